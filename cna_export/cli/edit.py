"""Commands that find and apply an edit: run, discover, apply, patch-gguf, gguf, new-recipe, inspect."""

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
from cna_export.gguf.outtypes import OUTTYPE_NAMES


def register(add) -> None:
    """Add this module's subcommands (`add(name, help, parents)` returns the subparser)."""
    model, select, apply = model_opts(), selection_opts(), apply_opts()

    p = add("run", "discover a circuit from a recipe and export the edited model", [model, select, apply])
    p.add_argument("recipe", help="recipe name (see recipes/) or YAML path")
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.add_argument("--circuit", type=Path, nargs="+", help="circuit file(s) to stack on the discovered one")
    p.add_argument("--adapter", action="store_true",
                   help="write a LoRA adapter folder instead of the edited model (--gguf f32: also a GGUF LoRA)")  # fmt: skip
    p.add_argument("--no-check", action="store_true",
                   help="skip the quick check (a few validation prompts, original vs edited) at the end")
    p.add_argument("--check-prompts", type=int, default=4, metavar="N",
                   help="validation prompts per set in the quick check (default 4)")
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

    p = add("apply", "fold a circuit into a model and export it (a .gguf: patched in place, same quantization)",
            [model, apply])  # fmt: skip
    p.add_argument("--circuit", required=True, type=Path, nargs="+",
                   help="circuit file(s) from discover; several are stacked (a neuron in several: the product)")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.set_defaults(func=_apply)

    p = add("patch-gguf", "scale a circuit's neurons inside an existing GGUF file (no re-conversion)", [])
    p.add_argument("gguf", type=Path, help="GGUF file to patch (never modified)")
    p.add_argument("--circuit", required=True, type=Path, help="circuit file from discover")
    p.add_argument("-o", "--out", required=True, type=Path, help="patched GGUF file to write")
    p.add_argument("--multiplier", type=float, help="scale for every neuron (0 ablate, >1 amplify)")
    p.add_argument("--allow-negative", action="store_true", help="permit a negative multiplier")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output written by patch-gguf")
    p.add_argument("--force", action="store_true", help="patch with a circuit discovered on different weights")
    p.set_defaults(func=_patch_gguf)

    p = add("gguf", "convert a Hugging Face model folder (e.g. an export) to GGUF for llama.cpp / Ollama", [])
    p.add_argument("model_dir", type=Path, help="model folder with config.json, safetensors and tokenizer")
    p.add_argument("-o", "--out", required=True, type=Path, help="GGUF file to write (NAME.gguf)")
    p.add_argument("--outtype", choices=OUTTYPE_NAMES, default="f16", help="weight type (default f16)")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile next to the GGUF")
    p.add_argument("--ollama-create", metavar="NAME", help="write the Modelfile and run `ollama create NAME`")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF (and Modelfile)")
    p.set_defaults(func=_gguf)

    p = add("new-recipe", "write a commented recipe template to start a custom edit from", [])
    p.add_argument("name", help="the recipe's name (lower-case letters, digits, '-', '_'), e.g. pirate-speak")
    p.add_argument("-o", "--out", type=Path, help="file to write (default NAME.yaml in the current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_new_recipe)

    p = add("inspect", "summarise a circuit: neurons per layer and top neurons", [])
    p.add_argument("circuit", type=Path, help="circuit file")
    p.add_argument("--top", type=int, default=20, help="how many neurons to list")
    p.add_argument("--plot", type=Path, help="write a PNG of neurons per layer")
    p.add_argument("--overwrite", action="store_true", help="replace existing --plot files")
    p.set_defaults(func=_inspect)


def _run(args: argparse.Namespace) -> None:
    from cna_export.backends import open_model
    from cna_export.run import run_recipe

    _check_push_args(args)
    export = export_options(args)  # a bad flag fails before the model is opened
    backend = open_model(args.model, load_options(args))  # once: discovery, export and the quick check share it
    try:
        out, circuit = run_recipe(args.recipe, backend, args.out, overrides=selection_overrides(args), export=export,
                                  stack_with=args.circuit)  # fmt: skip
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
    summary = summarize_run(backend, circuit, out, model=args.model, recipe=args.recipe, adapter=args.adapter,
                            prompts=prompts)  # fmt: skip
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
        recipe, base, overrides=selection_overrides(args), positive=args.positive, negative=args.negative,
        neutral=args.neutral, behaviour=args.behaviour, multiplier=args.multiplier,
    )  # fmt: skip
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


def _patch_gguf(args: argparse.Namespace) -> None:
    from cna_export.circuit.format import Circuit
    from cna_export.gguf.patch import patch_gguf_report

    report = patch_gguf_report(
        args.gguf, Circuit.load(args.circuit), args.out, multiplier=args.multiplier, overwrite=args.overwrite,
        force=args.force, allow_negative=args.allow_negative,
    )  # fmt: skip
    print(f"wrote {report.out}: {report.summary()}")
    print(f"wrote {report.sidecar}")


def _gguf(args: argparse.Namespace) -> None:
    from cna_export.gguf.ollama import convert_for_ollama

    gguf, modelfile = convert_for_ollama(args.model_dir, args.out, outtype=args.outtype, overwrite=args.overwrite,
                                         modelfile=args.modelfile, ollama_name=args.ollama_create)  # fmt: skip
    print(f"wrote {gguf}")
    if modelfile is not None:
        print(f"wrote {modelfile}")
    if args.ollama_create:
        print(f"created Ollama model {args.ollama_create}")


def _new_recipe(args: argparse.Namespace) -> None:
    from cna_export.circuit.template import write_recipe_template

    path = write_recipe_template(args.name, args.out, args.overwrite)
    print(f"wrote {path}: replace its example prompts with your own, then")
    print(f"  cna-export run {path} --model MODEL --out OUT")


def _inspect(args: argparse.Namespace) -> None:
    from cna_export.circuit.format import Circuit
    from cna_export.io.output import OutputPlan

    circuit = Circuit.load(args.circuit)
    outputs = OutputPlan(args.overwrite, protect=[args.circuit])
    plots = []
    if args.plot:  # a mixture of experts also gets where the neurons sit among the experts, beside the layer plot
        plots = [args.plot, *([_experts_plot(args.plot)] if circuit.is_moe else [])]
    for path in plots:
        outputs.file(path)
    print(circuit.summary(args.top))
    if plots:
        from cna_export.evaluate.plots import plot_experts, plot_layers

        with outputs:
            plot_layers(circuit, outputs.temp(plots[0]))
            if len(plots) > 1:
                plot_experts(circuit, outputs.temp(plots[1]))
        for path in plots:
            print(f"wrote {path}")


def _experts_plot(plot: Path) -> Path:
    return Path(plot).with_name(Path(plot).stem + "-experts.png")
