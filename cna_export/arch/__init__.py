"""Architectures as data: the table of supported families and where a neuron lives in each of them."""

from cna_export.arch.sites import ModelShape, Site
from cna_export.arch.spec import (
    ARCHITECTURES,
    GGUF_MODEL_TYPES,
    ArchSpec,
    arch_for,
    compatible,
    model_type_for_gguf,
    shape_of,
)

__all__ = [
    "ARCHITECTURES", "GGUF_MODEL_TYPES", "ArchSpec", "ModelShape", "Site", "arch_for", "compatible",
    "model_type_for_gguf", "shape_of",
]  # fmt: skip
