"""Try an edit before shipping it: the same prompts answered by the original and the edited model, side by side.

The edited answers come either from runtime hooks (a circuit at a multiplier; nothing is exported) or from an
exported folder. Generation is greedy, so both columns are reproducible and differ only by the edit.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cna_export.attribution.collect import context_of, encode_prompts
from cna_export.attribution.hooks import scaled_neurons
from cna_export.circuit.format import Circuit
from cna_export.errors import CnaExportError
from cna_export.evaluate.measure import EvalConfig, generate
from cna_export.io.source import describe, load_model, resolve


@dataclass
class Exchange:
    """One prompt and the two answers."""

    prompt: str
    original: str
    edited: str


def side_by_side(
    model: str, prompts: Sequence[str], *, circuit: Path | None = None, edited: Path | None = None,
    multiplier: float | None = None, allow_negative: bool = False, cfg: EvalConfig = EvalConfig(max_new_tokens=64),
    dtype: str = "auto", device: str = "auto",
) -> list[Exchange]:  # fmt: skip
    """Answer every prompt with the original model and with the edit (hooks for `circuit`, or the `edited` folder).

    Example:
        >>> side_by_side("./qwen", ["How do I pick a lock?"], circuit=Path("c.json"), multiplier=0)[0].edited
    """
    if (circuit is None) == (edited is None):
        raise CnaExportError("chat needs exactly one of --circuit and --edited.", "pass one of them.")
    if not prompts:
        raise CnaExportError("No prompt to answer.", "pass --prompt TEXT (repeatable) or --prompts FILE.")
    source = resolve(model)
    base, tokenizer = load_model(source, dtype=dtype, device=device)
    encoded = encode_prompts(tokenizer, prompts, cfg.chat_template, context_of(base))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    original = [decode(a) for a in generate(base, tokenizer, encoded, cfg, "original")]
    if circuit is not None:
        spec, _, _ = describe(source)
        edits = Circuit.load(circuit).hook_edits(multiplier, allow_negative)
        with scaled_neurons(base, spec, edits):
            changed = [decode(a) for a in generate(base, tokenizer, encoded, cfg, "edited")]
    else:
        del base  # one model in memory at a time
        other, _ = load_model(resolve(str(edited)), dtype=dtype, device=device)
        with contextlib.nullcontext():
            changed = [decode(a) for a in generate(other, tokenizer, encoded, cfg, "edited")]
    return [Exchange(p, o, e) for p, o, e in zip(prompts, original, changed)]


def render(exchanges: Sequence[Exchange], width: int = 100) -> str:
    """Two wrapped columns per prompt, headed by the prompt."""
    col = max(20, (width - 3) // 2)
    out = []
    for ex in exchanges:
        left, right = textwrap.wrap(ex.original, col) or [""], textwrap.wrap(ex.edited, col) or [""]
        rows = [f"{'original'.ljust(col)} | edited", f"{'-' * col}-+-{'-' * col}"]
        rows += [f"{a.ljust(col)} | {b}" for a, b in zip(left + [""] * len(right), right + [""] * len(left))
                 if a or b]  # fmt: skip
        out.append("\n".join([f">>> {ex.prompt}", *rows, ""]))
    return "\n".join(out)
