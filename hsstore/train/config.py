"""The draft model's configuration: derived from the target, or read from configs/draft/*.json.

An EAGLE-3 draft is one Llama decoder layer sized like its target: it reuses the target's token
embedding (so its hidden size is the target's), its attention geometry and its RoPE (the draft
shares the target's positions). Only the draft vocabulary and the three aux layers are choices.
Every mismatch with a store is caught here, before any tensor is built, with the number on each side.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import HSStoreError
from ..generate.layers import default_aux_layer_ids

NUM_AUX_LAYERS = 3  # EAGLE-3 fuses a low, a middle and a high layer
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "draft"


@dataclass(frozen=True)
class DraftConfig:
    """Sizes of the draft's one decoder layer (the target's), its vocab, and the target facts it must match."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    target_vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]
    target_hidden_size: int
    target_num_layers: int
    rope_scaling: dict[str, Any] | None = None  # rope_type and its parameters; None = plain RoPE
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids))
        object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling))
        self._validate()

    def _validate(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise HSStoreError(f"draft config: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise HSStoreError(
                f"draft config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if len(self.aux_layer_ids) != NUM_AUX_LAYERS:
            raise HSStoreError(
                f"draft config: EAGLE-3 fuses exactly {NUM_AUX_LAYERS} aux layers, got {len(self.aux_layer_ids)} "
                f"({list(self.aux_layer_ids)}); regenerate the store with --layer-ids a,b,c"
            )
        bad = [i for i in self.aux_layer_ids if not 0 <= i <= self.target_num_layers]
        if bad:
            raise HSStoreError(
                f"draft config: aux layer ids {bad} outside 0..{self.target_num_layers} "
                f"(the target has {self.target_num_layers} layers)"
            )
        if self.hidden_size != self.target_hidden_size:
            raise HSStoreError(
                f"draft config: hidden_size {self.hidden_size} != target_hidden_size {self.target_hidden_size}; the "
                "draft reuses the target's token embedding, so it must be as wide as the target"
            )
        if not 0 < self.draft_vocab_size <= self.target_vocab_size:
            raise HSStoreError(
                f"draft config: draft_vocab_size {self.draft_vocab_size} must be within 1..{self.target_vocab_size} "
                "(the target vocab)"
            )

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_target(
        cls,
        target: str | Path | dict[str, Any] | Any,
        draft_vocab_size: int,
        aux_layer_ids: tuple[int, ...] | list[int] | None = None,
    ) -> DraftConfig:
        """Sizes from a Llama/Qwen-style target: a model directory, a config dict or a transformers config."""
        if isinstance(target, (str, Path)):
            from ..targetweights import read_target_config

            config = read_target_config(target)
        elif isinstance(target, dict):
            config = target
        else:  # a transformers PretrainedConfig
            config = target.get_text_config().to_dict() if hasattr(target, "get_text_config") else target.to_dict()
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            num_layers = int(config["num_hidden_layers"])
            theta, scaling = _rope_from_target(config)
            return cls(
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                target_vocab_size=int(config["vocab_size"]),
                draft_vocab_size=int(draft_vocab_size),
                aux_layer_ids=tuple(aux_layer_ids) if aux_layer_ids else tuple(default_aux_layer_ids(num_layers)),
                target_hidden_size=hidden,
                target_num_layers=num_layers,
                hidden_act=str(config.get("hidden_act", "silu")),
            )
        except KeyError as e:
            raise HSStoreError(f"target config has no {e.args[0]!r}: not a Llama/Qwen-style decoder config") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> DraftConfig:
        """Keys starting with '_' are comments; unknown keys are errors (a typo must not pass silently)."""
        data = {k: v for k, v in {**data, **overrides}.items() if not k.startswith("_")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HSStoreError(f"draft config: unknown keys {unknown}; known keys: {sorted(known)}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise HSStoreError(f"draft config: missing keys {missing}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> DraftConfig:
        """A JSON or YAML file; a bare name like 'llama-3.1-8b' means configs/draft/llama-3.1-8b.json."""
        path = Path(path)
        if not path.exists() and (CONFIG_DIR / f"{path.name}.json").is_file():
            path = CONFIG_DIR / f"{path.name}.json"
        if not path.is_file():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.is_dir() else []
            raise HSStoreError(f"draft config {path} not found; bundled configs: {names}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise HSStoreError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        try:
            return cls.from_dict(data, **overrides)
        except HSStoreError as e:
            raise HSStoreError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # --- compatibility ------------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """transformers-5 style: theta, type and scaling parameters in one dict."""
        return {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}

    def check_store(self, manifest: Any, draft_vocab_size: int | None = None) -> None:
        """Refuse a store made for another target or with other aux layers (`manifest`: hsstore Manifest)."""
        where = f"store of {manifest.target.name_or_path}"
        t = manifest.target
        pairs = [
            ("hidden size", t.hidden_size, self.target_hidden_size),
            ("number of layers", t.num_layers, self.target_num_layers),
            ("vocab size", t.vocab_size, self.target_vocab_size),
        ]
        for what, store_value, ours in pairs:
            if store_value != ours:
                raise HSStoreError(
                    f"{where}: target {what} is {store_value}, the draft config expects {ours}; "
                    "is the draft config for another target?"
                )
        try:
            aux = manifest.hidden_spec("aux")
            if getattr(manifest, "teacher", None) is None:  # without a stored top-k, the teacher reads `last`
                manifest.hidden_spec("last")
        except KeyError as e:
            raise HSStoreError(
                f"{where}: {e.args[0]}; EAGLE-3 training needs role 'aux' and a teacher: role 'last' or a top-k teacher"
            ) from None
        if len(aux.layer_ids) != NUM_AUX_LAYERS:
            raise HSStoreError(
                f"{where}: holds {len(aux.layer_ids)} aux layers {list(aux.layer_ids)}; EAGLE-3 needs exactly "
                f"{NUM_AUX_LAYERS}; regenerate with --layer-ids a,b,c"
            )
        if tuple(aux.layer_ids) != self.aux_layer_ids:
            raise HSStoreError(
                f"{where}: aux layers {list(aux.layer_ids)}, the draft config says {list(self.aux_layer_ids)}; "
                "vLLM feeds the draft the layers its config names, so they must be the stored ones"
            )
        if aux.hidden_size != self.target_hidden_size:
            raise HSStoreError(f"{where}: aux arrays are {aux.hidden_size} wide, expected {self.target_hidden_size}")
        if draft_vocab_size is not None and draft_vocab_size != self.draft_vocab_size:
            raise HSStoreError(
                f"{where}: its draft vocab has {draft_vocab_size} tokens, the draft config says "
                f"{self.draft_vocab_size}; rebuild with `hsstore vocab --draft-vocab-size {self.draft_vocab_size}`"
            )


def _rope_from_target(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either transformers-5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" not in params and "full_attention" in params:  # per-layer-type parameters
            params = params["full_attention"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(params.get("rope_theta", 10000.0)), scaling
    return float(config.get("rope_theta", 10000.0)), config.get("rope_scaling")


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Legacy 'type' -> 'rope_type'; plain RoPE -> None."""
    if not scaling:
        return None
    scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
        return None
    return scaling
