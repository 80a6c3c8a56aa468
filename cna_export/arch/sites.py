"""Where a neuron lives: one `Site` per tensor (or runtime module) that holds the neurons of a layer.

Neuron j of layer i is one slice of a tensor: index `part * n + j` along `axis`, where n is the MLP width and a
fused tensor stacks `parts` blocks of n along that axis (Phi-3's `gate_up_proj` holds gate then up: the up
neurons are part 1 of 2). A tensor that stacks experts has an `expert_axis`. Everything that reads or writes
neurons (fold, export, patch-gguf, diff/verify, the weight readers, the card) asks its site; none works out a
shape on its own.

Shapes here are in the order the tensor is stored in: PyTorch order for safetensors, numpy order (the reverse
of GGUF's innermost-first dims) for GGUF.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES

if TYPE_CHECKING:
    from cna_export.arch.experts import ExpertKey, ExpertShape


@dataclass(frozen=True)
class ModelShape:
    """The sizes that a circuit must fit.

    `layer_widths` is None when every dense MLP is `intermediate_size` wide; otherwise it holds each layer's width
    (Gemma 4's `use_double_wide_mlp`: its KV-shared layers are twice as wide), and `intermediate_size` is the
    narrowest layer's. `ModelShape.of_widths` builds either from per-layer widths.
    """

    num_layers: int
    intermediate_size: int
    hidden_size: int
    moe: ExpertShape | None = None  # the experts of an MoE model (arch/experts.py); None for a dense model
    layer_widths: tuple[int, ...] | None = None

    @classmethod
    def of_widths(cls, widths: Sequence[int], hidden_size: int, moe: ExpertShape | None = None) -> ModelShape:
        """The shape of a model whose layers' dense MLPs have `widths` (one per layer)."""
        uneven = len(set(widths)) > 1
        return cls(len(widths), min(widths), hidden_size, moe, tuple(widths) if uneven else None)

    def width(self, layer: int) -> int:
        """Neurons of the dense MLP of `layer`."""
        return self.layer_widths[layer] if self.layer_widths is not None else self.intermediate_size

    @property
    def row_width(self) -> int:
        """Columns of one attribution row: the widest layer's (narrower layers leave their last columns unused)."""
        widest = max(self.layer_widths) if self.layer_widths is not None else self.intermediate_size
        return self.moe.layer_width(widest) if self.moe is not None else widest

    @property
    def num_neurons(self) -> int:
        """All MLP neurons (an MoE layer: every routed expert's and the shared expert's; the k of a fraction)."""
        return self.neurons_in(range(self.num_layers))

    def neurons_in(self, layers: range) -> int:
        """The MLP neurons of `layers` (an MoE layer: every routed expert's and the shared expert's)."""
        if self.moe is None:
            return sum(self.width(i) for i in layers)
        return sum(width for i in layers for _, width in self.moe.units(i, self.width(i)))

    def width_of(self, expert: ExpertKey, layer: int) -> int:
        """Neurons of one unit of `layer`: a dense MLP (None), a routed expert (an int) or the shared expert."""
        if expert is None or self.moe is None:
            return self.width(layer)
        return self.moe.shared if expert == "shared" else self.moe.width


@dataclass(frozen=True)
class Site:
    """Where the neurons of one layer sit in one tensor.

    Attributes:
        template: tensor name with `{i}` for the layer (and `{e}` for the expert, one tensor per expert).
        axis: the axis along which neuron j is index `part * n + j` (n = MLP width).
        part, parts: a fused tensor stacks `parts` blocks of n along `axis`; the neurons are block `part`.
        expert_axis: the axis of a tensor that stacks all experts of a layer (None: not stacked).
        codec: how the values are stored, when not as floats: "mxfp4" (gpt-oss's Hub checkpoints): 4-bit e2m1
            codes, 32 neurons a block, stored [E, rows, n/32, 16] with e8m0 scales in the `_scales` tensor beside
            the `_blocks` one (fold/mxfp4.py). `axis` and `expert_axis` then describe the decoded values
            [E, n, rows]; the fold edits the codes, the audit decodes them (`decoded()`).
    """

    template: str
    axis: int
    part: int = 0
    parts: int = 1
    expert_axis: int | None = None
    codec: str | None = None

    def name(self, layer: int, expert: int | None = None) -> str:
        return self.template.format(i=layer, e=expert)

    def expected_shape(self, shape: ModelShape, experts: int | None = None) -> tuple[int, ...]:
        """The stored shape this site implies for a model of `shape`: 2-D (hidden x parts*n), with an expert
        axis in front when the tensor stacks experts."""
        dims = [shape.hidden_size, shape.hidden_size]
        dims[self.axis - (1 if self.expert_axis is not None and self.expert_axis < self.axis else 0)] = (
            self.parts * shape.intermediate_size
        )
        if self.expert_axis is not None:
            dims.insert(self.expert_axis, experts or 0)
        if self.codec == "mxfp4":  # decoded [E, n, rows] -> stored blocks [E, rows, n/32, 16]
            *lead, n, rows = dims
            return (*lead, rows, n // 32, 16)
        return tuple(dims)

    def decoded(self) -> Site:
        """The site of the decoded values (itself for float storage)."""
        return replace(self, codec=None) if self.codec else self

    def offset(self, width: int) -> int:
        """Index of neuron 0 along `axis` for an MLP of `width` neurons."""
        return self.part * width

    def of_expert(self) -> Site:
        """The site inside one expert's slice of a tensor that stacks experts (itself when it stacks none)."""
        if self.expert_axis is None:
            return self
        return replace(self, axis=self.axis - (1 if self.expert_axis < self.axis else 0), expert_axis=None)

    def rows(self, tensor: torch.Tensor, width: int, expert: int | None = None) -> torch.Tensor:
        """A view of `tensor` with one row per neuron (neuron j is row j), for reading and in-place edits."""
        if self.expert_axis is not None:
            return self.of_expert().rows(tensor.select(self.expert_axis, expert), width)
        return tensor.narrow(self.axis, self.offset(width), width).movedim(self.axis, 0)

    def first_row(self, width: int, expert: int | None = None) -> int:
        """The row of neuron 0 when the tensor is read as rows of its innermost dimension (a GGUF tensor as
        (rows, bytes per row)): for a site whose neurons are those rows (`of_expert().axis` is the second to last
        axis), neuron j is row `first_row + j`, expert after expert in a tensor that stacks them."""
        stacked = expert * self.parts * width if self.expert_axis is not None else 0
        return stacked + self.offset(width)

    def describe(self) -> str:
        """Where the neurons are, for people: e.g. 'columns of `mlp.down_proj.weight`' (names inside a layer)."""
        axis = self.of_expert().axis  # within one expert's slice of a tensor that stacks them
        where = {0: "rows", 1: "columns"}.get(axis, f"slices along axis {axis}")
        fused = f" (part {self.part + 1} of {self.parts} of the fused tensor)" if self.parts > 1 else ""
        experts = " of each expert" if self.expert_axis is not None or "{e}" in self.template else ""
        codec = f" ({self.codec.upper()} codes)" if self.codec else ""
        return f"{where}{experts} of `{self.template.split('{i}.', 1)[-1]}`{fused}{codec}"


def gguf_site(tensor: MODEL_TENSOR, axis: int, expert_axis: int | None = None) -> Site:
    """A GGUF site named by gguf-py's constants (`blk.{bid}.ffn_up` -> `blk.{i}.ffn_up.weight`); numpy order."""
    return Site(TENSOR_NAMES[tensor].replace("{bid}", "{i}") + ".weight", axis, expert_axis=expert_axis)
