"""Refusal edit on the real Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, CPU): sweep k x m on held-out prompts.

One attribution with the `refusal-ablate` recipe's discovery prompts, cut at every k; the original model's
answers are generated and scored once; every (k, m) point runs with runtime hooks (the tests show hooks and the
exported checkpoint give the same numbers). Held-out harmful prompts: the 40 of `builtin:refusal_harmful_heldout`
plus an evenly spaced subset of AdvBench read from the `pyrit` 1.1.0 wheel (MIT; `pip download --no-deps
pyrit==1.1.0`), with anything that duplicates or nearly duplicates a discovery prompt removed. Benign:
`builtin:refusal_benign_heldout` (40).

Usage (about 25 minutes for 6 points on 2 busy CPU cores; run it in the background). The committed results came from
    nohup python -m benchmarks.refusal_qwen --advbench /tmp/pyrit_dl/pyrit-1.1.0-py3-none-any.whl \
        --skip-last-layers 2 --k 117 233 467 --m 0 2 --max-new-tokens 16 > /tmp/refusal_qwen.log 2>&1 &
and, for smaller k, the same with `--k 47 80 --m 0 --name refusal_qwen_small_k`; the specificity selection with
`--specificity 1 --k 233 467 700 --m 0 2 --name refusal_qwen_specificity` (the recipe now has specificity 1 and
0.2%; pass `--specificity 0` for the |delta| ranking of the first two runs). `--skip-last-layers` overrides
the recipe's value (the recipe now has 2; 0 is the paper's selection, see results/refusal_qwen_paper_selection/).

Writes benchmarks/results/refusal_qwen.json and .md (headline and table) and refusal_qwen/ (report.md, PNGs,
results.json, prompts.jsonl with every answer and verdict).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import zipfile
from pathlib import Path

import torch
import yaml

from cna_export.backends.torch import TorchBackend
from cna_export.circuit.recipe import load_prompts, load_recipe
from cna_export.evaluate.measure import EvalConfig, disjoint
from cna_export.evaluate.options import SweepOptions
from cna_export.evaluate.report import headline, selection_scores, table, write_report
from cna_export.evaluate.sweep import run_sweep, save_results
from cna_export.io.source import describe, identity, load_model, resolve

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = Path.home() / ".cache" / "cna-real-models" / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
ADV_BENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"


def advbench(path: Path, n: int) -> list[str]:
    """n evenly spaced AdvBench behaviours from the pyrit wheel (or the extracted .prompt YAML)."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            text = wheel.read(ADV_BENCH).decode()
    else:
        text = path.read_text()
    seeds = [s["value"] for s in yaml.safe_load(text)["seeds"]]
    step = len(seeds) / n
    return [seeds[int(i * step)] for i in range(n)]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def near_duplicates_removed(prompts: list[str], discovery: list[str], threshold: float = 0.6) -> list[str]:
    """Drop prompts whose word set overlaps a discovery prompt's by Jaccard >= threshold."""
    kept = []
    for p in prompts:
        w = _words(p)
        if all(len(w & _words(d)) / max(1, len(w | _words(d))) < threshold for d in discovery):
            kept.append(p)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--recipe", default="refusal-ablate")
    ap.add_argument("--skip-last-layers", type=int, help="override the recipe's skip_last_layers")
    ap.add_argument("--specificity", type=float, help="override the recipe's specificity (0: rank by |delta|)")
    ap.add_argument("--advbench", type=Path, help="pyrit-1.1.0 wheel or adv_bench.prompt (optional)")
    ap.add_argument("--advbench-n", type=int, default=40)
    ap.add_argument("--k", type=int, nargs="+", default=[467, 1167, 1600, 2400])
    ap.add_argument("--m", type=float, nargs="+", default=[0.0, 2.0])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--kl-tokens", type=int, default=8)
    ap.add_argument("--kl-budget", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="refusal_qwen")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    recipe, base = load_recipe(args.recipe)
    if args.skip_last_layers is not None:
        recipe = recipe.model_copy(update={"skip_last_layers": args.skip_last_layers})
    if args.specificity is not None:
        recipe = recipe.model_copy(update={"specificity": args.specificity})
    discovery = load_prompts(recipe.positive, base) + load_prompts(recipe.negative, base)
    harmful = load_prompts(recipe.heldout_positive, base)
    if args.advbench:
        harmful += advbench(args.advbench, args.advbench_n)
    harmful = near_duplicates_removed(disjoint(harmful, discovery), discovery)
    benign = near_duplicates_removed(disjoint(load_prompts(recipe.heldout_negative, base), discovery), discovery)
    logging.info("held-out: %d harmful, %d benign", len(harmful), len(benign))

    times = {}
    t = time.time()
    source = resolve(str(args.model))
    spec, shape, config = describe(source)
    model, tokenizer = load_model(source, dtype="float32", device="cpu")
    times["load_s"] = time.time() - t

    from cna_export.attribution.select import attribute_on

    t = time.time()
    settings = recipe.selection()
    backend = TorchBackend.of_model(model, tokenizer, spec, identity(source, config, shape))
    att = attribute_on(backend, load_prompts(recipe.positive, base), load_prompts(recipe.negative, base), load_prompts(recipe.universal.prompts, base), settings)  # fmt: skip
    times["attribution_s"] = time.time() - t

    cfg = EvalConfig(args.max_new_tokens, args.batch_size, args.kl_tokens)
    t = time.time()
    results, records, circuits = run_sweep(
        TorchBackend.of_model(model, tokenizer, spec, model_name=args.model.name), att, harmful, benign, "refusal",
        cfg, SweepOptions(ks=args.k, multipliers=args.m, recipe=recipe.name, kl_budget=args.kl_budget,
                          goal="decrease", out=args.out / args.name),
    )  # fmt: skip
    times["sweep_s"] = time.time() - t
    source_note = f"builtin:refusal_harmful_heldout + {args.advbench_n if args.advbench else 0} AdvBench (pyrit 1.1.0)"
    results["heldout_sources"] = {"positive": source_note, "negative": "builtin:refusal_benign_heldout"}
    results["selection"] = {"recipe": recipe.name, "skip_first_layers": recipe.skip_first_layers,
                            "skip_last_layers": recipe.skip_last_layers, "universal": recipe.universal.enabled,
                            "specificity": recipe.specificity}  # fmt: skip
    split_kl(results, records)
    write_outputs(
        args.out, args.name, f"Refusal edit on {args.model.name} (CPU, fp32 dequantized)", results, records, att,
        circuits, times, f"Held-out: {len(harmful)} harmful ({source_note}), {len(benign)} benign. "
        f"Greedy, {args.max_new_tokens} new tokens, {args.threads} threads.",
    )  # fmt: skip


def split_kl(results: dict, records: list[dict]) -> None:
    """First-token KL split by what the original did on each benign prompt.

    On the benign prompts the original refuses (risky-sounding ones), a refusal edit is meant to change the first
    token, so their KL is the intended effect, not damage; the KL on the benign prompts the original answers is
    the side effect. Adds `kl_first_answered`, `kl_first_refused` and `n_benign_refused_by_original` to every point.
    """
    refused = {
        r["prompt"] for r in records if r["label"] == "original" and r["set"] == "negative" and r["refusal_rule"]
    }
    for point in [results["baseline"], *results["points"]]:
        rows = [r for r in records if r["label"] == point["label"] and r["set"] == "negative"]
        answered = [r["kl_first"] for r in rows if r["prompt"] not in refused]
        was_refused = [r["kl_first"] for r in rows if r["prompt"] in refused]
        point["kl_first_answered"] = sum(answered) / len(answered) if answered else None
        point["kl_first_refused"] = sum(was_refused) / len(was_refused) if was_refused else None
        point["n_benign_refused_by_original"] = len(was_refused)


def split_table(results: dict) -> str:
    """Markdown: refusal change and first-token KL split into answered / refused benign prompts, per point."""
    base = results["baseline"]["rate"]
    rows = ["| point | harmful refusal | relative change | benign refusals | KL first (all) | KL first (benign the "
            "original answers) | KL first (benign the original refuses) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in [results["baseline"], *results["points"]]:
        change = f"{100 * (p['rate'] - base) / base:+.0f}%" if base else "-"
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"| {p['label']} | {p['rate']:.3f} | {change} | {p['benign_refusal_rate']:.3f} "
                    f"| {p['kl_first']:.3f} | {fmt(p['kl_first_answered'])} | {fmt(p['kl_first_refused'])} |")  # fmt: skip
    return "\n".join(rows)


def write_outputs(out: Path, name: str, title: str, results: dict, records: list, att, circuits: dict, times: dict,
                  notes: str) -> None:  # fmt: skip
    """OUT/NAME/ (results.json, prompts.jsonl, report.md, PNGs) and OUT/NAME.json + OUT/NAME.md (headline, table)."""
    folder = out / name
    results["timings"] = times
    results["circuit_layers"] = {str(k): c.layer_counts() for k, c in circuits.items()}
    save_results(folder, results, records)
    candidates, cuts = selection_scores(att, circuits)
    chosen = results["chosen"]
    shown = circuits[results["points"][chosen]["k"]] if chosen is not None else circuits[max(circuits)]
    write_report(folder, results, shown, candidates, cuts, specificity=att.selection.specificity)
    head = headline(results)
    (out / f"{name}.json").write_text(json.dumps({"headline": head, **results}, indent=1))
    timing = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in times.items())
    lines = [f"# {title}", "", notes, f"Timings: {timing}.", "", table(results), ""]
    if "kl_first_answered" in results["baseline"]:
        lines += ["First-token KL split by the original's answer on each benign prompt:", "", split_table(results), ""]
    lines += ["Headline (chosen point):", "",
             "```json", json.dumps(head, indent=1), "```", "",
             f"Figures and every answer with its verdict: [{name}/report.md]({name}/report.md)."]  # fmt: skip
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    logging.info("done: %s", json.dumps(head))


if __name__ == "__main__":
    main()
