"""Runtime access to a loaded model's MLPs: find the down projections, capture their input, scale neurons.

Attribution captures the input of `down_proj` (one value per neuron). Runtime scaling is the reference for
the folded weights: the tests check that both give the same logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cna_export.arch.spec import ArchSpec
from cna_export.errors import ArchitectureError
from cna_export.fold.scale import LayerEdits, UnitEdits


def submodule(root: nn.Module, path: str, spec: ArchSpec, layer: int | None = None) -> nn.Module:
    """The module at `path` inside `root` (a loaded model, or its decoder layer `layer`), where the architecture
    table says it is. A loaded model without it (its config and the table disagree, e.g. on which layers are dense)
    is one line, not an AttributeError."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        where = f"Layer {layer} of this" if layer is not None else "This"
        raise ArchitectureError(
            f"{where} {spec.model_type} model has no module {path!r}, where the architecture table expects it.",
            "check that config.json belongs to the checkpoint (its keys decide which layers are dense); if it does, "
            "cna-export does not support this variant of the family yet.",
        ) from None


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder layers of a loaded model (where the architecture table says they are)."""
    return submodule(model, spec.layers_module, spec)


def down_projs(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    """The module whose input is the neurons (`spec.hook`, usually `mlp.down_proj`) of every layer, in order."""
    return [submodule(layer, spec.hook, spec, i) for i, layer in enumerate(decoder_layers(model, spec))]


def mlp_of(model: nn.Module, spec: ArchSpec, layer: int) -> nn.Module:
    """The module that computes the neurons of `layer` and contains the hook module (its parent)."""
    return submodule(decoder_layers(model, spec)[layer], spec.hook.rpartition(".")[0], spec, layer)


@contextlib.contextmanager
def pre_hooks(modules: dict[int, nn.Module], fn: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Install `fn(layer, input)` as a forward-pre-hook on each module; a returned tensor replaces the input."""

    def make(layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            out = fn(layer, args[0])
            return None if out is None else (out, *args[1:])

        return hook

    handles = [module.register_forward_pre_hook(make(layer)) for layer, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def scaled_neurons(model: nn.Module, spec: ArchSpec, edits: LayerEdits | UnitEdits) -> Iterator[None]:
    """Scale neurons at run time: multiply the chosen inputs of `down_proj` while the context is open.

    `edits` keyed by (layer, expert) (`Circuit.unit_edits`, a mixture of experts) scale the experts' fused
    parameters instead (`attribution.experts.scaled_units`)."""
    if any(isinstance(key, tuple) for key in edits):
        from cna_export.attribution.experts import scaled_units

        with scaled_units(decoder_layers(model, spec), spec, edits):
            yield
        return
    projs = down_projs(model, spec)

    def scale(layer: int, x: torch.Tensor) -> torch.Tensor:
        index, mult = edits[layer]
        x = x.clone()
        x[..., index.to(x.device)] *= mult.to(device=x.device, dtype=x.dtype)
        return x

    with pre_hooks({layer: projs[layer] for layer in edits}, scale):
        yield
