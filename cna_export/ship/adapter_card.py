"""The card (README.md) of an adapter folder: a PEFT LoRA of a circuit, with how to load, serve and dial it.

Front-matter the Hub understands (`library_name: peft`, `base_model`, `base_model_relation: adapter`), the edit
(behaviour, neurons, multipliers, stacked sources), the command lines for PEFT, vLLM and llama.cpp, and the same
provenance block as an export's card (`cna_export.ship.provenance`), with every file hashed, so `push` checks an
adapter folder as it checks an export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cna_export.circuit.format import Circuit
from cna_export.io.source import Source
from cna_export.ship.provenance import CARD_NAME, provenance, provenance_block, source_metadata


def write_adapter_card(
    folder: Path, source: Source, circuit: Circuit, pairs: list, *, target: str = "down",
    source_weights_sha256: str | None = None, base_model: str | None = None, name: str | None = None,
) -> Path:  # fmt: skip
    """Write `folder/README.md` for an adapter folder holding the factors `pairs` (`LoraPair`s) of `circuit`;
    `name` is the folder's final name (`folder` may be its staging sibling)."""
    name = name or Path(folder).name
    from huggingface_hub import ModelCard, ModelCardData

    record = provenance(folder, source, circuit, target=target, source_weights_sha256=source_weights_sha256)
    inherited = source_metadata(source)
    base = base_model or inherited.pop("base_model", None)
    inherited.pop("base_model", None)
    record["source"]["base_model"] = base
    gguf = next((name for name in record["files"] if name.endswith(".gguf")), None)
    record["adapter"] = {
        "format": "peft-lora",
        "target": target,
        "rank": max(p.rank for p in pairs),
        "ranks": {p.module: p.rank for p in pairs},
        # A layer's routed experts: PEFT `target_parameters` on their stacked parameter, rank per expert.
        "expert_parameters": [p.module for p in pairs if getattr(p, "parameter", False)],
        "gguf": gguf,
    }
    tags = ["cna-export", "neuron-editing", "lora"] + (["gguf"] if gguf else [])
    data = ModelCardData(
        base_model=base, library_name="peft", pipeline_tag="text-generation", tags=tags, **inherited,
        **({"base_model_relation": "adapter"} if base else {}),
    )  # fmt: skip
    path = Path(folder) / CARD_NAME
    ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(record, circuit, base, name)}").save(path)
    return path


def sources_lines(circuit: Circuit) -> list[str]:
    """Markdown lines naming each circuit of a stack (empty for a single circuit)."""
    if not circuit.sources:
        return []
    lines = ["- Stacked from (a neuron in several circuits gets the product of their multipliers):"]
    for s in circuit.sources:
        recipe = f", recipe `{s.recipe}`" if s.recipe else ""
        lines.append(f"  - `{s.file}`: {s.behaviour}{recipe}, {s.neurons} neurons, m = {s.multiplier:g}, "
                     f"sha256 `{s.sha256[:12]}`")  # fmt: skip
    return lines


def _body(record: dict[str, Any], circuit: Circuit, base: str | None, name: str) -> str:
    edit, adapter = record["edit"], record["adapter"]
    total = circuit.num_neurons
    base_ref = base or "BASE_MODEL"
    overrides = sorted({n.multiplier for n in circuit.neurons if n.multiplier is not None})
    module = "down_proj (B = the scaled columns, A = one-hot rows)" if edit["target"] == "down" else (
        "up_proj (A = the scaled rows, B = one-hot columns)")  # fmt: skip
    lines = [
        "",
        f"# {base or record['source']['model']}: {circuit.behaviour} as a LoRA adapter (cna-export)",
        "",
        f"A LoRA adapter that scales the MLP neurons carrying **{circuit.behaviour}** (found by contrastive neuron "
        "attribution). Merged, it equals the model with the circuit folded into its weights; unmerged, it is an "
        "edit a server can switch per request and a dial in llama.cpp (scale s gives each neuron 1 + s (m - 1)).",
        "",
        "## What it changes",
        "",
        f"- Neurons: {edit['neurons']} of {total} ({100 * edit['neurons'] / total:.3f}%) in "
        f"{len(edit['neurons_per_layer'])} layers; rank per module = neurons in that layer (max {adapter['rank']})",
        f"- Multiplier: m = {edit['multiplier']:g}"
        + (f"; per-neuron: {', '.join(f'{m:g}' for m in overrides)}" if overrides else ""),
        f"- Module: {module}; exact in float32, lora_alpha = rank (scaling 1)",
        *_experts_lines(adapter, edit["target"]),
        *_gguf_source_lines(record["source"]),
        *sources_lines(circuit),
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_ref}"), "{name}")',
        "merged = model.merge_and_unload()  # the folded model",
        "```",
        "",
        "```bash",
    ]
    if not adapter["expert_parameters"]:  # vLLM's loading of PEFT's `target_parameters` is not checked here
        lines.append(f"vllm serve {base_ref} --enable-lora --max-lora-rank {_vllm_rank(adapter['rank'])} "
                     f"--lora-modules {name}={name}")  # fmt: skip
    if adapter["gguf"]:
        lines += [
            f"llama-server -m BASE.gguf --lora-scaled {name}/{adapter['gguf']} 1.0   # 0.5: half the edit",
            f"# Ollama Modelfile: FROM BASE.gguf / ADAPTER ./{adapter['gguf']}",
        ]
    lines += [
        "```",
        "",
        "## Audit",
        "",
        "`circuit.json` lists every neuron and multiplier. To check that the factors are exactly that circuit's "
        "LoRA of the source (the PEFT file and the GGUF LoRA alike, bit for bit; run it where the source and this "
        "folder both are; a local source is named by its folder or file name):",
        "",
        "```bash",
        f"cna-export diff {record['source']['model']} {name} --verify {name}/circuit.json",
        "```",
        "",
        "## Provenance",
        "",
        *provenance_block(record),
    ]
    return "\n".join(lines)


def _experts_lines(adapter: dict[str, Any], target: str) -> list[str]:
    """Neurons inside routed experts: where their factors are, and what loading them needs."""
    params = adapter["expert_parameters"]
    if not params:
        return []
    fused = "gate_up_proj: the up half" if target == "up" else "down_proj"
    gguf = f"; in the GGUF LoRA, `ffn_{target}_exps` (one factor pair per expert)" if adapter["gguf"] else ""
    return [f"- Experts: PEFT `target_parameters` on the stacked experts' {fused} of {len(params)} layers (rank per "
            "expert = its neurons in that layer, the layer's largest, zero-padded for the others; loading needs "
            f"PEFT >= 0.22){gguf}"]  # fmt: skip


def _gguf_source_lines(source: dict[str, Any]) -> list[str]:
    """An adapter read from a GGUF file: where its factors come from, and what they are exact for."""
    if not source.get("gguf_file"):
        return []
    return [f"- Factors read from the GGUF file `{source['gguf_file']}` (its rows dequantized to float32): the GGUF "
            "LoRA gives that file the edit; on the model the file was converted from, the PEFT adapter is exact "
            "only where the file stores the weights unrounded"]  # fmt: skip


def _vllm_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank` (it takes a fixed set of values)."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)
