"""Measuring one edit for the tuner, on either backend, with the protect set scored beside the positive prompts.

The measurement is `eval`'s and the sweep's (`evaluate.measure`): the original's answers are generated once
(`Evaluator`), then each edit is the backend's variant of the circuit (runtime hooks on a model folder, a patched
temporary copy of a GGUF in llama.cpp) and generates and scores its own. The protect prompts ride along with the
positive ones (the baseline's positive list is positive + protect) and are split off afterwards
(`evaluate.protect`), so one call measures all three sets; their records are labelled `set: protect` and the
metrics gain `protect_rate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cna_export.circuit.format import Circuit
from cna_export.evaluate.measure import EvalConfig, build_baseline, measure
from cna_export.evaluate.protect import split_protect

if TYPE_CHECKING:
    from cna_export.backends.base import Backend


@dataclass(frozen=True)
class PromptSets:
    """One split's prompts: with the behaviour, without it, and those whose behaviour must not change."""

    positive: list[str]
    negative: list[str]
    protect: list[str] = field(default_factory=list)


class Evaluator:
    """One split on one backend: the original measured once, then any edit against it.

    Example:
        >>> val = Evaluator(open_model("qwen.gguf"), PromptSets(harmful, benign, overrefusal), detect_refusal, cfg)
        >>> metrics, records = val.measure(circuit, 2.0, "trial 0")   # metrics["protect_rate"]
    """

    def __init__(
        self, backend: Backend, sets: PromptSets, detector, cfg: EvalConfig, allow_negative: bool = False
    ) -> None:
        self.backend, self.sets, self.detector, self.cfg = backend, sets, detector, cfg
        self.allow_negative = allow_negative
        self.base = build_baseline(backend.load(), sets.positive + sets.protect, sets.negative, detector, cfg)
        self.metrics, self.records = split_protect(
            self.base.metrics, self.base.records, len(sets.positive), len(sets.protect)
        )

    def measure(self, circuit: Circuit, multiplier: float, label: str) -> tuple[dict, list[dict]]:
        with self.backend.variant(circuit, multiplier, self.allow_negative) as runner:
            metrics, records = measure(
                runner, self.base, self.detector, self.cfg, label=label, k=len(circuit.neurons), multiplier=multiplier
            )
        return split_protect(metrics, records, len(self.sets.positive), len(self.sets.protect))
