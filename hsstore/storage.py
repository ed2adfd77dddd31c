"""Opening the zarr store behind a path or fsspec URL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> Path | None:
    """The filesystem path of a local store, or None for remote URLs."""
    if is_remote(location):
        return None
    return Path(location.removeprefix("file://"))


def open_store(location: str, read_only: bool) -> Store:
    """LocalStore for paths (its writes are atomic renames), FsspecStore for URLs (s3://, gs://, ...)."""
    path = local_path(location)
    if path is not None:
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(location, read_only=read_only)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename, as zarr's LocalStore does (same `.partial` temp names, so a
    killed write leaves what resume sweeps), without zarr's event-loop round trip on the writer thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
