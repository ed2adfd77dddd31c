"""Training-loader throughput: hsstore stores (raw, lossless, fp8) vs one .pt file per sample.

Every variant runs the same TrainLoader (same seeded plan, packing, workers and collate); only the
per-sample read differs: StoreReader[i] or torch.load of `{input_ids, loss_mask, aux, last}`.
fp8 batches are dequantized by `to_device` on the CPU here, inside the timing (single-threaded, slow);
in training that runs on the GPU, so the row "fp8, dequant left to GPU" is the host-side cost that matters.
Synthetic Gaussian activations: compression ratios are not representative (see store_bench.py), and
all files sit in the page cache after writing, so this measures decode + packing, not the disk.

    python benchmarks/train_data_bench.py             # ~2 min on 2 cores
    python benchmarks/train_data_bench.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hsstore import Geometry, HiddenSpec, Manifest, StoreWriter, TargetInfo
from hsstore.train.data import SampleDataset
from hsstore.train.loader import TrainLoader
from hsstore.train.sampler import PackedBatchSampler

AUX_LAYERS = (2, 16, 29)
NUM_LAYERS = 32


class PtDataset(torch.utils.data.Dataset):
    """The baseline: one torch.save pickle per sample, read whole with torch.load."""

    def __init__(self, root: Path, lengths: np.ndarray) -> None:
        self.root, self.lengths = root, lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return torch.load(self.root / f"{i:07d}.pt", weights_only=True)


def make_samples(n: int, hidden: int, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    lengths = np.random.default_rng(seed).integers(128, 2048, n)
    for length in lengths.tolist():
        yield {
            "input_ids": torch.randint(0, 32000, (length,), generator=rng),
            "loss_mask": (torch.rand(length, generator=rng) > 0.5).to(torch.uint8),
            "aux": torch.randn(length, 3, hidden, generator=rng).to(torch.bfloat16),
            "last": torch.randn(length, hidden, generator=rng).to(torch.bfloat16),
        }


def write_all(root: Path, n: int, hidden: int) -> dict[str, Path]:
    paths = {c: root / c for c in ("raw", "lossless", "fp8")}
    for codec, path in paths.items():
        manifest = Manifest(
            target=TargetInfo("synthetic", hidden, NUM_LAYERS, 32000),
            hidden=(HiddenSpec("aux", AUX_LAYERS, hidden, codec), HiddenSpec("last", (NUM_LAYERS,), hidden, codec)),
            geometry=Geometry(64, 16384),
        )
        with StoreWriter(str(path), manifest) as w:
            for i, s in enumerate(make_samples(n, hidden)):
                w.append(s["input_ids"], s["loss_mask"], {"aux": s["aux"], "last": s["last"]}, sample_id=f"s{i}")
    paths["pt"] = root / "pt"
    paths["pt"].mkdir()
    for i, s in enumerate(make_samples(n, hidden)):
        torch.save({**s, "input_ids": s["input_ids"].to(torch.int32)}, paths["pt"] / f"{i:07d}.pt")
    return paths


def measure(name: str, path: Path, args: argparse.Namespace, dequantize: bool = True) -> tuple[float, float, int]:
    """(batches/s, tokens/s, bytes on disk) over one epoch."""
    if name == "pt":
        lengths = np.array([int(torch.load(p, weights_only=True)["input_ids"].numel()) for p in sorted(path.iterdir())])
        dataset = PtDataset(path, lengths)
    else:
        dataset = SampleDataset(str(path), decode=False, max_tokens=args.max_tokens)
        lengths = dataset.lengths
    sampler = PackedBatchSampler(lengths, args.max_tokens, seed=0)
    loader = TrainLoader(dataset, sampler, num_workers=args.workers, prefetch_factor=2)
    batches = tokens = 0
    start = time.perf_counter()  # a whole epoch, worker start-up included (the same for every format)
    for batch in loader:
        if dequantize:
            batch = loader.to_device(batch, "cpu")
        batches += 1
        tokens += int((batch["seq_ids"] >= 0).sum())
    elapsed = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return batches / elapsed, tokens / elapsed, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="epochs per format; the best is reported")
    ap.add_argument("--quick", action="store_true", help="120 samples, hidden 256")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.hidden = 120, 256
    torch.set_num_threads(1)
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="hsstore-train-bench-") as tmp:
        t0 = time.perf_counter()
        paths = write_all(Path(tmp), args.samples, args.hidden)
        console.print(f"wrote {args.samples} samples x 4 formats in {time.perf_counter() - t0:.0f} s")
        runs = [(name, path, True) for name, path in paths.items()] + [("fp8", paths["fp8"], False)]
        results = {}
        for name, path, deq in runs:  # best of --repeat epochs: the machine may be shared
            key = name if deq else "fp8, dequant left to GPU"
            results[key] = max((measure(name, path, args, deq) for _ in range(args.repeat)), key=lambda r: r[1])
    base_tps = results["pt"][1]
    table = Table(
        title=f"TrainLoader, {args.workers} workers, max_tokens {args.max_tokens}, hidden {args.hidden}, "
        f"{args.samples} samples (warm page cache)"
    )
    for col in ("format", "batches/s", "tokens/s", "vs .pt", "MB on disk"):
        table.add_column(col, justify="right")
    for name, (bps, tps, size) in results.items():
        table.add_row(name, f"{bps:.1f}", f"{tps:,.0f}", f"{tps / base_tps:.2f}x", f"{size / 1e6:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
