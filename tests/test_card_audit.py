"""Every kind of output's card prints the commands that audit it, and they work as printed: run from the folder that
holds the source and the output, each exits 0. Kinds: a safetensors export, a safetensors export with a GGUF
conversion (f16: its own check; q8_0: checked through the weights), the patched-GGUF folder of a GGUF source, a
LoRA adapter (of a model folder and of a GGUF file)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import make_circuit, run_cli

from cna_export.gguf.convert import export_gguf

NEURONS = [(0, 3), (1, 40), (2, 7)]


def card_commands(folder: Path) -> list[list[str]]:
    """The `cna-export ...` lines of the card's Audit section (its bash blocks), as argument lists."""
    text = (folder / "README.md").read_text()
    audit = text.split("## Audit", 1)[1].split("## Provenance", 1)[0]
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", audit, re.S) for ln in block.splitlines()]
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("cna-export ")]


def run_card(folder: Path, where: Path, expect: int) -> list[list[str]]:
    """Run every audit command of `folder`'s card in `where`; each must pass."""
    commands = card_commands(folder)
    assert len(commands) == expect, commands
    for args in commands:
        proc = run_cli(*args, cwd=where, check=False)
        assert proc.returncode == 0, f"cna-export {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return commands


@pytest.fixture
def work(tiny_models, tmp_path) -> Path:
    """A folder holding the source model under its own name (the name the card prints) and a circuit."""
    (tmp_path / "llama").symlink_to(tiny_models["llama"], target_is_directory=True)
    make_circuit(tiny_models["llama"], NEURONS, multiplier=0.0).save(tmp_path / "c.json")
    return tmp_path


def test_safetensors_export(work):
    run_cli("apply", "--model", "llama", "--circuit", "c.json", "--out", "edited", cwd=work)
    [cmd] = run_card(work / "edited", work, 1)
    assert cmd == ["diff", "llama", "edited", "--verify", "edited/circuit.json"]
    text = (work / "edited" / "README.md").read_text()
    assert str(work) not in text  # a published card names no local path


@pytest.mark.parametrize("outtype, commands", [("f16", 3), ("q8_0", 1)])
def test_safetensors_export_with_gguf(work, outtype, commands):
    run_cli("apply", "--model", "llama", "--circuit", "c.json", "--out", "edited", "--gguf", outtype, cwd=work)
    run_card(work / "edited", work, commands)


@pytest.mark.parametrize("route", ["apply", "run"])
def test_patched_gguf_folder(work, route):
    pytest.importorskip("llama_cpp")
    export_gguf(work / "llama", work / "llama.Q8_0.gguf", outtype="q8_0")
    if route == "apply":
        run_cli("apply", "--model", "llama.Q8_0.gguf", "--circuit", "c.json", "--out", "patched", cwd=work)
    else:
        run_cli("run", "refusal-ablate", "--model", "llama.Q8_0.gguf", "--out", "patched", "--top-k", "12",
                "--skip-first-layers", "0", "--skip-last-layers", "0", cwd=work)  # fmt: skip
    [cmd] = run_card(work / "patched", work, 1)
    assert cmd == ["diff", "llama.Q8_0.gguf", "patched", "--verify", "patched/circuit.json"]


@pytest.mark.parametrize("source", ["llama", "llama.gguf"])
def test_adapter(work, source):
    if source.endswith(".gguf"):
        pytest.importorskip("llama_cpp")
        export_gguf(work / "llama", work / source, outtype="f32")
    run_cli("adapter", "--model", source, "--circuit", "c.json", "--out", "lora", "--gguf", cwd=work)
    [cmd] = run_card(work / "lora", work, 1)
    assert cmd == ["diff", source, "lora", "--verify", "lora/circuit.json"]


def test_safetensors_export_of_a_gguf(work):
    """`apply --safetensors` on a GGUF: the dequantized export; its card's command compares it with the GGUF
    dequantized the same way."""
    pytest.importorskip("llama_cpp")
    export_gguf(work / "llama", work / "llama.gguf", outtype="f32")
    run_cli("apply", "--model", "llama.gguf", "--circuit", "c.json", "--out", "dense", "--safetensors", cwd=work)
    [cmd] = run_card(work / "dense", work, 1)
    assert cmd == ["diff", "llama.gguf", "dense", "--verify", "dense/circuit.json"]
