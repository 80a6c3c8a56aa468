"""Nothing a run publishes names a local path (issue 23, class 12): the card, circuit.json, the safetensors
metadata and every other file of the export name the source by its Hub id or its file name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_circuit, two_prompt_recipe

from cna_export.circuit.format import Circuit
from cna_export.cli.main import main
from cna_export.errors import OutputError
from cna_export.io.names import public_name
from cna_export.io.source import resolve

RECIPE = two_prompt_recipe("leak-check")


def assert_no_local_path(folder: Path, *paths: Path) -> None:
    """No file under `folder` (binary ones included: the weights are published too) holds any of `paths`."""
    needles = {str(p).encode() for p in paths} | {str(p.resolve()).encode() for p in paths}
    for f in (p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        assert not [n for n in needles if n in data], f"{f} records a local path"


@pytest.fixture
def deep(tmp_path) -> Path:
    """A folder deep inside the author's disk, whose path must never be published."""
    folder = tmp_path / "home" / "someone" / "private-projects"
    folder.mkdir(parents=True)
    return folder


def test_run_from_a_folder_publishes_no_local_path(tiny_models, tmp_path, deep):
    model = Path(shutil.copytree(tiny_models["qwen2"], deep / "tiny-qwen"))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    out = tmp_path / "edited"
    assert main(["run", str(tmp_path / "recipe.yaml"), "--model", str(model.absolute()), "--out", str(out),
                 "--top-k", "3"]) == 0  # fmt: skip
    assert Circuit.load(out / "circuit.json").model.source == "tiny-qwen"
    assert_no_local_path(out, deep, tmp_path)


def test_run_from_a_gguf_file_publishes_no_local_path(tiny_models, tmp_path, deep):
    pytest.importorskip("llama_cpp")
    from cna_export.gguf.convert import export_gguf

    gguf = export_gguf(tiny_models["qwen2"], deep / "tiny.gguf", outtype="f32")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    out = tmp_path / "edited"
    assert main(["run", str(tmp_path / "recipe.yaml"), "--model", str(gguf.absolute()), "--out", str(out),
                 "--top-k", "3", "--modelfile"]) == 0  # fmt: skip
    assert (out / "tiny.gguf").is_file() and (out / "Modelfile").is_file()
    assert Circuit.load(out / "circuit.json").model.source == "tiny.gguf"
    assert_no_local_path(out, deep, tmp_path)


def test_an_old_circuit_with_a_local_path_is_published_by_name(tiny_models, tmp_path, deep):
    """A circuit that still records where it was made (an older discover, a hand-written file) is exported with
    the name only: the export's circuit.json is the circuit as applied, the record that is published."""
    from cna_export.fold.export import apply_circuit

    circuit = make_circuit(tiny_models["qwen2"], [(1, 3)])
    circuit.model.source = str(deep / "models" / "tiny-qwen")
    out = apply_circuit(resolve(str(tiny_models["qwen2"])), circuit, tmp_path / "edited")
    assert Circuit.load(out / "circuit.json").model.source == "tiny-qwen"
    assert_no_local_path(out, deep)
    card = json.loads((out / "README.md").read_text().split("```json")[1].split("```")[0])
    assert card["source"]["model"] == tiny_models["qwen2"].name and card["circuit"]["sha256"]


@pytest.mark.parametrize(
    "name, public",
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("/home/me/.cache/huggingface/hub/models--acme--tiny/snapshots/0123abcd", "acme/tiny"),
        ("/home/me/models/smollm2.Q4_1.gguf", "smollm2.Q4_1.gguf"),
        ("./work/my-model", "my-model"),
    ],
)
def test_public_name(name, public):
    assert public_name(name) == public


def test_public_name_refuses_control_characters():
    with pytest.raises(OutputError, match="control character"):
        public_name("/models/evil\n# injected heading.gguf")
