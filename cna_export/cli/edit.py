"""Commands that make an edit: run (discover, then export), discover (a circuit file), apply (a circuit folded
into a model and exported)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cna_export.attribution import distributed
from cna_export.cli.options import (
    apply_opts,
    export_options,
    load_options,
    model_opts,
    selection_opts,
    selection_overrides,
)
from cna_export.errors import CnaExportError


def register(add) -> None:
    """Add this module's subcommands (`add(name, help, parents)` returns the subparser)."""
    model, select, apply = model_opts(), selection_opts(), apply_opts()

    p = add("run", "discover a circuit from a recipe and export the edited model", [model, select, apply])
    p.add_argument("recipe", help="recipe name (see recipes/) or YAML path")
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.add_argument("--circuit", type=Path, nargs="+", help="circuit file(s) to stack on the discovered one")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="write a LoRA adapter folder instead of the edited model (--gguf f32: also a GGUF LoRA)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the quick check (a few validation prompts, original vs edited) at the end",
    )
    p.add_argument(
        "--check-prompts",
        type=int,
        default=4,
        metavar="N",
        help="validation prompts per set in the quick check (default 4)",
    )
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

    p = add(
        "apply",
        "fold a circuit into a model and export it (a .gguf: patched in place, same quantization)",
        [model, apply],
    )
    p.add_argument(
        "--circuit",
        required=True,
        type=Path,
        nargs="+",
        help="circuit file(s) from discover; several are stacked (a neuron in several: the product)",
    )
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.set_defaults(func=_apply)


def _run(args: argparse.Namespace) -> None:
    from cna_export.backends import open_model
    from cna_export.run import run_recipe

    _check_push_args(args)
    export = export_options(args)  # a bad flag fails before the model is opened
    backend = open_model(args.model, load_options(args))  # once: discovery, export and the quick check share it
    try:
        out, circuit = run_recipe(
            args.recipe, backend, args.out, overrides=selection_overrides(args), export=export, stack_with=args.circuit
        )
        if out is not None:
            _report_run(args, out, circuit, backend)
    finally:
        backend.close()


def _report_run(args: argparse.Namespace, out: Path, circuit, backend) -> None:
    """What `run` prints once the export is written: the files, then what was done and what to do next (where the
    neurons are, a quick check, the files, the next commands)."""
    from cna_export.evaluate.summary import render, summarize_run

    print(f"wrote {out}: {len(circuit.neurons)} neurons scaled" + (" (LoRA adapter)" if args.adapter else ""))
    if args.adapter and args.gguf is not None:
        from cna_export.ship.adapter import gguf_name

        args.gguf = None  # the GGUF LoRA is named by the adapter, not OUT-OUTTYPE.gguf
        print(f"wrote {out / gguf_name(out)}")
    _after_export(args, out)

    prompts = 0 if args.no_check else args.check_prompts
    summary = summarize_run(
        backend, circuit, out, model=args.model, recipe=args.recipe, adapter=args.adapter, prompts=prompts
    )
    print()
    print(render(summary))


def _discover(args: argparse.Namespace) -> None:
    from cna_export.attribution.discover import discover_source, plan_discovery
    from cna_export.backends import open_model
    from cna_export.circuit.recipe import load_recipe
    from cna_export.io.output import OutputPlan

    model = Path(args.model).expanduser()
    outputs = OutputPlan(args.overwrite, protect=[model if model.exists() else None])
    outputs.file(args.out)
    recipe, base = load_recipe(args.recipe) if args.recipe else (None, None)
    plan = plan_discovery(
        recipe,
        base,
        overrides=selection_overrides(args),
        positive=args.positive,
        negative=args.negative,
        neutral=args.neutral,
        behaviour=args.behaviour,
        multiplier=args.multiplier,
    )
    backend = open_model(args.model, load_options(args))
    try:
        circuit = discover_source(backend, plan)
    finally:
        backend.close()
    if not distributed.is_main():
        return
    with outputs:
        circuit.save(outputs.temp(args.out))
    print(f"wrote {args.out}: {len(circuit.neurons)} neurons in {len(circuit.layer_counts())} layers")


def _apply(args: argparse.Namespace) -> None:
    from cna_export.backends import open_model
    from cna_export.circuit.stack import load_stack

    _check_push_args(args)
    backend = open_model(args.model, load_options(args))  # a bad model fails first, as it always has
    circuit = load_stack(args.circuit, args.multiplier, args.allow_negative)
    out = backend.write(circuit, args.out, export_options(args))
    print(f"wrote {out}")
    _after_export(args, out)


def _check_push_args(args: argparse.Namespace) -> None:
    """Fail on a bad --push-to-hub before any long work."""
    if args.push_to_hub is not None:
        from cna_export.ship.card import check_repo_id

        check_repo_id(args.push_to_hub)
    elif args.private:
        raise CnaExportError("--private needs --push-to-hub.", "add --push-to-hub owner/name, or drop --private.")


def _after_export(args: argparse.Namespace, out: Path) -> None:
    """After apply/run: name the GGUF written into the folder (--gguf), then --push-to-hub."""
    if args.gguf is not None:
        print(f"wrote {out / f'{out.name}-{args.gguf}.gguf'}")
    if args.push_to_hub is not None:
        from cna_export.ship.hub import push

        print(f"pushed {out} to {push(out, args.push_to_hub, private=args.private)}")
