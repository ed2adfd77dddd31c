"""Write a trained draft as a directory vLLM (and SGLang) load as an EAGLE-3 speculator.

Two config flavours over the same weights (fc, midlayer.*, norm, lm_head, d2t, t2d; no embed_tokens,
vLLM shares the target's):
- "vllm": a Llama config with architectures ["LlamaForCausalLMEagle3"] and
  eagle_config.eagle_aux_hidden_state_layer_ids; serve the target with
  --speculative-config '{"method": "eagle3", "model": DIR, "num_speculative_tokens": 3}'.
- "speculators": the vllm-project/speculators layout (speculators_model_type "eagle3", a
  transformer_layer_config, the verifier's path and the proposal method); `vllm serve DIR` then starts
  the verifier with this draft by itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import HSStoreError
from .config import DraftConfig
from .model import Eagle3Draft

ExportFormat = Literal["vllm", "speculators"]
WEIGHTS_FILE = "model.safetensors"
SPECULATORS_VERSION = "0.3.0"  # the config layout vLLM 0.32's SpeculatorsConfig reads
EXPORTED_NAMES = frozenset(
    ["fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"]
    + [f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")]
    + [f"midlayer.self_attn.{n}_proj.weight" for n in "qkvo"]
    + [f"midlayer.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
)


def export_state_dict(
    config: DraftConfig, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The draft's weights under the names vLLM loads, floats cast to `dtype`.

    d2t/t2d are left out when the draft vocab is the whole target vocab: vLLM then has no mapping to load."""
    full_vocab = config.draft_vocab_size == config.target_vocab_size
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith("embed_tokens.") or (full_vocab and name in ("d2t", "t2d")):
            continue
        t = tensor.detach().to("cpu")
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def llama_layer_config(config: DraftConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The one-layer Llama config of the draft; RoPE written both the transformers-5 and the legacy way."""
    return {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rope_parameters": config.rope_parameters,
        "vocab_size": config.target_vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _target_info(target_dir: str | Path | None) -> dict[str, Any]:
    if target_dir is None:
        return {}
    from ..targetweights import read_target_config

    return read_target_config(target_dir)


def vllm_config(config: DraftConfig, target: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out = {"architectures": ["LlamaForCausalLMEagle3"], **llama_layer_config(config, dtype)}
    out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids), "use_aux_hidden_state": True}
    out["norm_before_residual"] = False  # the hidden stream enters the residual before hidden_norm
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if target.get(key) is not None:
            out[key] = target[key]
    return out


def speculators_config(
    config: DraftConfig, target: dict[str, Any], target_dir: str | Path, dtype: torch.dtype, speculative_tokens: int
) -> dict[str, Any]:
    """No top-level model_type: that is how vLLM recognises the speculators format."""
    verifier = {"name_or_path": str(target_dir), "architectures": target.get("architectures", ["LlamaForCausalLM"])}
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "norm_before_residual": False,  # vLLM's speculators default is True; this draft adds the residual first
        "norm_before_fc": False,
        "eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids),
        "transformer_layer_config": {"architectures": ["LlamaForCausalLM"], **llama_layer_config(config, dtype)},
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "verifier": verifier,
        },
    }


def export_draft(
    draft: Eagle3Draft,
    out_dir: str | Path,
    target_dir: str | Path | None = None,
    format: ExportFormat = "vllm",
    *,
    dtype: torch.dtype = torch.bfloat16,
    speculative_tokens: int = 3,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json + model.safetensors to `out_dir`; `target_dir` (the verifier) is required for
    "speculators" and supplies token ids for "vllm". `state_dict`: a full (gathered) state dict to write
    instead of `draft.state_dict()`, e.g. `accelerator.get_state_dict(model)` under FSDP."""
    from safetensors.torch import save_file

    if format not in ("vllm", "speculators"):
        raise HSStoreError(f"export format {format!r}: choose 'vllm' or 'speculators'")
    if format == "speculators" and target_dir is None:
        raise HSStoreError("the speculators format names its verifier: pass target_dir")
    target = _target_info(target_dir)
    if target and int(target.get("hidden_size", draft.config.target_hidden_size)) != draft.config.target_hidden_size:
        raise HSStoreError(
            f"{target_dir}: hidden size {target['hidden_size']}, the draft was built for "
            f"{draft.config.target_hidden_size}; export against the target it was trained for"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if format == "vllm":
        config = vllm_config(draft.config, target, dtype)
    else:
        assert target_dir is not None
        config = speculators_config(draft.config, target, target_dir, dtype, speculative_tokens)
    config["hsstore"] = {"aux_layer_ids": list(draft.config.aux_layer_ids), "target": str(target_dir or "")}
    weights = export_state_dict(draft.config, draft.state_dict() if state_dict is None else state_dict, dtype)
    full_vocab = draft.config.draft_vocab_size == draft.config.target_vocab_size
    missing = sorted(EXPORTED_NAMES - set(weights) - ({"d2t", "t2d"} if full_vocab else set()))
    if missing:
        raise HSStoreError(f"export: the state dict lacks {missing}; pass the full (unsharded) draft state")
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
