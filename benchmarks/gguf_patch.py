"""patch-gguf speed: patching a real GGUF vs `cp` of the same file (the floor for any tool writing a new file).

On Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB, see ../shared/REAL_MODELS.md) with a 1600-neuron circuit (1.4% of
the MLP neurons, the size that removes most refusals on that model) carrying the file's real weights hash, so the
hash check runs (from the sha256 cache, as after `discover`). Contenders, interleaved, each repeated:
  - `cp SRC DST`,
  - `patch_gguf` called in this process (modules already imported),
  - the command `cna-export patch-gguf` (a new Python process: interpreter, torch and module imports included),
  - `python -c "import cna_export.cli.main, cna_export.gguf.patch"`, the start-up part of the command on its own.
Page-cache drops need root on the host, so every run is warm: the source is read once before timing, and
`os.sync()` runs before each contender so none pays for another's write-back. Prints medians and the ratio to cp,
and writes benchmarks/results/gguf_patch.json.

    python -m benchmarks.gguf_patch [--model FILE.gguf] [--repeats 3] [--k 1600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
DEFAULT = REAL / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"


def make_circuit(src: Path, path: Path, k: int, model_type: str) -> dict:
    """A k-neuron ablation circuit for `src` with its weights hash, as discover writes it; returns the shape."""
    from cna_export.arch import arch_for
    from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection
    from cna_export.gguf.check import check_gguf, gguf_shape
    from cna_export.io.hashing import combined_sha256, sha256_files

    shape = gguf_shape(check_gguf(src), arch_for(model_type), src)
    rng = random.Random(0)
    picks = rng.sample(range(shape.num_layers * shape.intermediate_size), k)
    ident = ModelIdentity(
        source=str(src), model_type=model_type, weights_sha256=combined_sha256(sha256_files([src])),
        num_layers=shape.num_layers, intermediate_size=shape.intermediate_size, hidden_size=shape.hidden_size,
    )  # fmt: skip
    Circuit(
        model=ident, prompts={"positive": PromptSet(count=0, sha256=""), "negative": PromptSet(count=0, sha256="")},
        selection=RecordedSelection(top_k=k),
        neurons=[Neuron(layer=i // shape.intermediate_size, index=i % shape.intermediate_size, delta=1.0)
                 for i in picks],
    ).save(path, overwrite=True)  # fmt: skip
    return {"layers": shape.num_layers, "n_ff": shape.intermediate_size, "n_embd": shape.hidden_size}


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def clean(*paths: Path) -> None:
    """Remove earlier outputs and flush dirty pages (untimed)."""
    for p in paths:
        p.unlink(missing_ok=True)
        Path(str(p) + ".circuit.json").unlink(missing_ok=True)
    os.sync()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT, help="GGUF file to patch")
    parser.add_argument("--model-type", default="qwen2", help="model_type recorded in the circuit")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cna-bench-gguf"), help="scratch folder")
    parser.add_argument("--k", type=int, default=1600, help="neurons in the circuit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model} not found: run scripts/fetch-real-models.sh first")
    from cna_export.circuit.format import Circuit
    from cna_export.gguf.patch import patch_gguf_report

    args.work.mkdir(parents=True, exist_ok=True)
    circuit_file = args.work / "circuit.json"
    shape = make_circuit(args.model, circuit_file, args.k, args.model_type)  # hashes once, fills the cache
    circuit = Circuit.load(circuit_file)
    with open(args.model, "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass
    out_cp, out_lib, out_cli = (args.work / f"out-{n}.gguf" for n in ("cp", "lib", "cli"))
    runs: dict[str, list[float]] = {"cp": [], "patch_in_process": [], "patch_cli": [], "cli_startup": []}
    report = None
    for _ in range(args.repeats):
        clean(out_cp, out_lib, out_cli)
        runs["cp"].append(timed(["cp", str(args.model), str(out_cp)]))
        clean(out_cp, out_lib, out_cli)
        t0 = time.perf_counter()
        report = patch_gguf_report(args.model, circuit, out_lib)
        runs["patch_in_process"].append(time.perf_counter() - t0)
        clean(out_cp, out_lib, out_cli)
        runs["patch_cli"].append(timed([sys.executable, "-m", "cna_export", "patch-gguf", str(args.model),
                                        "--circuit", str(circuit_file), "-o", str(out_cli)]))  # fmt: skip
        runs["cli_startup"].append(timed([sys.executable, "-c", "import cna_export.cli.main, cna_export.gguf.patch"]))
    clean(out_cp, out_lib, out_cli)
    med = {name: statistics.median(v) for name, v in runs.items()}
    result = {
        "model": args.model.name,
        "size_bytes": args.model.stat().st_size,
        "shape": shape,
        "neurons": args.k,
        "ffn_up_types": sorted({t.ggml_type for t in report.tensors}),
        "rows_patched": sum(t.rows for t in report.tensors),
        "largest_relative_scale_rounding": max(t.max_rel_error for t in report.tensors),
        "repeats": args.repeats,
        "runs_s": runs,
        "median_s": med,
        "ratio_in_process_vs_cp": med["patch_in_process"] / med["cp"],
        "ratio_cli_vs_cp": med["patch_cli"] / med["cp"],
        "ratio_cli_minus_startup_vs_cp": (med["patch_cli"] - med["cli_startup"]) / med["cp"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "warm page cache for every contender (drop_caches needs host root); medians of interleaved runs",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_patch.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model.name} ({result['size_bytes'] / 1e6:.0f} MB), {args.k} neurons, median of {args.repeats}:")
    for name, value in med.items():
        print(f"  {name:18s} {value:7.3f} s")
    print(f"  patch in-process / cp = {result['ratio_in_process_vs_cp']:.2f}x; CLI / cp = "
          f"{result['ratio_cli_vs_cp']:.2f}x ({result['ratio_cli_minus_startup_vs_cp']:.2f}x without start-up)")  # fmt: skip
    print(f"wrote {RESULTS / 'gguf_patch.json'}")


if __name__ == "__main__":
    main()
