"""GGUF-native `run refusal-ablate` (discovery inside llama.cpp, patched GGUF out) against the old path
(transformers dequantizes the GGUF, attribution in torch, a float32 safetensors export), on real quantized models.

For each model: wall time and peak RSS of both CLI runs (each in its own process, measured by /usr/bin/time), and
the agreement of the two routes on the same prompts and settings: % of the llama.cpp circuit's neurons that the
torch route also selects, and the Pearson correlation of all selectable neurons' deltas (llama.cpp route on the
quantized file vs torch on the dequantized model).

    nice -n 10 python benchmarks/gguf_native.py --models smollm2 qwen0.5b [--old-too qwen1.5b] [--no-agreement qwen1.5b]
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


def agreement(path: Path) -> dict:
    """Both routes' full deltas and circuits on the same plan (the recipe's prompts and selection)."""
    import torch

    from cna_export.attribution.discover import plan_discovery
    from cna_export.attribution.native import attribute_gguf, describe_gguf, gguf_identity
    from cna_export.attribution.select import attribute
    from cna_export.circuit.recipe import load_recipe
    from cna_export.io.source import load_model, resolve

    recipe, base = load_recipe("refusal-ablate")
    plan = plan_discovery(recipe, base)
    spec, shape, meta = describe_gguf(path)
    ident = gguf_identity(str(path), path, spec, shape, meta)
    k = plan.selection.resolve_k(shape)
    native = attribute_gguf(path, spec, ident, plan.positive, plan.negative, plan.neutral, plan.selection)
    model, tok = load_model(resolve(str(path)), dtype="float32", device="cpu")
    ref = attribute(model, tok, spec, ident, plan.positive, plan.negative, plan.neutral, plan.selection)
    del model
    picked = {(n.layer, n.index) for n in native.circuit(k).neurons}
    wanted = {(n.layer, n.index) for n in ref.circuit(k).neurons}
    keep = ~ref.excluded & ~native.excluded
    corr = torch.corrcoef(torch.stack([native.delta[keep], ref.delta[keep]]))[0, 1]
    return {"k": k, "same_neurons_pct": round(100 * len(picked & wanted) / k, 1), "delta_correlation": round(float(corr), 4)}


def refusal_change(original: Path, edited: Path, n: int = 40) -> dict:
    """Refusal rates of the original and the patched GGUF through llama.cpp on the recipe's held-out test prompts
    (first `n` of each set, 24 greedy tokens), and the first-answer-token KL on the benign ones."""
    from cna_export.circuit.recipe import load_recipe
    from cna_export.evaluate.native import evaluate_gguf
    from cna_export.evaluate.sweep import heldout_sets

    recipe, base = load_recipe("refusal-ablate")
    pos, neg = heldout_sets(recipe, base)
    start = time.perf_counter()
    result = evaluate_gguf(original, edited, pos[:n], neg[:n], "refusal", max_new_tokens=24, batch_size=8)
    result.pop("answers")
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def bench(name: str, old: bool, agree: bool, work: Path, evaluate: bool = False) -> dict:
    path = MODELS[name]
    row: dict = {"model": path.name, "file_gb": round(path.stat().st_size / 1e9, 2)}
    out = work / f"{name}-new"
    row["gguf_native"] = timed_cli(["run", "refusal-ablate", "--model", str(path), "--out", str(out)])
    row["gguf_native"]["out_gb"] = round(sum(f.stat().st_size for f in out.iterdir()) / 1e9, 2)
    if evaluate:
        row["llama_cpp_eval"] = refusal_change(path, out / path.name)
    shutil.rmtree(out)
    if old:
        out = work / f"{name}-old"
        row["old_path"] = timed_cli(["run", "refusal-ablate", "--model", str(path), "--backend", "torch",
                                     "--safetensors", "--out", str(out)])  # fmt: skip
        row["old_path"]["out_gb"] = round(sum(f.stat().st_size for f in out.iterdir()) / 1e9, 2)
        shutil.rmtree(out)
        row["speedup"] = round(row["old_path"]["wall_s"] / row["gguf_native"]["wall_s"], 2)
        row["speedup_cpu"] = round(row["old_path"]["cpu_s"] / row["gguf_native"]["cpu_s"], 2)
    row["rss_minus_file_gb"] = round(row["gguf_native"]["peak_rss_gb"] - row["file_gb"], 2)
    if agree:
        row["agreement"] = agreement(path)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-old", nargs="*", default=[], help="models whose old-path run is skipped (too long)")
    p.add_argument("--no-agreement", nargs="*", default=[], help="models whose agreement check is skipped")
    p.add_argument("--evaluate", nargs="*", default=[], help="models whose patched GGUF is evaluated in llama.cpp")
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="gguf-native-") as tmp:
        for name in args.models:
            results[name] = bench(name, name not in args.no_old, name not in args.no_agreement, Path(tmp),
                                  name in args.evaluate)
            results[name]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
