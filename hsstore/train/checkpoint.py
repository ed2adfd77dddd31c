"""Training checkpoints: accelerate's state plus what accelerate does not know (step, data position).

A checkpoint is OUT/checkpoints/step-XXXXXXX holding:
- accelerate's `save_state` files: model, optimizer, registered scheduler, every rank's RNG states
  (model.safetensors under single-process/DDP, pytorch_model_fsdp_0/ + optimizer_0/ under FSDP);
- rank-RRRRR.pt per rank: the TrainLoader position and the noise generator, so the data order and the
  noise resume exactly;
- hsstore_train.json: the step, the world size, the draft config and the run's settings (what
  `hsstore eval` and `hsstore export` need to rebuild the draft without the original command).

Every rank writes into a hidden temp dir; rank 0 renames it into place only after all ranks finished,
so a crash mid-save never leaves a directory that looks complete. Older checkpoints beyond `keep` go.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import HSStoreError

CHECKPOINTS = "checkpoints"
META_FILE = "hsstore_train.json"
PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"{PREFIX}{step:07d}"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (temp dirs of a crashed save are skipped)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a training OUT dir (its latest checkpoint)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise HSStoreError(f"{path}: neither a checkpoint (no {META_FILE}) nor a training dir with {CHECKPOINTS}/")
    return latest


def save_checkpoint(
    accelerator: Any, out: str | Path, step: int, meta: dict[str, Any], rank_state: dict[str, Any], keep: int
) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = checkpoint_dir(out, step)
    temp = final.with_name(TEMP_PREFIX + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)  # leftovers of a save that crashed
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    torch.save(rank_state, temp / f"rank-{accelerator.process_index:05d}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        body = {"format_version": FORMAT_VERSION, "step": step, "world_size": accelerator.num_processes, **meta}
        (temp / META_FILE).write_text(json.dumps(body, indent=2) + "\n")
        if final.exists():  # the same step saved again (a resumed run re-saving its start)
            shutil.rmtree(final)
        temp.rename(final)
        for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = json.loads((Path(path) / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise HSStoreError(
            f"{path}: checkpoint format {meta.get('format_version')}, this hsstore reads {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(accelerator: Any, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective: restores what accelerate saved; returns (meta, this rank's extra state)."""
    path = Path(path)
    meta = read_meta(path)
    if meta["world_size"] != accelerator.num_processes:
        raise HSStoreError(
            f"{path} was written by {meta['world_size']} processes, this run has {accelerator.num_processes}; "
            "the data order and optimizer shards resume exactly only with the same number"
        )
    accelerator.load_state(str(path))
    rank_state = torch.load(path / f"rank-{accelerator.process_index:05d}.pt", weights_only=True)
    return meta, rank_state


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The draft's full state dict from a checkpoint, in one process, whatever wrote it (single, DDP, FSDP)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    elif (path / "pytorch_model_fsdp_0").is_dir():
        state = _merge_sharded(path / "pytorch_model_fsdp_0")
    elif (path / "pytorch_model_fsdp.bin").is_file():
        state = torch.load(path / "pytorch_model_fsdp.bin", map_location="cpu", weights_only=True)
    else:
        raise HSStoreError(f"{path}: no model weights (model.safetensors, pytorch_model*.bin or pytorch_model_fsdp_0/)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def restore_draft(path: str | Path) -> Any:
    """The trained draft of a checkpoint on the CPU; its embedding comes from the checkpoint, so no target is read."""
    from .config import DraftConfig
    from .model import Eagle3Draft

    state = load_model_state(path)
    config = DraftConfig.from_dict(read_meta(path)["draft_config"])
    draft = Eagle3Draft(config, state["d2t"], state["t2d"], embed=state["embed_tokens.weight"])
    draft.load_state_dict(state)
    return draft


def _merge_sharded(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """FSDP's sharded (torch.distributed.checkpoint) files -> one full state dict, no process group needed."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "model.pt"
        dcp_to_torch_save(dcp_dir, merged)
        state = torch.load(merged, map_location="cpu", weights_only=True)
    return state.get("model", state)  # accelerate nests the model's entries under "model"
