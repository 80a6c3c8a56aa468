"""Numbers checked against the type they are stored in: the one check of every fold path.

A multiplier that is a finite Python float can still make a weight that is not finite where it lands: 1e39 is
inf as the float32 the fold computes in, 1e7 times a weight of 0.01 is inf in float16, and 0 times an inf
multiplier is NaN. Every path that stores a product (the safetensors fold in float32, bfloat16 and float16, the
f16 block scales and float rows of patch-gguf, its re-quantized rows, the LoRA factors of an adapter, the
multipliers themselves as float32) rounds it with `stored`, which refuses, before anything is written, a value
that was finite before and is not finite in its storage type. `rounding_error` then reports the largest
relative error of what is stored against the exact product, which is never "0" for a value that is not finite.
"""

from __future__ import annotations

import torch

from cna_export.errors import CircuitError


def stored(
    product: torch.Tensor,
    dtype: torch.dtype,
    before: torch.Tensor,
    multiplier: torch.Tensor,
    what: str,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """`product` rounded to `dtype`, after checking that every value finite `before` is finite there.

    Args:
        product: the new values, one row per neuron ([k, ...]; any float dtype, float64 for an exact product).
        dtype: the storage type.
        before: bool, broadcastable to `product`: which values were finite before scaling (a weight that was
            already inf or NaN in the source is the source's; it is left as it is).
        multiplier: the k multipliers, for the message.
        what: where the values go, for the message ("model.layers.1.mlp.down_proj.weight", "Q4_K block scales").
        index: the k neurons, for the message (else the row number is named).

    Raises:
        CircuitError: some value would not be finite in `dtype`; nothing has been written.
    """
    new = product.to(dtype)
    bad = torch.broadcast_to(before, new.shape) & ~torch.isfinite(new)
    if bool(bad.any()):
        row = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0]) if bad.dim() else 0
        m = float(multiplier.reshape(-1)[row]) if multiplier.numel() > 1 else float(multiplier.reshape(-1)[0])
        if index is not None:
            neuron = f" on neuron {int(index.reshape(-1)[row])}"
        else:
            neuron = f" on row {row}" if new.dim() and new.shape[0] > 1 else ""
        name = str(dtype).removeprefix("torch.")
        wider = "" if torch.finfo(dtype).bits >= 32 else ", or fold into weights of a wider type (float32)"
        raise CircuitError(
            f"Multiplier {m:g}{neuron} overflows {what}, stored as {name} ({float(new[bad][0])}; the largest "
            f"finite {name} is {torch.finfo(dtype).max:g}).",
            f"use a smaller multiplier{wider}.",
        )
    return new


def rounding_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest relative error of the stored values `got` against the `exact` products (0.0 when exact).

    Values whose exact product is not finite (a source weight that was already inf or NaN) are left out; a
    stored value that is not finite where the exact product is, or not 0 where it is 0, makes the error inf
    (never 0)."""
    got, exact = got.to(torch.float64), exact.to(torch.float64)
    finite = torch.isfinite(exact)
    got, exact = got[finite], exact[finite]
    if not bool(torch.isfinite(got).all()) or bool((got[exact == 0] != 0).any()):
        return float("inf")
    nonzero = exact != 0
    if not bool(nonzero.any()):
        return 0.0
    return float(((got - exact)[nonzero].abs() / exact[nonzero].abs()).max())
