"""One vLLM run: the target with an exported EAGLE-3 draft as its speculator, greedy, on held-out prompts.

    python benchmarks/quality/vllm_accept.py --target DIR --draft DIR --prompts prompts.jsonl --out result.json

Run as its own process per draft (vLLM's engine state does not come apart cleanly in one process, and
it needs the `__main__` guard). vLLM's CPU build, the engine core in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) with a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE), as the tests run it.
The prompts are user turns rendered by `LLM.chat` with the target tokenizer's chat template. Written:
vLLM's spec-decode counters (`LLM.get_metrics()`), the mean acceptance length 1 + accepted / drafts
(tokens per target forward of a drafting request), and every generated token id, so runs with
different drafts can be checked to produce the same greedy text.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--prompts", required=True, type=Path, help="JSONL of strings (user turns)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-speculative-tokens", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=8)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    prompts = [json.loads(line) for line in a.prompts.read_text().splitlines() if line.strip()]
    k = a.num_speculative_tokens
    llm = LLM(
        model=a.target,
        speculative_config={"method": "eagle3", "model": a.draft, "num_speculative_tokens": k},
        max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs,
        enforce_eager=True,
        disable_log_stats=False,
        dtype="bfloat16",
        seed=0,
    )
    loaded = time.perf_counter()
    chats = [[{"role": "user", "content": p}] for p in prompts]
    outputs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=a.max_tokens))
    generated = time.perf_counter()
    metrics = {m.name: m for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}
    drafts = int(metrics["vllm:spec_decode_num_drafts"].value)
    drafted = int(metrics["vllm:spec_decode_num_draft_tokens"].value)
    accepted = int(metrics["vllm:spec_decode_num_accepted_tokens"].value)
    per_position = [int(x) for x in metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values]
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    result = {
        "num_speculative_tokens": k,
        "prompts": len(prompts),
        "drafts": drafts,
        "draft_tokens": drafted,
        "accepted": accepted,
        "accepted_per_position": per_position,
        "acceptance_length": 1 + accepted / max(1, drafts),
        "acceptance_rate_per_position": [x / max(1, drafts) for x in per_position],
        "generated_tokens": sum(len(t) for t in token_ids),
        "finished_by_stop": sum(o.outputs[0].finish_reason == "stop" for o in outputs),
        "token_ids": token_ids,
        "first_output": outputs[0].outputs[0].text if outputs else "",
        "load_seconds": loaded - started,
        "generate_seconds": generated - loaded,
    }
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.rename(a.out)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
