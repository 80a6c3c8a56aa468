"""The model a circuit was made on, as the circuit file records it: its identity (type, source, hashes) and its
shape (layers, MLP widths, experts), and the check that a model is one the circuit fits."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from cna_export.arch import ModelShape, compatible
from cna_export.arch.experts import SHARED, ExpertShape
from cna_export.circuit.selection import Strict
from cna_export.errors import CircuitError

# Sizes and indices beyond this are damage, not models; without a bound they would overflow int64 tensors.
MAX_SIZE = 2**31
# The fields of an MoE model's experts (format version 2); a dense circuit is written without them.
MOE_IDENTITY = ("num_experts", "expert_size", "shared_expert_size", "dense_layers")


class ModelIdentity(Strict):
    source: str = Field(description="Path or Hub id the circuit was discovered on.")
    model_type: str = Field(description="config.model_type.")
    revision: str | None = Field(default=None, description="Hub commit, when the model came from the Hub.")
    weights_sha256: str | None = Field(default=None, description="Combined sha256 of the weight files.")
    config_sha256: str | None = Field(default=None, description="sha256 of config.json.")
    num_layers: int = Field(gt=0, lt=MAX_SIZE, description="Decoder layers.")
    intermediate_size: int = Field(gt=0, lt=MAX_SIZE, description="MLP neurons per layer (the narrowest layer's).")
    hidden_size: int = Field(gt=0, lt=MAX_SIZE, description="Residual width.")
    # Mixtures of experts (format version 2).
    num_experts: int | None = Field(default=None, gt=0, lt=MAX_SIZE, description="Routed experts per MoE layer.")
    expert_size: int | None = Field(default=None, gt=0, lt=MAX_SIZE, description="Neurons per routed expert.")
    shared_expert_size: int | None = Field(default=None, ge=0, lt=MAX_SIZE, description="Shared expert neurons.")
    dense_layers: list[int] | None = Field(default=None, description="Layers of an MoE model with a dense MLP.")
    layer_widths: list[int] | None = Field(
        default=None, description="Each layer's MLP neurons, where they differ (format version 2; None: all equal)."
    )

    @model_validator(mode="after")
    def _widths(self) -> ModelIdentity:
        w = self.layer_widths
        if w is not None and (
            len(w) != self.num_layers or not all(0 < x < MAX_SIZE for x in w) or min(w) != self.intermediate_size
        ):
            raise ValueError(f"layer_widths must give {self.num_layers} widths, the narrowest intermediate_size")
        return self

    def width(self, layer: int) -> int:
        """MLP neurons of `layer` (a dense layer's)."""
        return self.layer_widths[layer] if self.layer_widths is not None else self.intermediate_size

    def unit_width(self, expert: int | str | None, layer: int) -> int:
        """Neurons of the unit `expert` of `layer`: a dense MLP (None), a routed expert or the shared one (0 when
        the model has no such expert)."""
        if expert is None:
            return self.width(layer)
        if expert == SHARED:
            return self.shared_expert_size or 0
        return self.expert_size or 0 if self.num_experts and expert < self.num_experts else 0

    @property
    def num_neurons(self) -> int:
        """All MLP neurons of the model (an MoE layer: all its experts' and the shared one's)."""
        if not self.num_experts:
            return sum(self.width(i) for i in range(self.num_layers))
        dense = set(self.dense_layers or [])
        moe = self.num_experts * (self.expert_size or 0) + (self.shared_expert_size or 0)
        return sum(self.width(i) if i in dense else moe for i in range(self.num_layers))

    def shape(self) -> ModelShape:
        """The model's shape as recorded here, experts and per-layer widths included (what a k of a fraction and
        the attribution rows are sized by)."""
        moe = None
        if self.num_experts:
            dense = frozenset(self.dense_layers or ())
            moe = ExpertShape(self.num_experts, self.expert_size or 0, self.shared_expert_size or 0, dense)
        widths = tuple(self.layer_widths) if self.layer_widths is not None else None
        return ModelShape(self.num_layers, self.intermediate_size, self.hidden_size, moe, widths)

    def check_fits(
        self,
        model_type: str,
        shape: ModelShape,
        weights_sha256: str | None = None,
        force: bool = False,
        experts: bool = False,
    ) -> None:
        """Refuse a model that is not this one: another family, another shape (per-layer widths; the experts too
        where the circuit has `experts`), or other weights (`force` skips only the hash check)."""
        if not compatible(self.model_type, model_type):
            raise CircuitError(
                f"Circuit was made for a {self.model_type} model but this model is {model_type}.",
                "discover a circuit on this model.",
            )
        if (self.num_layers, self.intermediate_size) != (shape.num_layers, shape.intermediate_size):
            raise CircuitError(
                f"Circuit was made for {self.num_layers} layers x {self.intermediate_size} neurons, "
                f"this model has {shape.num_layers} x {shape.intermediate_size}.",
                "discover a circuit on this model.",
            )
        theirs_w = list(shape.layer_widths) if shape.layer_widths is not None else None
        if self.layer_widths != theirs_w:
            raise CircuitError(
                f"Circuit was made for MLP widths {self.layer_widths or 'all ' + str(self.intermediate_size)} by "
                f"layer, this model has {theirs_w or 'all ' + str(shape.intermediate_size)}.",
                "discover a circuit on this model.",
            )
        moe = shape.moe
        mine = (self.num_experts, self.expert_size, self.shared_expert_size or 0, sorted(self.dense_layers or []))
        theirs = (moe.num_experts, moe.width, moe.shared, sorted(moe.dense_layers)) if moe else (None, None, 0, [])
        if experts and mine != theirs:
            raise CircuitError(
                f"Circuit was made for experts (count, width, shared, dense layers) {mine}, this model has {theirs}.",
                "discover a circuit on this model.",
            )
        if weights_sha256 and self.weights_sha256 and weights_sha256 != self.weights_sha256 and not force:
            raise CircuitError(
                f"Circuit was made on weights {self.weights_sha256[:12]}, this model's are {weights_sha256[:12]}.",
                "pass --force to apply it to a fine-tune or re-upload of the same model.",
            )


def shape_fields(shape: ModelShape) -> dict[str, Any]:
    """The `ModelIdentity` fields of a shape beyond layers, width and hidden size: experts, per-layer widths."""
    widths = {"layer_widths": list(shape.layer_widths)} if shape.layer_widths is not None else {}
    return moe_fields(shape) | widths


def moe_fields(shape: ModelShape) -> dict[str, Any]:
    """The `ModelIdentity` fields of an MoE model's experts (none for a dense model)."""
    moe = shape.moe
    if moe is None:
        return {}
    return {
        "num_experts": moe.num_experts,
        "expert_size": moe.width,
        "shared_expert_size": moe.shared,
        "dense_layers": sorted(moe.dense_layers),
    }
