"""Does a French-language edit change behaviour on a real model? Sweep k x m, count answers in French.

One attribution with the recipe's discovery prompts ("... Answer in French." vs "... Answer in English."), cut at
every k; the recipe's held-out prompts are answered greedily by the original model (m = 1) and by every (k, m)
point with runtime hooks, and `cna_export.evaluate.detectors.detect_french` counts the answers that are in French. Benign
set (KL, quality): `builtin:refusal_benign_heldout`.

The default recipe `french-ablate` holds out 30 English questions followed by "Answer in French."
(`builtin:french_heldout_instructed`): does ablation keep the model in English? Amplification was tried too, on
plain English questions (`--heldout-suffix` adds text to each held-out prompt; use a recipe whose held-out set is
`builtin:french_heldout` with m > 1): it did not make the models answer in French (results/french_qwen.md).

Usage (Qwen 0.5B: about 3 minutes of sweep on 2 CPU cores, plus loading):
    python -m benchmarks.french --model ~/.cache/cna-real-models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf \
        --k 0.001 0.005 --m 0 --name french_ablate_qwen
The committed results/french_ablate_qwen.* were made with the same prompts (then as builtin:french_heldout plus
--heldout-suffix "Answer in French."), --max-new-tokens 24, PYTHONPATH=.; results/french_smollm2.* and
french_qwen.* are the amplification attempts (--k 0.01 --m 4 8 and --k 0.005 --m 2 4, --threads 1).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from benchmarks.refusal_qwen import write_outputs
from cna_export.attribution.select import attribute_on
from cna_export.backends.torch import TorchBackend
from cna_export.circuit.recipe import load_prompts, load_recipe
from cna_export.evaluate.measure import EvalConfig
from cna_export.evaluate.options import SweepOptions
from cna_export.evaluate.sweep import goal_of, heldout_sets, resolve_ks, run_sweep
from cna_export.io.source import describe, identity, load_model, resolve

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = Path.home() / ".cache" / "cna-real-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--recipe", default="french-ablate")
    ap.add_argument("--k", type=float, nargs="+", default=[0.005, 0.01, 0.02], help="fractions of all MLP neurons")
    ap.add_argument("--m", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--kl-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout-suffix", default="", help='e.g. "Answer in French." to test ablation (m < 1)')
    ap.add_argument("--name", default="french_smollm2")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    recipe, base = load_recipe(args.recipe)
    held_pos, held_neg = heldout_sets(recipe, base)
    if args.heldout_suffix:
        held_pos = [f"{p} {args.heldout_suffix}" for p in held_pos]
    times = {}
    t = time.time()
    source = resolve(str(args.model))
    spec, shape, config = describe(source)
    model, tokenizer = load_model(source, dtype="float32", device="cpu")
    times["load_s"] = time.time() - t
    t = time.time()
    settings = recipe.selection()
    neutral = load_prompts(recipe.universal.prompts, base) if settings.universal else []
    backend = TorchBackend.of_model(model, tokenizer, spec, identity(source, config, shape))
    att = attribute_on(backend, load_prompts(recipe.positive, base), load_prompts(recipe.negative, base), neutral, settings)  # fmt: skip
    times["attribution_s"] = time.time() - t
    t = time.time()
    results, records, circuits = run_sweep(
        TorchBackend.of_model(model, tokenizer, spec, model_name=args.model.name), att, held_pos, held_neg,
        recipe.behaviour, EvalConfig(args.max_new_tokens, args.batch_size, args.kl_tokens),
        SweepOptions(ks=resolve_ks(args.k, shape), multipliers=args.m, recipe=recipe.name, kl_budget=None,
                     goal=goal_of(min(args.m)), out=args.out / args.name),
    )  # fmt: skip
    times["sweep_s"] = time.time() - t
    results["heldout_sources"] = {
        "positive": str(recipe.heldout_positive),
        "negative": "builtin:refusal_benign_heldout",
    }
    notes = (
        f"Recipe `{recipe.name}` (its defaults: k = {recipe.fraction} of MLP neurons, m = {recipe.multiplier:g}); "
        f"swept here: k = {', '.join(f'{k:g}' for k in args.k)} of MLP neurons, m = {', '.join(f'{m:g}' for m in args.m)}. Held-out: "
        f"{len(held_pos)} plain English questions (`{recipe.heldout_positive}`)"
        f"{f' each followed by {args.heldout_suffix!r}' if args.heldout_suffix else ''}; 'positive rate' = answers in "
        f"French. Benign: {len(held_neg)} everyday requests. Greedy, {args.max_new_tokens} new tokens."
    )
    write_outputs(args.out, args.name, f"French {'amplification' if min(args.m) > 1 else 'ablation'} on {args.model.name}", results, records, att,
                  circuits, times, notes)  # fmt: skip


if __name__ == "__main__":
    main()
