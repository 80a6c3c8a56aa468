"""Property tests (issue 6): random corruptions of the files cna-export reads never raise anything but the
project's own errors (`CnaExportError` subclasses), and files that pass the checks read cleanly.

Targets: the safetensors header reader and the lazy checkpoint reader, the circuit loader (and what apply does
with a loaded circuit next), and the GGUF structure check. Example counts are moderate so the whole file runs in
well under a minute on 2 cores; `--hypothesis-seed` reproduces a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from cna_export.arch.spec import ModelShape
from cna_export.circuit.format import Circuit, ModelIdentity, Neuron, PromptSet, RecordedSelection
from cna_export.errors import CnaExportError
from cna_export.gguf.check import check_gguf
from cna_export.io.checkpoint import CheckpointReader, read_header

# CNA_FUZZ_EXAMPLES=2000 for a deeper local run; the default keeps CI quick.
EXAMPLES = int(os.environ.get("CNA_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


_BASE = Path(tempfile.mkdtemp(prefix="cna-fuzz-"))
_CURRENT: list[Path] = []


def _workdir() -> Path:
    """A fresh empty folder for one example; the previous example's folder is removed first.

    hypothesis runs hundreds of examples per test function (a function-scoped tmp_path would be shared), and
    every check uses one folder at a time, so only the latest one is kept.
    """
    while _CURRENT:
        shutil.rmtree(_CURRENT.pop(), ignore_errors=True)
    _CURRENT.append(Path(tempfile.mkdtemp(dir=_BASE)))
    return _CURRENT[-1]


@pytest.fixture(scope="module", autouse=True)
def _remove_workdirs():
    yield
    shutil.rmtree(_BASE, ignore_errors=True)


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        out[pos % len(out)] = value
    return bytes(out)


def _mutate_json(node, path: list[int], value):
    """Replace the node reached by following `path` (indices into lists / sorted dict keys) with `value`."""
    if not path or not isinstance(node, (dict, list)) or not node:
        return value
    if isinstance(node, dict):
        key = sorted(node)[path[0] % len(node)]
        return {**node, key: _mutate_json(node[key], path[1:], value)}
    i = path[0] % len(node)
    return [*node[:i], _mutate_json(node[i], path[1:], value), *node[i + 1 :]]


# Safetensors ---------------------------------------------------------------------------------------------------

TENSORS = {
    "a": torch.arange(16, dtype=torch.float32).reshape(4, 4),
    "b": torch.ones(8, dtype=torch.float16),
    "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
}
ST_BYTES = st_save(TENSORS, metadata={"format": "pt"})
(ST_HEADER_LEN,) = struct.unpack("<Q", ST_BYTES[:8])


def _check_safetensors(data: bytes) -> None:
    folder = _workdir()
    path = folder / "model.safetensors"
    path.write_bytes(data)
    try:
        read_header(path)
        reader = CheckpointReader(folder)
        for name in reader.entries:
            reader.tensor(name)
    except CnaExportError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 8 + ST_HEADER_LEN + 8), st.integers(0, 255)), min_size=1, max_size=6))
def test_safetensors_byte_flips(flips):
    _check_safetensors(_flip(ST_BYTES, flips))


@FUZZ
@given(st.integers(0, len(ST_BYTES) - 1))
def test_safetensors_truncations(size):
    _check_safetensors(ST_BYTES[:size])


@FUZZ
@given(st.lists(st.integers(0, 50), min_size=1, max_size=4), JSON)
def test_safetensors_header_mutations(path, value):
    header = json.loads(ST_BYTES[8 : 8 + ST_HEADER_LEN])
    raw = json.dumps(_mutate_json(header, path, value)).encode()
    _check_safetensors(struct.pack("<Q", len(raw)) + raw + ST_BYTES[8 + ST_HEADER_LEN :])


@FUZZ
@given(st.sampled_from(sorted(TENSORS)), st.integers(-5, 400), st.integers(-5, 400))
def test_safetensors_offsets(name, begin, end):
    """Arbitrary data_offsets: refused with CheckpointError, or accepted and then readable."""
    header = json.loads(ST_BYTES[8 : 8 + ST_HEADER_LEN])
    header[name]["data_offsets"] = [begin, end]
    raw = json.dumps(header).encode()
    _check_safetensors(struct.pack("<Q", len(raw)) + raw + ST_BYTES[8 + ST_HEADER_LEN :])


# Circuits ------------------------------------------------------------------------------------------------------

SHAPE = ModelShape(num_layers=3, intermediate_size=112, hidden_size=64)
CIRCUIT = Circuit(
    multiplier=0.0,
    model=ModelIdentity(source="tiny", model_type="qwen2", weights_sha256="ab" * 32, num_layers=3,
                        intermediate_size=112, hidden_size=64),
    prompts={"positive": PromptSet(count=2, sha256="00"), "negative": PromptSet(count=2, sha256="11")},
    selection=RecordedSelection(top_k=3, universal_excluded=[(0, 1)]),
    neurons=[Neuron(layer=1, index=3, delta=0.5), Neuron(layer=2, index=111, delta=-0.25, multiplier=2.0),
             Neuron(layer=0, index=0, delta=1.0)],
)  # fmt: skip
CIRCUIT_TEXT = CIRCUIT.to_json()


def _check_circuit(text: str | bytes) -> None:
    path = _workdir() / "circuit.json"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    try:
        circuit = Circuit.load(path)
    except CnaExportError:
        return
    # What `apply` does next with a circuit that loaded: edits, then the fit checks.
    for multiplier, allow in ((None, False), (None, True), (1.5, False)):
        try:
            circuit.edits(multiplier, allow)
        except CnaExportError:
            pass
    try:
        circuit.check_fits("qwen2", SHAPE, "cd" * 32)
    except CnaExportError:
        pass
    circuit.sha256()
    circuit.layer_counts()


@FUZZ
@given(st.lists(st.integers(0, len(CIRCUIT_TEXT) - 1), min_size=1, max_size=3), st.integers(0, 255))
def test_circuit_byte_flips(positions, value):
    _check_circuit(_flip(CIRCUIT_TEXT.encode(), [(p, value) for p in positions]))


@FUZZ
@given(st.integers(0, len(CIRCUIT_TEXT)))
def test_circuit_truncations(size):
    _check_circuit(CIRCUIT_TEXT[:size])


@FUZZ
@given(st.lists(st.integers(0, 50), min_size=1, max_size=5), JSON)
def test_circuit_json_mutations(path, value):
    data = json.loads(CIRCUIT_TEXT)
    _check_circuit(json.dumps(_mutate_json(data, path, value)))


@FUZZ
@example("index", 2**65)  # past int64: found by this test (edits() overflowed before the fit checks ran)
@example("layer", 2**63)
@given(st.sampled_from(["layer", "index", "delta", "multiplier"]), st.integers(-(2**80), 2**80) | st.floats())
def test_circuit_neuron_numbers(field, value):
    """Numbers of any size in a neuron, with the model claim widened so range checks alone do not stop them."""
    data = json.loads(CIRCUIT_TEXT)
    data["neurons"][0][field] = value
    data["model"].update(num_layers=2**70, intermediate_size=2**70)
    _check_circuit(json.dumps(data))


# GGUF ----------------------------------------------------------------------------------------------------------


class _Bytes(bytes):
    """File contents with a short repr, so a falsifying example does not print kilobytes of a fixture."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    from test_bad_inputs import tiny_gguf

    return _Bytes(tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes())


def _check_gguf(data: bytes) -> None:
    """check_gguf raises only CheckpointError; a file it accepts is read by gguf-py's GGUFReader without error."""
    from gguf import GGUFReader

    path = _workdir() / "m.gguf"
    path.write_bytes(data)
    try:
        layout = check_gguf(path)
    except CnaExportError:
        return
    reader = GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(layout.tensors)


def test_gguf_zero_dimensional_tensor_is_refused(gguf_bytes):
    """Found by test_gguf_truncations_and_insertions: check_gguf accepted a tensor with 0 dimensions, which
    gguf-py's GGUFReader (and so transformers) then failed on with an IndexError."""
    from cna_export.errors import CheckpointError

    at = gguf_bytes.index(b"token_embd.weight") + len(b"token_embd.weight")
    assert struct.unpack("<I", gguf_bytes[at : at + 4])[0] == 2
    bad = gguf_bytes[:at] + struct.pack("<I", 0) + gguf_bytes[at + 4 + 16 :]  # n_dims 0, its two dims removed
    path = _workdir() / "zero.gguf"
    path.write_bytes(bad)
    with pytest.raises(CheckpointError, match="0 dimensions"):
        check_gguf(path)


def test_gguf_empty_dimension_is_refused(gguf_bytes):
    """Found by test_gguf_numbers: dims (2**61, 0) give 0 bytes, passed the bounds checks, and then overflowed
    in GGUFReader's reshape."""
    from cna_export.errors import CheckpointError

    at = gguf_bytes.index(b"output.weight") + len(b"output.weight") + 4  # the first dim, after n_dims
    bad = gguf_bytes[:at] + struct.pack("<QQ", 2**61, 0) + gguf_bytes[at + 16 :]
    path = _workdir() / "empty.gguf"
    path.write_bytes(bad)
    with pytest.raises(CheckpointError, match="each must be 1 to"):
        check_gguf(path)


def _data_start(data: bytes) -> int:
    path = _workdir() / "ok.gguf"
    path.write_bytes(data)
    return check_gguf(path).data_start


@FUZZ
@given(st.data())
def test_gguf_byte_flips(gguf_bytes, data):
    header = _data_start(gguf_bytes)
    flips = data.draw(st.lists(st.tuples(st.integers(0, header - 1), st.integers(0, 255)), min_size=1, max_size=4))
    _check_gguf(_flip(gguf_bytes, flips))


@FUZZ
@given(st.data())
def test_gguf_truncations_and_insertions(gguf_bytes, data):
    cut = data.draw(st.integers(0, len(gguf_bytes)))
    insert = data.draw(st.binary(max_size=16))
    _check_gguf(gguf_bytes[:cut] + insert + gguf_bytes[cut + data.draw(st.integers(0, 16)) :])


@FUZZ
@given(st.data())
def test_gguf_numbers(gguf_bytes, data):
    """Overwrite one aligned 4- or 8-byte field of the header with an extreme or random number."""
    header = _data_start(gguf_bytes)
    width = data.draw(st.sampled_from([4, 8]))
    pos = data.draw(st.integers(0, header - width))
    top = 2 ** (width * 8) - 1
    value = data.draw(st.sampled_from([0, 1, top, top // 2 + 1]) | st.integers(0, top))
    fmt = "<I" if width == 4 else "<Q"
    _check_gguf(gguf_bytes[:pos] + struct.pack(fmt, value) + gguf_bytes[pos + width :])


# The GGUF patcher ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patch_source(tmp_path_factory) -> tuple[bytes, Circuit]:
    from gguf import GGMLQuantizationType as Q
    from test_gguf_patch import circuit_for, write_model

    path = write_model(tmp_path_factory.mktemp("patch") / "q4.gguf", Q.Q4_0)
    return _Bytes(path.read_bytes()), circuit_for(path, neurons=[(0, 1), (1, 63)])


def _check_patch(data: bytes, circuit: Circuit) -> None:
    """patch_gguf on a damaged file raises only CnaExportError and then leaves no output or temporary."""
    from cna_export.gguf.patch import patch_gguf

    folder = _workdir()
    src, out = folder / "in.gguf", folder / "out.gguf"
    src.write_bytes(data)
    try:
        patch_gguf(src, circuit, out)
    except CnaExportError:
        assert sorted(p.name for p in folder.iterdir()) == ["in.gguf"]
    assert src.read_bytes() == data


PATCH_FUZZ = settings(max_examples=max(1, EXAMPLES // 3), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PATCH_FUZZ
@given(st.data())
def test_patcher_byte_flips(patch_source, data):
    raw, circuit = patch_source
    header = _data_start(raw)
    flips = data.draw(st.lists(st.tuples(st.integers(0, header - 1), st.integers(0, 255)), min_size=1, max_size=3))
    _check_patch(_flip(raw, flips), circuit)


@PATCH_FUZZ
@given(st.data())
def test_patcher_truncations(patch_source, data):
    raw, circuit = patch_source
    _check_patch(raw[: data.draw(st.integers(0, len(raw) - 1))], circuit)


# Recipes and prompt files ----------------------------------------------------------------------------------------

RECIPE_TEXT = (Path(__file__).resolve().parent.parent / "recipes" / "refusal-ablate.yaml").read_text()


def _check_recipe(text: str | bytes) -> None:
    """load_recipe and the prompt sets it names raise only RecipeError (or another CnaExportError)."""
    from cna_export.circuit.recipe import load_prompts, load_recipe

    folder = _workdir()
    path = folder / "r.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    try:
        recipe, base = load_recipe(path)
        recipe.selection()
        for ref in (recipe.positive, recipe.negative, recipe.universal.prompts):
            load_prompts(ref, base)
    except CnaExportError:
        pass


@FUZZ
@given(st.lists(st.integers(0, 50), min_size=1, max_size=3), JSON)
def test_recipe_mutations(path, value):
    import yaml

    data = yaml.safe_load(RECIPE_TEXT)
    _check_recipe(yaml.safe_dump(_mutate_json(data, path, value)))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(RECIPE_TEXT) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_recipe_byte_flips(flips):
    _check_recipe(_flip(RECIPE_TEXT.encode(), flips))


@FUZZ
@given(st.sampled_from([".txt", ".json", ".jsonl", ".yaml"]), st.binary(max_size=64) | JSON.map(json.dumps))
def test_prompt_files(suffix, content):
    from cna_export.circuit.recipe import load_prompts

    path = _workdir() / f"p{suffix}"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    try:
        prompts = load_prompts(path.name, path.parent)
    except CnaExportError:
        return
    assert prompts and all(isinstance(p, str) and p.strip() for p in prompts)
