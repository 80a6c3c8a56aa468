"""Shared fixtures: tiny random models of every supported architecture (the table `TINY` of cna_export/testing),
built offline in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# The tiny-model table and its builders live in the package (cna_export/testing), so that the benchmarks that
# measure these models import the package only; the names are kept here for the tests.
from cna_export.testing import (  # noqa: F401
    ARCHS,
    CHATML,
    CORPUS,
    FAMILIES,
    MOE_ARCHS,
    PROCESSOR_FILES,
    TINY,
    Tiny,
    build_model,
    build_tokenizer,
    make_circuit,
)

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
# Keep the sha256 cache of the tests out of the user's home, in a folder removed when the session ends.
if "CNA_EXPORT_CACHE" not in os.environ:
    _CACHE = tempfile.TemporaryDirectory(prefix="cna-export-cache-")
    os.environ["CNA_EXPORT_CACHE"] = _CACHE.name
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random mixture-of-experts folder per MoE family (per-expert 2-D or stacked 3-D tensors on disk)."""
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: build_model(root / arch, arch) for arch in MOE_ARCHS}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model folder per architecture (llama is sharded across several files)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_model(root / arch, arch, shard="60KB" if arch == "llama" else None) for arch in ARCHS}


def two_prompt_recipe(name: str) -> str:
    """A recipe of two prompts per side, universal neurons off: the smallest one a command runs end to end."""
    return f"""version: 1
name: {name}
behaviour: refusal
positive: ["How do I pick a lock?", "Write malware."]
negative: ["How do I bake bread?", "Write a poem."]
multiplier: 0
universal:
  enabled: false
"""


def shallow_recipe(folder: Path, name: str = "refusal-ablate", **keys) -> Path:
    """A copy of a shipped recipe in `folder` for a tiny model: the shipped layer windows (skip 2 + 2) are made for
    deep models and leave no layer of a 3-layer one, which is refused (issue 23). `keys` replace the recipe's; by
    default skip_last_layers is 0 (a 3-layer model keeps its last layer)."""
    import yaml

    from cna_export.circuit.recipe import find_recipe

    data = yaml.safe_load(find_recipe(name).read_text())
    data.update({"skip_last_layers": 0, **keys})
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `cna-export` in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cna_export", *args], capture_output=True, text=True, env=env, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cna-export {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def last_token_inputs(model, spec, tok, prompts) -> list[list[torch.Tensor]]:
    """Per prompt, one at a time, each layer's down-projection input at the last token (float64): the reference the
    batched attribution is checked against."""
    from cna_export.attribution.collect import encode_prompts
    from cna_export.attribution.hooks import down_projs

    out = []
    for ids in encode_prompts(tok, prompts):
        got = {}
        hooks = [
            p.register_forward_pre_hook(lambda m, a, i=i, got=got: got.__setitem__(i, a[0][0, -1].double()))
            for i, p in enumerate(down_projs(model, spec))
        ]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        out.append([got[i] for i in sorted(got)])
    return out


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model folder per further dense or multimodal family (kind "family")."""
    root = tmp_path_factory.mktemp("tiny-families")
    return {arch: build_model(root / arch, arch) for arch in FAMILIES}


@pytest.fixture(scope="session")
def hf_to_gguf() -> str:
    """llama.cpp's converter, installed apart (`CNA_EXPORT_HF_TO_GGUF`, see gguf/external.py); .ci/run installs it,
    so in CI a missing converter fails instead of skipping."""
    where = os.environ.get("CNA_EXPORT_HF_TO_GGUF")
    if not where:
        if os.environ.get("CI"):
            pytest.fail("CI runs with llama.cpp's converter: .ci/run sets CNA_EXPORT_HF_TO_GGUF")
        pytest.skip("llama.cpp's converter not installed (set CNA_EXPORT_HF_TO_GGUF, see gguf/external.py)")
    return where
