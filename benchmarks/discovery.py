"""Discovery speed: cna-export's attribution vs the reference implementation's way, same prompts, same k, one run.

The baseline does what NousResearch/neural-steering's `NeuronSteerer.discover_contrastive` does with its defaults
(bfloat16 weights, eager attention): one prompt at a time, a full forward pass including the lm_head, per-layer
hooks that copy each activation to the host, and a Python loop over every neuron to rank them. Both sides use the
same selection rule (no universal filter, no skipped layers) so the selected neurons can be compared.

Measured, in one run: cna-export in bfloat16 (the reference's dtype) and in float32 (cna-export's CPU default)
against the baseline in the same dtype; how many neurons each picks in common with the float32 baseline (the
most exact answer); and the refusal recipes' rule (last 2 layers never selected), which cna-export turns into a
shorter forward pass. Prints a table and writes JSON to benchmarks/results/discovery-<model>.json.

    python -m benchmarks.discovery                       # SmolLM2-135M-Instruct (real, from PyPI)
    python -m benchmarks.discovery --model path/to/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from cna_export.attribution.collect import collect_sets, common_prefix, encode_prompts
from cna_export.attribution.hooks import down_projs
from cna_export.attribution.select import select
from cna_export.circuit.recipe import load_prompts, load_recipe
from cna_export.io.source import describe, load_model, resolve

REAL = Path(os.environ.get("CNA_REAL_MODELS", Path.home() / ".cache" / "cna-real-models"))
RESULTS = Path(__file__).resolve().parent / "results"


def computed_tokens(sets, batch_size):
    """Tokens the forward passes actually process: the prefix all prompts share once, then the padded batches of
    the sets' prompts, sorted by length together."""
    encoded = [ids for prompts in sets for ids in prompts]
    prefix = common_prefix(encoded)
    suffixes = sorted(len(ids) - prefix for ids in encoded)
    return prefix + sum(max(suffixes[i : i + batch_size]) * len(suffixes[i : i + batch_size])
                        for i in range(0, len(suffixes), batch_size))  # fmt: skip


def ours(model, spec, pos, neg, k, batch_size, pad_id, skip_last=0):
    t0 = time.perf_counter()
    last = len(down_projs(model, spec)) - 1 - skip_last
    a, b = collect_sets(model, spec, [pos, neg], batch_size, pad_id, last_layer=last)
    excluded = torch.zeros_like(a.sums, dtype=torch.bool)
    excluded[last + 1 :] = True
    chosen = select(a.mean - b.mean, k, excluded)
    return time.perf_counter() - t0, chosen


@torch.no_grad()
def baseline(model, spec, pos, neg, k, skip_last=0):
    """The reference's `discover_contrastive`: one prompt at a time through the whole model (lm_head included),
    each layer's last-token activation copied to the host by a hook, means of the stacked activations, then a
    Python loop over every neuron of the layers that may be selected and a sort by |difference|."""
    t0 = time.perf_counter()
    projs = down_projs(model, spec)
    means = []
    for prompts in (pos, neg):
        rows = []
        for ids in prompts:
            acts: dict[int, torch.Tensor] = {}
            hooks = [p.register_forward_pre_hook(lambda m, a, i=i, acts=acts: acts.__setitem__(i, a[0][0, -1].detach().cpu()))
                     for i, p in enumerate(projs)]  # fmt: skip
            try:
                model(torch.tensor([ids]))
            finally:
                for h in hooks:
                    h.remove()
            rows.append(acts)
        means.append({l: torch.stack([r[l] for r in rows]).mean(0) for l in range(len(projs))})
    scored = {}
    for l in range(len(projs) - skip_last):
        diff = means[0][l] - means[1][l]
        for j in range(diff.shape[0]):
            d = diff[j].item()
            if abs(d) > 1e-6:
                scored[(l, j)] = d
    ranked = sorted(scored.items(), key=lambda t: abs(t[1]), reverse=True)
    return time.perf_counter() - t0, [lj for lj, _ in ranked[:k]]


def matmul_peak(dtype=torch.float32, n=2048, reps=10) -> float:
    """Measured FLOP/s of a large GEMM on this machine: the roofline the forward passes are held against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REAL / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--top-k", type=int, default=0, help="default: 0.1%% of all MLP neurons")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--name", default=None, help="results file stem (default: discovery-<model>)")
    args = parser.parse_args()

    source = resolve(args.model)
    spec, shape, _ = describe(source)
    model, tok = load_model(source, dtype="float32", device="cpu")
    recipe, base = load_recipe("refusal-ablate")
    pos = encode_prompts(tok, load_prompts(recipe.positive, base))
    neg = encode_prompts(tok, load_prompts(recipe.negative, base))
    k = args.top_k or max(1, round(0.001 * shape.num_neurons))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = sum(map(len, pos)) + sum(map(len, neg))
    computed = computed_tokens([pos, neg], args.batch_size)
    # matmul FLOPs of the tokens computed: every layer but the last in full; in the last, attention for every
    # token, gate/up for the final tokens only, no down_proj (the pass stops at its input)
    layers = model.get_submodule(spec.layers_module)
    per_layer = sum(p.numel() for p in layers[-1].parameters())
    matrix = down_projs(model, spec)[-1].weight.numel()  # gate, up and down have as many weights each
    flops = 2 * ((len(layers) - 1) * per_layer * computed + (per_layer - 3 * matrix) * computed
                 + 2 * matrix * (len(pos) + len(neg)))  # fmt: skip
    result = {
        "model": Path(args.model).name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}",
        "prompts": len(pos) + len(neg),
        "prompt_tokens": tokens,
        "computed_tokens": computed,
        "k": k,
    }
    ours_attention = model.config._attn_implementation
    chosen = {}
    for dtype in (torch.float32, torch.bfloat16):  # fp32 first: its baseline is the reference answer
        name = str(dtype).removeprefix("torch.")
        m = model.to(dtype)
        m.set_attn_implementation("eager")  # the reference loads its model with attn_implementation="eager"
        t_base, sel_base = baseline(m, spec, pos, neg, k)
        m.set_attn_implementation(ours_attention)
        ours(m, spec, pos[:2], neg[:2], k, args.batch_size, pad)  # warm-up (allocator, kernels)
        t_ours, sel_ours = ours(m, spec, pos, neg, k, args.batch_size, pad)
        chosen[name] = (sel_base, sel_ours)
        peak = matmul_peak(dtype)
        result |= {
            f"baseline_{name}_s": round(t_base, 3),
            f"baseline_{name}_prompt_tokens_per_s": round(tokens / t_base, 1),
            f"ours_{name}_s": round(t_ours, 3),
            f"speedup_{name}": round(t_base / t_ours, 2),
            f"overlap_{name}": round(len(set(sel_ours) & set(sel_base)) / k, 4),
            f"ours_{name}_prompt_tokens_per_s": round(tokens / t_ours, 1),
            f"matmul_peak_{name}_gflops": round(peak / 1e9, 1),
            f"ours_{name}_gflops": round(flops / t_ours / 1e9, 1),
            f"roofline_fraction_{name}": round(flops / t_ours / peak, 3),
        }
    exact = set(chosen["float32"][0])  # the fp32 baseline's neurons
    result |= {
        "speedup_bfloat16_vs_fp32_baseline": round(result["baseline_float32_s"] / result["ours_bfloat16_s"], 2),
        "overlap_bfloat16_with_fp32_baseline": round(len(set(chosen["bfloat16"][1]) & exact) / k, 4),
        "overlap_baseline_bfloat16_with_fp32_baseline": round(len(set(chosen["bfloat16"][0]) & exact) / k, 4),
    }
    # The refusal recipes' selection: the last 2 layers are never selected, so cna-export does not compute them
    # (the reference-style baseline runs its full forward pass as always and ranks the same layers).
    model.to(torch.bfloat16)
    model.set_attn_implementation("eager")
    t_base2, sel_base2 = baseline(model, spec, pos, neg, k, skip_last=2)
    model.set_attn_implementation(ours_attention)
    t_ours2, sel_ours2 = ours(model, spec, pos, neg, k, args.batch_size, pad, skip_last=2)
    result |= {
        "baseline_bfloat16_skip_last2_s": round(t_base2, 3),
        "ours_bfloat16_skip_last2_s": round(t_ours2, 3),
        "speedup_bfloat16_skip_last2": round(t_base2 / t_ours2, 2),
        "overlap_bfloat16_skip_last2": round(len(set(sel_ours2) & set(sel_base2)) / k, 4),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = args.name or f"discovery-{Path(args.model).stem.split('.')[0]}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
