"""GGUF-native `run refusal-ablate` (discovery inside llama.cpp, patched GGUF out) against the old path
(transformers dequantizes the GGUF, attribution in torch, a float32 safetensors export), on real quantized models.

For each model: wall time and peak RSS of both CLI runs (each in its own process, measured by /usr/bin/time), and
the agreement of the two routes on the same prompts and settings: % of the llama.cpp circuit's neurons that the
torch route also selects, and the Pearson correlation of all selectable neurons' deltas (llama.cpp route on the
quantized file vs torch on the dequantized model).

    python -m benchmarks.gguf_native [--models smollm2 qwen0.5b qwen1.5b] [--no-old M..] [--no-agreement M..]
        [--evaluate M..]

`--evaluate`: the refusal change of the patched GGUF measured through llama.cpp (original vs patched file) and
the same circuit's change measured in torch on the dequantized float model, same test prompts and detector.
Run it on an otherwise idle machine: llama.cpp's threads wait for each other at every graph node, so a busy core
slows it far more than it slows torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
MODELS = {
    "smollm2": REAL / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen0.5b": REAL / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    "qwen1.5b": REAL / "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
}
RESULTS = REPO / "benchmarks" / "results" / "gguf_native.json"


def timed_cli(args: list[str]) -> dict:
    """Run `cna-export ARGS` in a fresh process; wall seconds and peak RSS (GNU time's maximum resident set)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cna_export", *args]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    # CPU seconds too: on a shared 2-core machine the wall time depends on what else runs.
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for kind in ("User", "System"))
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_gb": round(rss_kb / 1e6, 2),
            "load_avg_before": round(load, 1)}


def torch_source(path: Path):
    """The torch route's model of a GGUF: benchmarks/paper_table.py's dequantized float folder when it exists
    (the same weights, loaded in seconds), else the GGUF dequantized by transformers."""
    from cna_export.io.source import resolve

    float_dir = REAL / "float" / path.stem
    return resolve(str(float_dir) if (float_dir / "config.json").is_file() else str(path))


def agreement(path: Path) -> dict:
    """Both routes' full deltas and circuits on the same plan (the recipe's prompts and selection)."""
    import torch

    from cna_export.attribution.discover import plan_discovery
    from cna_export.attribution.select import attribute_on
    from cna_export.backends import LoadOptions, open_backend, open_model
    from cna_export.circuit.recipe import load_recipe

    recipe, base = load_recipe("refusal-ablate")
    plan = plan_discovery(recipe, base)
    gguf = open_model(str(path))
    k = plan.selection.resolve_k(gguf.shape)
    native = attribute_on(gguf, plan.positive, plan.negative, plan.neutral, plan.selection)
    gguf.close()
    dense = open_backend(torch_source(path), LoadOptions(dtype="float32", device="cpu"))
    dense.identity = gguf.identity  # both routes record the GGUF's identity, so the circuits compare as one model
    ref = attribute_on(dense, plan.positive, plan.negative, plan.neutral, plan.selection)
    dense.close()
    picked = {(n.layer, n.index) for n in native.circuit(k).neurons}
    wanted = {(n.layer, n.index) for n in ref.circuit(k).neurons}
    keep = ~ref.excluded & ~native.excluded
    corr = torch.corrcoef(torch.stack([native.delta[keep], ref.delta[keep]]))[0, 1]
    return {"k": k, "same_neurons_pct": round(100 * len(picked & wanted) / k, 1), "delta_correlation": round(float(corr), 4)}


def _rates(results: dict) -> dict:
    base, edit = results["baseline"], results["points"][0]
    return {
        "refusal": [base["positive_hits"], edit["positive_hits"], base["n_positive"]],
        "refusal_change_pts": round(100 * (edit["rate"] - base["rate"]), 1),
        "benign_refusal": [base["benign_hits"], edit["benign_hits"], base["n_negative"]],
        "kl_first": round(edit["kl_first"], 4), "kl_mean": round(edit["kl_mean"], 4),
    }  # fmt: skip


def refusal_change(original: Path, export: Path, n: int = 40, tokens: int = 24) -> dict:
    """The refusal change of the patched GGUF measured through llama.cpp (`eval --edited`: original file vs the
    patched file), and of the same circuit measured in torch on the dequantized float model (hooks, which equal
    the folded export), on the recipe's test prompts (first `n` of each set), greedy, same detector."""
    from cna_export.backends import LoadOptions, open_backend, open_model
    from cna_export.circuit.format import Circuit
    from cna_export.circuit.recipe import load_recipe
    from cna_export.evaluate.measure import EvalConfig
    from cna_export.evaluate.options import HeldOut, Variants
    from cna_export.evaluate.sweep import heldout_sets, run_eval

    recipe, base = load_recipe("refusal-ablate")
    pos, neg = (s[:n] for s in heldout_sets(recipe, base))
    cfg = EvalConfig(max_new_tokens=tokens, batch_size=8)
    circuit = Circuit.load(export / "circuit.json")
    out: dict = {"prompts": [len(pos), len(neg)], "max_new_tokens": tokens, "split": "test"}
    start = time.perf_counter()
    native, _, _ = run_eval(open_model(str(original)), HeldOut(positive=pos, negative=neg), "refusal", cfg,
                           Variants(edited=export))
    out["llama_cpp"] = {**_rates(native), "wall_s": round(time.perf_counter() - start, 1)}
    start = time.perf_counter()
    dense = open_backend(torch_source(original), LoadOptions(dtype="float32", device="cpu"))
    ref, _, _ = run_eval(dense, HeldOut(positive=pos, negative=neg), "refusal", cfg, Variants(circuit=circuit))
    out["torch"] = {**_rates(ref), "wall_s": round(time.perf_counter() - start, 1)}
    out["difference_pts"] = round(out["llama_cpp"]["refusal_change_pts"] - out["torch"]["refusal_change_pts"], 1)
    return out


def timing(name: str, work: Path, old: bool = True) -> dict:
    """Both CLI runs of `run refusal-ablate` (the GGUF-native default, and the old path), timed in this run."""
    path = MODELS[name]
    row: dict = {"file_gb": round(path.stat().st_size / 1e9, 2)}
    routes = {"gguf_native": [], "old_path": ["--backend", "torch", "--safetensors"]}
    for route, flags in routes.items():
        if route == "old_path" and not old:
            continue
        out = work / f"{name}-{route}"
        row[route] = timed_cli(["run", "refusal-ablate", "--model", str(path), "--out", str(out), *flags])
        row[route]["out_gb"] = round(sum(f.stat().st_size for f in out.iterdir()) / 1e9, 2)
        shutil.rmtree(out)
    if old:
        row["speedup"] = round(row["old_path"]["wall_s"] / row["gguf_native"]["wall_s"], 2)
        row["speedup_cpu"] = round(row["old_path"]["cpu_s"] / row["gguf_native"]["cpu_s"], 2)
    row["rss_minus_file_gb"] = round(row["gguf_native"]["peak_rss_gb"] - row["file_gb"], 2)
    return row


def evaluation(name: str, work: Path) -> dict:
    """`refusal_change` on the export of the GGUF-native run (made here, untimed)."""
    from cna_export.run import run_recipe

    out = work / f"{name}-eval"
    run_recipe("refusal-ablate", str(MODELS[name]), out)
    try:
        return refusal_change(MODELS[name], out)
    finally:
        shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--parts", nargs="+", default=["timing", "agreement"], choices=["timing", "agreement", "evaluate"],
                   help="what to measure (each part keeps its own date; parts not run keep their earlier result)")
    p.add_argument("--no-old", nargs="*", default=[], help="models whose old-path run is skipped (too long)")
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    stamp = lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="gguf-native-") as tmp:
        for name in args.models:
            row = results.setdefault(name, {})
            row["model"] = MODELS[name].name
            if "timing" in args.parts:
                row["timing"] = {**timing(name, Path(tmp), name not in args.no_old), "date": stamp()}
            if "agreement" in args.parts:
                row["agreement"] = {**agreement(MODELS[name]), "date": stamp()}
            if "evaluate" in args.parts:
                row["refusal_change"] = {**evaluation(name, Path(tmp)), "date": stamp()}
            print(json.dumps({name: row}), flush=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
