"""Tiny random models of every supported family, and hand-made circuits for them: what the tests are built on
(tests/conftest.py makes its fixtures from them) and what benchmarks/gguf_routes.py measures. No network, no GPU.
`tiny.py` holds the one table, `build.py` builds a model from a row."""

from cna_export.testing.build import CHATML, CORPUS, build_model, build_tokenizer, make_circuit
from cna_export.testing.tiny import ARCHS, FAMILIES, MOE_ARCHS, PROCESSOR_FILES, TINY, Tiny

__all__ = [
    "ARCHS",
    "CHATML",
    "CORPUS",
    "FAMILIES",
    "MOE_ARCHS",
    "PROCESSOR_FILES",
    "TINY",
    "Tiny",
    "build_model",
    "build_tokenizer",
    "make_circuit",
]
