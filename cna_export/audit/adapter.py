"""Audit an adapter folder: is it exactly a circuit as a LoRA of its base model?

An adapter's factors are a pure function of the circuit and the base model's own rows (`ship.adapter.lora_factors`),
so the check recomputes them from the base (a safetensors model, or a GGUF file whose rows are dequantized) and
compares, bit for bit (neurons inside experts too: their layer's stacked factors, `ship.adapter_experts`), the PEFT file (every key, dtype and value, nothing more) and the GGUF LoRA next to it, if
any. `cna-export diff BASE ADAPTER_FOLDER --verify ADAPTER_FOLDER/circuit.json` runs it (what the adapter's card
prints).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cna_export.circuit.format import Circuit
from cna_export.ship.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_pairs, peft_tensors


def is_adapter_folder(ref: str | Path) -> bool:
    """Whether `ref` names a LoRA adapter folder (PEFT's adapter_config.json) rather than a model."""
    return Path(ref).is_dir() and (Path(ref) / ADAPTER_CONFIG).is_file()


def verify_adapter(original: str, folder: Path, circuit: Circuit) -> tuple[bool, str]:
    """Is the adapter in `folder` exactly `circuit` as a LoRA of `original`, and nothing else?

    Returns:
        (ok, one-line reason): the first factor that differs, or what was checked.

    Example:
        >>> ok, why = verify_adapter("./qwen", Path("no-refusal-lora"), Circuit.load("no-refusal-lora/circuit.json"))
    """
    from safetensors.torch import load_file

    from cna_export.audit.weights import open_weights
    from cna_export.ship.card import read_provenance
    from cna_export.ship.provenance import CARD_NAME

    folder = Path(folder)
    target = read_provenance(folder / CARD_NAME)["edit"]["target"]
    weights = open_weights(original)
    pairs = adapter_pairs(weights, weights.spec, weights.shape, circuit.unit_edits(allow_negative=True), target)
    expected, found = peft_tensors(pairs), load_file(folder / ADAPTER_WEIGHTS)
    if set(found) != set(expected):
        name = sorted(set(found) ^ set(expected))[0]
        where = "the adapter" if name in found else "the circuit's LoRA"
        return False, f"{name} is only in {where}: the adapter does not adapt exactly the circuit's layers"
    for name, want in expected.items():
        got = found[name]
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            return False, f"{name} differs from the factor the circuit and the original's weights give"
    checked = f"{ADAPTER_WEIGHTS}"
    for path in sorted(folder.glob("*.gguf")):
        reason = _gguf_lora_reason(path, pairs)
        if reason:
            return False, reason
        checked += f" and {path.name}"
    layers = len(circuit.layer_counts())
    return True, (f"the adapter is the circuit's LoRA of the original ({len(circuit.neurons)} neurons in {layers} "
                  f"layers): {checked} hold exactly the factors recomputed from the original's weights")  # fmt: skip


def _gguf_lora_reason(path: Path, pairs: list) -> str | None:
    """Why a GGUF LoRA is not exactly `pairs` (float32, `blk.N.ffn_down.weight.lora_a/_b`; a layer's routed
    experts: `blk.N.ffn_down_exps.weight.lora_a/_b`, experts outermost), or None."""
    from gguf import GGUFReader

    want = {}
    for p in pairs:
        want[f"{p.gguf_tensor}.lora_a"] = p.gguf_a.numpy()
        want[f"{p.gguf_tensor}.lora_b"] = p.gguf_b.numpy()
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    if set(tensors) != set(want):
        name = sorted(set(tensors) ^ set(want))[0]
        return f"{path.name}: tensor {name} is in only one of the GGUF LoRA and the circuit's LoRA"
    for name, ref in want.items():
        data = np.asarray(tensors[name].data)
        if data.dtype != np.float32 or data.size != ref.size or not np.array_equal(data.reshape(ref.shape), ref):
            return f"{path.name}: {name} differs from the factor the circuit and the original's weights give"
    return None
