"""Export speed and memory: streamed export vs `cp -r`, and vs transformers load + edit + save_pretrained.

Builds random-weight Llama checkpoints (bf16, sharded like the Hub's) of two sizes, the larger >= 2 GB, then in
one run measures, each in its own process so peak RSS is its own:
  - `cp -r` of the folder (the floor for any tool that writes a full copy), and `cp -r` + `sha256sum` (the floor
    for one that also records every file's hash, as the model card of each export does),
  - `cna_export.fold.export.apply_circuit` with a 0.1% circuit (time inside the process, and the whole command), as
    by default (the card lists the weight files, whose sha256 `push` records) and with `--file-hashes` (the card
    records every file's sha256 now, hashed while it is written),
  - transformers `from_pretrained` + edit + `save_pretrained`.
The page cache is warmed first so every contender reads from memory. Prints a table and writes JSON to
benchmarks/results/export.json.

    python -m benchmarks.export --work /tmp/cna-bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 2048, 8192, 32000, 16, 8


def build(folder: Path, layers: int, shard_bytes: int = 1 << 30) -> int:
    """Write a random bf16 Llama checkpoint; returns its size in bytes."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    if (folder / "config.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    head = HIDDEN // HEADS
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    meta = {name: torch.empty(shape, dtype=torch.bfloat16, device="meta") for name, shape in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=shard_bytes)
    g = torch.Generator().manual_seed(0)
    for file, names in split.filename_to_tensors.items():
        tensors = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, tmp / file, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())},
                 "weight_map": split.tensor_to_filename}  # fmt: skip
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
    }  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# VmHWM is this process's own peak RSS (ru_maxrss can carry the parent's high-water mark across fork+exec).
PEAK = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

OURS = (
    PEAK
    + """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from cna_export.backends.options import ExportOptions
from cna_export.circuit.format import Circuit
from cna_export.fold.export import apply_circuit
from cna_export.io.source import resolve
t1 = time.perf_counter()
options = ExportOptions(hash_files=sys.argv[4] == "hash")
apply_circuit(resolve(sys.argv[1]), Circuit.load(sys.argv[2]), Path(sys.argv[3]), options)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "export_s": t2 - t1, "rss_mb": peak_mb()}))
"""
)

HF = (
    PEAK
    + """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
circuit = json.load(open(sys.argv[2]))
with torch.no_grad():
    for n in circuit["neurons"]:
        model.model.layers[n["layer"]].mlp.down_proj.weight[:, n["index"]] *= circuit["multiplier"]
model.save_pretrained(sys.argv[3])
t1 = time.perf_counter()
print(json.dumps({"export_s": t1 - t0, "rss_mb": peak_mb()}))
"""
)


def run_py(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def timed_cp(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return time.perf_counter() - t0


def timed_cp_sha256(src: Path, dst: Path) -> float:
    """`cp -r` then `sha256sum` of the copy: the floor for a tool that writes a copy and records its hashes (the
    model card of every export lists the sha256 of each file)."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sha256sum", *map(str, sorted(dst.iterdir()))], check=True, capture_output=True)
    return time.perf_counter() - t0


def settle(work: Path) -> None:
    """Remove earlier outputs and flush dirty pages to disk (untimed)."""
    for name in ("cp", "cp-sha", "ours", "ours-hash", "hf"):
        shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    os.sync()


def warm(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def make_circuit(src: Path, path: Path, layers: int) -> None:
    """A 0.1% ablation circuit carrying the model's real weights hash (as discover writes it)."""
    import random

    from cna_export.circuit.format import Circuit, Neuron, PromptSet, RecordedSelection
    from cna_export.io.source import describe, identity, resolve

    source = resolve(str(src))
    _, shape, config = describe(source)
    ident = identity(source, config, shape)  # hashes the weights once and caches the digests, as discover does
    rng = random.Random(0)
    k = round(0.001 * shape.num_neurons)
    picks = rng.sample(range(shape.num_neurons), k)
    Circuit(
        model=ident, prompts={"positive": PromptSet(count=0, sha256=""), "negative": PromptSet(count=0, sha256="")},
        selection=RecordedSelection(top_k=k),
        neurons=[Neuron(layer=i // INTER, index=i % INTER, delta=1.0) for i in picks],
    ).save(path, overwrite=True)  # fmt: skip


def main() -> None:
    from cna_export.io.checkpoint import CheckpointReader

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cna-bench"), help="scratch folder (needs ~12 GB)")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        src = args.work / f"llama-{layers}L"
        size = build(src, layers)
        circuit = args.work / f"circuit-{layers}L.json"
        make_circuit(src, circuit, layers)
        largest = max(math.prod(e.shape) * 2 for e in CheckpointReader(src).entries.values())
        warm(src)
        # Each contender starts with no dirty pages, so none pays for another's write-back; median of the runs
        # (interleaved, so drift on this shared machine hits all alike).
        runs: dict[str, list] = {"cp": [], "cp_sha": [], "ours": [], "hashed": [], "hf": []}
        for _ in range(args.repeats):
            settle(args.work)
            runs["cp"].append(timed_cp(src, args.work / "out-cp"))
            settle(args.work)
            runs["cp_sha"].append(timed_cp_sha256(src, args.work / "out-cp-sha"))
            settle(args.work)
            runs["ours"].append(run_py(OURS, str(src), str(circuit), str(args.work / "out-ours"), "-"))
            settle(args.work)
            runs["hashed"].append(run_py(OURS, str(src), str(circuit), str(args.work / "out-ours-hash"), "hash"))
            settle(args.work)
            runs["hf"].append(run_py(HF, str(src), str(circuit), str(args.work / "out-hf")))
        settle(args.work)
        t_cp = statistics.median(runs["cp"])
        t_cp_sha = statistics.median(runs["cp_sha"])
        ours = {k: statistics.median(r[k] for r in runs["ours"]) for k in runs["ours"][0]}
        hf = {k: statistics.median(r[k] for r in runs["hf"]) for k in runs["hf"][0]}
        hashed = statistics.median(r["export_s"] for r in runs["hashed"])
        rows.append({
            "layers": layers, "size_gb": round(size / 1e9, 2), "largest_tensor_mb": round(largest / 1e6, 1),
            "cp_s": round(t_cp, 2), "ours_export_s": round(ours["export_s"], 2), "ours_wall_s": round(ours["wall_s"], 2),
            "ours_vs_cp": round(ours["export_s"] / t_cp, 2), "ours_wall_vs_cp": round(ours["wall_s"] / t_cp, 2),
            "ours_file_hashes_s": round(hashed, 2), "ours_file_hashes_vs_cp": round(hashed / t_cp, 2),
            "cp_sha256_s": round(t_cp_sha, 2), "ours_file_hashes_vs_cp_sha256": round(hashed / t_cp_sha, 2),
            "ours_peak_rss_mb": round(ours["rss_mb"]), "rss_budget_mb": round(2 * largest / 1e6 + 600),
            "hf_s": round(hf["export_s"], 2), "hf_peak_rss_mb": round(hf["rss_mb"]),
            "hf_vs_ours": round(hf["export_s"] / ours["export_s"], 2),
        })  # fmt: skip
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(result, indent=1) + "\n")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))


if __name__ == "__main__":
    main()
