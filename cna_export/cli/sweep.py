"""The sweep command: a grid over k and m from one attribution, its Pareto front and chosen point, optionally
exported."""

from __future__ import annotations

import argparse
from pathlib import Path

from cna_export.cli.eval import headline_text
from cna_export.cli.options import eval_config, eval_opts, from_args, load_options, model_opts


def register(add) -> None:
    """Add this module's subcommand (`add(name, help, parents)` returns the subparser)."""
    model, evalo = model_opts(), eval_opts()
    p = add(
        "sweep", "grid over k and m from one attribution; Pareto front, pick a point, optionally export", [model, evalo]
    )
    p.add_argument("--recipe", required=True, help="recipe with discovery and held-out prompt sets")
    p.add_argument("--k", nargs="+", required=True, help="neuron counts (1600) or fractions (0.014, 1.4%%)")
    p.add_argument("--multipliers", type=float, nargs="+", default=[0.0, 1.0, 2.0], help="default: 0 1 2")
    p.add_argument("--kl-budget", type=float, default=0.1, help="max mean first-token KL of the chosen point")
    p.add_argument("--benign-budget", type=float, help="max benign (false positive) rate of the chosen point")
    p.add_argument("--positive", help="held-out prompts with the behaviour (overrides the recipe)")
    p.add_argument("--negative", help="held-out benign prompts (overrides the recipe)")
    p.add_argument("--allow-negative", action="store_true", help="permit negative multipliers")
    p.add_argument("--export", type=Path, help="export the chosen point to this model folder")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> None:
    from cna_export.evaluate.jobs import sweep_job
    from cna_export.evaluate.options import SweepRequest

    request = from_args(SweepRequest, args, ks=args.k)
    job = sweep_job(args.model, eval_config(args), args.out, request, load_options(args))
    print(headline_text(job.headline))
    print(f"wrote {job.report}")
    if job.export is not None:
        print(f"wrote {job.export}: k={job.chosen['k']} m={job.chosen['multiplier']:g}")
