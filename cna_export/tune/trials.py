"""Measuring one edit for the tuner, on either backend, with the protect set scored beside the positive prompts.

The measurement is the sweep's (`evaluate.measure.measure` with runtime hooks on a model folder,
`evaluate.native.gguf_measure` on a patched copy of a GGUF): the original's answers are generated once
(`Evaluator.baseline`), each edit then generates and scores its own. The protect prompts ride along with the
positive ones (the baseline's positive list is positive + protect) and are split off afterwards, so one call
measures all three sets; their records are labelled `set: protect` and the metrics gain `protect_rate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cna_export.circuit.format import Circuit
from cna_export.evaluate.measure import Baseline, EvalConfig
from cna_export.evaluate.protect import split_protect


@dataclass(frozen=True)
class PromptSets:
    """One split's prompts: with the behaviour, without it, and those whose behaviour must not change."""

    positive: list[str]
    negative: list[str]
    protect: list[str] = field(default_factory=list)


class Backend(Protocol):
    """What the tuner needs of a model: the original's baseline and the measurement of one edit."""

    def baseline(self, positive: Sequence[str], negative: Sequence[str], detector, cfg: EvalConfig) -> Baseline: ...

    def measure(self, baseline: Baseline, detector, cfg: EvalConfig, circuit: Circuit, multiplier: float,
                label: str) -> tuple[dict, list[dict]]: ...  # fmt: skip


class TorchBackend:
    """A model folder in transformers; an edit is the circuit's runtime hooks (nothing is written)."""

    def __init__(self, model, tokenizer, spec, allow_negative: bool) -> None:
        self.model, self.tokenizer, self.spec, self.allow_negative = model, tokenizer, spec, allow_negative

    def baseline(self, positive: Sequence[str], negative: Sequence[str], detector, cfg: EvalConfig) -> Baseline:
        from cna_export.evaluate.measure import build_baseline

        return build_baseline(self.model, self.tokenizer, positive, negative, detector, cfg)

    def measure(self, baseline: Baseline, detector, cfg: EvalConfig, circuit: Circuit, multiplier: float,
                label: str) -> tuple[dict, list[dict]]:  # fmt: skip
        from cna_export.evaluate.measure import measure

        edits = circuit.hook_edits(multiplier, self.allow_negative)
        return measure(self.model, self.tokenizer, baseline, detector, cfg, spec=self.spec, edits=edits, label=label,
                       k=len(circuit.neurons), multiplier=multiplier)  # fmt: skip


class GgufBackend:
    """A GGUF file in llama.cpp; an edit is a patched temporary copy of the file (removed after measuring)."""

    def __init__(self, path: Path, allow_negative: bool, n_threads: int | None = None) -> None:
        self.path, self.allow_negative, self.n_threads = Path(path), allow_negative, n_threads

    def baseline(self, positive: Sequence[str], negative: Sequence[str], detector, cfg: EvalConfig) -> Baseline:
        from cna_export.evaluate.native import original_baseline

        return original_baseline(self.path, positive, negative, detector, cfg, n_threads=self.n_threads)

    def measure(self, baseline: Baseline, detector, cfg: EvalConfig, circuit: Circuit, multiplier: float,
                label: str) -> tuple[dict, list[dict]]:  # fmt: skip
        from cna_export.evaluate.native import gguf_measure, patched

        with patched(self.path, circuit, multiplier, self.allow_negative) as variant:
            return gguf_measure(variant, baseline, detector, cfg, label=label, k=len(circuit.neurons),
                                multiplier=multiplier, n_threads=self.n_threads)  # fmt: skip


class Evaluator:
    """One split on one backend: the original measured once, then any edit against it."""

    def __init__(self, backend: Backend, sets: PromptSets, detector, cfg: EvalConfig) -> None:
        self.backend, self.sets, self.detector, self.cfg = backend, sets, detector, cfg
        self.base = backend.baseline(sets.positive + sets.protect, sets.negative, detector, cfg)
        self.metrics, self.records = split_protect(self.base.metrics, self.base.records, len(sets.positive),
                                                   len(sets.protect))  # fmt: skip

    def measure(self, circuit: Circuit, multiplier: float, label: str) -> tuple[dict, list[dict]]:
        metrics, records = self.backend.measure(self.base, self.detector, self.cfg, circuit, multiplier, label)
        return split_protect(metrics, records, len(self.sets.positive), len(self.sets.protect))
