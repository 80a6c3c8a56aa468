"""Neurons inside experts at run time: what CNA measures for them, where it is captured, and runtime scaling.

**The activation of an expert neuron.** Expert e of a layer computes `h_e(x) = act(gate_e x) * (up_e x)` and adds
`w_e(x) * down_e h_e(x)` to the residual stream, where `w_e(x)` is its router weight (0 when the token is not
routed to e). CNA's per-neuron activation for neuron j of expert e at the last token is therefore
`a_ej = w_e(x) * h_ej(x)`: the coefficient of column j of `down_e` in the layer's output. The mean difference
positive - negative is then the neuron's expected contribution to the output, routing included: a neuron of an
expert that the positive prompts never reach has delta 0 however large its unrouted value would be, and zeroing
it (m = 0) removes exactly `a_ej * down_e[:, j]` from every token. The shared expert sees every token; its weight
is its sigmoid gate (Qwen2-MoE `shared_expert_gate`), and a dense MLP's weight is 1.

**Where it is captured.** transformers 5 keeps the experts of a layer as fused 3-D parameters
(`gate_up_proj` [E, 2n, hidden], `down_proj` [E, hidden, n]) inside one module that may dispatch to grouped or
batched kernels; there is no per-expert Linear to hook. The capture is a forward-pre-hook on that module: its
inputs are the layer's hidden states and the routing (top-k indices and weights), and the hook recomputes
`w_e * h_e` for the last token of each row only, for every expert at once (an einsum over the fused weights),
which is cheap next to the forward pass. Tests check it against an unfused loop over the on-disk per-expert
tensors.

**Runtime scaling** (the reference of the fold, and what evaluation uses) multiplies the columns of the fused
`down_proj` parameter in place while the context is open and restores the saved columns after: scaling column j
of `down_e` by m is exactly scaling `a_ej` by m, whatever the router does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cna_export.arch.experts import SHARED
from cna_export.arch.spec import ArchSpec, ModelShape
from cna_export.fold.scale import UnitEdits


def router_weights(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Dense [tokens, E] router weights from the top-k routing (0 for experts a token is not routed to)."""
    # Some implementations route padding to the index `num_experts` (a dropped slot): give it no weight.
    keep = top_k_index < num_experts
    dense = torch.zeros(top_k_index.shape[0], num_experts + 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
    dense.scatter_add_(1, torch.where(keep, top_k_index, num_experts), torch.where(keep, top_k_weights, 0))
    return dense[:, :num_experts]


def routed_activations(experts: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`w_e * act(gate_e x) * (up_e x)` for every expert: [tokens, E, n] from x [tokens, hidden], weights [tokens, E].

    Reads the fused `gate_up_proj` [E, 2n, hidden] (gate rows first, as transformers' experts forward chunks it)."""
    gate_up = torch.einsum("th,eoh->teo", x, experts.gate_up_proj.to(x.dtype))
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up * weights.to(x.dtype)[..., None]


def _last_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The rows of the last token of each sequence from flattened [batch * seq, ...] hidden states."""
    return x.reshape(batch, x.shape[0] // batch, *x.shape[1:])[:, -1]


@contextlib.contextmanager
def capture_units(
    layers: nn.ModuleList, spec: ArchSpec, shape: ModelShape, upto: int,
    add: Callable[..., None], batch: Callable[[], int],
) -> Iterator[None]:  # fmt: skip
    """Capture the last-token activations of every unit of layers 0..upto into `add(layer, act, offset=,
    groups=, routed=)`: a dense MLP's down_proj input, `w_e * h_e` of each routed expert, the shared expert's
    gated input. `batch()` is the number of rows of the batch in flight (the experts see flattened tokens); 0
    while nothing is recorded (the shared-prefix pass)."""
    assert spec.experts is not None and shape.moe is not None
    moe, ex = shape.moe, spec.experts
    handles, pending = [], {}

    def on_experts(layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, index, weight = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
            b = batch()
            if not b:
                return
            w = router_weights(_last_rows(index, b), _last_rows(weight, b), moe.num_experts)
            act = routed_activations(module, _last_rows(hidden, b), w)
            add(layer, act.reshape(b, -1), groups=moe.num_experts, routed=w > 0)

        return hook

    def on_shared_input(layer: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            if batch():
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
                handles.append(layer.get_submodule(spec.hook).register_forward_pre_hook(
                    lambda _m, args, i=i: add(i, args[0][:, -1, :])))  # fmt: skip
                continue
            handles.append(layer.get_submodule(ex.module).register_forward_pre_hook(on_experts(i), with_kwargs=True))
            if moe.shared and ex.shared_hook and ex.shared_gate:
                handles.append(layer.get_submodule(ex.shared_hook).register_forward_pre_hook(on_shared_input(i)))
                handles.append(layer.get_submodule(ex.shared_gate).register_forward_hook(on_shared_gate(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def scaled_units(layers: nn.ModuleList, spec: ArchSpec, edits: UnitEdits) -> Iterator[None]:
    """Scale neurons of dense MLPs, routed and shared experts at run time (exact: columns of the in-memory down
    projections are scaled in place and restored when the context closes)."""
    saved: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (layer, expert), (index, mult) in edits.items():
                weight, where = _down_columns(layers[layer], spec, expert)
                idx = index.to(weight.device)
                cols = (*where, slice(None), idx)
                saved.append((weight, cols, weight[cols].clone()))
                weight[cols] = (weight[cols].float() * mult.to(weight.device)).to(weight.dtype)
        yield
    finally:
        with torch.no_grad():
            for weight, cols, original in reversed(saved):
                weight[cols] = original


def _down_columns(layer: nn.Module, spec: ArchSpec, expert) -> tuple[torch.Tensor, tuple]:
    """The in-memory down-projection weight of a unit, and the leading index that selects it ([hidden, n] rest)."""
    if expert is None:
        return layer.get_submodule(spec.hook).weight, ()
    assert spec.experts is not None
    if expert == SHARED:
        return layer.get_submodule(spec.experts.shared_hook).weight, ()
    return layer.get_submodule(spec.experts.module).down_proj, (expert,)
