"""Stacking circuits: several edits of one model applied together (e.g. refusal-strengthen and french-ablate).

Scaling neuron j by m1 and then by m2 scales it by m1 * m2, so a stack is one circuit whose neurons are the union
of the circuits' neurons, each with the product of the multipliers it gets. The stacked circuit lists its sources
(file, sha256, behaviour, multiplier), so the export's circuit.json and card say where every edit came from.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from cna_export.arch import compatible
from cna_export.circuit.format import Circuit, Neuron, RecordedSelection, StackedSource
from cna_export.errors import CircuitError
from cna_export.fold.scale import check_multiplier


def _check_same_model(circuits: list[Circuit], names: list[str]) -> None:
    """Every circuit of a stack must have been made for one model (type and shape; the weights when known)."""
    first, name0 = circuits[0].model, names[0]
    for circuit, name in zip(circuits[1:], names[1:]):
        me = circuit.model
        same_shape = (me.num_layers, me.intermediate_size, me.hidden_size, me.layer_widths) == (
            first.num_layers,
            first.intermediate_size,
            first.hidden_size,
            first.layer_widths,
        )
        if not compatible(first.model_type, me.model_type) or not same_shape:
            raise CircuitError(
                f"Circuits {name0} ({first.model_type}, {first.num_layers} x {first.intermediate_size}) and "
                f"{name} ({me.model_type}, {me.num_layers} x {me.intermediate_size}) were made for different models.",
                "stack only circuits discovered on the same model.",
            )


def stack(circuits: list[Circuit], names: list[str] | None = None, allow_negative: bool = False) -> Circuit:
    """One circuit with the edits of all `circuits`: a neuron listed in several gets the product of its multipliers.

    Args:
        circuits: the circuits, all made for one model.
        names: a name per circuit for the record (its file name); default `circuit-1`, `circuit-2`, ...
        allow_negative: accept negative multipliers (as `Circuit.edits`).

    Returns:
        The circuit itself when there is one; otherwise a new circuit whose default multiplier is the most common
        product (the others are per-neuron), with `sources` naming each circuit.

    Example:
        >>> both = stack([Circuit.load(p) for p in paths], [p.name for p in paths])
    """
    if not circuits:
        raise CircuitError("No circuit to apply.", "pass at least one circuit file.")
    if len(circuits) == 1:
        return circuits[0]
    names = names or [f"circuit-{i + 1}" for i in range(len(circuits))]
    if any(getattr(n, "expert", None) is not None for c in circuits for n in c.neurons):
        raise CircuitError(
            "Stacking circuits with neurons inside experts is not supported yet.",
            "apply mixture-of-experts circuits one at a time.",
        )
    _check_same_model(circuits, names)
    product: dict[tuple[int, int], float] = {}
    delta: dict[tuple[int, int], float] = {}
    for circuit in circuits:
        for n in circuit.neurons:
            key = (n.layer, n.index)
            m = check_multiplier(n.multiplier if n.multiplier is not None else circuit.multiplier, allow_negative)
            product[key] = product.get(key, 1.0) * m
            delta.setdefault(key, n.delta)  # the first circuit's measurement; deltas of different prompts do not add
    bad = next((key for key, m in product.items() if not math.isfinite(m)), None)
    if bad is not None:
        raise CircuitError(f"Neuron {bad} gets a product of multipliers that overflows.", "use smaller multipliers.")
    default = Counter(product.values()).most_common(1)[0][0]
    # The model's identity: the first circuit's, with a weights hash only where all circuits agree on it.
    hashes = {c.model.weights_sha256 for c in circuits}
    model = circuits[0].model.model_copy(update={"weights_sha256": hashes.pop() if len(hashes) == 1 else None})
    sources = [
        StackedSource(
            file=name,
            sha256=c.sha256(),
            behaviour=c.behaviour,
            recipe=c.recipe,
            multiplier=c.multiplier,
            neurons=len(c.neurons),
        )
        for c, name in zip(circuits, names)
    ]
    neurons = [
        Neuron(layer=l, index=i, delta=delta[(l, i)], multiplier=None if m == default else m)
        for (l, i), m in sorted(product.items())
    ]
    return Circuit(
        behaviour=" + ".join(c.behaviour for c in circuits),
        multiplier=default,
        model=model,
        prompts={f"{s.file}:{k}": v for s, c in zip(sources, circuits) for k, v in c.prompts.items()},
        selection=RecordedSelection(top_k=len(neurons)),
        neurons=neurons,
        sources=sources,
    )


def load_stack(paths: list[Path], multiplier: float | None = None, allow_negative: bool = False) -> Circuit:
    """Load circuit files and stack them (see `stack`). `multiplier` (the --multiplier override) needs one file:
    one number for several circuits would turn an ablation and an amplification into the same edit."""
    paths = [Path(p) for p in paths]
    if multiplier is not None and len(paths) > 1:
        raise CircuitError(
            "--multiplier overrides the multipliers of one circuit, but several were given.",
            "set each circuit's multiplier in its file, or apply them one at a time.",
        )
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]  # same file names in different folders: keep them apart
    return stack([Circuit.load(p) for p in paths], names, allow_negative)
