"""Neurons inside experts at run time: what CNA measures for them, where it is captured, and runtime scaling.

**The activation of an expert neuron.** Expert e of a layer computes `h_e(x) = act(gate_e x) * (up_e x)` and adds
`w_e(x) * down_e h_e(x)` to the residual stream, where `w_e(x)` is its router weight (0 when the token is not
routed to e). CNA's per-neuron activation for neuron j of expert e at the last token is therefore
`a_ej = w_e(x) * h_ej(x)`: the coefficient of column j of `down_e` in the layer's output. The mean difference
positive - negative is then the neuron's expected contribution to the output, routing included: a neuron of an
expert that the positive prompts never reach has delta 0 however large its unrouted value would be, and zeroing
it (m = 0) removes exactly `a_ej * down_e[:, j]` from every token. The shared expert sees every token; its weight
is its sigmoid gate (Qwen2-MoE `shared_expert_gate`; 1 for an ungated one, DeepSeek's `shared_experts`), and a
dense MLP's weight is 1. Llama 4 scales the expert's input instead (`down_e h_e(w_e x)`): the coefficient of
column j is then `h_ej(w_e x)`, which is 0 for an unrouted expert too, and is what is measured there.

**Where it is captured.** transformers 5 keeps the experts of a layer as fused 3-D parameters
(`gate_up_proj` [E, 2n, hidden], `down_proj` [E, hidden, n]) inside one module that may dispatch to grouped or
batched kernels; there is no per-expert Linear to hook. The capture is a forward-pre-hook on that module: its
inputs are the layer's hidden states and the routing (top-k indices and weights), and the hook recomputes
`w_e * h_e` for the last token of each row only, for every expert at once (an einsum over the fused weights),
which is cheap next to the forward pass. Tests check it against an unfused loop over the on-disk per-expert
tensors. The layouts differ by family (`ExpertSpec.fused`, `EXPERT_NEURONS`): gpt-oss interleaves gate and up,
adds biases and clamps; Llama 4's module takes every expert's router-scaled input, its weights come from the router.

**Runtime scaling** (the reference of the fold, and what evaluation uses) multiplies the columns of the fused
`down_proj` parameter in place while the context is open and restores the saved columns after: scaling column j
of `down_e` by m is exactly scaling `a_ej` by m, whatever the router does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cna_export.arch.experts import FUSED_DOWN, SHARED, ExpertKey
from cna_export.arch.spec import ArchSpec, ModelShape
from cna_export.attribution.hooks import submodule
from cna_export.fold.scale import UnitEdits, scale_rows_


def router_weights(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Dense [tokens, E] router weights from the top-k routing (0 for experts a token is not routed to)."""
    # Some implementations route padding to the index `num_experts` (a dropped slot): give it no weight.
    keep = top_k_index < num_experts
    dense = torch.zeros(top_k_index.shape[0], num_experts + 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
    dense.scatter_add_(1, torch.where(keep, top_k_index, num_experts), torch.where(keep, top_k_weights, 0))
    return dense[:, :num_experts]


def _gate_up(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`act(gate_e x) * (up_e x)` from `gate_up_proj` [E, 2n, hidden] (gate rows first, as the forward chunks it)."""
    gate, up = torch.einsum("th,eoh->teo", x, experts.gate_up_proj.to(x.dtype)).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _gpt_oss(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """gpt-oss: `gate_up_proj` [E, hidden, 2n] interleaved, plus its bias, through the module's own clamped SwiGLU."""
    gate_up = torch.einsum("th,eho->teo", x, experts.gate_up_proj.to(x.dtype)) + experts.gate_up_proj_bias.to(x.dtype)
    return experts._apply_gate(gate_up)


def _llama4(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama 4: x [tokens, E, hidden] is each expert's own input (already scaled by its router weight);
    `gate_up_proj` [E, hidden, 2n] holds the gate columns, then the up columns."""
    gate, up = torch.einsum("teh,eho->teo", x, experts.gate_up_proj.to(x.dtype)).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


# ExpertSpec.fused -> the neurons h_e of every expert from the fused parameters ([tokens, E, n]).
EXPERT_NEURONS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "gate_up": _gate_up,
    "gpt_oss": _gpt_oss,
    "llama4": _llama4,
}


def routed_activations(
    experts: nn.Module, x: torch.Tensor, weights: torch.Tensor, fused: str = "gate_up"
) -> torch.Tensor:
    """`w_e * h_e(x)` for every expert: [tokens, E, n] from x [tokens, hidden], weights [tokens, E] (the router
    weight scales the expert's output; `fused` names the layout, see `EXPERT_NEURONS`)."""
    return EXPERT_NEURONS[fused](experts, x) * weights.to(x.dtype)[..., None]


def _last_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The rows of the last token of each sequence from [batch * seq, d] or [batch, seq, d] hidden states (the
    experts see flattened tokens; DeepSeek's shared experts the unflattened ones)."""
    return x.reshape(batch, -1, x.shape[-1])[:, -1]


@contextlib.contextmanager
def capture_units(
    layers: nn.ModuleList,
    spec: ArchSpec,
    shape: ModelShape,
    upto: int,
    add: Callable[..., None],
    batch: Callable[[], int],
) -> Iterator[None]:
    """Capture the last-token activations of every unit of layers 0..upto into `add(layer, act, offset=,
    groups=, routed=)`: a dense MLP's down_proj input, `w_e * h_e` of each routed expert, the shared expert's
    gated input. `batch()` is the number of rows of the batch in flight (the experts see flattened tokens); 0
    while nothing is recorded (the shared-prefix pass)."""
    assert spec.experts is not None and shape.moe is not None
    moe, ex = shape.moe, spec.experts
    handles, pending, scores = [], {}, {}

    def on_experts(layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            b = batch()
            if not b:
                return
            if ex.fused == "llama4":  # the inputs of all experts stacked: [E * tokens, hidden], router-scaled
                w = _last_rows(scores.pop(layer), b)
                x = args[0].reshape(moe.num_experts, b, -1, args[0].shape[-1])[:, :, -1].transpose(0, 1)
                act = EXPERT_NEURONS[ex.fused](module, x)
            else:
                hidden, index, weight = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
                w = router_weights(_last_rows(index, b), _last_rows(weight, b), moe.num_experts)
                act = routed_activations(module, _last_rows(hidden, b), w, ex.fused)
            add(layer, act.reshape(b, -1), groups=moe.num_experts, routed=w > 0)

        return hook

    def on_router(layer: int):
        def hook(_module: nn.Module, _args: tuple, out: tuple) -> None:
            if batch():
                scores[layer] = out[0]  # Llama 4's router: (scores [tokens, E], 0 where not routed; logits)

        return hook

    def on_shared_input(layer: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            if not batch():
                return
            if ex.shared_gate is None:  # an ungated shared expert: its weight is 1
                add(layer, _last_rows(args[0], batch()), offset=moe.num_experts * moe.width)
            else:
                pending[layer] = _last_rows(args[0], batch())

        return hook

    def on_shared_gate(layer: int):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if layer not in pending:
                return
            gate = torch.sigmoid(_last_rows(out, batch()))
            add(layer, pending.pop(layer) * gate, offset=moe.num_experts * moe.width)

        return hook

    try:
        for i in range(upto + 1):
            layer = layers[i]
            if i in moe.dense_layers:
                dense = submodule(layer, spec.hook, spec, i)
                handles.append(dense.register_forward_pre_hook(lambda _m, args, i=i: add(i, args[0][:, -1, :])))
                continue
            experts = submodule(layer, ex.module, spec, i)
            handles.append(experts.register_forward_pre_hook(on_experts(i), with_kwargs=True))
            if ex.router:
                handles.append(submodule(layer, ex.router, spec, i).register_forward_hook(on_router(i)))
            if moe.shared and ex.shared_hook:
                shared = submodule(layer, ex.shared_hook, spec, i)
                handles.append(shared.register_forward_pre_hook(on_shared_input(i)))
            if moe.shared and ex.shared_gate:
                handles.append(submodule(layer, ex.shared_gate, spec, i).register_forward_hook(on_shared_gate(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def scaled_units(layers: nn.ModuleList, spec: ArchSpec, edits: UnitEdits) -> Iterator[None]:
    """Scale neurons of dense MLPs, routed and shared experts at run time (exact: the neurons' slices of the
    in-memory down projections are scaled in place and restored when the context closes)."""
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (layer, expert), (index, mult) in edits.items():
                rows = down_rows(layers, layer, spec, expert)
                idx = index.to(rows.device)
                saved.append((rows, idx, rows[idx].clone()))
                scale_rows_(rows, idx, mult.to(rows.device))
        yield
    finally:
        with torch.no_grad():
            for rows, idx, original in reversed(saved):
                rows[idx] = original


def down_rows(layers: nn.ModuleList, layer: int, spec: ArchSpec, expert: ExpertKey) -> torch.Tensor:
    """A view of the in-memory down projection of a unit of `layer` with one row per neuron (a dense MLP, the shared
    expert, or a routed expert's slice of the fused `down_proj`, laid out as `FUSED_DOWN` says)."""
    if expert is None or expert == SHARED:
        assert expert is None or spec.experts is not None and spec.experts.shared_hook is not None
        return submodule(layers[layer], spec.hook if expert is None else spec.experts.shared_hook, spec, layer).weight.T
    assert spec.experts is not None
    site, fused = FUSED_DOWN[spec.experts.fused], submodule(layers[layer], spec.experts.module, spec, layer).down_proj
    return site.rows(fused, fused.shape[site.axis], expert)
