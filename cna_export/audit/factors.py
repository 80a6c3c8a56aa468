"""Recover the factor by which an edited neuron (a row of values) was scaled, and check that it is one factor.

Float storage: a factor is accepted when folding it the way `cna_export.fold.scale` does (float32 product rounded to the
storage dtype) reproduces the edited row bit for bit. Quantized GGUF rows (edited through their f16 block scales,
see cna_export/gguf/quant.py) are checked on the bytes: the quantized values must be untouched, and every scale field must be
`f16(m * old scale)`, which pins m to an interval. In both cases the reported factor is the shortest decimal
that explains the edit, so a multiplier of 0.3 comes back as 0.3, not 0.30000001192.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cna_export.gguf.quant import scale_fields

SIG_DIGITS = range(1, 10)  # a recovered factor is the shortest decimal that explains the edit
# A factor computed in float32 and then rounded to f16 can land one rounding away from the exact interval.
SCALE_SLACK = 2.0**-20
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers, so that comparisons are bitwise (-0.0 != 0.0, NaN == NaN)."""
    return t.view(_BITS[t.element_size()])


def _rounded(values: np.ndarray, digits: int) -> np.ndarray:
    """Each value rounded to `digits` significant decimal digits (NaN stays NaN)."""
    return np.array([float(f"{v:.{digits}g}") if math.isfinite(v) else math.nan for v in values], dtype=np.float64)


def float_factors(o: torch.Tensor, e: torch.Tensor, quantized: bool = False) -> list[tuple[float | None, bool, bool]]:
    """(factor, constant, exact) for each row of `o` -> `e` (rows are neurons).

    Float storage: the factor is the shortest decimal whose fold (`cna_export.fold.scale`: float32 product rounded to the
    dtype) reproduces the row bit for bit; failing that, the shortest decimal within one unit of rounding of every
    value. Dequantized values (`quantized`) have no exact fold; they get the tolerance test only (f16 scale rounding).
    An edited row of zeros has factor 0.
    """
    of, ef = o.double(), e.double()
    denom = (of * of).sum(1)
    m_hat = torch.where(denom > 0, (of * ef).sum(1) / denom.clamp_min(1e-300), torch.nan).numpy()
    k = len(m_hat)
    factor, exact, constant = np.full(k, math.nan), np.zeros(k, bool), np.zeros(k, bool)
    zero = (ef == 0).all(1).numpy()
    if quantized:
        rtol, atol = 2.0**-10, 0.0
    else:
        info = torch.finfo(o.dtype)
        rtol, atol = info.eps, info.tiny * info.eps  # one ulp; the smallest subnormal
        o32, bits_e = o.to(torch.float32), as_bits(e)
        for digits in SIG_DIGITS:
            todo = ~exact & np.isfinite(m_hat) & ~zero
            if not todo.any():
                break
            c = _rounded(m_hat, digits)
            folded = (o32 * torch.from_numpy(c).to(torch.float32)[:, None]).to(o.dtype)
            ok = (as_bits(folded) == bits_e).all(1).numpy() & todo
            factor[ok], exact[ok] = c[ok], True
        if zero.any():
            exact |= zero & (as_bits((o32 * 0.0).to(o.dtype)) == bits_e).all(1).numpy()
    constant |= exact | zero
    for digits in SIG_DIGITS:
        todo = ~constant & np.isfinite(m_hat)
        if not todo.any():
            break
        c = _rounded(m_hat, digits)
        scaled = torch.from_numpy(c)[:, None] * of
        ok = ((ef - scaled).abs() <= rtol * scaled.abs() + atol).all(1).numpy() & todo
        factor[ok], constant[ok] = c[ok], True
    factor = np.where(zero, 0.0, np.where(np.isnan(factor), m_hat, factor))
    return [(float(f) if math.isfinite(f) else None, bool(c), bool(x)) for f, c, x in zip(factor, constant, exact)]


def scale_intervals(
    old_rows: np.ndarray, new_rows: np.ndarray, qtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For quantized rows (k, bytes per row): the interval [lo, hi] of factors m with f16(m * scale) == new scale
    for every f16 scale field, and whether all other bytes (the quantized values) are unchanged."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    k = old_rows.shape[0]
    a = np.ascontiguousarray(old_rows).reshape(k, -1, block)
    b = np.ascontiguousarray(new_rows).reshape(k, -1, block)
    mask = np.ones(block, bool)
    fields = scale_fields(qtype)
    for off in fields:
        mask[off : off + 2] = False
    untouched = (a[:, :, mask] == b[:, :, mask]).all(axis=(1, 2))
    old = np.stack([a[:, :, off : off + 2].copy().view(np.float16)[..., 0] for off in fields], -1)
    new = np.stack([b[:, :, off : off + 2].copy().view(np.float16)[..., 0] for off in fields], -1)
    old64, new64 = old.astype(np.float64), new.astype(np.float64)
    # Values of m * old that round to `new` in f16: halfway to the neighbouring f16 numbers on either side.
    below = np.nextafter(new, np.float16(-np.inf)).astype(np.float64)
    above = np.nextafter(new, np.float16(np.inf)).astype(np.float64)
    vlo, vhi = (new64 + below) / 2, (new64 + above) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = vlo / old64, vhi / old64
    lo, hi = np.minimum(x, y), np.maximum(x, y)
    zero_old = old64 == 0
    # A zero scale stays zero for every m; a zero scale that became non-zero cannot come from scaling.
    lo = np.where(zero_old, np.where(new64 == 0, -np.inf, np.inf), lo)
    hi = np.where(zero_old, np.where(new64 == 0, np.inf, -np.inf), hi)
    bad = ~np.isfinite(old64) | ~np.isfinite(new64)
    lo, hi = np.where(bad, np.inf, lo), np.where(bad, -np.inf, hi)
    lo_row, hi_row = lo.reshape(k, -1).max(1), hi.reshape(k, -1).min(1)
    slack = SCALE_SLACK * np.maximum(np.abs(lo_row), np.abs(hi_row))
    slack = np.where(np.isfinite(slack), slack, 0.0)
    return lo_row - slack, hi_row + slack, untouched


def quant_factors(o_rows: np.ndarray, e_rows: np.ndarray, qtype: str) -> list[tuple[float | None, bool, bool]]:
    """(factor, constant, exact) for quantized GGUF rows edited through their block scales."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    lo, hi, untouched = scale_intervals(o_rows, e_rows, qtype)
    feasible = untouched & (lo <= hi)
    with np.errstate(invalid="ignore"):
        mids = np.where(np.isfinite(lo) & np.isfinite(hi), (lo + hi) / 2, np.nan)
    snapped = np.full(len(mids), np.nan)
    for digits in SIG_DIGITS:  # the shortest decimal inside each row's interval
        c = _rounded(mids, digits)
        ok = np.isnan(snapped) & (lo <= c) & (c <= hi)
        snapped[ok] = c[ok]
    qt = GGMLQuantizationType[qtype]
    o_val = torch.from_numpy(dequantize(np.ascontiguousarray(o_rows), qt)).reshape(len(o_rows), -1)
    e_val = torch.from_numpy(dequantize(np.ascontiguousarray(e_rows), qt)).reshape(len(e_rows), -1)
    fallback = float_factors(o_val, e_val, quantized=True)
    out = []
    for i in range(len(o_rows)):
        if bool((e_val[i] == 0).all()):
            out.append((0.0, True, True))
        elif feasible[i]:
            out.append((float(snapped[i] if math.isfinite(snapped[i]) else mids[i]), True, True))
        else:
            out.append(fallback[i])
    return out
