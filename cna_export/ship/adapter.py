"""A circuit as a LoRA adapter: the edit in megabytes, loaded on top of an unchanged base model.

Scaling the neurons S of a layer by m changes `down_proj.weight` W by `W[:, S] (diag(m) - I)` on the columns S,
a matrix of rank |S|. As LoRA factors (`delta W = B @ A`, PEFT's `lora_B` [out, r] and `lora_A` [r, in]):
B holds the scaled columns `W[:, S] * (m - 1)` and A the one-hot rows that select S, so `B @ A` is the edit,
exact in float32 (each entry of `B @ A` is one product by 1). For the `up` target the roles swap: A holds the
scaled rows `W[S, :] * (m - 1)` and B the one-hot columns. Each module gets the rank of its layer (PEFT's
`rank_pattern`) and alpha equal to that rank (`alpha_pattern`), so PEFT's scaling alpha / r is 1 everywhere.
The PEFT file stores the one-hot factor in bfloat16 (0 and 1 are exact there) and the scaled one in float32.

The same factors make a GGUF LoRA for llama.cpp and Ollama. llama.cpp scales every adapter tensor by
`s * alpha / rank` with one alpha per file, or by `s` alone when alpha is 0; the file says alpha 0, so scale s
(`--lora-scaled FILE s`) gives every neuron the multiplier 1 + s (m - 1): s = 0 is the base model, s = 1 the edit.

Neurons inside routed experts are the same factors per expert, written for PEFT's `target_parameters` on the
layer's stacked expert parameter and for llama.cpp's `ffn_*_exps` (ship/adapter_experts.py); a shared expert and
the dense layers of an MoE model are Linear modules as above.

This module is the math (`lora_factors`) and the writers; `write_adapter` is the command's library function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from cna_export.arch.experts import ExpertKey
from cna_export.arch.sites import Site
from cna_export.arch.spec import ArchSpec, ModelShape
from cna_export.backends.options import ExportOptions
from cna_export.circuit.format import CIRCUIT_FILE, Circuit
from cna_export.errors import ArchitectureError, CircuitError
from cna_export.fold.scale import LayerEdits, UnitEdits
from cna_export.fold.storage import stored
from cna_export.io.output import OutputPlan
from cna_export.io.source import ADAPTER_CONFIG

if TYPE_CHECKING:
    from cna_export.audit.weights import Weights
    from cna_export.backends.base import Backend
    from cna_export.ship.adapter_experts import ExpertLoraPair

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's names for the factors of module M in an adapter file (PeftModel.save_pretrained writes these keys).
PEFT_PREFIX = "base_model.model."
SELECTOR_DTYPE = torch.bfloat16  # the one-hot factor's dtype in the PEFT file (exact: its values are 0 and 1)
GGUF_ALPHA = 0.0  # llama.cpp: alpha 0 means "scale by the user's s only", whatever each tensor's rank


@dataclass(frozen=True)
class LoraPair:
    """The LoRA factors of one module: `delta W = b @ a` (PEFT's lora_B, lora_A); the scaled factor float32."""

    module: str  # dotted module path, e.g. model.layers.3.mlp.down_proj
    gguf_tensor: str | None  # the base tensor's GGUF name, e.g. blk.3.ffn_down.weight
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    parameter: ClassVar[bool] = False  # a `target_modules` entry (ExpertLoraPair: a `target_parameters` one)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def owner(self) -> str:
        """The module whose factors these are in PEFT's file: the module itself."""
        return self.module

    @property
    def gguf_a(self) -> torch.Tensor:
        """llama.cpp's lora_a (float32: ggml multiplies an f16/bf16 weight by activations rounded to that type)."""
        return self.a.to(torch.float32)

    @property
    def gguf_b(self) -> torch.Tensor:
        return self.b.to(torch.float32)


# Math ------------------------------------------------------------------------------------------------------------


def lora_factors(
    weight: torch.Tensor, site: Site, width: int, index: torch.Tensor, multiplier: torch.Tensor,
    selector_dtype: torch.dtype = torch.float32, what: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """LoRA factors (A [k, in], B [out, k]) with `weight + B @ A` = `weight` with neurons `index` scaled.

    The scaled factor is float32; the one-hot factor is `selector_dtype` (exact in any float type).

    Args:
        weight: the 2-D weight of a linear layer ([out, in], PyTorch order) that holds the neurons as `site` says.
        site: where neuron j is in `weight` (axis 1: a column, down_proj; axis 0: a row, up_proj; fused part).
        width: the MLP width n.
        index: the neurons (k of them).
        multiplier: their multipliers.
        selector_dtype: dtype of the one-hot factor.
        what: the weight's name, for messages.

    Example:
        >>> a, b = lora_factors(w_down, spec.down, 11008, torch.tensor([5, 9]), torch.tensor([0.0, 2.0]))
        >>> torch.equal(w_down + b @ a, fold_site(w_down, spec.down, n, ...))  # up to one rounding of w + w (m - 1)
    """
    if weight.dim() != 2 or site.expert_axis is not None:
        raise ArchitectureError(
            f"Neurons stored in a {weight.dim()}-D tensor ({site.template}) cannot be a LoRA of one linear layer.",
            "export this model with `cna-export apply` instead of as an adapter.",
        )
    index = index.to(torch.long)
    scaled = scaled_factor(site.rows(weight, width)[index], multiplier, what or site.template, index)
    return placed_factors(scaled, index, site.offset(width), site.axis, weight.shape[site.axis], selector_dtype)


def scaled_factor(old: torch.Tensor, multiplier: torch.Tensor, what: str, index: torch.Tensor) -> torch.Tensor:
    """The scaled factor: the neurons' rows `old` ([k, hidden], one per neuron) times (m - 1), in float32.

    A product that float32 cannot hold is refused (`fold.storage.stored`) before anything is written."""
    product = old.to(torch.float32) * (multiplier.to(torch.float32) - 1).reshape(-1, 1)
    return stored(product, torch.float32, torch.isfinite(old), multiplier, f"the LoRA factor of {what}", index)


def placed_factors(
    scaled: torch.Tensor, index: torch.Tensor, offset: int, axis: int, size: int, selector_dtype: torch.dtype,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(A [rank, in], B [out, rank]) of a 2-D weight ([out, in]) whose neuron j is index `offset + j` along `axis`
    (of `size`): the scaled rows `scaled` ([k, hidden]) on one side, the one-hot selector on the other. A `rank`
    above k pads both with zeros (an expert that shares its layer's rank with a larger one), which adds only
    exact zeros to `B @ A`."""
    k, rank = len(index), rank or len(index)
    selector = torch.zeros(rank, size, dtype=selector_dtype)
    selector[torch.arange(k), index.to(torch.long) + offset] = 1.0
    padded = torch.zeros(rank, scaled.shape[1], dtype=scaled.dtype)
    padded[:k] = scaled
    if axis == 1:  # neurons are inputs (columns): B = the scaled columns, A = the selector rows
        return selector, padded.T.contiguous()
    return padded, selector.T.contiguous()  # neurons are outputs (rows): A = scaled rows, B = selector


def module_name(spec: ArchSpec, site: Site, layer: int) -> str:
    """The runtime module that owns a site's weight, as PEFT names it on the model transformers loads:
    `model.layers.3.mlp.down_proj`. The name inside the layer comes from the site and the layer list from the
    spec, because a checkpoint may store the weights under an older prefix (`language_model.model.layers...`)."""
    inside = site.template.split("{i}.", 1)[-1]
    if "{e}" in site.template or "{i}." not in site.template or not inside.endswith(".weight"):
        raise ArchitectureError(
            f"{site.template} is not the weight of one linear module, which a LoRA adapter needs.",
            "export this model with `cna-export apply` instead of as an adapter.",
        )
    return f"{spec.layers_module}.{layer}.{inside.removesuffix('.weight')}"


def peft_tensors(pairs: list[LoraPair | ExpertLoraPair]) -> dict[str, torch.Tensor]:
    """The adapter file's tensors under the keys PEFT writes and reads.

    The pairs of `adapter_pairs` hold the one-hot factor in bfloat16, where 0 and 1 are exact, and the scaled one
    in float32: the file is about half as large (the one-hot factor spans the MLP width) and loads into float32
    modules unchanged."""
    out = {}
    for p in pairs:
        out[f"{PEFT_PREFIX}{p.owner}.lora_A.weight"] = p.a
        out[f"{PEFT_PREFIX}{p.owner}.lora_B.weight"] = p.b
    return out


def peft_config(pairs: list[LoraPair | ExpertLoraPair], base_model: str | None, revision: str | None = None):
    """A `peft.LoraConfig` for `pairs`: exactly their modules (a layer's routed experts: their stacked parameter,
    in `target_parameters`), each with its rank and alpha = rank (scaling 1).

    `r` and `lora_alpha` are the largest rank, so a server that reads only those (one scaling alpha / r for all
    modules, a `--max-lora-rank`) also gets scaling 1 and the rank it must allow."""
    from peft import LoraConfig

    top = max(p.rank for p in pairs)
    params = [p.module for p in pairs if p.parameter]
    # `target_parameters` only where there are experts: a dense adapter's config stays what older PEFTs read.
    extra = {"target_parameters": params} if params else {}
    return LoraConfig(
        r=top, lora_alpha=top, target_modules=[p.module for p in pairs if not p.parameter] or None, lora_dropout=0.0,
        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model, revision=revision,
        inference_mode=True, rank_pattern={p.module: p.rank for p in pairs if p.rank != top},
        alpha_pattern={p.module: p.rank for p in pairs if p.rank != top}, **extra,
    )  # fmt: skip


# Reading the factors ---------------------------------------------------------------------------------------------


def adapter_pairs(
    weights: Weights, spec: ArchSpec, shape: ModelShape, edits: LayerEdits | UnitEdits, target: str
) -> list[LoraPair | ExpertLoraPair]:
    """The LoRA factors of every unit a circuit edits, read from the model's own weights: a safetensors checkpoint
    (the tensors config.json implies, checked first) or a GGUF file (its tensors dequantized to float32). Only the
    target tensor of each edited unit is read (memory-mapped), one at a time.

    `edits` is keyed by layer (a dense circuit) or by (layer, expert) (`Circuit.unit_edits`): a dense MLP or a
    shared expert is one `LoraPair` (a Linear module), a layer's routed experts one `ExpertLoraPair` (PEFT's
    `target_parameters` on their stacked parameter, `ship/adapter_experts.py`)."""
    from cna_export.fold.export import check_targets, unit_site
    from cna_export.ship.adapter_experts import expert_pairs

    units = {key if isinstance(key, tuple) else (key, None): edit for key, edit in edits.items()}
    if weights.fmt == "safetensors":
        check_targets(weights.reader, spec, shape, units, target)  # every tensor as config.json implies
    pairs: list[LoraPair | ExpertLoraPair] = []
    routed = {key: edit for key, edit in units.items() if isinstance(key[1], int)}
    for (layer, expert), (index, mult) in units.items():
        if isinstance(expert, int):
            continue
        site, _ = unit_site(spec, shape, layer, expert, target)  # checks the unit exists
        gguf_site, here = (_linear_site(spec, expert, target, fmt) for fmt in ("gguf", weights.fmt))
        # The GGUF tensor must hold the neurons as the checkpoint does, so the same factors serve both files.
        same = (gguf_site.axis, gguf_site.part, gguf_site.parts) == (site.axis, site.part, site.parts)
        if weights.fmt == "gguf" and not same:
            raise ArchitectureError(
                f"{gguf_site.template} holds the neurons differently from {site.template}, so a LoRA of the "
                "checkpoint cannot be read from the GGUF file.", "pass the safetensors model the GGUF was made from.",
            )  # fmt: skip
        weight = weights.values(here.name(layer))
        a, b = lora_factors(weight, here, shape.width_of(expert, layer), index, mult, SELECTOR_DTYPE, here.name(layer))
        pairs.append(LoraPair(module_name(spec, site, layer), gguf_site.name(layer) if same else None, a, b))
    if routed:
        pairs += expert_pairs(weights, spec, shape, routed, target, SELECTOR_DTYPE)
    return sorted(pairs, key=lambda p: _layer_of(spec, p.module))


def _linear_site(spec: ArchSpec, expert: ExpertKey, target: str, fmt: str) -> Site:
    """The site of a dense MLP's (expert None) or the shared expert's `target` in `fmt`."""
    return spec.site(target, fmt) if expert is None else spec.experts.site(target, expert, fmt)


def _layer_of(spec: ArchSpec, module: str) -> int:
    """The layer of a module path `{layers_module}.N....` (pairs are written layer by layer)."""
    return int(module.removeprefix(f"{spec.layers_module}.").split(".", 1)[0])


# Writers ---------------------------------------------------------------------------------------------------------


def write_peft(
    folder: Path, pairs: list[LoraPair | ExpertLoraPair], base_model: str | None, revision: str | None
) -> None:
    """adapter_model.safetensors and adapter_config.json (written by PEFT's own config class) into `folder`."""
    from safetensors.torch import save_file

    save_file(peft_tensors(pairs), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config(pairs, base_model, revision).save_pretrained(str(folder))


def write_gguf_lora(
    path: Path, spec: ArchSpec, pairs: list[LoraPair | ExpertLoraPair], name: str, base_model: str | None
) -> None:
    """A GGUF LoRA adapter for llama.cpp / Ollama: `blk.N.ffn_down.weight.lora_a` / `.lora_b`, float32.

    gguf-py writes numpy order, the reverse of ggml's dims, so A [r, in] is stored with ne = [in, r] and
    B [out, r] with ne = [r, out]: what llama.cpp checks against the base tensor (ne[0] = in, ne[1] = out). A
    stacked expert tensor's factors have the experts outermost (ne = [in, r, E], [r, out, E]), as llama.cpp's
    `mul_mat_id` of lora_b and lora_a picks each token's experts."""
    from gguf import GGUFType, GGUFWriter, Keys

    missing = [p.module for p in pairs if p.gguf_tensor is None]
    if missing:
        raise ArchitectureError(
            f"{missing[0]} is laid out differently in GGUF, so its factors cannot be a GGUF LoRA.",
            "drop --gguf (the PEFT adapter is still written), or export with `cna-export apply --gguf`.",
        )
    writer = GGUFWriter(str(path), spec.gguf_name)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, GGUF_ALPHA)
    writer.add_name(name)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    for p in pairs:  # float32 both (`LoraPair.gguf_a`); a stacked expert tensor's: [E, r, in] and [E, out, r]
        writer.add_tensor(f"{p.gguf_tensor}.lora_a", p.gguf_a.numpy())
        writer.add_tensor(f"{p.gguf_tensor}.lora_b", p.gguf_b.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_name(out: Path) -> str:
    """The GGUF LoRA's file name inside the adapter folder."""
    return f"{Path(out).name}-lora-f32.gguf"


def _checked(backend: Backend, circuit: Circuit, outputs: OutputPlan, out: Path, options: ExportOptions,
             ) -> tuple[UnitEdits, str | None]:  # fmt: skip
    """Every check before anything is read or written (`out` added to `outputs`): (edits, the source weights' hash
    if taken)."""
    from cna_export.ship.card import check_repo_id

    if getattr(backend.shape, "moe", None) is not None:
        from cna_export.ship.adapter_experts import check_peft_version

        check_peft_version()
    backend.spec.check_target(options.target)  # gpt-oss's experts have no up site
    edits = circuit.unit_edits(options.multiplier, options.allow_negative)
    if not edits:
        raise CircuitError("The circuit lists no neurons, so there is no adapter to write.", "pass another circuit.")
    outputs.folder(out)
    if options.base_model is not None:
        check_repo_id(options.base_model)
    # Hash the weights only when there is something to compare with (cached after discover), as apply does.
    force = options.force
    weights = backend.identity().weights_sha256 if circuit.model.weights_sha256 and not force else None
    circuit.check_fits(backend.model_type, backend.shape, weights, force)
    return edits, weights


def write_adapter(backend: Backend, circuit: Circuit, out: Path, options: ExportOptions | None = None) -> Path:
    """Write `circuit` as a LoRA adapter of the opened model into the folder `out` (nothing is written on failure).

    The folder holds adapter_model.safetensors and adapter_config.json (PEFT), the applied circuit.json, a card
    (README.md: `library_name: peft`, `base_model`) and, with `options.gguf` or from a GGUF source,
    `OUT-lora-f32.gguf` for llama.cpp / Ollama. The factors are the source's own rows: from a GGUF file they are
    read dequantized, so the GGUF LoRA is exact on that file and the PEFT one on the model it was converted from
    up to its quantization.

    Args:
        backend: the base model, opened (`cna_export.backends.open_model`): a safetensors model or a GGUF file.
        circuit: the (possibly stacked) circuit.
        out: the adapter folder.
        options: multiplier, allow_negative, force, target, base_model, recipe_file, overwrite (as for
            `apply_circuit`); gguf (any outtype: the GGUF LoRA is float32).

    Returns:
        The output folder.

    Example:
        >>> write_adapter(open_model("Qwen/Qwen2.5-0.5B-Instruct"), Circuit.load("c.json"), Path("no-refusal-lora"))
    """
    from cna_export.audit.weights import weights_of
    from cna_export.ship.adapter_card import write_adapter_card
    from cna_export.ship.card import copy_recipe
    from cna_export.ship.provenance import hub_origin

    options = options or ExportOptions()
    out, source = Path(out), backend.source
    outputs = OutputPlan(options.overwrite, protect=[source.path])
    edits, weights = _checked(backend, circuit, outputs, out, options)
    start = time.perf_counter()
    pairs = adapter_pairs(weights_of(source), backend.spec, backend.shape, edits, options.target)
    applied = circuit.applied(options.multiplier)
    hub = hub_origin(source)
    base = options.base_model or (hub[0] if hub else None)
    with outputs:
        tmp = outputs.temp(out)
        # A local path is not written into the config (it is published); --base-model names the Hub id.
        write_peft(tmp, pairs, base, hub[1] if hub else source.revision)
        if options.gguf is not None or source.is_gguf:  # a GGUF source: its LoRA is the adapter that runs on it
            write_gguf_lora(tmp / gguf_name(out), backend.spec, pairs, out.name, base)
        applied.save(tmp / CIRCUIT_FILE)
        if options.recipe_file is not None:
            copy_recipe(options.recipe_file, tmp)
        write_adapter_card(tmp, source, applied, pairs, target=options.target, source_weights_sha256=weights,
                           base_model=options.base_model, name=out.name)  # fmt: skip
    log.info("wrote %s in %.2f s", out, time.perf_counter() - start)
    return out


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraPair", "adapter_pairs", "gguf_name", "lora_factors", "module_name",
    "peft_config", "peft_tensors", "write_adapter", "write_gguf_lora", "write_peft",
]  # fmt: skip
