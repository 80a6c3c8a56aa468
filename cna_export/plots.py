"""PNG figures: where a circuit sits in the model, and how its effect varies."""

from __future__ import annotations

import os
from pathlib import Path

from cna_export.circuit import Circuit


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Save a figure atomically and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.cna-tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _figure().close(fig)


def plot_layers(circuit: Circuit, path: Path) -> None:
    """Neurons per layer (bars) and the |delta| of each selected neuron (dots), by layer."""
    plt = _figure()
    layers = range(circuit.model.num_layers)
    counts = circuit.layer_counts()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.bar(list(layers), [counts.get(i, 0) for i in layers], color="#3b6ea8")
    ax1.set_ylabel("selected neurons")
    ax1.set_title(f"{circuit.behaviour} circuit: {len(circuit.neurons)} neurons on {circuit.model.source}")
    ax2.scatter([n.layer for n in circuit.neurons], [abs(n.delta) for n in circuit.neurons], s=8, alpha=0.6)
    ax2.set_ylabel("|delta|")
    ax2.set_xlabel("layer")
    save_png(fig, path)
