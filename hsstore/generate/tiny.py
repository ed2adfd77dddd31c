"""The embedded default target: a tiny random-weight Llama with a real BPE tokenizer and chat template.

Demos and tests need a target that loads offline through the ordinary `AutoModelForCausalLM` /
`AutoTokenizer` path, in a second, with the chat formats real targets use, so the same code paths run
as for an 8B model. Nothing comes from the hub: the byte-level BPE tokenizer is trained here on lines
of the bundled ShareGPT text (so token statistics look like chat, not like random bytes), and the
weights are random from a fixed seed.

Weights are saved in bfloat16 by default because real targets are bf16: the store's bf16 path
(uint16 + logical dtype) and the backends' dtype handling get exercised end to end. Pass
`dtype="float32"` for bit-exact CPU comparisons.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from ..errors import HSStoreError

TemplateName = Literal["llama3", "chatml", "mistral"]
STAMP = "hsstore_tiny_target.json"
BUILD_VERSION = 1  # bump when the build changes, so stale targets are rebuilt

_LLAMA3 = r"""{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

_CHATML = r"""{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# Mistral-instruct style: no assistant header (the reply follows [/INST]), the system prompt joins the
# first user turn, roles must alternate.
_MISTRAL = r"""{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
{%- set system_message = messages[0]['content'] %}
{%- set loop_messages = messages[1:] %}
{%- else %}
{%- set system_message = '' %}
{%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
{%- if message['role'] == 'user' %}
{%- if loop.first and system_message %}
{{- '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
{%- else %}
{{- '[INST] ' + message['content'] + ' [/INST]' }}
{%- endif %}
{%- elif message['role'] == 'assistant' %}
{{- ' ' + message['content'] + eos_token }}
{%- else %}
{{- raise_exception('Only user, assistant and system roles are supported') }}
{%- endif %}
{%- endfor %}"""


@dataclass(frozen=True)
class ChatStyle:
    """The special tokens a chat format needs and the template that uses them."""

    template: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    unk: str | None = None


STYLES: dict[str, ChatStyle] = {
    "llama3": ChatStyle(
        _LLAMA3,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|end_of_text|>",
    ),
    "chatml": ChatStyle(
        _CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, eos="<|im_end|>", pad="<|endoftext|>"
    ),
    "mistral": ChatStyle(
        _MISTRAL, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), bos="<s>", eos="</s>", pad="<unk>", unk="<unk>"
    ),
}


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny target; written to the stamp file to decide reuse."""

    template: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    dtype: str
    seed: int
    train_lines: int
    build_version: int = BUILD_VERSION


def training_lines(limit: int) -> list[str]:
    """Non-empty lines of message text from the bundled ShareGPT file, read only as far as needed."""
    from .skips import SkipCounter
    from .sources import iter_records, resolve_sources

    records = iter_records(resolve_sources(["sharegpt"])[0], SkipCounter())
    lines = (line for r in records for m in r.messages or () for line in m["content"].splitlines() if line.strip())
    return list(islice(lines, limit))


def train_tokenizer(style: ChatStyle, vocab_size: int, lines: list[str], max_length: int) -> Any:
    """A byte-level BPE (like Llama-3/Qwen) with the style's special tokens, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets must cover whole tokens for masks
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(style.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=style.bos,
        eos_token=style.eos,
        pad_token=style.pad,
        unk_token=style.unk,
        chat_template=style.template,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
        model_max_length=max_length,
    )


def _save_model(spec: TinySpec, tokenizer: Any, out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, spec.dtype)).save_pretrained(out_dir)


def _read_stamp(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, spec: TinySpec) -> bool:
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return _read_stamp(out_dir) == asdict(spec) and all((out_dir / name).is_file() for name in files)


def _clear_stale(out_dir: Path) -> None:
    """Remove an older tiny target at `out_dir`, but never a directory this module did not build."""
    if not out_dir.exists():
        return
    if _read_stamp(out_dir) is None and any(out_dir.iterdir()):
        raise HSStoreError(f"{out_dir} exists and is not a tiny target built by hsstore; choose another directory")
    shutil.rmtree(out_dir)


def build_tiny_target(
    out_dir: str | Path,
    template: TemplateName = "llama3",
    *,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 2,  # head_dim 32: vLLM's CPU attention rejects head_dim 16
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    dtype: Literal["bfloat16", "float32"] = "bfloat16",
    seed: int = 0,
    train_lines: int = 3000,
) -> Path:
    """Build (or reuse) a tiny Llama target with a `template`-style chat tokenizer in `out_dir`.

    `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` load it
    offline. A stamp file records the parameters: the same call on a complete target returns at once.
    The build happens in a sibling directory renamed into place, so a crash never leaves half a target.
    """
    if template not in STYLES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(STYLES)}")
    out_dir = Path(out_dir)
    spec = TinySpec(
        template, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
        max_position_embeddings, dtype, seed, train_lines,
    )  # fmt: skip
    if _is_complete(out_dir, spec):
        return out_dir
    _clear_stale(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = train_tokenizer(STYLES[template], vocab_size, training_lines(train_lines), max_position_embeddings)
    tokenizer.save_pretrained(staging)
    _save_model(spec, tokenizer, staging)
    (staging / STAMP).write_text(json.dumps(asdict(spec), indent=2) + "\n")
    try:
        staging.rename(out_dir)
    except OSError:  # another process finished the same build first
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(out_dir, spec):
            raise
    return out_dir
