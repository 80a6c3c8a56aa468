"""`cna-export tune`: search a recipe's k, m, layer window, specificity and protect weight on its validation split."""

from __future__ import annotations

import argparse
from pathlib import Path

from cna_export.cli.options import eval_config, eval_opts, from_args, load_options, model_opts
from cna_export.errors import CnaExportError

EXAMPLE = """examples:
  cna-export tune refusal-strengthen --model qwen2.5-coder-0.5b.Q4_K_M.gguf --trials 30 --timeout 3600 -o tuned
  cna-export tune recipes/support-bot-policy.yaml --model ./Qwen2.5-1.5B-Instruct --trials 40 --seed 1 -o bot \\
      --kl-budget 0.1 --m-range 1.5 4
  cna-export eval --model M --recipe tuned/recipe.yaml --circuit tuned/circuit.json --out ev   # the test split
writes OUT/front.json, front.png (the Pareto front), recipe.yaml and circuit.json (the chosen point), test/ (the
chosen point on the test split, evaluated once) and summary.md."""


def register(add) -> None:
    """Add the `tune` subcommand (`add(name, help, parents)` returns the subparser)."""
    p = add(
        "tune",
        "search k, m, layer window, specificity and protect weight on the validation split (Optuna)",
        [model_opts(), eval_opts()],
    )
    p.epilog = EXAMPLE
    p.add_argument("recipe", help="recipe name (see recipes/) or YAML path; it needs a validation split")
    p.add_argument("--trials", type=int, required=True, help="number of trials (each one edit measured)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="start no trial after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0): the same seed gives the same front")
    p.add_argument("--kl-budget", type=float, default=0.1, help="max first-token KL of the chosen point (default 0.1)")
    p.add_argument(
        "--collateral-budget",
        type=float,
        help="max protect/benign rate change of the chosen point (default: the half-width of the "
        "original's 95%% interval on those sets)",
    )
    p.add_argument(
        "--k-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=(0.0002, 0.01),
        help="k as fractions of all MLP neurons (default 0.0002 0.01, searched on a log scale)",
    )
    p.add_argument(
        "--m-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="multipliers (default 0 0.9 for a recipe that lowers the behaviour, 1.25 4 to raise it)",
    )
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from cna_export.tune.job import tune_job
    from cna_export.tune.search import Budget
    from cna_export.tune.space import SearchSpace

    if args.trials < 1 or (args.timeout is not None and args.timeout <= 0):
        raise CnaExportError("--trials must be at least 1 and --timeout positive.", "e.g. --trials 30 --timeout 3600.")
    try:
        space = SearchSpace(fraction=tuple(args.k_range), multiplier=tuple(args.m_range) if args.m_range else None)
    except ValidationError as exc:
        raise CnaExportError(f"Bad search range: {exc.errors()[0]['msg']}.", "see cna-export tune --help.") from None
    budget = from_args(Budget, args)
    result = tune_job(
        args.recipe,
        args.model,
        Path(args.out),
        eval_config(args),
        budget,
        space,
        load=load_options(args),
        overwrite=args.overwrite,
    )
    print(f"{result.trials} trials in {result.seconds / 60:.1f} min")
    if result.chosen is None:
        print("no trial met the rule (see front.json and front.png): nothing chosen, the test split not evaluated")
    else:
        c, t = result.chosen, result.test
        print(
            f"chosen: trial {c['number']}, k={c['k']} m={c['multiplier']:.3g}; test split: behaviour "
            f"{t['positive']['original']:.1%} -> {t['positive']['edited']:.1%}, KL {t['kl_first']:.4f}"
        )
    print(f"wrote {result.out}")
