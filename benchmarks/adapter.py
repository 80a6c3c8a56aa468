"""Adapter size and write time vs a full export, for SmolLM2-135M, Qwen2.5-0.5B and 7B (Llama-2) shapes.

Random bf16 weights in each model's shapes. SmolLM2 and Qwen get full checkpoints, so the full export
(`apply_circuit`) is measured beside the adapter (`write_adapter`). The 7B shape gets only the tensors an adapter
reads, its 32 down_proj (2.9 GB, written one layer at a time), so its full size is computed from the shapes and
its export is not run. The circuit is 0.2% of the neurons (the refusal recipes' fraction), and 1%, chosen at
random over the layers. Times are medians inside the process with the page cache warm (the import of peft, once
per process, is reported apart), and the whole `cna-export adapter` command once (its own threads).

    nice -n 10 python -m benchmarks.adapter --work /tmp/cna-adapter-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# name: (model_type, hidden, intermediate, layers, vocab, heads, kv_heads, tied, full checkpoint)
SHAPES = {
    "SmolLM2-135M": ("llama", 576, 1536, 30, 49152, 9, 3, True, True),
    "Qwen2.5-0.5B": ("qwen2", 896, 4864, 24, 151936, 14, 2, True, True),
    "7B (Llama-2-7B shape)": ("llama", 4096, 11008, 32, 32000, 32, 32, False, False),
}
FRACTIONS = (0.002, 0.01)


def tensor_shapes(shape: tuple) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, name -> shape (Llama / Qwen2 layout)."""
    _, hidden, inter, layers, vocab, heads, kv, tied, _ = shape
    head = hidden // heads
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    out |= {} if tied else {"lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head, hidden),
            p + "self_attn.v_proj.weight": (kv * head, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }  # fmt: skip
    return out


def build(folder: Path, shape: tuple) -> int:
    """A random bf16 checkpoint, one shard per layer (only down_proj without a full checkpoint); the model's
    full size in bytes (bf16) either way."""
    import torch
    from safetensors.torch import save_file

    shapes = tensor_shapes(shape)
    full = sum(2 * _numel(s) for s in shapes.values())
    if (folder / "config.json").is_file():
        return full
    model_type, hidden, inter, layers, vocab, heads, kv, tied, complete = shape
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen, index = torch.Generator().manual_seed(0), {}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        if complete or name.endswith("down_proj.weight"):
            part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
            groups.setdefault(part, []).append(name)
    for n, names in enumerate(groups.values()):
        file = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16) for k in names}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        index |= dict.fromkeys(names, file)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": full}, "weight_map": index}))
    config = {"model_type": model_type, "architectures": ["LlamaForCausalLM" if model_type == "llama" else
              "Qwen2ForCausalLM"], "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "vocab_size": vocab, "num_attention_heads": heads, "num_key_value_heads": kv,
              "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6}  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(config))
    tmp.rename(folder)
    return full


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def circuit_for(shape: tuple, fraction: float, seed: int = 0):
    """A random circuit of `fraction` of the neurons, m = 0."""
    import torch

    from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, RecordedSelection

    model_type, hidden, inter, layers, *_ = shape
    k = round(fraction * layers * inter)
    flat = torch.randperm(layers * inter, generator=torch.Generator().manual_seed(seed))[:k].tolist()
    return Circuit(
        model=ModelIdentity(source="bench", model_type=model_type, num_layers=layers, intermediate_size=inter,
                            hidden_size=hidden),
        prompts={}, selection=RecordedSelection(top_k=k),
        neurons=[Neuron(layer=j // inter, index=j % inter, delta=1.0) for j in flat],
    )  # fmt: skip


def _median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _size(folder: Path, suffix: str | None = None) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and (suffix is None or p.name.endswith(suffix)))


def measure(name: str, shape: tuple, work: Path, runs: int) -> list[dict]:
    from cna_export.backends.options import ExportOptions
    from cna_export.fold.export import apply_circuit
    from cna_export.io.source import resolve
    from cna_export.ship.adapter import write_adapter

    folder = work / name.split(" ")[0]
    model_bytes = build(folder, shape)
    subprocess.run(["cat", *map(str, folder.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm
    source, rows = resolve(str(folder)), []
    for fraction in FRACTIONS:
        circuit = circuit_for(shape, fraction)
        ad = work / "out-adapter"
        t_adapter = _median_time(partial(write_adapter, source, circuit, ad, overwrite=True), runs)
        t_gguf = _median_time(partial(write_adapter, source, circuit, ad, overwrite=True, gguf=True), runs)
        row = {
            "model": name, "fraction": fraction, "neurons": len(circuit.neurons), "model_bytes": model_bytes,
            "adapter_bytes": _size(ad) - _size(ad, ".gguf"), "gguf_lora_bytes": _size(ad, ".gguf"),
            "adapter_write_s": round(t_adapter, 3), "adapter_and_gguf_write_s": round(t_gguf, 3),
            "max_rank": json.loads((ad / "adapter_config.json").read_text())["r"],
        }  # fmt: skip
        row["adapter_share_of_model"] = row["adapter_bytes"] / model_bytes
        if shape[-1]:
            ex = work / "out-export"
            row["export_write_s"] = round(
                _median_time(partial(apply_circuit, source, circuit, ex, ExportOptions(overwrite=True)), runs), 3
            )
            row["export_bytes"] = _size(ex)
            shutil.rmtree(ex)
        rows.append(row)
        print(json.dumps(row), flush=True)
    circuit_file = work / "c.json"
    circuit_for(shape, FRACTIONS[0]).save(circuit_file, overwrite=True)
    cmd = [sys.executable, "-m", "cna_export", "adapter", "--model", str(folder), "--circuit", str(circuit_file),
           "--out", str(work / "out-cli"), "--overwrite"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    rows[0]["cli_wall_s"] = round(time.perf_counter() - start, 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cna-adapter-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="model names to run (default all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the ops are small, and on a "
                    "shared machine a descheduled worker thread stalls every parallel region)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    import peft  # noqa: F401  (the one-off import, apart from the write times)

    peft_import_s = time.perf_counter() - start
    rows = [r for name, shape in SHAPES.items() if not args.only or name in args.only
            for r in measure(name, shape, args.work, args.runs)]  # fmt: skip
    result = {"peft_import_s": round(peft_import_s, 2), "rows": rows, "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": args.threads, "load_average_1min_at_end": round(os.getloadavg()[0], 1)}}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adapter.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"peft import {peft_import_s:.2f} s; wrote {RESULTS / 'adapter.json'}")


if __name__ == "__main__":
    main()
