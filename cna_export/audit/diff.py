"""Audit an edited checkpoint: which tensors differ from the original, which neurons changed and by what factor.

`diff` compares two checkpoints tensor by tensor (safetensors folders, Hub ids, or GGUF files, quantized ones
included). Untouched tensors are compared as raw bytes without being decoded; a changed MLP tensor is decoded
(dequantized for GGUF) one at a time, so memory stays about one tensor. For each changed neuron (a column of
`down_proj` / `ffn_down`, a row of `up_proj` / `ffn_up`) it estimates the factor edited/original and checks
that it is one constant factor up to the rounding of the storage type. From that it rebuilds the circuit.

`verify` answers a yes/no question: is the edited model exactly the original with a given circuit folded in,
and nothing else changed? For float weights it recomputes the folded tensor with `cna_export.fold.scale` and compares
bytes; for a quantized GGUF row it requires the quantized values to be untouched and every f16 block scale to be
`f16(m * scale)`, which is what scaling a row by m inside a quantized file means (cna_export/gguf/quant.py).

Reading both checkpoints is `cna_export.audit.weights`; recovering a factor from a pair of rows is `cna_export.audit.factors`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cna_export.arch import Site
from cna_export.arch.spec import ModelShape
from cna_export.audit.factors import as_bits, float_factors, quant_factors
from cna_export.audit.weights import CHUNK, Weights, open_pair, same_bytes
from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, RecordedSelection, shape_fields
from cna_export.errors import CircuitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeuronChange:
    """One changed neuron: `factor` is edited/original (None when no factor explains it)."""

    layer: int
    index: int
    tensor: str  # "down" or "up"
    factor: float | None
    constant: bool  # one factor explains the whole column/row up to the rounding of the storage type
    exact: bool  # the fold of that factor reproduces the edited values exactly (quantized: up to f16 scale rounding)
    expert: int | str | None = None  # MoE: the routed expert (or "shared"); None for a dense MLP


# Diff ------------------------------------------------------------------------------------------------------------


@dataclass
class TensorChange:
    """A tensor that differs. kind: down, up (MLP projections), other, dtype, only_original, only_edited."""

    name: str
    kind: str
    layer: int | None = None
    neurons: list[NeuronChange] = field(default_factory=list)
    detail: str = ""


@dataclass
class DiffReport:
    """What differs between two checkpoints, and the circuit that explains it."""

    original: str
    edited: str
    fmt: str
    model_type: str
    shape: ModelShape
    compared: int = 0
    identical: int = 0
    changes: list[TensorChange] = field(default_factory=list)

    def neurons(self) -> list[NeuronChange]:
        return [n for c in self.changes for n in c.neurons]

    @property
    def is_circuit_edit(self) -> bool:
        """True when every difference is a neuron scaled by one constant factor."""
        return all(c.kind in ("down", "up") for c in self.changes) and all(n.constant for n in self.neurons())

    def multipliers(self) -> dict[tuple, float]:
        """(layer, index), or (layer, expert, index) inside an expert, -> factor of the neuron; a neuron scaled in
        both down and up gets the product."""
        out: dict[tuple, float] = {}
        for n in self.neurons():
            if n.constant and n.factor is not None:
                key = (n.layer, n.index) if n.expert is None else (n.layer, n.expert, n.index)
                out[key] = out.get(key, 1.0) * n.factor
        return out

    def circuit(self, behaviour: str = "custom") -> Circuit:
        """The recovered circuit: the most common factor is its multiplier, other factors are per-neuron."""
        mults = self.multipliers()
        if not mults:
            raise CircuitError(
                "No neuron was scaled by a constant factor, so there is no circuit to write.",
                "check that EDITED is an edit of ORIGINAL.",
            )
        default = Counter(mults.values()).most_common(1)[0][0]
        s = self.shape
        return Circuit(
            behaviour=behaviour,
            multiplier=default,
            model=ModelIdentity(
                source=self.original,
                model_type=self.model_type,
                num_layers=s.num_layers,
                intermediate_size=s.intermediate_size,
                hidden_size=s.hidden_size,
                **shape_fields(s),
            ),
            prompts={},
            selection=RecordedSelection(top_k=len(mults)),
            neurons=[
                Neuron(
                    layer=k[0],
                    expert=k[1] if len(k) == 3 else None,
                    index=k[-1],
                    delta=0.0,
                    multiplier=None if m == default else m,
                )
                for k, m in sorted(mults.items(), key=lambda km: unit_order(km[0]))
            ],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "edited": self.edited,
            "format": self.fmt,
            "model_type": self.model_type,
            "shape": asdict(self.shape),
            "tensors": {"compared": self.compared, "identical": self.identical, "changed": len(self.changes)},
            "circuit_edit": self.is_circuit_edit,
            "neurons": len(self.multipliers()),
            "changes": [asdict(c) for c in self.changes],
        }

    def table(self) -> str:
        """A readable summary: one line per changed tensor, then the recovered circuit."""
        lines = [
            f"original: {self.original}",
            f"edited:   {self.edited}",
            f"tensors:  {self.compared} compared, {self.identical} identical, {len(self.changes)} changed",
        ]
        if not self.changes:
            return "\n".join([*lines, "no differences"])
        width = max(len(c.name) for c in self.changes)
        kw = max(len(c.kind) for c in self.changes)
        lines += ["", f"{'tensor':<{width}}  {'kind':<{kw}}  layer  neurons  factors"]
        for c in self.changes:
            counts = Counter(_fmt_factor(n) for n in c.neurons)
            factors = ", ".join(f"{f} x{k}" for f, k in counts.most_common(6)) + (" ..." if len(counts) > 6 else "")
            layer = "" if c.layer is None else c.layer
            lines.append(f"{c.name:<{width}}  {c.kind:<{kw}}  {layer:>5}  {len(c.neurons):>7}  {factors or c.detail}")
        mults = self.multipliers()
        layers = {key[0] for key in mults}
        verdict = "a circuit edit" if self.is_circuit_edit else "NOT only a circuit edit"
        lines += ["", f"recovered: {len(mults)} neurons in {len(layers)} layers; the difference is {verdict}"]
        return "\n".join(lines)


def _fmt_factor(n: NeuronChange) -> str:
    if n.factor is None:
        return "?"
    text = f"{n.factor:g}"
    return text if n.constant else f"~{text} (not constant)"


def _tensor_change(a: Weights, b: Weights, name: str, role: tuple[str, int] | None) -> TensorChange | None:
    meta_a, meta_b = a.meta(name), b.meta(name)
    if meta_a != meta_b:
        return TensorChange(name, "dtype", detail=f"{meta_a[0]}{list(meta_a[1])} -> {meta_b[0]}{list(meta_b[1])}")
    if same_bytes(a.raw(name), b.raw(name)):
        return None
    if role is None:
        o, e = a.values(name).reshape(-1), b.values(name).reshape(-1)
        step = CHUNK // 8
        worst = max(
            (float((o[i : i + step].double() - e[i : i + step].double()).abs().max()) for i in range(0, len(o), step)),
            default=0.0,
        )
        return TensorChange(name, "other", detail=f"max |diff| {worst:.3g}")
    kind, layer = role
    site, units, neurons = a.unit_site(name), a.experts_in[name], []
    for expert in units:  # one unit, or each expert of a tensor that stacks them (only those whose bytes differ)
        if len(units) > 1 and same_bytes(a.unit_raw(name, expert), b.unit_raw(name, expert)):
            continue
        if site.parts > 1 and not outside_equal(
            a.unit_values(name, expert), b.unit_values(name, expert), site, a.width(name)
        ):
            return TensorChange(
                name, "other", layer, detail="changed outside its neurons (another part of a fused tensor)"
            )
        neurons += _neuron_changes(a, b, name, kind, layer, expert)
    detail = "" if neurons else "bytes differ, values do not"
    return TensorChange(name, kind, layer, neurons, detail)


def _neuron_changes(a: Weights, b: Weights, name: str, kind: str, layer: int, expert) -> list[NeuronChange]:
    qtype = a.quant(name)
    o_rows = a.quant_rows(name, expert)
    if o_rows is not None:
        e_rows = b.quant_rows(name, expert)
        idx = np.nonzero((o_rows != e_rows).any(1))[0].tolist()
        facts = quant_factors(o_rows[idx], e_rows[idx], qtype) if idx else []
    else:
        o, e = a.neuron_values(name, expert), b.neuron_values(name, expert)
        if qtype is None:
            changed = (as_bits(o) != as_bits(e)).any(1)
        else:
            changed = (o != e).any(1)
        idx = torch.nonzero(changed).flatten().tolist()
        facts = float_factors(o[idx], e[idx], quantized=qtype is not None) if idx else []
    return [NeuronChange(layer, j, kind, f, c, x, expert) for j, (f, c, x) in zip(idx, facts)]


def diff(original: str, edited: str) -> DiffReport:
    """Compare two checkpoints tensor by tensor and recover the neuron edit between them.

    Args:
        original: the unedited model (folder, Hub id or .gguf).
        edited: the model to audit (same formats).

    Returns:
        A `DiffReport` (`.table()`, `.to_dict()`, `.circuit()`).

    Example:
        >>> report = diff("Qwen/Qwen2.5-0.5B-Instruct", "qwen-no-refusal")
        >>> report.circuit().save(Path("recovered.json"))
    """
    with open_pair(original, edited) as (a, b):
        report = DiffReport(original, edited, a.fmt, a.model_type, a.shape)
        in_b = set(b.names)
        with tqdm(total=sum(a.nbytes(n) for n in a.names), unit="B", unit_scale=True, desc="diff") as bar:
            for name in a.names:
                if name not in in_b:
                    report.changes.append(TensorChange(name, "only_original"))
                else:
                    report.compared += 1
                    change = _tensor_change(a, b, name, a.mlp.get(name))
                    if change is None:
                        report.identical += 1
                    else:
                        report.changes.append(change)
                bar.update(a.nbytes(name))
        in_a = set(a.names)
        report.changes += [TensorChange(n, "only_edited") for n in b.names if n not in in_a]
    return report


def unit_order(key: tuple) -> tuple:
    """Sort key of (layer, index) and (layer, expert, index): dense first in a layer, then experts, then shared."""
    expert = key[1] if len(key) == 3 else None
    return key[0], -1 if expert is None else (expert if isinstance(expert, int) else 2**40), key[-1]


def outside_equal(x: torch.Tensor, y: torch.Tensor, site: Site, width: int) -> bool:
    """Whether two tensors agree bit for bit outside the neuron slice of `site` (a fused tensor's other parts)."""
    if site.parts == 1:
        return True
    ax = site.axis
    before, after = site.offset(width), site.offset(width) + width
    pieces = [(0, before), (after, x.shape[ax])]
    return all(
        torch.equal(as_bits(x.narrow(ax, s, e - s)), as_bits(y.narrow(ax, s, e - s))) for s, e in pieces if e > s
    )
