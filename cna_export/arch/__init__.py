"""Architectures as data: the table of supported families and where a neuron lives in each of them.

`spec.py` defines the row type (`ArchSpec`), `families.py` the rows (one block per vendor family), `experts.py` and
`sites.py` the parts of a row (mixtures of experts; where a neuron sits in a tensor), `lookup.py` finds rows.
"""

from cna_export.arch.experts import DenseLayers, ExpertSpec
from cna_export.arch.families import ARCHITECTURES, GGUF_MODEL_TYPES
from cna_export.arch.lookup import arch_for, compatible, model_type_for_gguf, shape_of
from cna_export.arch.sites import ModelShape, Site
from cna_export.arch.spec import ArchSpec

__all__ = [
    "ARCHITECTURES",
    "GGUF_MODEL_TYPES",
    "ArchSpec",
    "DenseLayers",
    "ExpertSpec",
    "ModelShape",
    "Site",
    "arch_for",
    "compatible",
    "model_type_for_gguf",
    "shape_of",
]
