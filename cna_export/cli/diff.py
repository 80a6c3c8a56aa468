"""The diff command: what differs between two checkpoints, the neuron edit recovered (or checked against a
circuit with --verify)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(add) -> None:
    """Add this module's subcommand (`add(name, help, parents)` returns the subparser)."""
    p = add("diff", "list what differs between two checkpoints and recover the neuron edit", [])
    p.add_argument("original", help="original model: folder, Hub id or .gguf file")
    p.add_argument("edited", help="edited model: folder, Hub id or .gguf file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-o", "--output", type=Path, help="write the recovered circuit to this file (without --verify)")
    p.add_argument("--verify", type=Path, metavar="CIRCUIT", help="exit 0 only if EDITED is ORIGINAL + CIRCUIT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(func=_diff)


def _diff(args: argparse.Namespace) -> int:
    from cna_export.audit.diff import diff
    from cna_export.audit.verify import verify
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
