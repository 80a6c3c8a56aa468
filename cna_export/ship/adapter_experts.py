"""Neurons inside routed experts as LoRA factors: one PEFT LoRA on a layer's stacked expert parameter, one GGUF
LoRA on llama.cpp's `ffn_down_exps` / `ffn_up_exps`.

transformers 5 holds a layer's routed experts in 3-D parameters (`mlp.experts.down_proj` [E, hidden, n],
`gate_up_proj` [E, 2n, hidden]; gpt-oss and Llama 4 store each expert transposed), and has no Linear per expert:
PEFT adapts them with `LoraConfig(target_parameters=[...])`. Its `ParamWrapper` gives every expert e its own
rank-r update of its matrix `P[e]` ([d1, d2]): `lora_A` is [E * r, in] (expert e's rows e*r .. e*r + r - 1) and
`lora_B` [out, r * E] (expert e's columns e, E + e, 2E + e, ...), read as `P[e] + B_e @ A_e` where the module
says the experts are stored [E, out, in] (not `is_transposed`, as PEFT reads a module without the attribute) and
as `P[e] + (B_e @ A_e)^T` where it says [E, in, out] (gpt-oss). Scaling expert e's neurons S_e by m is a
rank-|S_e| update of `P[e]`, the same factors as a dense layer's (`ship.adapter.placed_factors`); r is the largest
|S_e| of the layer and the other experts' factors are padded with zeros (exact: they add zeros), alpha = r.

llama.cpp applies a LoRA of a stacked expert tensor per expert (`build_lora_mm_id`: `mul_mat_id` of lora_b
and lora_a with the token's routed experts): `blk.N.ffn_down_exps.weight.lora_a` is [E, r, in] and `.lora_b`
[E, out, r] in numpy order, the same per-expert factors in llama.cpp's layout of the expert (its up tensor is not
fused with the gate, so an up neuron's selector has no offset there).

The shared expert and the dense layers of an MoE model are ordinary Linear modules (`ship.adapter.LoraPair`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from cna_export.arch.experts import FUSED_DOWN, ExpertSpec
from cna_export.arch.sites import Site
from cna_export.errors import ArchitectureError

if TYPE_CHECKING:
    from cna_export.arch.spec import ArchSpec, ModelShape
    from cna_export.audit.weights import Weights
    from cna_export.fold.scale import UnitEdits

# The up neurons inside transformers 5's fused `gate_up_proj` (the layouts of `FUSED_DOWN`, arch/experts.py):
# gate then up along the rows of each expert's [2n, hidden] ("gate_up"), or along the columns of its [hidden, 2n]
# (Llama 4). gpt-oss interleaves gate and up and clamps up, so its up rows are not neurons (ArchSpec.check_target).
FUSED_UP: dict[str, Site] = {
    "gate_up": Site("gate_up_proj", axis=1, part=1, parts=2, expert_axis=0),
    "llama4": Site("gate_up_proj", axis=2, part=1, parts=2, expert_axis=0),
}
# The layouts whose experts module says `is_transposed = True` (stored [E, in, out]), so PEFT forms
# `P[e] + (B_e @ A_e)^T`; Llama 4's module stores [E, in, out] too but does not say so, and PEFT then reads it
# as [E, out, in]: the update has the parameter's shape either way, only which factor is which differs.
PEFT_TRANSPOSED = frozenset({"gpt_oss"})
# The first PEFT whose `target_parameters` and mixture-of-experts retargeting this module was tested with: 0.21
# rewrote a dense layer's `down_proj` target of an MoE model into the experts' parameter.
PEFT_MIN = (0, 22)


@dataclass(frozen=True)
class ExpertLoraPair:
    """The LoRA of one layer's routed experts (one stacked parameter): PEFT's tensors and llama.cpp's."""

    module: str  # the PEFT target parameter, e.g. model.layers.1.mlp.experts.down_proj
    gguf_tensor: str  # the base tensor's GGUF name, e.g. blk.1.ffn_down_exps.weight
    a: torch.Tensor  # PEFT's lora_A [E * rank, in]
    b: torch.Tensor  # PEFT's lora_B [out, rank * E]
    gguf_a: torch.Tensor  # llama.cpp's lora_a [E, rank, in], float32 (numpy order)
    gguf_b: torch.Tensor  # llama.cpp's lora_b [E, out, rank], float32
    rank: int  # per expert
    experts: tuple[int, ...]  # the experts with neurons in the circuit
    parameter: ClassVar[bool] = True  # a `target_parameters` entry, not a module

    @property
    def owner(self) -> str:
        """The module whose factors these are in PEFT's file: the experts module that holds the parameter (PEFT
        wraps the module; one adapter targets one parameter of it, so its factors are not nested)."""
        return self.module.rpartition(".")[0]


def runtime_site(ex: ExpertSpec, target: str) -> Site:
    """Where transformers 5's fused expert parameter of `target` holds the neurons (relative to the experts
    module)."""
    return FUSED_DOWN[ex.fused] if target == "down" else FUSED_UP[ex.fused]


def check_peft_version() -> None:
    """Refuse a PEFT older than `PEFT_MIN` for a mixture-of-experts model, in one line."""
    import peft

    found = tuple(int(p) for p in peft.__version__.split(".")[:2] if p.isdigit())
    if found < PEFT_MIN:
        raise ArchitectureError(
            f"Adapters of mixture-of-experts models need PEFT >= {'.'.join(map(str, PEFT_MIN))} (found "
            f"{peft.__version__}): older ones retarget a dense down_proj to the experts' parameter.",
            f"pip install -U 'peft>={'.'.join(map(str, PEFT_MIN))}', or export with `cna-export apply`.",
        )


def expert_pairs(weights: Weights, spec: ArchSpec, shape: ModelShape, edits: UnitEdits, target: str,
                 selector_dtype: torch.dtype) -> list[ExpertLoraPair]:  # fmt: skip
    """One `ExpertLoraPair` per layer with routed-expert neurons in `edits` (keys (layer, e), e an int), read
    from the model's own weights (`weights`: safetensors, or GGUF dequantized)."""
    by_layer: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, expert), edit in edits.items():
        by_layer.setdefault(layer, {})[expert] = edit
    return [_layer_pair(weights, spec, shape, layer, units, target, selector_dtype) for layer, units in
            sorted(by_layer.items())]  # fmt: skip


def _layer_pair(
    weights: Weights, spec: ArchSpec, shape: ModelShape, layer: int, units: dict, target: str,
    selector_dtype: torch.dtype,
) -> ExpertLoraPair:  # fmt: skip
    from cna_export.ship.adapter import placed_factors, scaled_factor

    ex, moe = spec.experts, shape.moe
    source, gguf = weights.spec.experts.site(target, 0, weights.fmt), ex.site(target, 0, "gguf").of_expert()
    if source.codec is not None:
        raise ArchitectureError(
            f"The experts of {source.name(layer)} are stored as {source.codec.upper()} codes, which transformers "
            "dequantizes on load, so a LoRA of their values would not be the folded MXFP4 export.",
            "export with `cna-export apply` (it folds the codes exactly), or adapt a bf16 checkpoint of the model.",
        )
    runtime = runtime_site(ex, target).of_expert()
    rank, width, held = max(len(index) for index, _ in units.values()), moe.width, {}
    peft, ggml = [], []
    for e in range(moe.num_experts):
        index, mult = units.get(e, (torch.zeros(0, dtype=torch.long), torch.zeros(0)))
        name = source.name(layer, e)
        rows = _expert_rows(weights, name, e, held)
        scaled = scaled_factor(rows[index], mult, f"{name} (expert {e})", index)
        peft.append(placed_factors(scaled, index, runtime.offset(width), runtime.axis, runtime.parts * width,
                                   selector_dtype, rank))  # fmt: skip
        ggml.append(placed_factors(scaled, index, gguf.offset(width), gguf.axis, gguf.parts * width, torch.float32,
                                   rank))  # fmt: skip
    a, b = peft_stack([p[0] for p in peft], [p[1] for p in peft], ex.fused in PEFT_TRANSPOSED)
    return ExpertLoraPair(
        module=f"{spec.layers_module}.{layer}.{ex.module}.{runtime.template}",
        gguf_tensor=ex.site(target, 0, "gguf").name(layer),
        a=a, b=b, gguf_a=torch.stack([g[0] for g in ggml]), gguf_b=torch.stack([g[1] for g in ggml]),
        rank=rank, experts=tuple(sorted(units)),
    )  # fmt: skip


def peft_stack(a: list[torch.Tensor], b: list[torch.Tensor], transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A, lora_B) of a stacked parameter from each expert's (A_e [r, d2], B_e [d1, r]), where
    expert e's update of its matrix [d1, d2] is `B_e @ A_e` (`ParamWrapper.get_delta_weight` undone: A is read
    as [E, r, in] and B as [out, r, E]; `transposed`: in = d1 and out = d2, and the factors trade places)."""
    a3, b3 = torch.stack(a), torch.stack(b)  # [E, r, d2], [E, d1, r]
    experts, rank = a3.shape[0], a3.shape[1]
    if transposed:  # P[e] + (Bm_e @ Am_e)^T: Am_e = B_e^T [r, d1], Bm_e = A_e^T [d2, r]
        big_a, big_b = b3.transpose(1, 2).reshape(experts * rank, -1), a3.permute(2, 1, 0).reshape(-1, rank * experts)
    else:
        big_a, big_b = a3.reshape(experts * rank, -1), b3.permute(1, 2, 0).reshape(-1, rank * experts)
    return big_a.contiguous(), big_b.contiguous()  # a reshape may be a strided view (rank 1), which safetensors refuses


def _expert_rows(weights: Weights, name: str, expert: int, held: dict[str, torch.Tensor]) -> torch.Tensor:
    """Expert `expert`'s part of tensor `name`, one row per neuron. A safetensors tensor that stacks the layer's
    experts is read once per layer (a GGUF one decodes only that expert's bytes)."""
    if weights.fmt != "safetensors" or not weights.stacked(name):
        return weights.neuron_values(name, expert)
    if name not in held:
        held.clear()
        held[name] = weights.values(name)
    part = held[name].select(weights.site(name).expert_axis, expert)
    return weights.unit_site(name).rows(part, weights.width(name))
