"""What `hsstore inspect` shows: manifest, sizes and compression, token frequencies, a sample.

Sizes come from listing the store's files (fsspec, so remote stores work too); logical sizes from
the manifest (bf16 = 2 bytes per value), so the ratio is exactly what the codec bought. A top-k teacher
that replaces the last layer counts, logically, as that bf16 [T, H] layer (`layout.teacher_logical_row_bytes`):
its ratio and the store's total then say how much smaller the store is than one keeping the last layer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import fsspec
import numpy as np

from . import dtypes, layout
from .manifest import Manifest
from .reader import StoreReader


@dataclass(frozen=True)
class ArraySize:
    name: str
    stored_bytes: int
    logical_bytes: int

    @property
    def ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else float("nan")


def file_sizes(location: str) -> dict[str, int]:
    """Relative path -> size of every file under the store."""
    fs, root = fsspec.core.url_to_fs(location)
    root = root.rstrip("/")
    return {p[len(root) + 1 :]: int(info["size"]) for p, info in fs.find(root, detail=True).items()}


def array_sizes(reader: StoreReader, files: dict[str, int]) -> list[ArraySize]:
    """Stored vs logical bytes per hidden role (fp8 scales count toward their role) and for tokens."""
    stored: dict[str, int] = defaultdict(int)
    for path, size in files.items():
        parts = path.split("/")
        if parts[0] != layout.PARTS_GROUP or len(parts) < 4:
            continue
        if parts[2] == "hidden":
            stored[f"hidden/{parts[3].removesuffix('_scale')}"] += size
        elif parts[2] in ("input_ids", "loss_mask", layout.TEACHER_GROUP):
            stored[parts[2]] += size
    tokens = reader.num_tokens
    out = [ArraySize("input_ids", stored["input_ids"], 4 * tokens), ArraySize("loss_mask", stored["loss_mask"], tokens)]
    for spec in reader.manifest.hidden:
        itemsize = dtypes.torch_dtype(spec.logical_dtype).itemsize
        logical = tokens * int(np.prod(spec.per_token_shape)) * itemsize
        out.append(ArraySize(f"hidden/{spec.role}", stored[f"hidden/{spec.role}"], logical))
    t = reader.manifest.teacher
    if t is not None:
        name = f"{layout.TEACHER_GROUP} (top-{t.k}{'' if 'last' in reader.manifest.roles else ', for last'})"
        logical = tokens * layout.teacher_logical_row_bytes(reader.manifest)
        out.append(ArraySize(name, stored[layout.TEACHER_GROUP], logical))
    return out


def teacher_description(manifest: Manifest) -> str | None:
    """One line for inspect: what the teacher holds and what it was computed from."""
    t = manifest.teacher
    if t is None:
        return None
    kept = "beside the last layer" if "last" in manifest.roles else "instead of the last layer"
    return (
        f"top-{t.k} log-probs of layer [{t.layer_id}] through the final norm and lm_head, {kept}; "
        f"ids {t.ids_dtype}, log-probs {t.logprob_dtype} (floor {t.logprob_floor:g}), rows at teacher positions only"
    )


def top_tokens(freq: np.ndarray, k: int) -> list[tuple[int, int]]:
    order = np.argsort(-freq, kind="stable")[:k]
    return [(int(t), int(freq[t])) for t in order if freq[t] > 0]
