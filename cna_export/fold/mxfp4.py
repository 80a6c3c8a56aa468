"""Fold a neuron multiplier into gpt-oss's MXFP4 expert weights, exactly or not at all.

gpt-oss checkpoints store each layer's `down_proj` as `mlp.experts.down_proj_blocks` [E, hidden, n/32, 16] uint8
(two 4-bit e2m1 codes a byte, the low nibble first) and `down_proj_scales` [E, hidden, n/32] uint8 (e8m0: the
block value is `2 ** (scale - 127) * e2m1`). Neuron j of expert e is element j % 32 of block j // 32 in every row:
its 4-bit code in each of the `hidden` rows. The scale of a block is shared by 32 neurons, so a neuron's factor
can only go into its codes:

* m = 0 sets them to the code of +0: exact;
* m = 2**k is exact when every code's value times 2**k is again an e2m1 value (e2m1 holds 0, 0.5, 1, 1.5, 2, 3, 4,
  6 and their negatives: m = 2 keeps 0.5-3, m = 0.5 keeps 1-6 and 0);
* anything else (or a power of two that overflows or underflows some code) is refused with one line:
  re-quantizing the tensor would change the other 31 neurons of each block.

(The up rows are no fold target on gpt-oss: its SwiGLU clamps `up` and adds 1, see tests/test_experts.py.)
`decode_mxfp4` gives the values, for the audit (diff, verify) to read a neuron's column and its factor.
"""

from __future__ import annotations

import math

import torch

from cna_export.errors import CircuitError

# e2m1 magnitudes of codes 0..7 (bit 3 is the sign), as transformers' and llama.cpp's MXFP4 tables.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = 32


NO_CODE = 255  # `_code_map` of a code whose scaled value e2m1 cannot hold


def _code_map(m: float) -> torch.Tensor:
    """Code -> code of m times its value for the 16 e2m1 codes (`NO_CODE` where there is none)."""
    out = []
    for code in range(16):
        sign, value = code & 8, E2M1[code & 7] * m
        out.append(NO_CODE if value not in E2M1 else sign | E2M1.index(value))  # a zero keeps its sign
    return torch.tensor(out, dtype=torch.uint8)


def fold_mxfp4_neurons_(
    blocks: torch.Tensor,
    expert: int,
    index: torch.Tensor,
    multiplier: torch.Tensor,
    name: str = "down_proj_blocks",
    dry_run: bool = False,
) -> None:
    """Scale neurons `index` of `expert` in MXFP4 `blocks` [E, rows, n/32, 16] in place (the scales untouched).

    Every new code is an e2m1 value, so a stored product is finite by construction (a multiplier that is not
    finite as float32 never gets here: `fold.scale.group_by_layer` refuses it). `dry_run` checks without writing.

    Raises:
        CircuitError: a multiplier that this format cannot hold exactly for one of the neurons (before any write).
    """
    plans = []
    for j, m in zip(index.tolist(), multiplier.tolist()):
        mapping = None if m != 0 and (m < 0 or not math.log2(m).is_integer()) else _code_map(float(m))
        block, pos = divmod(j, BLOCK)
        byte, high = divmod(pos, 2)
        codes = blocks[expert, :, block, byte]
        codes = (codes >> 4) if high else (codes & 0x0F)
        if mapping is None or bool((mapping[codes.long()] == NO_CODE).any()):
            raise CircuitError(
                f"{name}: neuron {j} of expert {expert} cannot be scaled by {m:g} exactly in MXFP4 (its block scale "
                "is shared by 32 neurons).",
                "use m = 0 or a power of two that its codes can hold, or fold into a dequantized (bf16) copy.",
            )
        plans.append((block, byte, high, mapping[codes.long()]))
    for block, byte, high, new in [] if dry_run else plans:
        column = blocks[expert, :, block, byte]
        blocks[expert, :, block, byte] = (column & 0x0F) | (new << 4) if high else (column & 0xF0) | new


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values [E, n, rows] of MXFP4 `blocks` [E, rows, n/32, 16] and e8m0 `scales` [E, rows, n/32] (the
    layout transformers gives the dequantized parameter: gpt-oss's `down_proj` [E, n, hidden])."""
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32)  # bit 3 of a code is its sign
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], BLOCK)  # low nibble first
    values = table[codes.long()] * torch.exp2(scales.to(torch.float32) - 127)[..., None]
    return values.reshape(*blocks.shape[:2], -1).transpose(1, 2).contiguous()
