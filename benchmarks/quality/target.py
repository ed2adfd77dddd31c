"""A small Llama target trained on real ShareGPT chats, so that a draft has something real to learn.

The tokenizer and chat template come from hsstore's tiny-target machinery (`hsstore.generate.tiny`:
a byte-level BPE trained here, the Llama-3 style template and its special tokens). The model is a
LlamaForCausalLM trained from scratch with a plain torch loop on the CPU: the conversations are
rendered with the chat template (headers, <|eot_id|> and all), concatenated and cut into blocks of
`context` tokens, and every token is trained on, so the target learns the chat format and ends its
replies with <|eot_id|> like a real chat model. fp32 master weights, saved in bf16 (real targets are
bf16; `hsstore generate` and vLLM run it in bf16).

The result is a normal transformers directory (config.json, model.safetensors, tokenizer files with
the chat template), cached under the benchmark's cache dir by a hash of this config; a stamp file
holds the config and the loss curve, and the build is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STAMP = "quality_target.json"


@dataclass(frozen=True)
class TargetConfig:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # BPE vocab, special tokens included
    context: int  # tokens per training sequence
    batch: int  # sequences per step
    steps: int
    lr: float
    warmup: int
    seed: int
    tokenizer_chars: int  # characters of conversation text the BPE is trained on
    max_conversation_tokens: int  # train on each conversation's first this many tokens (0: all of it)
    threads: int = 2
    version: int = 1  # bump when the recipe changes

    def identity(self) -> dict[str, Any]:
        """What decides the weights: everything but the thread count."""
        return {k: v for k, v in asdict(self).items() if k != "threads"}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def matches(self, stamp: dict[str, Any] | None) -> bool:
        """Whether a stamp was written for a target built with this config."""
        config = (stamp or {}).get("config", {})
        return {k: v for k, v in config.items() if k != "threads"} == self.identity()

    def describe(self) -> str:
        return (
            f"Llama {self.layers} layers, hidden {self.hidden}, {self.heads} heads / {self.kv_heads} kv, MLP "
            f"{self.intermediate}, vocab {self.vocab}; trained {self.steps} steps x {self.batch} x {self.context} "
            f"tokens, lr {self.lr:g}"
        )


def read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / STAMP).read_text())
    except (OSError, ValueError):
        return None


def tokenizer_lines(conversations: Sequence[dict[str, Any]], chars: int) -> list[str]:
    """Non-empty lines of message text, up to about `chars` characters."""
    lines: list[str] = []
    total = 0
    for conv in conversations:
        for message in conv["messages"]:
            for line in message["content"].splitlines():
                if line.strip():
                    lines.append(line)
                    total += len(line)
        if total >= chars:
            break
    return lines


def token_stream(conversations: Sequence[dict[str, Any]], tokenizer: Any, tokens: int, cut: int) -> list[int]:
    """Rendered, tokenized conversations (each cut to `cut` tokens if > 0) back to back, until `tokens` tokens
    (or the data runs out)."""
    out: list[int] = []
    batch = 64
    for start in range(0, len(conversations), batch):
        texts = [
            tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in conversations[start : start + batch]
        ]
        limit = {"truncation": True, "max_length": cut} if cut else {}
        for ids in tokenizer(texts, add_special_tokens=False, **limit)["input_ids"]:
            out.extend(ids)
        if len(out) >= tokens:
            break
    return out


def build_target(
    cfg: TargetConfig, conversations: Sequence[dict[str, Any]], out: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Train (or reuse) the target in `out`; returns its stamp (config, loss curve, seconds)."""
    stamp = read_stamp(out)
    if cfg.matches(stamp):
        return stamp  # type: ignore[return-value]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hsstore.generate.tiny import STYLES, train_tokenizer

    shutil.rmtree(out, ignore_errors=True)
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.set_num_threads(cfg.threads)
    started, load = time.perf_counter(), os.getloadavg()[0]

    tokenizer = train_tokenizer(
        STYLES["llama3"], cfg.vocab, tokenizer_lines(conversations, cfg.tokenizer_chars), max_length=2048
    )
    tokenizer.save_pretrained(staging)
    rows = list(conversations)
    random.Random(cfg.seed).shuffle(rows)
    need = cfg.steps * cfg.batch * cfg.context
    stream = token_stream(rows, tokenizer, need, cfg.max_conversation_tokens)
    blocks = torch.tensor(stream[: len(stream) // cfg.context * cfg.context]).view(-1, cfg.context)
    epochs = need / max(1, blocks.numel())
    log(
        f"target: tokenizer ({len(tokenizer)} tokens) and {blocks.numel():,} training tokens ready in "
        f"{time.perf_counter() - started:.0f} s ({epochs:.2f} epochs)"
    )

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.seed))
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    train_start = time.perf_counter()
    every = max(1, cfg.steps // 20)
    for step in range(cfg.steps):
        rows_at = [(step * cfg.batch + i) % len(blocks) for i in range(cfg.batch)]
        batch = blocks[order[rows_at]]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window.append(loss.detach().item())
        if step == 0 or (step + 1) % every == 0 or step + 1 == cfg.steps:
            mean = sum(window) / len(window)
            curve.append((step + 1, mean))
            window = []
            elapsed = time.perf_counter() - train_start
            rate = (step + 1) * cfg.batch * cfg.context / elapsed
            log(f"target: step {step + 1}/{cfg.steps} loss {mean:.3f} ({rate:,.0f} tok/s, {elapsed:.0f} s)")
    seconds = time.perf_counter() - started
    model.to(torch.bfloat16).save_pretrained(staging)
    stamp = {
        "config": asdict(cfg),
        "loss_curve": curve,
        "train_tokens": cfg.steps * cfg.batch * cfg.context,
        "data_tokens": int(blocks.numel()),
        "seconds": seconds,
        "load": load,  # 1-min load average at the start: over the cpu count, other jobs shared the cpus
    }
    (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    staging.rename(out)
    return stamp
