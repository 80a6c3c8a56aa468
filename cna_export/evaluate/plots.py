"""PNG figures: where a circuit sits in the model, and how its effect varies."""

from __future__ import annotations

from pathlib import Path

from cna_export.circuit.format import Circuit


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Save a figure as PNG and close it. `path` is a staged output (`cna_export.io.output.OutputPlan`): a report
    folder's temporary, or the temporary of `inspect --plot`."""
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    finally:
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


def expert_grid(circuit: Circuit) -> tuple[list[str], list[list[int]]]:
    """Neurons per (layer, unit) as a layers x columns grid: one column per routed expert, then "shared" and
    "dense" where the model has them (a dense layer's neurons sit in the "dense" column)."""
    m = circuit.model
    columns = [str(e) for e in range(m.num_experts or 0)]
    columns += ["shared"] * bool(m.shared_expert_size) + ["dense"] * bool(m.dense_layers or not m.num_experts)
    grid = [[0] * len(columns) for _ in range(m.num_layers)]
    for (layer, expert), count in circuit.expert_counts().items():
        grid[layer][columns.index("dense" if expert is None else str(expert))] += count
    return columns, grid


def plot_experts(circuit: Circuit, path: Path) -> None:
    """Heatmap layer x expert of a mixture-of-experts circuit: how many selected neurons sit in each expert."""
    import numpy as np

    plt = _figure()
    columns, grid = expert_grid(circuit)
    values = np.asarray(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.25 * len(columns)), min(12, 2 + 0.3 * len(grid))))
    image = ax.imshow(np.ma.masked_equal(values, 0), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="selected neurons")
    step = max(1, len(columns) // 32)
    ax.set_xticks(range(0, len(columns), step), [columns[i] for i in range(0, len(columns), step)], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{circuit.behaviour} circuit: {len(circuit.neurons)} neurons by layer and expert")
    save_png(fig, path)


def plot_delta_distribution(
    abs_delta, cuts: dict[str, float], path: Path, title: str = "", score: str = "|delta|"
) -> None:
    """Histogram of the selection score (|delta| by default) over candidate neurons (log counts), with a vertical
    line at each k's cut-off.

    Args:
        abs_delta: the score of every neuron that could be selected (1-D array-like).
        cuts: label (e.g. "k=1600") -> the smallest score that k selects.
        score: what the values are, for the axis label.
    """
    import numpy as np

    plt = _figure()
    values = np.asarray(abs_delta, dtype=float)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.hist(values, bins=100, color="#7a7a7a", log=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, cut) in enumerate(cuts.items()):
        ax.axvline(cut, color=colors[i % len(colors)], linestyle="--", label=f"{label} (>= {cut:.3g})")
    ax.set_xlabel(score if score != "|delta|" else "|delta| (mean positive - mean negative activation)")
    ax.set_ylabel("neurons")
    ax.set_title(title or f"{score} of {len(values)} neurons")
    if cuts:
        ax.legend(fontsize=8)
    save_png(fig, path)


# Panels of plot_metrics: (title, [(metric key, label)]).
METRIC_PANELS = [
    ("behaviour", [("rate", "held-out positive"), ("benign_rate", "benign (false positive)")]),
    ("KL(original || edited), benign", [("kl_first", "first token"), ("kl_mean", "mean over first N")]),
    ("quality", [("ppl_ratio", "perplexity ratio"), ("repetition", "1 - repeated 4-grams")]),
]


def plot_metrics(points: list[dict], baseline: dict, x: str, group: str, path: Path, title: str = "") -> None:
    """Metrics of evaluated points against `x` ("multiplier" or "k"), one line per value of `group`.

    Solid lines are the first metric of a panel, dashed the second; the original model is drawn at m = 1 on
    multiplier plots and as a dotted horizontal line on k plots.
    """
    plt = _figure()
    fig, axes = plt.subplots(1, len(METRIC_PANELS), figsize=(5 * len(METRIC_PANELS), 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = sorted({p[group] for p in points if p[group] is not None})
    for ax, (panel, metrics) in zip(axes, METRIC_PANELS):
        for gi, g in enumerate(groups):
            rows = [p for p in points if p[group] == g]
            if x == "multiplier":  # the original model is every circuit at m = 1
                rows = rows + [{**baseline, "multiplier": 1.0}]
            rows.sort(key=lambda p: p[x])
            for mi, (key, label) in enumerate(metrics):
                ax.plot(
                    [p[x] for p in rows],
                    [p[key] for p in rows],
                    marker="o",
                    color=colors[gi % len(colors)],
                    linestyle="-" if mi == 0 else "--",
                    label=f"{label}, {group}={g:g}",
                )
        if x != "multiplier":
            for mi, (key, _) in enumerate(metrics):
                ax.axhline(baseline[key], color="black", linestyle=":", alpha=0.5 + 0.3 * mi)
        if panel == "behaviour":
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(panel)
        ax.set_xlabel("multiplier m" if x == "multiplier" else "k (neurons)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    save_png(fig, path)
