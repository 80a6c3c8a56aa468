"""Backends: where a model runs. One interface (`Backend`, `Runner` in base.py) and one implementation per runtime:
torch (torch.py) and llama.cpp (llamacpp.py, with its attribution in llamacpp_sums.py and its runner in
llamacpp_runner.py). `open_model` / `open_backend` choose one per command from the source; the option models
(`LoadOptions`, `ExportOptions`) are in options.py."""

from cna_export.backends.base import Backend, Runner, applied_circuit, open_backend, open_model, write_edit
from cna_export.backends.options import BACKENDS, ExportOptions, LoadOptions

__all__ = [
    "BACKENDS",
    "Backend",
    "ExportOptions",
    "LoadOptions",
    "Runner",
    "applied_circuit",
    "open_backend",
    "open_model",
    "write_edit",
]
