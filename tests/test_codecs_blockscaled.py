"""Block-scaled codecs (mxfp4 = e2m1, mxfp6 = e2m3, one e8m0 scale per 32 values) through real stores:
error bounds, exact grid values, the stored bytes, bad input, and decoding on the device in the loader."""

from __future__ import annotations

import pytest
import torch
import zarr
from conftest import H, build_manifest, build_sample

from hsstore import IncompatibleStoreError, SampleError, StoreReader, StoreWriter
from hsstore.blockscaled import BLOCK, E2M0, E2M1, E2M3, ScaleRule, dequantize, pack_fp4, quantize, value_table
from hsstore.codecs import CODECS, get_codec
from hsstore.train.loader import build_loader, role_codecs, to_device

MX = {"mxfp4": E2M1, "mxfp6": E2M3, "mxfp3": E2M0}
# Worst error of one value relative to its block's amax, scale rule CEIL (amax > max_value * scale / 2):
# e2m1: a value >= 4 rounds by <= 1 (step 2) and sits at >= 5 to do so: 1/5; below 4 steps are <= 1, amax > 3.
# e2m3: values in [4, 7.5] round by <= 0.25 (step 0.5), at >= 4.25: 1/17; below 4 steps are <= 0.25, amax > 3.75.
# e2m0: a value in (2, 4) rounds by <= 1 and sits at >= 3 to do so: 1/3; below 2 steps are <= 0.5, amax > 2.
MAX_ERR_OF_BLOCK_AMAX = {"mxfp4": 1 / 5, "mxfp6": 1 / 17, "mxfp3": 1 / 3}
# per-token relative L2 error on conftest's Gaussian samples: measured mean 11.6% / 2.8%, max 17.7% / 4.3%
MEAN_REL_ERR = {"mxfp4": 0.13, "mxfp6": 0.035, "mxfp3": 0.30}
LENGTHS = [5, 40, 130, 1, 64]  # one sample crosses the 128-token shard boundary


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per token (and layer) ||x - x^|| / ||x||."""
    return (got.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1).clamp_min(1e-30)


def write(path: str, codec: str, samples) -> None:
    with StoreWriter(path, build_manifest(codec)) as w:
        for s in samples:
            s.append_to(w)


@pytest.fixture(scope="module")
def mx_stores(tmp_path_factory) -> dict[str, tuple[str, list]]:
    root = tmp_path_factory.mktemp("mx-stores")
    samples = [build_sample(i, n) for i, n in enumerate(LENGTHS)]
    out = {}
    for codec in MX:
        write(str(root / codec), codec, samples)
        out[codec] = (str(root / codec), samples)
    return out


@pytest.mark.parametrize("codec", list(MX))
def test_round_trip_error_is_bounded_per_value_and_token(mx_stores, codec):
    path, samples = mx_stores[codec]
    r = StoreReader(path)
    errors = []
    for i, s in enumerate(samples):
        got = r[i]
        assert torch.equal(got["input_ids"].long(), s.input_ids.long())
        for role, ref in s.hidden.items():
            t = got[role]
            assert t.dtype == torch.bfloat16 and t.shape == ref.shape, (role, t.dtype, t.shape)
            blocks = ref.float().reshape(*ref.shape[:-1], H // BLOCK, BLOCK)
            amax = blocks.abs().amax(dim=-1, keepdim=True)
            err = (t.float().reshape(blocks.shape) - blocks).abs()
            assert bool((err <= MAX_ERR_OF_BLOCK_AMAX[codec] * amax).all()), (i, role, float((err / amax).max()))
            errors.append(rel_err(t, ref).reshape(-1))
    every = torch.cat(errors)
    assert float(every.mean()) < MEAN_REL_ERR[codec]
    assert float(every.mean()) > MEAN_REL_ERR[codec] / 3  # lossy for real: the bound is not vacuous


@pytest.mark.parametrize("codec", list(MX))
def test_grid_values_survive_exactly_and_bytes_are_as_documented(store_path, codec):
    """A block of grid values times 2^k (amax = max_value * 2^k) decodes bit-exactly, at any k."""
    fmt = MX[codec]
    grid = value_table(fmt, torch.device("cpu"), torch.float32)[:, 0]  # every signed code's value
    block = grid[torch.arange(BLOCK) % len(grid)]
    block[0] = fmt.max_value  # the scale is then exactly 2^k
    s = build_sample(0, 4)
    s.hidden["last"] = torch.stack([torch.cat([block * 2.0**k, block * 2.0 ** (k - 9)]) for k in (0, 5, -20, 40)])
    s.hidden["last"] = s.hidden["last"].to(torch.bfloat16)
    s.hidden["aux"][2] = 0  # an all-zero token comes back zero
    with StoreWriter(store_path, build_manifest(codec)) as w:
        s.append_to(w)
    got = StoreReader(store_path)[0]
    assert torch.equal(got["last"], s.hidden["last"])
    assert torch.equal(got["aux"][2], torch.zeros(3, H, dtype=torch.bfloat16))
    # the plain zarr arrays: uint8 codes (two per byte for fp4, low nibble first) and e8m0 scales
    part = zarr.open_group(store_path, mode="r")["parts/part-00000"]
    payload, scale = part["hidden/last"][:], part["hidden/last_scale"][:]
    assert scale.dtype == payload.dtype == "uint8" and scale.shape == (4, H // BLOCK)
    assert scale[:, 0].tolist() == [127, 132, 107, 167] and scale[:, 1].tolist() == [118, 123, 98, 158]
    codes = torch.arange(BLOCK, dtype=torch.uint8) % len(grid)
    codes[0] = fmt.max_code
    codes[codes == fmt.sign_bit] = 0  # -0 is written as +0
    if codec == "mxfp4":
        assert payload.shape == (4, H // 2)
        assert payload[0, :3].tolist() == [0x7 | (1 << 4), 2 | (3 << 4), 4 | (5 << 4)]
        assert torch.equal(torch.from_numpy(payload[0, : BLOCK // 2]), pack_fp4(codes))
    else:
        assert payload.shape == (4, H) and torch.equal(torch.from_numpy(payload[0, :BLOCK]), codes)
    # decoding formula: value(code) * 2^(scale - 127)
    again = dequantize(torch.from_numpy(payload), torch.from_numpy(scale), fmt, torch.float32, packed=codec == "mxfp4")
    assert torch.equal(again, s.hidden["last"].float())


@pytest.mark.parametrize("codec", list(MX))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused(store_path, codec, bad):
    good = build_sample(1, 30)
    w = StoreWriter(store_path, build_manifest(codec))
    good.append_to(w)
    s = build_sample(2, 20)
    s.hidden["aux"] = s.hidden["aux"].clone()
    s.hidden["aux"][7, 2, 40] = bad
    with pytest.raises(SampleError, match=r"NaN/inf \(first at token 7\)"):
        s.append_to(w)
    w.close()
    r = StoreReader(store_path)
    assert len(r) == 1 and torch.isfinite(r[0]["aux"].float()).all()


@pytest.mark.parametrize("codec", list(MX))
def test_hidden_size_not_a_multiple_of_32_is_refused(store_path, codec):
    with pytest.raises(IncompatibleStoreError, match=r"blocks of 32 values, but the hidden size is 48; use fp8"):
        StoreWriter(store_path, build_manifest(codec, hidden_size=48))


@pytest.mark.parametrize("codec", list(MX))
def test_undecoded_read_then_to_device_equals_reader_decode(mx_stores, codec):
    path, samples = mx_stores[codec]
    raw, decoded = StoreReader(path, decode=False), StoreReader(path, decode=True)
    codecs = role_codecs(raw.manifest)
    for i, s in enumerate(samples):
        stored = raw[i]
        n = len(s)
        assert stored["aux"].dtype == torch.uint8 and stored["aux_scale"].shape == (n, 3, H // BLOCK)
        assert stored["last"].shape == (n, H // 2 if codec == "mxfp4" else H)
        on_device = to_device(stored, "cpu", codecs)
        want = decoded[i]
        assert on_device.keys() == want.keys()
        for k, v in want.items():
            assert v.dtype == on_device[k].dtype and torch.equal(on_device[k], v), k
        assert to_device(want, "cpu", codecs).keys() == want.keys()  # already decoded: passes through


@pytest.mark.parametrize("codec", list(MX))
def test_packed_batches_decode_on_the_device_like_the_reader(mx_stores, codec):
    path, _ = mx_stores[codec]
    max_tokens = 128
    device = build_loader(path, max_tokens=max_tokens, rows_per_batch=2, seed=3, num_workers=0)
    host = build_loader(path, max_tokens=max_tokens, rows_per_batch=2, seed=3, num_workers=0, device_decode=False)
    ref = StoreReader(path)
    for stored, decoded in zip(device, host, strict=True):
        assert stored["aux"].dtype == torch.uint8 and stored["aux_scale"].dtype == torch.uint8
        batch = device.to_device(stored, "cpu")
        assert "aux_scale" not in batch and "last_scale" not in batch
        assert batch.keys() == host.to_device(decoded, "cpu").keys()
        for role in ("aux", "last"):
            assert batch[role].dtype == torch.bfloat16 and torch.equal(batch[role], decoded[role])
        for r, row in enumerate(batch["sample_indices"]):
            at = 0
            for i in row:
                want = ref[i]
                n = min(len(want["input_ids"]), max_tokens)
                assert torch.equal(batch["aux"][r, at : at + n], want["aux"][:n])
                assert torch.equal(batch["last"][r, at : at + n], want["last"][:n])
                at += n
            assert not batch["aux"][r, at:].any()  # zero padding (codes 0, scale 0) decodes to zero


def test_rounding_is_nearest_ties_to_even_and_scale_rules_differ():
    fmt = E2M1
    # e2m1 grid 0, .5, 1, 1.5, 2, 3, 4, 6: midpoints go to the even code (even mantissa)
    x = torch.tensor([6.0, 2.5, 3.5, 5.0, 0.25, 0.75, 1.25, 1.75, -2.5, -0.25, 0.1, 5.1] + [0.0] * 20)
    codes, scale = quantize(x, fmt)
    assert scale.tolist() == [127]
    assert codes[:12].tolist() == [7, 4, 6, 6, 0, 2, 2, 4, 8 | 4, 0, 0, 7]
    # amax 7 is past the grid: OCP's floor rule keeps scale 1 and saturates it to 6; CEIL doubles the scale
    x[0] = 7.0
    floor_codes, floor_scale = quantize(x, fmt, ScaleRule.FLOOR)
    ceil_codes, ceil_scale = quantize(x, fmt, ScaleRule.CEIL)
    assert (floor_scale.item(), floor_codes[0].item()) == (127, 7)
    assert (ceil_scale.item(), ceil_codes[0].item()) == (128, 6)  # 7 / 2 = 3.5 -> 4 (tie to even)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4 * BLOCK, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 3)
    for fmt in (E2M1, E2M3, E2M0):
        codes, scale = quantize(x, fmt)
        grid = value_table(fmt, torch.device("cpu"), torch.float32)[:, 0]
        step = torch.exp2(scale.float() - 127).repeat_interleave(BLOCK, dim=-1)
        distance = (x.to(torch.bfloat16).float().unsqueeze(-1) / step.unsqueeze(-1) - grid).abs()
        chosen = distance.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
        assert torch.equal(chosen, distance.min(dim=-1).values), fmt.name  # always a nearest grid value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_logical_dtypes_decode_to_the_same_values(dtype):
    x = torch.randn(8, 2 * BLOCK) * 100
    for fmt in (E2M1, E2M3, E2M0):
        codes, scale = quantize(x, fmt)
        ref = dequantize(codes, scale, fmt, torch.bfloat16)
        got = dequantize(codes, scale, fmt, dtype)
        assert got.dtype == dtype and torch.equal(got.float(), ref.float())
        if fmt.bits == 4:
            assert torch.equal(dequantize(pack_fp4(codes), scale, fmt, dtype, packed=True), got)


def test_every_codec_declares_the_suffixes_it_stores():
    for codec in CODECS.values():
        stored = codec.stored_arrays((3, 64), "bfloat16")
        assert tuple(a.suffix for a in stored) == codec.suffixes, codec.name
    assert get_codec("mxfp4").stored_arrays((64,), "bfloat16")[0].per_token_shape == (32,)
