"""Block-scaled low-precision numbers (OCP Microscaling style): the math, in torch, on any device.

Every block of BLOCK consecutive values along the last axis shares one e8m0 scale (a power of two,
stored as its biased exponent in a uint8; 255 = NaN); each value is a tiny sign-magnitude float
(e2m1, e2m3, ...) with no inf/NaN. The writer quantizes on its CPU; the trainer dequantizes on the
GPU, where decoding is one table gather and one multiply by an exact power of two, so the bytes
crossing PCIe stay at ~3.5-6 bits a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cache

import torch

BLOCK = 32  # values sharing one scale (the OCP MX block size)
E8M0_BIAS = 127
E8M0_NAN = 255  # the scale of a block holding NaN/inf: the only way a NaN/inf input shows in the output
MIN_EXP, MAX_EXP = -126, 127  # shared exponents written (e8m0 codes 1..254)


class ScaleRule(Enum):
    """How a block's shared exponent follows from its largest magnitude (amax)."""

    FLOOR = "floor"  # OCP MX v1.0: 2^(floor(log2 amax) - emax); values past the grid's max saturate
    CEIL = "ceil"  # the smallest power of two that puts amax on the grid: nothing clips (FLOOR, +1 if FLOOR clips)


@dataclass(frozen=True)
class ElementFormat:
    """A sign-magnitude minifloat without inf/NaN: ebits exponent bits (bias 2^(ebits-1) - 1), mbits mantissa bits.

    Magnitude codes are (exponent bits << mbits) | mantissa bits, so they increase with the value; the
    sign bit sits above them.
    """

    name: str
    ebits: int
    mbits: int

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    @property
    def sign_bit(self) -> int:
        return 1 << (self.ebits + self.mbits)

    @property
    def max_code(self) -> int:
        return self.sign_bit - 1

    def magnitude(self, code: int) -> float:
        exp, frac = code >> self.mbits, (code & ((1 << self.mbits) - 1)) / (1 << self.mbits)
        return frac * 2.0 ** (1 - self.bias) if exp == 0 else (1 + frac) * 2.0 ** (exp - self.bias)

    @property
    def max_value(self) -> float:
        return self.magnitude(self.max_code)

    @property
    def emax(self) -> int:
        """Exponent of the largest value, floor(log2 max_value)."""
        return (self.max_code >> self.mbits) - self.bias


E2M1 = ElementFormat("e2m1", 2, 1)  # fp4: 0, 0.5, 1, 1.5, 2, 3, 4, 6
E2M3 = ElementFormat("e2m3", 2, 3)  # fp6: 0 .. 7.5, steps of 1/8 below 2
E2M0 = ElementFormat("e2m0", 2, 0)  # 3 bits: 0, 1, 2, 4 (powers of two), for footprint-first stores


@cache
def value_table(fmt: ElementFormat, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[2^bits, 1]: the value of every signed code, the decode lookup table (2-D like pair_table)."""
    mags = torch.tensor([fmt.magnitude(c) for c in range(fmt.sign_bit)], dtype=torch.float32)
    return torch.cat([mags, -mags]).unsqueeze(1).to(device, dtype)


@cache
def pair_table(fmt: ElementFormat, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: the two values of a byte holding two 4-bit codes (low nibble first): packed fp4 in one gather."""
    if fmt.bits != 4:
        raise ValueError(f"{fmt.name} codes are {fmt.bits} bits; only 4-bit codes pack two to a byte")
    byte = torch.arange(256)
    table = value_table(fmt, torch.device("cpu"), torch.float32)[:, 0]
    return torch.stack([table[byte & 0xF], table[byte >> 4]], dim=-1).to(device, dtype)


def _pow2(exp: torch.Tensor) -> torch.Tensor:
    """2.0 ** exp (int32, -126 <= exp <= 127) as float32, built from the exponent bits: exact and cheap."""
    return ((exp + E8M0_BIAS) << 23).view(torch.float32)


def _round_to_grid(mag: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Magnitudes >= 0 (float32, already divided by the block scale) -> nearest magnitude code (int32).

    Ties go to the even code (IEEE round-to-nearest-even); values past the grid's max saturate.
    The quantum at `mag` is 2^(max(floor(log2 mag), 1 - bias) - mbits); rounding to it is torch.round.
    """
    floor_log2 = (mag.view(torch.int32) >> 23) - E8M0_BIAS  # exact for normal floats; 0 gives -127
    qexp = floor_log2.clamp_min(1 - fmt.bias) - fmt.mbits
    steps = torch.round(mag * _pow2(-qexp)).to(torch.int32)
    # code = (exponent field - 1) << mbits + steps, with steps in [2^mbits, 2^(mbits+1)] above the subnormals
    code = ((qexp - (1 - fmt.bias - fmt.mbits)) << fmt.mbits) + steps
    return code.clamp_max(fmt.max_code)


@cache
def code_table(fmt: ElementFormat, device: torch.device) -> torch.Tensor:
    """[65536] uint8: the signed code of every bf16 bit pattern (a value already divided by its block scale).

    Quantizing is then one gather per value, ~10x faster on a CPU than rounding arithmetic; NaN/inf
    patterns map to code 0.
    """
    v = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(torch.bfloat16).float()
    mag_code = _round_to_grid(torch.where(torch.isfinite(v), v.abs(), 0.0), fmt)
    negative = (v < 0) & (mag_code > 0)  # zero keeps sign 0: -0 would only cost entropy
    return (mag_code | negative.to(torch.int32) * fmt.sign_bit).to(device, torch.uint8)


def quantize(
    x: torch.Tensor, fmt: ElementFormat, rule: ScaleRule = ScaleRule.CEIL
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H] (H % BLOCK == 0) -> (signed codes uint8 [..., H], e8m0 scales uint8 [..., H / BLOCK]).

    Values are quantized as bf16 (float32 input is rounded to bf16 first: 0.4% at most, far below any
    element format's step); dividing bf16 by a power of two is exact, so each code is the nearest grid
    value, ties to even. A block holding NaN/inf gets scale 255 (NaN) and zero codes, so callers detect
    bad input from the scales alone.
    """
    h = x.shape[-1]
    if h % BLOCK:
        raise ValueError(f"the last axis ({h}) must be a multiple of the block size {BLOCK}")
    xb = x.to(torch.bfloat16).reshape(*x.shape[:-1], h // BLOCK, BLOCK)
    amax = xb.abs().amax(dim=-1).float()
    finite = torch.isfinite(amax)
    _, e = torch.frexp(torch.where(finite, amax, 0.0))  # amax = m * 2^e, m in [0.5, 1): floor(log2 amax) = e - 1
    exp = (e - 1 - fmt.emax).clamp(MIN_EXP, MAX_EXP)
    if rule is ScaleRule.CEIL:
        exp = (exp + (amax > fmt.max_value * _pow2(exp)).to(exp.dtype)).clamp_max(MAX_EXP)
    # 1 / scale, exact in bf16 (2^-127 is subnormal, so not _pow2); 0 turns a NaN/inf block into NaNs: code 0
    inv = torch.where(finite, torch.ldexp(torch.ones_like(amax), -exp), 0.0).to(torch.bfloat16)
    scaled = (xb * inv.unsqueeze(-1)).view(torch.uint16).to(torch.int32)
    codes = code_table(fmt, x.device).index_select(0, scaled.reshape(-1)).reshape(x.shape)
    scale = torch.where(finite, exp + E8M0_BIAS, E8M0_NAN).to(torch.uint8)
    return codes, scale


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes uint8 [..., H] -> bytes [..., H / 2]; element 2i in the low nibble (as torch.float4_e2m1fn_x2)."""
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def scale_values(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e8m0 codes -> 2^(code - 127) from the exponent bits; code 0 gives 0 and 255 inf (neither is ever written)."""
    if dtype == torch.bfloat16:
        return (scale.to(torch.int16) << 7).view(torch.bfloat16)
    return (scale.to(torch.int32) << 23).view(torch.float32).to(dtype)


def dequantize(
    payload: torch.Tensor, scale: torch.Tensor, fmt: ElementFormat, dtype: torch.dtype, *, packed: bool = False
) -> torch.Tensor:
    """Codes uint8 [..., H] (or packed fp4 bytes [..., H / 2]) + scales [..., H / BLOCK] -> dtype [..., H].

    Runs on the tensors' device. An element value times a power of two is exact in bf16 and float32,
    so those are computed directly (half the memory traffic for bf16); float16 goes through float32.
    """
    work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    table = pair_table(fmt, payload.device, work) if packed else value_table(fmt, payload.device, work)
    values = table.index_select(0, payload.reshape(-1).to(torch.int32))  # [n, 2 or 1]
    blocks = values.reshape(*scale.shape, BLOCK) * scale_values(scale, work).unsqueeze(-1)
    return blocks.reshape(*scale.shape[:-1], -1).to(dtype)
