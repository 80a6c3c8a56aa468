"""`verify`: is the edited model exactly the original with a given circuit folded in, and nothing else changed?

For float weights it recomputes the folded tensor with `cna_export.fold.scale` and compares bytes; for a quantized
GGUF row it requires the quantized values to be untouched and every f16 block scale to be `f16(m * scale)`, which
is what scaling a row by m inside a quantized file means (cna_export/gguf/quant.py). An adapter folder is checked
by `cna_export.audit.adapter.verify_adapter`. `cna_export.audit.diff` answers the open question (what changed).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from cna_export.audit.diff import outside_equal
from cna_export.audit.factors import as_bits, float_factors, quant_factors, scale_intervals
from cna_export.audit.weights import Weights, open_pair, same_bytes
from cna_export.circuit.format import Circuit
from cna_export.fold.scale import fold_site

log = logging.getLogger(__name__)


def verify(original: str, edited: str, circuit: Circuit) -> tuple[bool, str]:
    """Is `edited` exactly `original` with `circuit` folded in (down columns or up rows), nothing else changed?

    `edited` may also be a LoRA adapter folder: then its factors must be exactly the circuit's LoRA of `original`
    (`cna_export.audit.adapter.verify_adapter`).

    Returns:
        (ok, one-line reason). Stops at the first difference.

    Example:
        >>> ok, why = verify("./model", "./edited", Circuit.load("./edited/circuit.json"))
    """
    from cna_export.audit.adapter import is_adapter_folder, verify_adapter

    if is_adapter_folder(edited):
        return verify_adapter(original, edited, circuit)
    edits = circuit.unit_edits(allow_negative=True)  # (layer, expert) -> (indices, multipliers)
    with open_pair(original, edited) as (a, b):
        s, me = a.shape, circuit.model
        mine = [me.width(i) for i in range(me.num_layers)]
        if mine != [s.width(i) for i in range(s.num_layers)]:
            return False, (
                f"the circuit is for {me.num_layers} layers of {sorted(set(mine))} neurons, the original "
                f"has {s.num_layers} of {sorted({s.width(i) for i in range(s.num_layers)})}"
            )
        in_a, in_b = set(a.names), set(b.names)
        only = [n for n in a.names if n not in in_b] + [n for n in b.names if n not in in_a]
        if only:
            return False, f"tensor {only[0]} is in only one of the two models"
        with tqdm(total=sum(a.nbytes(n) for n in a.names), unit="B", unit_scale=True, desc="verify") as bar:
            for name in a.names:
                role = a.mlp.get(name)
                units = [] if role is None else [(role[1], e) for e in a.experts_in[name]]
                if a.meta(name) != b.meta(name):
                    return False, f"{name} changed type or shape ({a.meta(name)} -> {b.meta(name)})"
                touched = any(u in edits for u in units)
                if not touched and not same_bytes(a.raw(name), b.raw(name)):
                    where = "" if role is None else f" ({_unit_label(*units[0])} has no neurons in the circuit)"
                    return False, f"{name} changed but the circuit does not touch it{where}"
                for u in units if touched and len(units) > 1 else []:  # the untouched experts of a stacked tensor
                    if u not in edits and not same_bytes(a.unit_raw(name, u[1]), b.unit_raw(name, u[1])):
                        return False, f"{name} changed in {_unit_label(*u)}, which has no neurons in the circuit"
                if not touched:
                    bar.update(a.nbytes(name))
            counted: set[str] = set()  # a stacked tensor holds several experts of the circuit: its bytes once
            for (layer, expert), (index, mult) in edits.items():
                pair = a.pair(layer, expert)
                if not pair:
                    return False, f"the original has no tensors for {_unit_label(layer, expert)} of the circuit"
                changed = {k: not same_bytes(a.unit_raw(n, expert), b.unit_raw(n, expert)) for k, n in pair.items()}
                if len(changed) > 1 and all(changed.values()):  # an ungated MLP has only its down site
                    return False, (
                        f"{_unit_label(layer, expert)}: both down_proj and up_proj changed; a fold changes one of them"
                    )
                kind = "up" if changed.get("up") else "down"
                reason = _check_layer(a, b, pair[kind], expert, _unit_label(layer, expert), index, mult)
                if reason:
                    return False, reason
                bar.update(sum(a.nbytes(n) for n in pair.values() if n not in counted))
                counted.update(pair.values())
    layers = len({layer for layer, _ in edits})
    return True, (
        f"the edited model is the original with the circuit folded in ({len(circuit.neurons)} neurons in "
        f"{layers} layers); every other tensor is byte-identical"
    )


def _unit_label(layer: int, expert: int | str | None = None) -> str:
    """How messages name a unit: 'layer 3', or 'layer 3 expert 5' / 'layer 3 expert shared'."""
    return f"layer {layer}" if expert is None else f"layer {layer} expert {expert}"


def _check_layer(
    a: Weights, b: Weights, name: str, expert, layer: str, index: torch.Tensor, mult: torch.Tensor
) -> str | None:
    """Why `expert`'s part of tensor `name` (unit `layer`, a label: 'layer 3', 'layer 3 expert 5') is not the
    original with (index, mult) folded in, or None if it is."""
    wanted = dict(zip(index.tolist(), mult.tolist()))
    qtype = a.quant(name)
    o_rows = a.quant_rows(name, expert)
    if o_rows is not None:
        e_rows = b.quant_rows(name, expert)
        for j in np.nonzero((o_rows != e_rows).any(1))[0].tolist():
            if j not in wanted:
                return f"{layer} neuron {j}: {name} changed but the neuron is not in the circuit"
        idx = sorted(wanted)
        lo, hi, untouched = scale_intervals(o_rows[idx], e_rows[idx], qtype)
        facts = None
        for i, j in enumerate(idx):
            m = wanted[j]
            if untouched[i] and lo[i] <= m <= hi[i]:
                continue
            facts = facts or quant_factors(o_rows[idx], e_rows[idx], qtype)
            if m == 0 and facts[i][0] == 0.0:  # the row was zeroed some other way; still exactly m * original
                continue
            return _wrong_factor(layer, j, name, m, facts[i], untouched=bool(untouched[i]))
        return None
    o, e = a.unit_values(name, expert), b.unit_values(name, expert)
    site, width = a.unit_site(name), a.width(name)
    if qtype is not None:  # quantized columns (ffn_down) or a type without f16 block scales: dequantized values
        on, en = site.rows(o, width), site.rows(e, width)
        for j in torch.nonzero((on != en).any(1)).flatten().tolist():
            if j not in wanted:
                return f"{layer} neuron {j}: {name} changed but the neuron is not in the circuit"
        idx = sorted(wanted)
        facts = float_factors(on[idx], en[idx], quantized=True)
        for i, j in enumerate(idx):
            m = wanted[j]
            tol = 2.0**-10 * (m * on[j].double()).abs()
            if not bool(((en[j].double() - m * on[j].double()).abs() <= tol).all()):
                return _wrong_factor(layer, j, name, m, facts[i])
        return None
    expected = fold_site(o, site, width, index, mult)
    if torch.equal(as_bits(expected), as_bits(e)):
        return None
    xn, en, on = (site.rows(t, width) for t in (expected, e, o))
    if not outside_equal(expected, e, site, width):
        return f"{name} changed outside the neurons of {layer} (e.g. the gate half of a fused tensor)"
    bad = torch.nonzero((as_bits(xn) != as_bits(en)).any(1)).flatten().tolist()
    if a.fmt == "gguf":
        # Float tensors inside a GGUF may have been scaled by another implementation: allow one unit of rounding.
        info = torch.finfo(o.dtype)

        def off(j: int) -> bool:
            ref = wanted.get(j, 1.0) * on[j].double()
            return not bool(((en[j].double() - ref).abs() <= info.eps * ref.abs() + info.tiny * info.eps).all())

        bad = [j for j in bad if off(j)]
        if not bad:
            return None
    j = bad[0]
    if j not in wanted:
        return f"{layer} neuron {j}: {name} changed but the neuron is not in the circuit"
    return _wrong_factor(layer, j, name, wanted[j], float_factors(on[j : j + 1], en[j : j + 1])[0])


def _wrong_factor(layer: str, j: int, name: str, m: float, fact: tuple, untouched: bool = True) -> str:
    factor, constant, _ = fact
    if not untouched:
        found = "its quantized values changed, not only its block scales"
    elif factor == 1.0 and constant:
        found = "it is unchanged (neuron missing)"
    elif factor is None or not constant:
        found = "it was not scaled by one constant factor"
    else:
        found = f"it was scaled by {factor:g}"
    return f"{layer} neuron {j}: the circuit scales it by {m:g} in {name}, but {found}"
