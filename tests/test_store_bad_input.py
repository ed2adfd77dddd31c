"""Malformed samples are refused with an error naming the sample and the fix; the writer keeps going
and nothing already written (committed or still buffered) is disturbed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsstore import SampleError, StoreReader, StoreWriter


def _with(s, **changes):
    """(input_ids, loss_mask, hidden) of sample s with some parts replaced."""
    out = {"input_ids": s.input_ids, "loss_mask": s.loss_mask, "hidden": dict(s.hidden)}
    hidden = changes.pop("hidden_roles", None)
    out.update(changes)
    if hidden is not None:
        out["hidden"] = hidden
    return out


def _poke(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


N = 20  # tokens of the bad sample
BAD = {
    "hidden size": (lambda s: _with(s, hidden_roles={**s.hidden, "aux": s.hidden["aux"][..., :32]}), ["has shape"]),
    "layer count": (lambda s: _with(s, hidden_roles={**s.hidden, "aux": s.hidden["aux"][:, :2]}), ["(20, 3, 64)"]),
    "extra layer dim": (lambda s: _with(s, hidden_roles={**s.hidden, "last": s.hidden["last"][:, None]}), ["shape"]),
    "hidden too short": (lambda s: _with(s, hidden_roles={**s.hidden, "last": s.hidden["last"][:-1]}), ["(19, 64)"]),
    "mask too long": (lambda s: _with(s, loss_mask=torch.ones(N + 1, dtype=torch.uint8)), ["loss_mask has 21"]),
    "batch dim": (lambda s: _with(s, input_ids=s.input_ids[None], loss_mask=s.loss_mask[None]), ["batch dimension"]),
    "empty": (
        lambda s: _with(
            s,
            input_ids=s.input_ids[:0],
            loss_mask=s.loss_mask[:0],
            hidden_roles={k: v[:0] for k, v in s.hidden.items()},
        ),
        ["empty sample", "drop it"],
    ),
    "nan": (
        lambda s: _with(s, hidden_roles={**s.hidden, "aux": _poke(s.hidden["aux"], (3, 1, 5), float("nan"))}),
        ["NaN/inf", "token 3"],
    ),
    "inf": (
        lambda s: _with(s, hidden_roles={**s.hidden, "last": _poke(s.hidden["last"], (17, 0), float("-inf"))}),
        ["NaN/inf", "token 17", "skip"],
    ),
    "id >= vocab": (
        lambda s: _with(s, input_ids=_poke(s.input_ids, 4, 1000)),
        ["token id 1000", "0..999", "tokenizer"],
    ),
    "negative id": (lambda s: _with(s, input_ids=_poke(s.input_ids, 0, -1)), ["token id -1", "tokenizer"]),
    "float ids": (lambda s: _with(s, input_ids=s.input_ids.float()), ["must be integers"]),
    "mask value 2": (lambda s: _with(s, loss_mask=_poke(s.loss_mask, 2, 2)), ["only 0/1"]),
    "negative mask": (lambda s: _with(s, loss_mask=_poke(s.loss_mask.to(torch.int64), 2, -1)), ["only 0/1"]),
    "float mask": (lambda s: _with(s, loss_mask=s.loss_mask.float() * 0.5), ["only 0/1"]),
    "missing role": (lambda s: _with(s, hidden_roles={"aux": s.hidden["aux"]}), ["missing ['last']"]),
    "extra role": (
        lambda s: _with(s, hidden_roles={**s.hidden, "teacher": s.hidden["last"]}),
        ["unexpected ['teacher']"],
    ),
    "int hidden": (
        lambda s: _with(s, hidden_roles={**s.hidden, "aux": s.hidden["aux"].to(torch.int32)}),
        ["floating point"],
    ),
    "numpy hidden": (
        lambda s: _with(s, hidden_roles={**s.hidden, "last": s.hidden["last"].float().numpy()}),
        ["torch.Tensor"],
    ),
    "hidden not a dict": (lambda s: _with(s, hidden_roles=s.hidden["last"]), ["dict"]),
}


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "no-copy"])  # no-copy: what generate appends with
@pytest.mark.parametrize("case", list(BAD))
def test_bad_sample_is_refused_and_the_writer_keeps_working(
    case, copy, store_path, make_manifest, make_sample, assert_sample
):
    build, fragments = BAD[case]
    # 200 tokens: shard 0 is written in the background (committing sample 0), samples 1-2 stay buffered
    good = [make_sample(i, length) for i, length in enumerate([60, 90, 50])]
    w = StoreWriter(store_path, make_manifest("lossless", max_seq_length=400))
    for s in good:
        s.append_to(w)
    bad = build(make_sample(99, N))
    with pytest.raises(SampleError) as info:
        w.append(bad["input_ids"], bad["loss_mask"], bad["hidden"], sample_id="bad-7", copy=copy)
    msg = str(info.value)
    assert "sample 'bad-7'" in msg and store_path in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert w.num_samples == 3 and w.commit.samples <= 1
    mid = StoreReader(store_path)  # meanwhile a reader sees the committed prefix, intact
    assert mid.sample_ids.tolist() == ["s0"][: len(mid)]
    for i in range(len(mid)):
        assert_sample(mid[i], good[i], "lossless")
    after = make_sample(3, 40)
    after.append_to(w)
    w.close()
    r = StoreReader(store_path)
    assert r.sample_ids.tolist() == ["s0", "s1", "s2", "s3"]
    for i, s in enumerate([*good, after]):
        assert_sample(r[i], s, "lossless")


def test_too_long_sample(store_path, make_manifest, make_sample, assert_sample):
    good = make_sample(0, 100)
    with StoreWriter(store_path, make_manifest("raw", max_seq_length=256)) as w:
        good.append_to(w)
        long = make_sample(1, 257)
        with pytest.raises(SampleError, match=r"sample 'long': 257 tokens exceeds max_seq_length 256; truncate"):
            w.append(long.input_ids, long.loss_mask, long.hidden, sample_id="long")
        make_sample(2, 256).append_to(w)  # exactly the limit is fine
    r = StoreReader(store_path)
    assert r.sample_ids.tolist() == ["s0", "s2"] and r.index.length.tolist() == [100, 256]
    assert_sample(r[0], good, "raw")


def test_accepted_input_variants(store_path, make_manifest, make_sample, assert_sample):
    """numpy ids, bool masks, float32 and non-contiguous hidden states, int ids/sources are all fine."""
    base = make_sample(0, 30)
    aux_t = base.hidden["aux"].float().transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not aux_t.is_contiguous()
    with StoreWriter(store_path, make_manifest("lossless")) as w:
        w.append(
            base.input_ids.numpy().astype(np.int32),
            base.loss_mask.bool(),
            {"aux": aux_t, "last": base.hidden["last"].float()},
            sample_id=17,  # stored as the string "17"
            source=3,
        )
        w.append(base.input_ids.tolist(), base.loss_mask.tolist(), base.hidden)
    r = StoreReader(store_path)
    assert r.sample_ids.tolist() == ["17", "1"]  # default id: the sample's position in the part
    assert r.index.source.tolist() == ["3", ""]
    assert_sample(r[0], base, "lossless")
    assert_sample(r[1], base, "lossless")


@pytest.mark.parametrize("codec", ["raw", "fp8", "mxfp4"])
@pytest.mark.parametrize(
    ("value", "fragment"), [(float("nan"), "first at token 5"), (3.4e38, "after casting to bfloat16")]
)
def test_non_finite_is_refused_at_append_for_every_codec(
    codec, value, fragment, store_path, make_manifest, make_sample
):
    """Quantizing codecs encode later, on the shard thread, yet NaN/inf, including a float32 value that only
    overflows when cast to the logical bf16, is refused at append and the store keeps the good samples."""
    good = make_sample(0, 30)
    bad = make_sample(1, N)
    aux = bad.hidden["aux"].float()
    aux[5, 2, 7] = value
    with StoreWriter(store_path, make_manifest(codec)) as w:
        good.append_to(w)
        with pytest.raises(SampleError, match=f"NaN/inf \\({fragment}\\)"):
            w.append(bad.input_ids, bad.loss_mask, {**bad.hidden, "aux": aux}, sample_id="bad")
    r = StoreReader(store_path)
    assert r.sample_ids.tolist() == ["s0"]
    assert bool(torch.isfinite(r[0]["aux"].float()).all())
