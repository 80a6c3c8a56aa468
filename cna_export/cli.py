"""Command line: thin wrappers that build validated settings and call one library function each.

Errors the user can fix print as one line and exit 2; set CNA_EXPORT_DEBUG=1 (or --debug) for tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cna_export import __version__, distributed
from cna_export.errors import CnaExportError

log = logging.getLogger("cna_export")
EXPORT_MARKER = "circuit.json"  # the file every export folder holds (cna_export.export.EXPORT_MARKER)
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # cna_export.gguf_export.OUTTYPES, without importing gguf here

EXAMPLES = {
    "run": """examples:
  cna-export run refusal-ablate --model Qwen/Qwen2.5-0.5B-Instruct --out qwen-no-refusal
  cna-export run recipes/refusal-strengthen.yaml --model ./my-model --out hardened --multiplier 3
  cna-export run refusal-ablate --model model.gguf --out out --top-k 1600""",
    "discover": """examples:
  cna-export discover --model ./Llama-3.2-1B-Instruct --recipe refusal-ablate -o circuit.json
  cna-export discover --model ./m --positive harmful.txt --negative benign.txt --top-k 500 -o c.json""",
    "apply": """examples:
  cna-export apply --model ./Llama-3.2-1B-Instruct --circuit circuit.json --out edited
  cna-export apply --model ./m --circuit c.json --out amplified --multiplier 2 --overwrite""",
    "gguf": """examples:
  cna-export gguf qwen-no-refusal -o qwen-no-refusal-f16.gguf
  cna-export gguf ./m -o m-q8_0.gguf --outtype q8_0 --modelfile --ollama-create m-edited
  cna-export apply --model ./m --circuit c.json --out edited --gguf q8_0   # also edited/edited-q8_0.gguf""",
    "inspect": """examples:
  cna-export inspect circuit.json
  cna-export inspect circuit.json --top 50 --plot layers.png""",
    "eval": """examples:
  cna-export eval --model ./m --circuit circuit.json --multiplier 0 1 2 --recipe refusal-ablate --out eval-report
  cna-export eval --model ./m --edited ./m-no-refusal --recipe refusal-ablate --out eval-exported
  cna-export eval --model ./m --circuit c.json --positive harmful.txt --negative benign.txt --max-new-tokens 24 \\
      --out ev --lm-eval mmlu --lm-eval-limit 100""",
    "sweep": """examples:
  cna-export sweep --model ./m --recipe refusal-ablate --k 467 1167 1600 2400 --multipliers 0 1 2 --out sweep
  cna-export sweep --model m.gguf --recipe refusal-ablate --k 0.004 0.014 --kl-budget 0.1 --out s --export best""",
    "push": """examples:
  cna-export push qwen-no-refusal me/qwen-no-refusal --private
  cna-export push qwen-no-refusal me/qwen-no-refusal --revision m0 --commit-message "k=1600, m=0"
  cna-export push qwen-no-refusal.Q8_0.gguf me/qwen-no-refusal-GGUF
the token comes from `hf auth login` or HF_TOKEN and is never printed.""",
    "diff": """examples:
  cna-export diff Qwen/Qwen2.5-0.5B-Instruct ./qwen-no-refusal -o recovered_circuit.json
  cna-export diff ./model ./edited --verify ./edited/circuit.json
  cna-export diff model.Q4_K_M.gguf edited.Q4_K_M.gguf --json
exit status: 0 when the difference is exactly a neuron edit (with --verify: exactly that circuit, nothing else),
1 when it is not, 2 on bad input.""",
    "patch-gguf": """examples:
  cna-export discover --model smollm2.Q4_1.gguf --recipe refusal-ablate --top-k 46 -o c.json
  cna-export patch-gguf smollm2.Q4_1.gguf --circuit c.json -o smollm2-edited.Q4_1.gguf
  cna-export patch-gguf ~/.ollama/models/blobs/sha256-XXXX --circuit c.json -o edited.gguf --multiplier 2
scales the circuit's ffn_up rows inside the quantized file (f16 block scales); every other byte is copied
unchanged, and the applied circuit is written to OUT.circuit.json.""",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _model_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="model folder, Hub id (owner/name) or .gguf file")
    g.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--device-map", help="spread layers over devices: auto, balanced, sequential (accelerate)")
    g.add_argument("--offload-folder", type=Path, help="folder for weights offloaded to disk with --device-map")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")
    return p


def _select_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("selection (overrides the recipe)")
    k = g.add_mutually_exclusive_group()
    k.add_argument("--top-k", type=int, help="number of neurons to select")
    k.add_argument(
        "--fraction", type=float, help="share of all MLP neurons to select (default: the recipe's, else 0.001)"
    )
    g.add_argument("--skip-first-layers", type=int, help="never select neurons in the first N layers")
    g.add_argument("--skip-last-layers", type=int, help="never select neurons in the last N layers")
    g.add_argument("--no-universal", action="store_true", help="do not exclude universal neurons")
    g.add_argument("--universal-top-n", type=int, help="per-layer top-|activation| size for universal neurons")
    g.add_argument("--universal-threshold", type=float, help="share of neutral prompts that makes a neuron universal")
    g.add_argument("--specificity", type=float,
                   help="rank by |delta| - S x mean |activation| on neutral prompts (0: by |delta|, the paper)")  # fmt: skip
    g.add_argument("--batch-size", type=int, help="prompts per forward pass")
    g.add_argument("--no-chat-template", action="store_true", help="feed raw prompts even if a chat template exists")
    return p


def _apply_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("edit and export")
    g.add_argument("--multiplier", type=float, help="scale for every selected neuron (0 ablate, >1 amplify)")
    g.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    g.add_argument(
        "--target", choices=("down", "up"), default="down", help="fold into down_proj columns or up_proj rows"
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    g.add_argument("--force", action="store_true", help="apply a circuit discovered on different weights of this shape")
    g.add_argument("--base-model", help="Hub id of the source for the model card, when it is a local copy or GGUF")
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this Hub repository (owner/name)")
    g.add_argument("--private", action="store_true", help="create the --push-to-hub repository as private")
    g.add_argument("--gguf", metavar="OUTTYPE", choices=GGUF_OUTTYPES,
                   help="also convert the export to OUT/OUT-OUTTYPE.gguf (f32, f16, bf16, q8_0)")  # fmt: skip
    g.add_argument("--file-hashes", action=argparse.BooleanOptionalAction, default=False,
                   help="record the weight files' sha256 in the model card now (default: push records them; "
                        "hashing costs more than the copy itself)")  # fmt: skip
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cna-export", description="Find the MLP neurons behind a behaviour and ship the edit.")
    parser.add_argument("--version", action="version", version=f"cna-export {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model, select, apply, evalo = _model_opts(), _select_opts(), _apply_opts(), _eval_opts()

    def add(name: str, help: str, parents: list) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, parents=parents, epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

    p = add("run", "discover a circuit from a recipe and export the edited model", [model, select, apply])
    p.add_argument("recipe", help="recipe name (see recipes/) or YAML path")
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.set_defaults(func=_run)

    p = add("discover", "find the neurons of a behaviour and write a circuit file", [model, select])
    p.add_argument("--recipe", help="recipe name or YAML path with the prompt sets")
    p.add_argument("--positive", help="prompts with the behaviour (.txt/.yaml/.json/.jsonl)")
    p.add_argument("--negative", help="prompts without it")
    p.add_argument("--neutral", help="diverse neutral prompts for universal neurons (default: built-in set)")
    p.add_argument("--behaviour", help="name of the behaviour, recorded in the circuit")
    p.add_argument("--multiplier", type=float, help="default multiplier stored in the circuit")
    p.add_argument("-o", "--out", required=True, type=Path, help="circuit file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing circuit file")
    p.set_defaults(func=_discover)

    p = add("apply", "fold a circuit into a model and export it as safetensors", [model, apply])
    p.add_argument("--circuit", required=True, type=Path, help="circuit file from discover")
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.set_defaults(func=_apply)

    p = add("gguf", "convert a Hugging Face model folder (e.g. an export) to GGUF for llama.cpp / Ollama", [])
    p.add_argument("model_dir", type=Path, help="model folder with config.json, safetensors and tokenizer")
    p.add_argument("-o", "--out", required=True, type=Path, help="GGUF file to write (NAME.gguf)")
    p.add_argument("--outtype", choices=GGUF_OUTTYPES, default="f16", help="weight type (default f16)")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile next to the GGUF")
    p.add_argument("--ollama-create", metavar="NAME", help="write the Modelfile and run `ollama create NAME`")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF (and Modelfile)")
    p.set_defaults(func=_gguf)

    p = add("inspect", "summarise a circuit: neurons per layer and top neurons", [])
    p.add_argument("circuit", type=Path, help="circuit file")
    p.add_argument("--top", type=int, default=20, help="how many neurons to list")
    p.add_argument("--plot", type=Path, help="write a PNG of neurons per layer")
    p.set_defaults(func=_inspect)

    p = add("eval", "measure an edit on held-out prompts: behaviour rate, benign rate, KL, quality", [model, evalo])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--edited", type=Path, help="exported model folder to compare with --model")
    what.add_argument("--circuit", type=Path, help="circuit to apply with runtime hooks (no export needed)")
    p.add_argument("--multiplier", type=float, nargs="+", help="one or more multipliers for --circuit")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--recipe", help="recipe whose heldout_positive/heldout_negative sets to use")
    p.add_argument("--positive", help="held-out prompts with the behaviour (overrides the recipe)")
    p.add_argument("--negative", help="held-out benign prompts (overrides the recipe)")
    p.add_argument("--behaviour", help="detector to use (refusal, answer-in-french); default from recipe/circuit")
    p.add_argument("--lm-eval", nargs="+", metavar="TASK", default=(), help="also run lm-eval-harness tasks")
    p.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task")
    p.set_defaults(func=_eval)

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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --export folder")
    p.set_defaults(func=_sweep)

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

    p = add("patch-gguf", "scale a circuit's neurons inside an existing GGUF file (no re-conversion)", [])
    p.add_argument("gguf", type=Path, help="GGUF file to patch (never modified)")
    p.add_argument("--circuit", required=True, type=Path, help="circuit file from discover")
    p.add_argument("-o", "--out", required=True, type=Path, help="patched GGUF file to write")
    p.add_argument("--multiplier", type=float, help="scale for every neuron (0 ablate, >1 amplify)")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output written by patch-gguf")
    p.add_argument("--force", action="store_true", help="patch with a circuit discovered on different weights")
    p.set_defaults(func=_patch_gguf)
    return parser


def _eval_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("evaluation")
    g.add_argument("--out", required=True, type=Path, help="report folder (results.json, prompts.jsonl, report.md)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (default 32)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    g.add_argument("--kl-tokens", type=int, default=8, help="answer positions averaged for KL (default 8)")
    g.add_argument("--no-chat-template", action="store_true", help="feed raw prompts even if a chat template exists")
    return p


# Subcommands -------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, base):
    """Recipe settings with the command-line overrides applied."""
    from dataclasses import replace

    overrides = {
        "top_k": args.top_k,
        "skip_first_layers": args.skip_first_layers,
        "skip_last_layers": args.skip_last_layers,
        "universal_top_n": args.universal_top_n,
        "universal_threshold": args.universal_threshold,
        "specificity": args.specificity,
        "batch_size": args.batch_size,
    }
    settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if args.top_k is not None:
        settings = replace(settings, fraction=None)
    if args.fraction is not None:
        settings = replace(settings, fraction=args.fraction, top_k=None)
    if args.no_universal:
        settings = replace(settings, universal=False)
    if args.no_chat_template:
        settings = replace(settings, chat_template=False)
    _check_settings(settings)
    return settings


def _check_settings(s) -> None:
    if s.top_k is not None and s.top_k < 1:
        raise CnaExportError(f"--top-k {s.top_k} must be at least 1.", "pass a positive count.")
    if s.fraction is not None and not 0 < s.fraction <= 1:
        raise CnaExportError(f"--fraction {s.fraction} must be in (0, 1].", "e.g. 0.001 for 0.1%.")
    if s.batch_size < 1:
        raise CnaExportError(f"--batch-size {s.batch_size} must be at least 1.", "pass a positive size.")
    if s.skip_first_layers < 0 or s.skip_last_layers < 0:
        raise CnaExportError("--skip-first-layers/--skip-last-layers must not be negative.", "pass 0 or more.")
    if not 0 < s.universal_threshold <= 1:
        raise CnaExportError(f"--universal-threshold {s.universal_threshold} must be in (0, 1].", "e.g. 0.8.")
    if not 0 <= s.specificity < float("inf"):
        raise CnaExportError(f"--specificity {s.specificity} must be a finite number >= 0.", "e.g. 1, or 0 for off.")


def _discover_from(args: argparse.Namespace, recipe, base: Path | None):
    from cna_export.attribute import Settings, discover_circuit
    from cna_export.recipe import load_prompts
    from cna_export.source import resolve

    if recipe is not None:
        settings = _settings(args, recipe.settings())
        positive, negative = load_prompts(recipe.positive, base), load_prompts(recipe.negative, base)
        neutral = load_prompts(recipe.universal.prompts, base) if settings.universal else []
        behaviour, multiplier, name = recipe.behaviour, recipe.multiplier, recipe.name
    else:
        settings = _settings(args, Settings())
        positive, negative = load_prompts(args.positive), load_prompts(args.negative)
        neutral = load_prompts(args.neutral or "builtin:neutral_diverse") if settings.universal else []
        behaviour, multiplier, name = "custom", 0.0, None
    if getattr(args, "behaviour", None):
        behaviour = args.behaviour
    if args.multiplier is not None:
        multiplier = args.multiplier
    source = resolve(args.model, args.revision)
    return source, discover_circuit(
        source, positive, negative, neutral, settings, dtype=args.dtype, device=args.device,
        device_map=args.device_map, offload_folder=args.offload_folder,
        trust_remote_code=args.trust_remote_code, behaviour=behaviour, recipe=name, multiplier=multiplier,
    )  # fmt: skip


def _discover(args: argparse.Namespace) -> None:
    from cna_export.checkpoint import check_output_path
    from cna_export.recipe import load_recipe

    if args.recipe is None and (args.positive is None or args.negative is None):
        raise CnaExportError("discover needs prompt sets.", "pass --recipe, or both --positive and --negative.")
    check_output_path(args.out, None, args.overwrite)
    recipe, base = load_recipe(args.recipe) if args.recipe else (None, None)
    _, circuit = _discover_from(args, recipe, base)
    if not distributed.is_main():
        return
    circuit.save(args.out)
    print(f"wrote {args.out}: {len(circuit.neurons)} neurons in {len(circuit.layer_counts())} layers")


def _apply(args: argparse.Namespace) -> None:
    from cna_export.circuit import Circuit
    from cna_export.export import apply_circuit
    from cna_export.source import resolve

    _check_push_args(args)
    source = resolve(args.model, args.revision)
    out = apply_circuit(source, Circuit.load(args.circuit), args.out, **_apply_kwargs(args))
    print(f"wrote {out}")
    _after_export(args, out)


def _apply_kwargs(args: argparse.Namespace) -> dict:
    return {
        "multiplier": args.multiplier,
        "allow_negative": args.allow_negative,
        "overwrite": args.overwrite,
        "force": args.force,
        "target": args.target,
        "base_model": args.base_model,
        "gguf": args.gguf,
        "hash_files": args.file_hashes,
    }


def _check_push_args(args: argparse.Namespace) -> None:
    """Fail on a bad --push-to-hub before any long work."""
    if args.push_to_hub is not None:
        from cna_export.card import check_repo_id

        check_repo_id(args.push_to_hub)
    elif args.private:
        raise CnaExportError("--private needs --push-to-hub.", "add --push-to-hub owner/name, or drop --private.")


def _after_export(args: argparse.Namespace, out: Path) -> None:
    """After apply/run: name the GGUF written into the folder (--gguf), then --push-to-hub."""
    if args.gguf is not None:
        print(f"wrote {out / f'{out.name}-{args.gguf}.gguf'}")
    if args.push_to_hub is not None:
        from cna_export.hub import push

        print(f"pushed {out} to {push(out, args.push_to_hub, private=args.private)}")


def _local_model(args: argparse.Namespace) -> Path | None:
    """The --model path when it is a local file or folder, so an output overlapping it is refused before the
    (long) discovery rather than after it."""
    path = Path(args.model).expanduser()
    return path if path.exists() else None


def _gguf(args: argparse.Namespace) -> None:
    from cna_export.gguf_export import export_gguf

    out = export_gguf(args.model_dir, args.out, outtype=args.outtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    if args.modelfile or args.ollama_create:
        from cna_export.ollama import ollama_create, write_modelfile

        modelfile = write_modelfile(out, overwrite=args.overwrite)
        print(f"wrote {modelfile}")
        if args.ollama_create:
            ollama_create(args.ollama_create, modelfile)
            print(f"created Ollama model {args.ollama_create}")


def _run(args: argparse.Namespace) -> None:
    from cna_export.checkpoint import check_output_path
    from cna_export.export import apply_circuit
    from cna_export.recipe import find_recipe, load_recipe

    _check_push_args(args)
    recipe, base = load_recipe(args.recipe)
    if args.multiplier is not None:
        from cna_export.fold import check_multiplier

        check_multiplier(args.multiplier, args.allow_negative or recipe.allow_negative)
    check_output_path(args.out, _local_model(args), args.overwrite, marker=EXPORT_MARKER)
    source, circuit = _discover_from(args, recipe, base)
    if not distributed.is_main():
        return
    kwargs = _apply_kwargs(args) | {"allow_negative": args.allow_negative or recipe.allow_negative}
    out = apply_circuit(source, circuit, args.out, recipe_file=find_recipe(args.recipe), **kwargs)
    print(f"wrote {out}: {len(circuit.neurons)} neurons scaled")
    _after_export(args, out)


def _inspect(args: argparse.Namespace) -> None:
    from cna_export.circuit import Circuit

    circuit = Circuit.load(args.circuit)
    print(summary(circuit, args.top))
    if args.plot:
        from cna_export.plots import plot_layers

        plot_layers(circuit, args.plot)
        print(f"wrote {args.plot}")


def _eval_config(args: argparse.Namespace):
    from cna_export.evaluate import EvalConfig

    cfg = EvalConfig(args.max_new_tokens, args.batch_size, args.kl_tokens, not args.no_chat_template)
    cfg.check()
    return cfg


def _eval(args: argparse.Namespace) -> None:
    from cna_export.circuit import Circuit
    from cna_export.recipe import load_recipe
    from cna_export.report import headline, write_report
    from cna_export.source import resolve
    from cna_export.sweep import heldout_sets, run_eval, save_results

    cfg = _eval_config(args)
    circuit = Circuit.load(args.circuit) if args.circuit else None
    if args.multiplier and circuit is None:
        raise CnaExportError("--multiplier needs --circuit.", "pass --circuit, or evaluate an --edited folder.")
    recipe_name = args.recipe or (circuit.recipe if circuit is not None and not args.positive else None)
    recipe, base = load_recipe(recipe_name) if recipe_name else (None, None)
    positive, negative = heldout_sets(recipe, base, args.positive, args.negative)
    behaviour = args.behaviour or (recipe.behaviour if recipe else None) or (circuit.behaviour if circuit else None)
    if behaviour is None:
        raise CnaExportError("Unknown behaviour to detect.", "pass --behaviour refusal (or a --recipe).")
    results, records, used = run_eval(
        resolve(args.model, args.revision), positive, negative, behaviour, cfg, circuit=circuit,
        multipliers=args.multiplier, edited=args.edited, allow_negative=args.allow_negative,
        lm_eval_tasks=args.lm_eval, lm_eval_limit=args.lm_eval_limit, dtype=args.dtype, device=args.device,
    )  # fmt: skip
    save_results(args.out, results, records)
    report = write_report(args.out, results, used)
    print(_headline_text(headline(results)))
    print(f"wrote {report}")
    if args.edited is not None and (args.edited / "circuit.json").is_file():
        from cna_export.card import add_metrics

        if add_metrics(args.edited, headline(results)):  # the card's file hashes stay valid
            print(f"added these numbers to the model card of {args.edited}")


def _sweep(args: argparse.Namespace) -> None:
    from cna_export.checkpoint import check_output_path
    from cna_export.recipe import load_recipe
    from cna_export.report import headline, selection_scores, write_report
    from cna_export.source import resolve
    from cna_export.sweep import parse_k, sweep_source

    cfg = _eval_config(args)
    if args.export is not None:
        check_output_path(args.export, _local_model(args), args.overwrite, marker=EXPORT_MARKER)
    recipe, base = load_recipe(args.recipe)
    source = resolve(args.model, args.revision)
    results, records, circuits, att = sweep_source(
        source, recipe, base, [parse_k(k) for k in args.k], args.multipliers, cfg, positive=args.positive,
        negative=args.negative, kl_budget=args.kl_budget, benign_budget=args.benign_budget,
        allow_negative=args.allow_negative, dtype=args.dtype, device=args.device, out=args.out,
    )  # fmt: skip
    chosen = results["points"][results["chosen"]] if results["chosen"] is not None else None
    shown = circuits[chosen["k"]] if chosen else circuits[max(circuits)]
    candidates, cuts = selection_scores(att, circuits)
    report = write_report(args.out, results, shown, candidates, cuts, specificity=att.settings.specificity)
    print(_headline_text(headline(results)))
    print(f"wrote {report}")
    if args.export is not None:
        if chosen is None:
            raise CnaExportError("No sweep point meets the selection rule, so nothing was exported.",
                                 "raise --kl-budget or try other --k/--multipliers; see the report.")  # fmt: skip
        from cna_export.export import apply_circuit
        from cna_export.recipe import find_recipe

        allow = args.allow_negative or recipe.allow_negative
        circuit = circuits[chosen["k"]].model_copy(update={"multiplier": chosen["multiplier"]})
        out = apply_circuit(source, circuit, args.export, allow_negative=allow, overwrite=args.overwrite,
                            recipe_file=find_recipe(args.recipe), metrics=headline(results))  # fmt: skip
        print(f"wrote {out}: k={chosen['k']} m={chosen['multiplier']:g}")


def _patch_gguf(args: argparse.Namespace) -> None:
    from cna_export.circuit import Circuit
    from cna_export.gguf_patch import patch_gguf_report

    report = patch_gguf_report(
        args.gguf, Circuit.load(args.circuit), args.out, multiplier=args.multiplier, overwrite=args.overwrite,
        force=args.force, allow_negative=args.allow_negative,
    )  # fmt: skip
    print(f"wrote {report.out}: {report.summary()}")
    print(f"wrote {report.sidecar}")


def _push(args: argparse.Namespace) -> None:
    from cna_export.hub import push

    url = push(args.path, args.repo_id, private=args.private, branch=args.revision,
               commit_message=args.commit_message, verify=not args.no_verify)  # fmt: skip
    print(f"pushed {args.path} to {url}")


def _diff(args: argparse.Namespace) -> int:
    import json

    from cna_export.diff import diff, verify

    if args.output is not None:
        from cna_export.checkpoint import check_output_path

        check_output_path(args.output, None, args.overwrite)
    if args.verify is not None:
        from cna_export.circuit import Circuit

        ok, reason = verify(args.original, args.edited, Circuit.load(args.verify))
        print(json.dumps({"verified": ok, "reason": reason}) if args.json else f"{'OK' if ok else 'FAILED'}: {reason}")
        return 0 if ok else 1
    report = diff(args.original, args.edited)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    if args.output is not None:
        report.circuit().save(args.output)
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


def summary(circuit, top: int = 20) -> str:
    """A readable summary of a circuit."""
    m, s = circuit.model, circuit.selection
    total = m.num_layers * m.intermediate_size
    lines = [
        f"circuit: {circuit.behaviour} on {m.source} ({m.model_type}, {m.num_layers} layers x {m.intermediate_size})",
        f"neurons: {len(circuit.neurons)} ({100 * len(circuit.neurons) / total:.3f}% of {total}), "
        f"default multiplier {circuit.multiplier:g}",
        f"excluded: first {s.skip_first_layers} and last {s.skip_last_layers} layers, "
        f"{len(s.universal_excluded)} universal neurons"
        + (f"; specificity {s.specificity:g}" if s.specificity else ""),
        "prompts: " + ", ".join(f"{k} {v.count}" for k, v in circuit.prompts.items()),
        "",
        "layer  neurons",
    ]
    lines += [f"{layer:5d}  {count:7d}" for layer, count in circuit.layer_counts().items()]
    lines += ["", f"top {min(top, len(circuit.neurons))} by |delta|:", "layer  index        delta"]
    ranked = sorted(circuit.neurons, key=lambda n: -abs(n.delta))[:top]
    lines += [f"{n.layer:5d}  {n.index:5d}  {n.delta:+11.5f}" for n in ranked]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("CNA_EXPORT_DEBUG"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with _termination_as_interrupt():
            distributed.init_from_env()
            code = args.func(args)
    except CnaExportError as exc:
        if debug:
            raise
        print(f"cna-export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug:
            raise
        print(f"cna-export: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        print(f"cna-export: interrupted ({signal.Signals(signum).name}); temporary files removed.", file=sys.stderr)
        return 128 + signum
    finally:
        distributed.shutdown()
    return code or 0


# What to do about an operating-system error, by errno; the problem itself is the system's message.
_OS_FIXES = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space (disk quota exceeded) or write to another disk",
    errno.EROFS: "write to a location that is not on a read-only file system",
    errno.EACCES: "check the permissions of that path or choose another location",
    errno.EPERM: "check the permissions of that path or choose another location",
    errno.ENOENT: "check the path",
    errno.EISDIR: "pass a file, not a folder",
    errno.ENOTDIR: "check the path; a part of it is a file, not a folder",
    errno.EIO: "the disk reported an I/O error; check it and try again",
}


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError: the system's message, the path, and a fix that fits the errno."""
    where = f" ({exc.filename})" if exc.filename else ""
    problem = exc.strerror or str(exc) or exc.__class__.__name__
    fix = _OS_FIXES.get(exc.errno, "check the path, its permissions and the free space")
    return " ".join(f"{problem}{where}. Fix: {fix}.".split())


@contextlib.contextmanager
def _termination_as_interrupt():
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so a killed-politely run removes its temporaries too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
