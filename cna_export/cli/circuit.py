"""The inspect command: a circuit summarised (neurons per layer, top neurons), optionally plotted."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(add) -> None:
    """Add this module's subcommand (`add(name, help, parents)` returns the subparser)."""
    p = add("inspect", "summarise a circuit: neurons per layer and top neurons", [])
    p.add_argument("circuit", type=Path, help="circuit file")
    p.add_argument("--top", type=int, default=20, help="how many neurons to list")
    p.add_argument("--plot", type=Path, help="write a PNG of neurons per layer")
    p.add_argument("--overwrite", action="store_true", help="replace existing --plot files")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> None:
    from cna_export.circuit.format import Circuit
    from cna_export.io.output import OutputPlan

    circuit = Circuit.load(args.circuit)
    outputs = OutputPlan(args.overwrite, protect=[args.circuit])
    plots = []
    if args.plot:  # a mixture of experts also gets where the neurons sit among the experts, beside the layer plot
        plots = [args.plot, *([_experts_plot(args.plot)] if circuit.is_moe else [])]
    for path in plots:
        outputs.file(path)
    print(circuit.summary(args.top))
    if plots:
        from cna_export.evaluate.plots import plot_experts, plot_layers

        with outputs:
            plot_layers(circuit, outputs.temp(plots[0]))
            if len(plots) > 1:
                plot_experts(circuit, outputs.temp(plots[1]))
        for path in plots:
            print(f"wrote {path}")


def _experts_plot(plot: Path) -> Path:
    return Path(plot).with_name(Path(plot).stem + "-experts.png")
