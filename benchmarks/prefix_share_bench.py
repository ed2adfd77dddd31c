"""How much would deduplicating shared prefixes save? Measured on real ShareGPT with a real chat template.

In a causal target, two samples that start with the same tokens have identical hidden states over that
prefix, so a store could keep the prefix once. This script counts, over the offline ShareGPT package
rendered with a chat template and truncated like `hsstore generate`, the tokens that lie inside a prefix
some earlier sample already has (what a prefix-dedupe codec would drop), and the same with a fixed system
prompt of a Llama-3.1-style template prepended to every sample.

    python benchmarks/prefix_share_bench.py [--tokenizer DIR] [--seq-length 2048] [--system-tokens 25]

The tokenizer defaults to the embedded tiny target's (built on first use, as `hsstore demo` does).
"""

from __future__ import annotations

import argparse
import bisect
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent


def shared_prefix_tokens(samples: Sequence[tuple[int, ...]]) -> int:
    """Tokens of each sample inside its longest common prefix with any earlier sample, summed.

    Keeps earlier samples sorted; the longest common prefix with any of them is with a sorted neighbour."""
    seen: list[tuple[int, ...]] = []
    shared = 0
    for s in samples:
        at = bisect.bisect_left(seen, s)
        best = 0
        for j in (at - 1, at):
            if 0 <= j < len(seen):
                other = seen[j]
                n = min(len(s), len(other))
                k = next((i for i in range(n) if s[i] != other[i]), n)
                best = max(best, k)
        shared += best
        seen.insert(at, s)
    return shared


def tokenized_samples(tokenizer_dir: str, seq_length: int, limit: int | None) -> list[tuple[int, ...]]:
    from transformers import AutoTokenizer

    from hsstore.generate.chat import encode_record
    from hsstore.generate.skips import SkipCounter, SkipSample
    from hsstore.generate.sources import iter_records, resolve_sources

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for record in iter_records(resolve_sources(["sharegpt"])[0], SkipCounter()):
        try:
            encoded = encode_record(record, tok, seq_length)
        except SkipSample:  # counted and dropped by generate too
            continue
        out.append(tuple(encoded.input_ids))
        if limit and len(out) >= limit:
            break
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer directory with a chat template (default: the tiny target's)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--system-tokens", type=int, default=25, help="length of the fixed system prompt variant")
    p.add_argument("--limit", type=int, help="use the first N conversations")
    a = p.parse_args(argv)
    tokenizer = a.tokenizer
    if tokenizer is None:
        from hsstore.generate.tiny import build_tiny_target

        tokenizer = str(build_tiny_target(HERE / ".cache" / "tiny-llama3"))
    samples = tokenized_samples(tokenizer, a.seq_length, a.limit)
    total = sum(len(s) for s in samples)
    system = tuple(range(1, a.system_tokens + 1))  # any fixed ids: only equality matters
    with_system = [(system + s)[: a.seq_length] for s in samples]
    table = Table(title=f"shared prefixes: {len(samples):,} ShareGPT conversations, --seq-length {a.seq_length}")
    for col in ("samples as rendered", "tokens", "tokens in a prefix seen before", "share"):
        table.add_column(col, justify="right")
    for name, rows in (("chat template only", samples), (f"+ {a.system_tokens}-token system prompt", with_system)):
        n = sum(len(s) for s in rows)
        shared = shared_prefix_tokens(rows)
        table.add_row(name, f"{n:,}", f"{shared:,}", f"{shared / n:.1%}")
    Console(width=120).print(table)
    print(f"tokenizer: {tokenizer}; {total:,} tokens before the system-prompt variant")


if __name__ == "__main__":
    main()
