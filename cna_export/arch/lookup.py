"""Finding rows of the architecture table: by `model_type`, by a GGUF file's architecture, by a config (and the
shape that config gives), and whether a circuit made on one family fits another."""

from __future__ import annotations

from typing import Any

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

from cna_export.arch.experts import expert_shape
from cna_export.arch.families import ARCHITECTURES, GGUF_MODEL_TYPES, GGUF_MOE_MODEL_TYPES
from cna_export.arch.sites import ModelShape
from cna_export.arch.spec import ArchSpec
from cna_export.errors import ArchitectureError


def arch_for(model_type: str) -> ArchSpec:
    """Return the table entry for `model_type`, or fail naming the supported types."""
    try:
        return ARCHITECTURES[model_type]
    except (KeyError, TypeError):
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ArchitectureError(
            f"Unsupported model_type {model_type!r}.",
            f"use a model of one of these types: {supported}.",
        ) from None


def compatible(a: str, b: str) -> bool:
    """Whether a circuit made on model_type `a` fits a model of type `b`: the same type, or types whose neurons
    sit in the same places and that run as one llama.cpp architecture (Mistral's dense models and Llama)."""
    if a == b:
        return True
    sa, sb = ARCHITECTURES.get(a), ARCHITECTURES.get(b)
    if sa is None or sb is None:
        return False
    return sa.gguf_arch == sb.gguf_arch and sa.sites() == sb.sites() and sa.experts == sb.experts


def model_type_for_gguf(architecture: str | None, model_name: str | None = None, experts: int | None = None) -> str:
    """The transformers model_type of a GGUF file, from `general.architecture` (and `general.name`, and
    `{arch}.expert_count`).

    Several model types convert to one llama.cpp architecture; the mapping follows transformers' GGUF loader,
    which reads a `llama` file whose name mentions Mistral as `mistral`; a `llama` file with experts is Mixtral.
    """
    if experts and architecture in GGUF_MOE_MODEL_TYPES:
        return GGUF_MOE_MODEL_TYPES[architecture]
    if architecture == MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA] and model_name and "mistral" in model_name.lower():
        return "mistral"
    if architecture in GGUF_MODEL_TYPES:
        return GGUF_MODEL_TYPES[architecture]
    raise ArchitectureError(
        f"GGUF architecture {architecture!r} is not supported.", f"use one of {sorted(GGUF_MODEL_TYPES)}."
    )


def spec_of_config(model_type: Any) -> ArchSpec | None:
    """The row of a config's `model_type`: a family's own, or a wrapper's text config (`text_model_type`)."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return next((s for s in ARCHITECTURES.values() if s.text_model_type and s.text_model_type == model_type), None)


def shape_of(config: Any) -> ModelShape:
    """Read layer count and MLP width from a transformers config (or a plain dict); each layer's width where the
    row's `double_wide` rule widens some."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    spec = spec_of_config(get("model_type"))
    width_key = spec.width_key if spec is not None else "intermediate_size"
    values = {key: get(key) for key in ("num_hidden_layers", width_key, "hidden_size")}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ArchitectureError(
                f"config.json has no valid {key} (found {value!r}).",
                "use the config.json that came with the checkpoint.",
            )
    layers, width = values["num_hidden_layers"], values[width_key]
    moe = expert_shape(spec.experts, config, layers) if spec is not None and spec.experts is not None else None
    widths = [width] * layers
    if spec is not None and spec.double_wide is not None and get(spec.double_wide[0]):
        wide = get(spec.double_wide[1]) or 0
        widths = [2 * width if i >= layers - wide else width for i in range(layers)]
    return ModelShape.of_widths(widths, values["hidden_size"], moe)
