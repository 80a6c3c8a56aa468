"""The one table of GGUF storage types that a neuron edit can scale, shared by patch-gguf, diff and verify.

Every dequantized value of a quantized block is linear in the block's f16 scale fields (d, and the min/dmin of
the Q*_1 and K types), so multiplying those fields by m scales the whole block by m while the quantized values
stay untouched (tests/test_gguf_patch.py checks every entry against gguf-py's dequantizers). Float types are
scaled value by value.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

Q = GGMLQuantizationType
# Byte offsets, inside one block, of the f16 scale fields of each quantized type. Q8_1 is left out: llama.cpp
# uses it only for activations, and its `s` field is a cached sum.
SCALE_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q4_0: (0,), Q.Q5_0: (0,), Q.Q8_0: (0,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,), Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,),
    Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ1_S: (0,), Q.TQ1_0: (52,), Q.TQ2_0: (64,),
}  # fmt: skip
# Float storage types, scaled value by value (product in float32, rounded once to the storage type).
FLOAT_TYPES: dict[GGMLQuantizationType, torch.dtype] = {
    Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16,
}  # fmt: skip


def scale_fields(qtype: str | GGMLQuantizationType) -> tuple[int, ...] | None:
    """The f16 scale-field offsets of a quantized type (by name or enum), or None if it has none."""
    if isinstance(qtype, str):
        qtype = Q.__members__.get(qtype)
    return SCALE_FIELDS.get(qtype)
