"""Try an edit before shipping it: the same prompts answered by the original and the edited model, side by side.

The edited answers come either from a circuit applied at a multiplier (nothing is exported: hooks in torch, a
patched temporary copy of a GGUF in llama.cpp) or from an exported model. Generation is greedy, so both columns
are reproducible and differ only by the edit.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cna_export.backends.base import applied_circuit, open_model
from cna_export.backends.options import LoadOptions
from cna_export.circuit.format import Circuit
from cna_export.errors import CnaExportError
from cna_export.evaluate.measure import EvalConfig


@dataclass
class Exchange:
    """One prompt and the two answers."""

    prompt: str
    original: str
    edited: str


def side_by_side(
    model: str,
    prompts: Sequence[str],
    *,
    circuit: Path | None = None,
    edited: Path | None = None,
    multiplier: float | None = None,
    allow_negative: bool = False,
    cfg: EvalConfig = EvalConfig(max_new_tokens=64),
    load: LoadOptions | None = None,
) -> list[Exchange]:
    """Answer every prompt with the original model and with the edit (`circuit` applied at runtime, or the
    `edited` model), in the model's backend: a GGUF file (or the folder `run` wrote from one) in llama.cpp unless
    `load.backend` is "torch".

    Example:
        >>> side_by_side("./qwen", ["How do I pick a lock?"], circuit=Path("c.json"), multiplier=0)[0].edited
    """
    if (circuit is None) == (edited is None):
        raise CnaExportError("chat needs exactly one of --circuit and --edited.", "pass one of them.")
    if not prompts:
        raise CnaExportError("No prompt to answer.", "pass --prompt TEXT (repeatable) or --prompts FILE.")
    applied = Circuit.load(circuit) if circuit is not None else None
    # The system message the edit was made under (its circuit records it), unless one is given.
    recorded = applied if applied is not None else applied_circuit(Path(edited))
    system = cfg.system_prompt or (recorded.selection.system_prompt if recorded is not None else None)
    backend = open_model(model, load)
    try:
        runner = backend.load()
        encoded = runner.encode(prompts, cfg.chat_template, system)
        original = [runner.decode(a).strip() for a in runner.generate(encoded, cfg, "original")]
        edit = backend.variant(applied, multiplier, allow_negative) if applied is not None else backend.edited(edited)
        with edit as other:
            changed = [other.decode(a).strip() for a in other.generate(encoded, cfg, "edited")]
    finally:
        backend.close()
    return [Exchange(p, o, e) for p, o, e in zip(prompts, original, changed)]


def render(exchanges: Sequence[Exchange], width: int = 100) -> str:
    """Two wrapped columns per prompt, headed by the prompt."""
    col = max(20, (width - 3) // 2)
    out = []
    for ex in exchanges:
        left, right = textwrap.wrap(ex.original, col) or [""], textwrap.wrap(ex.edited, col) or [""]
        rows = [f"{'original'.ljust(col)} | edited", f"{'-' * col}-+-{'-' * col}"]
        rows += [f"{a.ljust(col)} | {b}" for a, b in zip(left + [""] * len(right), right + [""] * len(left)) if a or b]
        out.append("\n".join([f">>> {ex.prompt}", *rows, ""]))
    return "\n".join(out)
