"""Shared fixtures of the store tests: tiny manifests, deterministic samples, and a writer helper.

Shapes are tiny but keep the store's real structure: H=64, chunks of 32 tokens, shards of 128, so
samples cross shard boundaries, and lossless aux chunks (32*3*64*2 = 12 KiB) stay above blosc's
minimum chunk size. Everything is written with real zarr under pytest's tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
import torch

from hsstore import Geometry, HiddenSpec, Manifest, SourceInfo, StoreWriter, TargetInfo
from hsstore.commit import CommitRecord

pytest_plugins = ["generate_fixtures"]

H = 64
VOCAB = 1000
NUM_LAYERS = 8
CHUNK_TOKENS = 32
SHARD_TOKENS = 128
AUX_LAYERS = (2, 4, 5)
# e4m3 keeps 3 mantissa bits: rounding a value scaled into [256, 448] costs at most 16/448 of the
# token's amax, and the bf16 result adds up to 2^-8 of it; measured worst case on random data: 0.0382.
FP8_MAX_ERR_OF_AMAX = 0.04


@dataclass
class Sample:
    """One sample as a generation backend hands it to the writer."""

    input_ids: torch.Tensor  # [n] int64
    loss_mask: torch.Tensor  # [n] uint8
    hidden: dict[str, torch.Tensor]  # aux [n, 3, H], last [n, H], bf16
    sample_id: str
    source: str = "src-a"

    def __len__(self) -> int:
        return len(self.input_ids)

    def append_to(self, writer: StoreWriter) -> None:
        writer.append(self.input_ids, self.loss_mask, self.hidden, sample_id=self.sample_id, source=self.source)


def build_manifest(
    codec: str = "lossless",
    *,
    hidden_size: int = H,
    chunk_tokens: int = CHUNK_TOKENS,
    shard_tokens: int = SHARD_TOKENS,
    num_parts: int = 1,
    max_seq_length: int | None = None,
    aux_layers: tuple[int, ...] = AUX_LAYERS,
    vocab_size: int = VOCAB,
) -> Manifest:
    return Manifest(
        target=TargetInfo("tiny-target", hidden_size, NUM_LAYERS, vocab_size),
        hidden=(
            HiddenSpec("aux", aux_layers, hidden_size, codec),
            HiddenSpec("last", (NUM_LAYERS,), hidden_size, codec),
        ),
        geometry=Geometry(chunk_tokens, shard_tokens),
        num_parts=num_parts,
        sources=(SourceInfo("src-a"), SourceInfo("src-b")),
        max_seq_length=max_seq_length,
    )


def build_sample(seed: int, n: int, *, hidden_size: int = H, vocab: int = VOCAB, source: str = "src-a") -> Sample:
    """Deterministic from (seed, n): bf16 activations with a per-token scale, as real ones vary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.4).to(torch.uint8)
    scale = torch.exp(torch.randn(n, 1, generator=g))
    aux = (torch.randn(n, 3, hidden_size, generator=g) * scale.unsqueeze(-1)).to(torch.bfloat16)
    last = (torch.randn(n, hidden_size, generator=g) * scale).to(torch.bfloat16)
    return Sample(ids, mask, {"aux": aux, "last": last}, sample_id=f"s{seed}", source=source)


@pytest.fixture
def store_path(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def make_manifest() -> Callable[..., Manifest]:
    return build_manifest


@pytest.fixture
def make_sample() -> Callable[..., Sample]:
    return build_sample


@pytest.fixture
def write_samples() -> Callable[..., CommitRecord]:
    """Write samples with one writer (closing it) and return the final commit record."""

    def write(location: str, manifest: Manifest, samples: Iterable[Sample], **writer_kwargs) -> CommitRecord:
        with StoreWriter(location, manifest, **writer_kwargs) as w:
            for s in samples:
                s.append_to(w)
        return w.commit

    return write


def check_sample(got: dict[str, torch.Tensor], want: Sample, codec: str) -> None:
    """Tokens and mask exact; hidden bit-exact for lossless codecs, within the fp8 bound otherwise."""
    assert got["input_ids"].dtype == torch.int32
    assert torch.equal(got["input_ids"].long(), want.input_ids.long()), want.sample_id
    assert torch.equal(got["loss_mask"], want.loss_mask.to(torch.uint8)), want.sample_id
    for role, ref in want.hidden.items():
        t = got[role]
        assert t.dtype == torch.bfloat16 and t.shape == ref.shape, (want.sample_id, role, t.dtype, t.shape)
        if codec == "fp8":
            ref32 = ref.float()
            amax = ref32.abs().amax(dim=-1, keepdim=True)
            err = (t.float() - ref32).abs()
            assert bool((err <= FP8_MAX_ERR_OF_AMAX * amax).all()), (want.sample_id, role, float((err / amax).max()))
        else:
            assert torch.equal(t.view(torch.int16), ref.view(torch.int16)), (want.sample_id, role)


@pytest.fixture
def assert_sample() -> Callable[[dict[str, torch.Tensor], Sample, str], None]:
    return check_sample
