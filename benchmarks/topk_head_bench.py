"""Top-k head benchmark: what the default's top-k teacher costs, and what asking vLLM for it would cost instead.

`hsstore generate --teacher topk` computes the target's top-k next-token log-probs after the forward, on the
captured last layer, at teacher positions only (hsstore.generate.head.TopkHead). vLLM can return a top-k itself
(SamplingParams(prompt_logprobs=k)), but it then computes logits at every prompt position and hands them back as
Python objects. Over the same ShareGPT samples of generate_bench's large target (hidden 1024), from the same run:

    vLLM prefill            LLM.generate(max_tokens=1), prefix caching off: the forward vLLM runs anyway
    vLLM prefill + top-k    the same with prompt_logprobs=k: vLLM's own top-k at every prompt position
    hsstore top-k head      TopkHead.teachers on the last layer (captured once with the hf backend, untimed)

It prints wall seconds (best of --repeats) and each extra's cost as a share of vLLM's prefill, and checks that
the two agree: the share of teacher positions where vLLM's top-1 token is the head's.

    python benchmarks/topk_head_bench.py      # ~2 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from generate_bench import DEFAULT_TOPK, Target, prepare_target, quiet_libraries
from generate_bench import parse_args as generate_bench_args
from rich.table import Table
from store_bench import console, hsstore_revision, log

from hsstore.generate.backends import load_backend
from hsstore.generate.head import TopkHead


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    """Fastest of `repeats` timed calls, and the last call's result."""
    walls, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - start)
    return min(walls), out


def captured_last_layer(target: Target) -> list[list[torch.Tensor]]:
    """Each batch's last-layer states ([n, H] per sample) from the hf backend: the head's input."""
    backend = load_backend("hf", str(target.path))
    n = target.spec.layers
    return [[h[:, 0] for h in backend.hidden_states([s.input_ids for s in b], [n])] for b in target.batches]


def head_pass(head: TopkHead, target: Target, last: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The head over every batch, as run_generate calls it; returns each sample's top-k ids."""
    ids = []
    for batch, states in zip(target.batches, last, strict=True):
        ids += [t[1] for t in head.teachers(states, [s.loss_mask for s in batch])]
    return ids


def top1_agreement(target: Target, head_ids: list[torch.Tensor], vllm_outputs: list) -> float:
    """Share of teacher positions j (loss_mask[j + 1] == 1) where vLLM's rank-1 token at prompt position j + 1
    is the head's top-1 for row j (the same distribution: the next token after position j)."""
    by_id = {tuple(o.prompt_token_ids): o for o in vllm_outputs}
    ordered = [s for b in target.batches for s in b]
    agree = total = 0
    for sample, ids in zip(ordered, head_ids, strict=True):
        logprobs = by_id[tuple(sample.input_ids.tolist())].prompt_logprobs
        for j in np.flatnonzero(np.asarray(sample.loss_mask)[1:]):
            rank1 = next(t for t, lp in logprobs[j + 1].items() if lp.rank == 1)
            agree += int(rank1 == int(ids[j, 0]))
            total += 1
    return agree / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=12, help="ShareGPT conversations (default 12)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=DEFAULT_TOPK)
    a = p.parse_args(argv)
    cfg = generate_bench_args(["--targets", "large", "--large-conversations", str(a.conversations)])
    quiet_libraries()
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.kv_cache_gib:g}")
    target = prepare_target(cfg.targets[0], cfg)
    teacher_positions = sum(int(np.asarray(s.loss_mask)[1:].sum()) for s in target.data.samples)
    console.print(f"[bold]top-k head benchmark[/bold] (k = {a.k}); hsstore {hsstore_revision()}")
    console.print(
        f"{target.describe()}; {teacher_positions:,} teacher positions; {cfg.threads} torch thread(s); "
        f"vLLM eager, prefix caching off; best of {a.repeats}"
    )

    last = captured_last_layer(target)
    head = TopkHead.from_target(target.path, a.k)
    head_pass(head, target, last)  # warm-up
    head_s, head_ids = best_of(a.repeats, lambda: head_pass(head, target, last))
    log(f"hsstore head: {head_s:.2f} s")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        str(target.path),
        max_model_len=cfg.seq_length + 1,
        enforce_eager=True,
        enable_prefix_caching=False,  # every repeat must run the whole prefill
        dtype="bfloat16",
    )
    prompts = [TokensPrompt(prompt_token_ids=s.input_ids.tolist()) for b in target.batches for s in b]
    plain = SamplingParams(max_tokens=1, temperature=0.0)
    with_topk = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=a.k)
    llm.generate(prompts, plain, use_tqdm=False)  # warm-up
    walls: dict[str, list[float]] = {"plain": [], "topk": []}
    outputs = None
    for _ in range(a.repeats):  # interleaved, so drift favours neither
        for name, params in (("plain", plain), ("topk", with_topk)):
            start = time.perf_counter()
            out = llm.generate(prompts, params, use_tqdm=False)
            walls[name].append(time.perf_counter() - start)
            outputs = out if name == "topk" else outputs
    prefill_s, vllm_topk_s = min(walls["plain"]), min(walls["topk"])

    table = Table(title=f"top-{a.k} next-token log-probs: cost over vLLM's prefill", title_justify="left")
    for col in ("", "wall s (best)", "repeats", "cost over the prefill", "positions"):
        table.add_column(col, justify="right" if col else "left")
    spread = {k: ", ".join(f"{w:.2f}" for w in v) for k, v in walls.items()}
    tokens = target.tokens
    table.add_row("vLLM prefill", f"{prefill_s:.2f}", spread["plain"], "-", f"{tokens:,}")
    table.add_row(
        f"vLLM prefill + prompt_logprobs={a.k}",
        f"{vllm_topk_s:.2f}",
        spread["topk"],
        f"{vllm_topk_s / prefill_s - 1:.1%}",
        f"{tokens - len(prompts):,} (every prompt position)",
    )
    table.add_row(
        "hsstore top-k head",
        f"{head_s:.2f}",
        "",
        f"{head_s / prefill_s:.1%}",
        f"{teacher_positions:,} (teacher positions)",
    )
    console.print(table)
    agreement = top1_agreement(target, head_ids, outputs)
    console.print(f"top-1 agreement, vLLM's prompt logprobs vs the hsstore head, at teacher positions: {agreement:.2%}")


if __name__ == "__main__":  # required: vLLM may spawn processes that re-import this module
    sys.exit(main())
