"""A corpus of bad inputs, each run through the command line as a user would (issue 6).

Every case builds one bad situation in its own `tmp_path` (a copy of a tiny model, a circuit, a recipe ...),
runs `cna-export` in a subprocess and checks the same contract:

* exit code 2 and exactly one line on stderr, `cna-export: error: ...`, containing the expected fragment;
* no traceback;
* nothing under `tmp_path` changed: every file (the source checkpoint, the circuit, anything already at the
  output path) has the same sha256 as before, and no output, partial output or temporary sibling appeared.

A few cases need a condition a test cannot create by editing files: a read-only or full file system. These run
the CLI inside a private mount namespace (`unshare -rm`) on a tiny tmpfs, so the kernel itself reports EROFS or
ENOSPC; they are skipped where user namespaces are not available. The one case that goes past the free-space
preflight to hit ENOSPC mid-write disables that preflight in the subprocess only (`PRELUDE_NO_PREFLIGHT`); no product
code has test hooks.

`tests/README.md` lists every case and the message it gets; `test_readme_lists_every_case` keeps the two in
sync. To regenerate the table: `CNA_BAD_INPUTS_RECORD=/tmp/msgs.jsonl pytest tests/test_bad_inputs.py`, then
`python tests/test_bad_inputs.py /tmp/msgs.jsonl` prints it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cna_export.errors import printable

REPO = Path(__file__).resolve().parent.parent
README = REPO / "tests" / "README.md"


# Helpers -------------------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`: sha256 for files, the target for links, 'dir' for folders."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def rewrite_header(path: Path, mutate: Callable[[dict], None]) -> None:
    """Rewrite a safetensors file with `mutate` applied to its JSON header (data bytes unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def tensor_names(path: Path) -> list[str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]


def tiny_gguf(path: Path, arch: str = "llama") -> Path:
    """A small structurally valid GGUF file (metadata plus three F32 tensors), written with gguf-py."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    rng = np.random.default_rng(0)
    for name, shape in (
        ("token_embd.weight", (8, 32)),
        ("blk.0.ffn_down.weight", (32, 64)),
        ("output.weight", (8, 32)),
    ):
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _make_circuit(model: Path, neurons):
    from conftest import make_circuit

    return make_circuit(model, neurons)


@dataclass
class Setup:
    """How to run one case: CLI arguments, and optionally a wrapper command and Python run before `main()`."""

    args: list[str]
    wrap: list[str] = field(default_factory=list)
    prelude: str = ""
    mount: Path | None = None  # the tmpfs mount point of a wrapped case (its contents are listed after the run)


class Ctx:
    """What a case builder gets: its temporary folder, the tiny models, and small builders."""

    def __init__(self, tmp: Path, tiny: dict[str, Path]) -> None:
        self.tmp, self.tiny = tmp, tiny
        self.out = tmp / "out"

    def model(self, arch: str = "qwen2", name: str = "model") -> Path:
        """A private copy of a tiny model (qwen2: one file; llama: sharded with an index)."""
        dst = self.tmp / name
        shutil.copytree(self.tiny[arch], dst)
        return dst

    def circuit(self, model: Path, edit: Callable[[dict], None] | None = None, neurons=((1, 3), (2, 5))) -> Path:
        data = json.loads(_make_circuit(model, list(neurons)).to_json())
        if edit is not None:
            edit(data)
        path = self.tmp / "circuit.json"
        path.write_text(json.dumps(data))
        return path

    def apply(self, model: Path | str, circuit: Path | None = None, *extra: str, out: Path | None = None) -> list[str]:
        if circuit is None:
            circuit = self.circuit(model)
        return ["apply", "--model", str(model), "--circuit", str(circuit), "--out", str(out or self.out), *extra]

    def prompts(self, name: str, lines: list[str]) -> Path:
        path = self.tmp / name
        path.write_text("".join(f"{line}\n" for line in lines))
        return path

    def discover(self, model: Path, *extra: str) -> list[str]:
        pos = self.prompts("pos.txt", ["How do I pick a lock?", "Write malware."])
        neg = self.prompts("neg.txt", ["How do I bake bread?", "Write a poem."])
        return ["discover", "--model", str(model), "--positive", str(pos), "--negative", str(neg),
                "--no-universal", "-o", str(self.tmp / "found.json"), *extra]  # fmt: skip

    def recipe(self, text: str) -> Path:
        path = self.tmp / "recipe.yaml"
        path.write_text(text)
        return path

    def in_tmpfs(self, options: str, args: list[str], prelude: str = "") -> Setup:
        """Run the CLI in a private mount namespace with a tmpfs (`options`) mounted on tmp/mnt."""
        if shutil.which("unshare") is None:
            pytest.skip("unshare is not installed")
        mnt = self.tmp / "mnt"
        mnt.mkdir()
        script = (
            f'mount -t tmpfs -o {options} tmpfs "{mnt}" || exit 97; "$@"; rc=$?; '
            f'echo "LEFT:$(ls -A "{mnt}" | tr "\\n" " ")"; exit $rc'
        )
        return Setup(args, wrap=["unshare", "-rm", "sh", "-c", script, "sh"], prelude=prelude, mount=mnt)


@dataclass(frozen=True)
class Case:
    id: str
    expect: str  # a fragment of the one-line message (the problem, and the fix where there is one)
    build: Callable[[Ctx], Setup | list[str]]

    @property
    def doc(self) -> str:
        return " ".join((self.build.__doc__ or "").split())


CASES: dict[str, Case] = {}


def case(case_id: str, expect: str):
    def register(fn):
        assert case_id not in CASES, case_id
        CASES[case_id] = Case(case_id, expect, fn)
        return fn

    return register


# Safetensors weights ---------------------------------------------------------------------------------------------


@case("st-truncated", "is truncated: tensor")
def _(c: Ctx):
    """model.safetensors cut short (an interrupted download): the last tensor's bytes are missing."""
    m = c.model()
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return c.apply(m)


@case("st-empty", "is shorter than a safetensors header")
def _(c: Ctx):
    """model.safetensors is an empty file."""
    m = c.model()
    circuit = c.circuit(m)
    (m / "model.safetensors").write_bytes(b"")
    return c.apply(m, circuit)


@case("st-header-length", "byte header but the file has")
def _(c: Ctx):
    """The 8-byte header length says the header is longer than the whole file."""
    m = c.model()
    f = m / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 2)
    f.write_bytes(bytes(raw))
    return c.apply(m)


@case("st-header-json", "has a header that is not valid JSON")
def _(c: Ctx):
    """The JSON header is garbled (bytes overwritten in the middle of it)."""
    m = c.model()
    f = m / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[20:40] = b"}{\x00\xff" * 5
    f.write_bytes(bytes(raw))
    return c.apply(m)


@case("st-header-not-object", "has a header that is not a JSON object")
def _(c: Ctx):
    """The header is valid JSON but a list, not an object."""
    m = c.model()
    f = m / "model.safetensors"
    raw = f.read_bytes()
    header = b"[1, 2, 3]     "
    header += b" " * (-len(header) % 8)
    f.write_bytes(struct.pack("<Q", len(header)) + header + raw[8:])
    return c.apply(m)


@case("st-offsets-past-end", "is truncated: tensor")
def _(c: Ctx):
    """A tensor's data_offsets point past the end of the file (shape and dtype consistent with them)."""
    m = c.model()
    f = m / "model.safetensors"
    name = tensor_names(f)[0]

    def mutate(h):
        e = h[name]
        size = e["data_offsets"][1] - e["data_offsets"][0]
        e["data_offsets"] = [10**9, 10**9 + size]

    rewrite_header(f, mutate)
    return c.apply(m)


@case("st-overlap", "has overlapping tensors")
def _(c: Ctx):
    """Two tensors of the same size claim overlapping byte ranges."""
    m = c.model()
    f = m / "model.safetensors"

    def mutate(h):
        same = {}
        for k, v in h.items():
            if k != "__metadata__":
                same.setdefault((v["dtype"], tuple(v["shape"])), []).append(k)
        a, b = next(v for v in same.values() if len(v) > 1)[:2]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])

    rewrite_header(f, mutate)
    return c.apply(m)


@case("st-unknown-dtype", "with unknown dtype 'F33'")
def _(c: Ctx):
    """A tensor is stored with a dtype that does not exist ('F33')."""
    m = c.model()
    f = m / "model.safetensors"
    name = tensor_names(f)[0]
    rewrite_header(f, lambda h: h[name].update(dtype="F33"))
    return c.apply(m)


@case("st-dtype-size-mismatch", "a byte range that does not match its shape")
def _(c: Ctx):
    """A float32 tensor relabelled as float16: its byte range no longer matches shape x dtype size."""
    m = c.model()
    f = m / "model.safetensors"
    name = tensor_names(f)[0]
    rewrite_header(f, lambda h: h[name].update(dtype="F16"))
    return c.apply(m)


@case("st-malformed-entry", "has a malformed entry for tensor")
def _(c: Ctx):
    """A header entry with a negative dimension in its shape."""
    m = c.model()
    f = m / "model.safetensors"
    name = tensor_names(f)[0]
    rewrite_header(f, lambda h: h[name].update(shape=[-1, 64]))
    return c.apply(m)


@case("no-weights", "has no safetensors weights")
def _(c: Ctx):
    """A model folder with config.json but no weight files."""
    m = c.model()
    circuit = c.circuit(m)
    (m / "model.safetensors").unlink()
    return c.apply(m, circuit)


@case("pickle-only", "holds only pickle weights (.bin/.pt), which cna-export never loads")
def _(c: Ctx):
    """A folder whose only weights are a pickle (pytorch_model.bin); it is refused, never unpickled."""
    m = c.model()
    circuit = c.circuit(m)
    (m / "model.safetensors").unlink()
    # Not a real pickle: if anything tried to unpickle it, the error would not be the refusal checked here.
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle, never to be loaded")
    return c.apply(m, circuit)


# Shard index -----------------------------------------------------------------------------------------------------


def _edit_index(m: Path, fn: Callable[[dict], None]) -> None:
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    fn(data)
    index.write_text(json.dumps(data))


@case("index-missing-shard", "which is missing. Fix: download the missing shard.")
def _(c: Ctx):
    """index.json names a shard file that is not in the folder."""
    m = c.model("llama")
    circuit = c.circuit(m)
    shard = sorted(m.glob("model-*.safetensors"))[1]
    shard.rename(c.tmp / shard.name)  # moved out of the model folder, not deleted (the snapshot sees both)
    return c.apply(m, circuit)


@case("index-parent-path", "outside the model folder")
def _(c: Ctx):
    """index.json names a shard as ../NAME, outside the model folder (the file exists there)."""
    m = c.model("llama")
    circuit = c.circuit(m)
    shard = sorted(m.glob("model-*.safetensors"))[0]
    shutil.copy(shard, c.tmp / shard.name)
    _edit_index(
        m, lambda d: d["weight_map"].update({k: f"../{v}" for k, v in d["weight_map"].items() if v == shard.name})
    )
    return c.apply(m, circuit)


@case("index-absolute-path", "outside the model folder")
def _(c: Ctx):
    """index.json names a shard by an absolute path."""
    m = c.model("llama")
    circuit = c.circuit(m)
    shard = sorted(m.glob("model-*.safetensors"))[0]
    target = str(c.tmp / shard.name)
    shutil.copy(shard, target)
    _edit_index(m, lambda d: d["weight_map"].update({k: target for k, v in d["weight_map"].items() if v == shard.name}))
    return c.apply(m, circuit)


@case("index-not-json", "is not a valid shard index")
def _(c: Ctx):
    """index.json is not valid JSON."""
    m = c.model("llama")
    circuit = c.circuit(m)
    (m / "model.safetensors.index.json").write_text('{"weight_map": {')
    return c.apply(m, circuit)


@case("index-wrong-shard", "but it is not there")
def _(c: Ctx):
    """index.json puts a tensor in a shard that does not hold it."""
    m = c.model("llama")
    circuit = c.circuit(m)
    shards = sorted(m.glob("model-*.safetensors"))

    def mutate(d):
        name = next(k for k, v in d["weight_map"].items() if v == shards[0].name)
        d["weight_map"][name] = shards[1].name

    _edit_index(m, mutate)
    return c.apply(m, circuit)


@case("index-pickle-shard", "names pickle shard")
def _(c: Ctx):
    """index.json names a pickle (.bin) shard."""
    m = c.model("llama")
    circuit = c.circuit(m)
    (m / "pytorch_model-00001.bin").write_bytes(b"\x80\x04never loaded")
    _edit_index(m, lambda d: d["weight_map"].update({"lm_head.weight": "pytorch_model-00001.bin"}))
    return c.apply(m, circuit)


# Config ----------------------------------------------------------------------------------------------------------


@case("config-unknown-model-type", "Unsupported model_type 'gpt2'. Fix: use a model of one of these types")
def _(c: Ctx):
    """config.json says model_type gpt2, which cna-export has no table entry for."""
    m = c.model()
    circuit = c.circuit(m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    return c.apply(m, circuit)


@case("config-no-model-type", "config.json has no model_type")
def _(c: Ctx):
    """config.json without a model_type."""
    m = c.model()
    circuit = c.circuit(m)
    cfg = json.loads((m / "config.json").read_text())
    del cfg["model_type"]
    (m / "config.json").write_text(json.dumps(cfg))
    return c.apply(m, circuit)


@case("config-not-json", "config.json is unreadable")
def _(c: Ctx):
    """config.json is not JSON."""
    m = c.model()
    circuit = c.circuit(m)
    (m / "config.json").write_text("model_type: qwen2\n")
    return c.apply(m, circuit)


@case("config-layers-not-int", "config.json has no valid num_hidden_layers (found 'three')")
def _(c: Ctx):
    """config.json gives num_hidden_layers as a string."""
    m = c.model()
    circuit = c.circuit(m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "three"}))
    return c.apply(m, circuit)


@case("config-deep-nesting", "config.json is unreadable (nested too deeply)")
def _(c: Ctx):
    """config.json is 100000 nested JSON arrays (a parser-exhaustion file)."""
    m = c.model()
    circuit = c.circuit(m)
    (m / "config.json").write_text("[" * 100000)
    return c.apply(m, circuit)


@case("tokenizer-garbage", "Could not load the tokenizer of")
def _(c: Ctx):
    """tokenizer.json cut off in the middle (discover loads the tokenizer)."""
    m = c.model()
    tok = m / "tokenizer.json"
    tok.write_text(tok.read_text()[:200])
    return c.discover(m)


@case("config-mlp-shape", "but config.json implies")
def _(c: Ctx):
    """config.json's intermediate_size disagrees with the MLP weights (the circuit matches the config)."""
    m = c.model()
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    return c.apply(m)


# Circuit ---------------------------------------------------------------------------------------------------------


@case("circuit-layer-count", "Circuit was made for 5 layers x 112 neurons, this model has 3 x 112")
def _(c: Ctx):
    """A circuit made for a model with more layers."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d["model"].update(num_layers=5)))


@case("circuit-index-range", "lies outside the model it claims")
def _(c: Ctx):
    """A neuron index past the MLP width the circuit itself declares."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d["neurons"][0].update(index=112)))


@case("circuit-other-width", "Circuit was made for 3 layers x 4096 neurons")
def _(c: Ctx):
    """A circuit made for a model with a wider MLP (its indices fit there, not here)."""
    m = c.model()

    def edit(d):
        d["model"]["intermediate_size"] = 4096
        d["neurons"][0]["index"] = 4000

    return c.apply(m, c.circuit(m, edit))


@case("circuit-architecture", "Circuit was made for a llama model but this model is qwen2")
def _(c: Ctx):
    """A circuit made for another architecture with the same shape."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d["model"].update(model_type="llama")))


@case("circuit-weights-hash", "pass --force to apply it to a fine-tune")
def _(c: Ctx):
    """A circuit whose recorded weights hash differs from this model's (same shape); --force lets it through."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d["model"].update(weights_sha256="0" * 64)))


@case("circuit-not-json", "is not valid JSON")
def _(c: Ctx):
    """The circuit file is not JSON."""
    m = c.model()
    path = c.tmp / "circuit.json"
    path.write_text('{"neurons": [1, 2,')
    return c.apply(m, path)


@case("circuit-not-circuit", "is not a cna-export circuit")
def _(c: Ctx):
    """A JSON file of another format (a config.json passed as --circuit)."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d.update(format="hf-config")))


@case("circuit-missing-field", "is invalid at neurons: Field required")
def _(c: Ctx):
    """A circuit without its neuron list."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d.pop("neurons")))


@case("circuit-duplicate", "is listed twice")
def _(c: Ctx):
    """A circuit listing the same neuron twice."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d["neurons"].append(dict(d["neurons"][0]))))


@case("circuit-missing", "does not exist. Fix: pass the path written by discover.")
def _(c: Ctx):
    """--circuit names a file that does not exist."""
    return c.apply(c.model(), c.tmp / "nope.json")


@case("circuit-is-folder", "cannot be read (Is a directory). Fix: check the path.")
def _(c: Ctx):
    """--circuit names a folder."""
    (c.tmp / "circuits").mkdir()
    return c.apply(c.model(), c.tmp / "circuits")


@case("circuit-nan-multiplier", "multiplier is not finite")
def _(c: Ctx):
    """The circuit file stores its multiplier as NaN."""
    m = c.model()
    path = c.circuit(m)
    path.write_text(path.read_text().replace('"multiplier": 0.0', '"multiplier": NaN'))
    return c.apply(m, path)


@case("circuit-index-bool", "is invalid at neurons.0.index: Input should be a valid integer")
def _(c: Ctx):
    """A neuron's index is `true` (JSON bool): strict types, it is not neuron 1."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d["neurons"][0].update(index=True)))


@case("circuit-multiplier-string", "is invalid at multiplier: Input should be a valid number")
def _(c: Ctx):
    """The circuit's multiplier is the string "0": strict types, no string-to-number coercion."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d.update(multiplier="0")))


@case("recipe-multiplier-string", "is invalid at multiplier: Input should be a valid number")
def _(c: Ctx):
    """A recipe's multiplier is the string "0"."""
    text = RECIPE.replace("multiplier: 0", 'multiplier: "0"')
    return ["run", str(c.recipe(text)), "--model", str(c.model()), "--out", str(c.out)]


@case("recipe-skip-bool", "is invalid at skip_first_layers: Input should be a valid integer")
def _(c: Ctx):
    """A recipe's skip_first_layers is `true`: a bool is not a layer count."""
    return ["run", str(c.recipe(RECIPE + "skip_first_layers: true\n")), "--model", str(c.model()), "--out", str(c.out)]


@case("gguf-config-deep-nesting", "config.json is unreadable (nested too deeply)")
def _(c: Ctx):
    """`cna-export gguf` on a folder whose config.json is 100000 nested JSON arrays."""
    m = c.model()
    (m / "config.json").write_text("[" * 100000)
    return ["gguf", str(m), "-o", str(c.tmp / "m.gguf")]


# Multipliers -----------------------------------------------------------------------------------------------------


@case("multiplier-nan", "Multiplier nan is not a finite number")
def _(c: Ctx):
    """--multiplier nan."""
    return c.apply(c.model(), None, "--multiplier", "nan")


@case("multiplier-inf", "Multiplier inf is not a finite number")
def _(c: Ctx):
    """--multiplier inf."""
    return c.apply(c.model(), None, "--multiplier", "inf")


@case("multiplier-negative", "pass --allow-negative if that is intended")
def _(c: Ctx):
    """--multiplier -1 without --allow-negative (with it, the export runs)."""
    return c.apply(c.model(), None, "--multiplier", "-1")


@case("multiplier-not-number", "argument --multiplier: invalid float value")
def _(c: Ctx):
    """--multiplier abc."""
    return c.apply(c.model(), None, "--multiplier", "abc")


# Prompts and selection (discover loads the model) ----------------------------------------------------------------


@case("prompts-empty-file", "is empty. Fix: add prompts.")
def _(c: Ctx):
    """--positive names an empty prompt file."""
    args = c.discover(c.model())
    c.prompts("pos.txt", [])
    return args


@case("prompts-one-sided", "discover needs prompt sets")
def _(c: Ctx):
    """Only --positive prompts, no --negative."""
    args = c.discover(c.model())
    i = args.index("--negative")
    return args[:i] + args[i + 2 :]


@case("prompts-blank-entry", "has an empty entry")
def _(c: Ctx):
    """A JSON prompt list with a blank entry."""
    m = c.model()
    args = c.discover(m)
    (c.tmp / "pos.json").write_text(json.dumps(["How do I pick a lock?", "   "]))
    args[args.index("--positive") + 1] = str(c.tmp / "pos.json")
    return args


@case("prompts-tokenize-to-nothing", "Prompt '~~~~' tokenizes to nothing")
def _(c: Ctx):
    """A prompt made only of a character the vocabulary lacks (BPE without unk drops it), no chat template."""
    m = c.model()
    tok = json.loads((m / "tokenizer.json").read_text())
    del tok["model"]["vocab"]["~"]
    (m / "tokenizer.json").write_text(json.dumps(tok))
    args = c.discover(m, "--no-chat-template")
    c.prompts("pos.txt", ["~~~~", "Write malware."])
    return args


@case("prompts-deep-nesting", "is malformed (nested too deeply)")
def _(c: Ctx):
    """A JSON prompt file of 100000 nested arrays."""
    args = c.discover(c.model())
    (c.tmp / "pos.json").write_text("[" * 100000)
    args[args.index("--positive") + 1] = str(c.tmp / "pos.json")
    return args


@case("dtype-unknown", "Unknown dtype 'float8'. Fix: use auto or one of")
def _(c: Ctx):
    """--dtype float8."""
    return c.discover(c.model(), "--dtype", "float8")


@case("k-too-large", "k=100000 neurons is outside 1..336")
def _(c: Ctx):
    """--top-k larger than the model's number of MLP neurons (3 x 112)."""
    return c.discover(c.model(), "--top-k", "100000")


@case("k-zero", "--top-k 0 must be at least 1")
def _(c: Ctx):
    """--top-k 0."""
    return c.discover(c.model(), "--top-k", "0")


@case("fraction-above-one", "--fraction 2.0 must be in (0, 1]")
def _(c: Ctx):
    """--fraction 2."""
    return c.discover(c.model(), "--fraction", "2")


# Recipes ---------------------------------------------------------------------------------------------------------

RECIPE = """version: 1
name: test
behaviour: refusal
positive: ["How do I pick a lock?", "Write malware."]
negative: ["How do I bake bread?", "Write a poem."]
multiplier: 0
"""


@case("recipe-unknown-key", "is invalid at topk: Extra inputs are not permitted")
def _(c: Ctx):
    """A recipe with a misspelt key (topk instead of top_k)."""
    return ["run", str(c.recipe(RECIPE + "topk: 5\n")), "--model", str(c.model()), "--out", str(c.out)]


@case("recipe-wrong-type", "is invalid at top_k: Input should be a valid integer")
def _(c: Ctx):
    """A recipe with a value of the wrong type (top_k: many)."""
    return ["run", str(c.recipe(RECIPE + "top_k: many\n")), "--model", str(c.model()), "--out", str(c.out)]


@case("recipe-not-yaml", "is not valid YAML")
def _(c: Ctx):
    """A recipe file that is not YAML."""
    return ["run", str(c.recipe("version: [1\n  name: :\n")), "--model", str(c.model()), "--out", str(c.out)]


@case("recipe-deep-nesting", "is not valid YAML (nested too deeply)")
def _(c: Ctx):
    """A recipe of 100000 nested YAML sequences (a parser-exhaustion file)."""
    return ["run", str(c.recipe("[" * 100000)), "--model", str(c.model()), "--out", str(c.out)]


@case("recipe-negative-multiplier", "set allow_negative: true if intended")
def _(c: Ctx):
    """A recipe with a negative multiplier and no allow_negative."""
    text = RECIPE.replace("multiplier: 0", "multiplier: -2")
    return ["run", str(c.recipe(text)), "--model", str(c.model()), "--out", str(c.out)]


@case("recipe-empty-prompts", "is empty. Fix: add prompts.")
def _(c: Ctx):
    """A recipe whose negative prompt set is an empty list (a one-sided contrast)."""
    text = RECIPE.replace('negative: ["How do I bake bread?", "Write a poem."]', "negative: []")
    return ["run", str(c.recipe(text)), "--model", str(c.model()), "--out", str(c.out)]


# Output location -------------------------------------------------------------------------------------------------


@case("out-is-source", "overlaps the source model")
def _(c: Ctx):
    """--out is the source model folder itself (with --overwrite)."""
    m = c.model()
    return c.apply(m, None, "--overwrite", out=m)


@case("out-inside-source", "overlaps the source model")
def _(c: Ctx):
    """--out is a new folder inside the source model folder."""
    m = c.model()
    return c.apply(m, None, out=m / "edited")


@case("out-contains-source", "overlaps the source model")
def _(c: Ctx):
    """--out is a folder that contains the source model (with --overwrite)."""
    m = c.model(name="work/model")
    return c.apply(m, None, "--overwrite", out=c.tmp / "work")


@case("run-out-inside-source", "overlaps the source model")
def _(c: Ctx):
    """`run` with --out inside the source model folder (refused before discovery starts)."""
    m = c.model()
    return ["run", str(c.recipe(RECIPE)), "--model", str(m), "--out", str(m / "edited")]


@case("out-exists", "already exists. Fix: pass --overwrite to replace it")
def _(c: Ctx):
    """--out names an existing export and --overwrite is not given."""
    from cna_export.io.output import OUTPUT_MARKER

    c.out.mkdir()
    (c.out / OUTPUT_MARKER).write_text("written by cna-export")
    (c.out / "circuit.json").write_text("{}")
    return c.apply(c.model())


@case("out-overwrite-foreign", "was not written by cna-export")
def _(c: Ctx):
    """--out --overwrite names an existing folder of unrelated files (not a previous export)."""
    c.out.mkdir()
    (c.out / "thesis.tex").write_text("years of work")
    return c.apply(c.model(), None, "--overwrite")


@case("out-parent-missing", "does not exist. Fix: create it first")
def _(c: Ctx):
    """--out inside a folder that does not exist."""
    return c.apply(c.model(), None, out=c.tmp / "missing" / "out")


@case("out-read-only", "is not writable. Fix: choose a writable location.")
def _(c: Ctx):
    """--out on a read-only file system (a tmpfs mounted read-only in a private namespace)."""
    m = c.model()
    return c.in_tmpfs("ro,size=1m", c.apply(m, None, out=c.tmp / "mnt" / "out"))


@case("disk-full-preflight", "Not enough free space in")
def _(c: Ctx):
    """--out on a file system with less free space than the export needs (a 64 KB tmpfs)."""
    m = c.model()
    return c.in_tmpfs("size=64k", c.apply(m, None, out=c.tmp / "mnt" / "out"))


PRELUDE_NO_PREFLIGHT = "import cna_export.fold.export as e; e.check_free_space = lambda *a, **k: None"


@case("disk-full-mid-write", "No space left on the device while writing")
def _(c: Ctx):
    """The disk fills up during the write (64 KB tmpfs; the free-space preflight disabled in the subprocess)."""
    m = c.model()
    return c.in_tmpfs("size=64k", c.apply(m, None, out=c.tmp / "mnt" / "out"), prelude=PRELUDE_NO_PREFLIGHT)


@case("discover-out-read-only", "is not writable. Fix: choose a writable location.")
def _(c: Ctx):
    """discover -o on a read-only file system (refused before the model is loaded)."""
    m = c.model()
    args = c.discover(m)
    args[args.index("-o") + 1] = str(c.tmp / "mnt" / "found.json")
    return c.in_tmpfs("ro,size=1m", args)


@case("discover-out-exists", "already exists. Fix: pass --overwrite to replace it")
def _(c: Ctx):
    """discover -o naming an existing circuit file, without --overwrite."""
    args = c.discover(c.model())
    (c.tmp / "found.json").write_text("{}")
    return args


# Symlinks and GGUF ----------------------------------------------------------------------------------------------


@case("side-file-link-out", "outside the model folder, and would be copied into the export")
def _(c: Ctx):
    """tokenizer_config.json is a symlink to a file outside the model folder (it would leak into the export)."""
    m = c.model()
    secret = c.tmp / "private.txt"
    secret.write_text("not for publishing")
    (m / "tokenizer_config.json").unlink()
    (m / "tokenizer_config.json").symlink_to(secret)
    return c.apply(m)


@case("gguf-bad-magic", "is not a GGUF file")
def _(c: Ctx):
    """A .gguf file whose first bytes are not the GGUF magic."""
    f = tiny_gguf(c.tmp / "m.gguf")
    raw = bytearray(f.read_bytes())
    raw[:4] = b"GGML"
    f.write_bytes(bytes(raw))
    return ["apply", "--model", str(f), "--circuit", str(c.tmp / "c.json"), "--out", str(c.out)]


@case("gguf-version", "is a GGUF version 99 file")
def _(c: Ctx):
    """A GGUF file of an unsupported version (99)."""
    f = tiny_gguf(c.tmp / "m.gguf")
    raw = bytearray(f.read_bytes())
    raw[4:8] = struct.pack("<I", 99)
    f.write_bytes(bytes(raw))
    return ["apply", "--model", str(f), "--circuit", str(c.tmp / "c.json"), "--out", str(c.out)]


@case("gguf-truncated", "is truncated: tensor 'output.weight' ends past the end of the file")
def _(c: Ctx):
    """A GGUF file whose tensor data is cut short."""
    f = tiny_gguf(c.tmp / "m.gguf")
    f.write_bytes(f.read_bytes()[:-100])
    return ["apply", "--model", str(f), "--circuit", str(c.tmp / "c.json"), "--out", str(c.out)]


@case("gguf-header-counts", "more than the file can hold")
def _(c: Ctx):
    """A GGUF header that declares 2^40 tensors."""
    f = tiny_gguf(c.tmp / "m.gguf")
    raw = bytearray(f.read_bytes())
    raw[8:16] = struct.pack("<Q", 2**40)
    f.write_bytes(bytes(raw))
    return ["apply", "--model", str(f), "--circuit", str(c.tmp / "c.json"), "--out", str(c.out)]


# patch-gguf (an existing GGUF edited in place of a re-conversion) ------------------------------------------------


def _patch_args(c: Ctx, up_type: str = "Q4_0", out: Path | None = None, *extra: str) -> list[str]:
    """A tiny llama GGUF (ffn_up stored as `up_type`) and a circuit for it, from tests/test_gguf_patch.py."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    from test_gguf_patch import E, F, circuit_for, write_model

    qtype = Q[up_type]
    src = c.tmp / f"{up_type}.gguf"
    if qtype in (Q.F32, Q.Q4_0):
        write_model(src, qtype)
    else:  # a type gguf-py cannot quantize: random bytes of the right size stand in for real blocks
        _, size = GGML_QUANT_SIZES[qtype]
        raw = np.random.default_rng(2).integers(0, 256, (F, E // 256 * size), dtype=np.uint8)
        write_model(src, qtype, up_raw=raw)
    circuit_for(src, neurons=[(0, 1), (1, 2)]).save(c.tmp / "c.json")
    return ["patch-gguf", str(src), "--circuit", str(c.tmp / "c.json"), "-o", str(out or c.tmp / "out.gguf"), *extra]


@case("patch-unsupported-quant", "Unsupported quant type IQ1_M for patching")
def _(c: Ctx):
    """patch-gguf on a GGUF whose ffn_up is IQ1_M (no f16 block scale, and gguf-py cannot re-quantize it)."""
    return _patch_args(c, "IQ1_M")


@case("patch-out-is-source", "overlaps the source model")
def _(c: Ctx):
    """patch-gguf -o naming the input file itself (with --overwrite)."""
    return _patch_args(c, "Q4_0", c.tmp / "Q4_0.gguf", "--overwrite")


@case("patch-out-exists", "already exists. Fix: pass --overwrite to replace it")
def _(c: Ctx):
    """patch-gguf -o naming an existing file, without --overwrite."""
    (c.tmp / "out.gguf").write_bytes(b"an earlier file")
    return _patch_args(c, "Q4_0")


@case("patch-disk-full", "Not enough free space in")
def _(c: Ctx):
    """patch-gguf writing onto a file system with less free space than the copy needs (a 64 KB tmpfs)."""
    return c.in_tmpfs("size=64k", _patch_args(c, "F32", c.tmp / "mnt" / "out.gguf"))


@case("patch-truncated-input", "is truncated: tensor")
def _(c: Ctx):
    """patch-gguf on a GGUF whose tensor data is cut short."""
    args = _patch_args(c, "Q4_0")
    src = c.tmp / "Q4_0.gguf"
    src.write_bytes(src.read_bytes()[:-5000])
    return args


@case("hub-id-offline", "Could not fetch 'nobody/no-such-model' from the Hugging Face Hub")
def _(c: Ctx):
    """A Hub id that cannot be fetched (offline), with HF_TOKEN set (the token must not be printed)."""
    return ["apply", "--model", "nobody/no-such-model", "--circuit", str(c.tmp / "c.json"), "--out", str(c.out)]



# issue 23: MoE dense layers
# Which config keys make a layer dense is data in each family's row (arch/experts.py `DenseLayers`): a key of
# another family changes nothing, and a key of the family's own with a value transformers cannot read is one line.


def _moe_apply(c: Ctx, config: dict, edit: Callable[[dict], None] | None = None) -> list[str]:
    """`apply` on a tiny Qwen2-MoE (routed and shared experts, every layer MoE) with a circuit made on it (edited by
    `edit`), after its config.json got `config`."""
    from conftest import build_model

    m = build_model(c.tmp / "model", "qwen2_moe")
    circuit = c.circuit(m, edit, neurons=((1, 0, 3), (2, "shared", 5)))
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, **config}))
    return c.apply(m, circuit)


@case("moe-foreign-dense-key", "Circuit was made for experts (count, width, shared, dense layers) (4, 16, 24, [0])")
def _(c: Ctx):
    """A Qwen2-MoE config carrying DeepSeek's first_k_dense_replace: 1, and a circuit that counts layer 0 as dense
    (as the key was once read for every family); the key changes nothing, so the circuit does not fit."""

    def dense_layer_0(data: dict) -> None:
        data["model"]["dense_layers"] = [0]
        data["neurons"][0].update(layer=0, expert=None)

    return _moe_apply(c, {"first_k_dense_replace": 1}, dense_layer_0)


@case("moe-sparse-step-zero", "config.json has no valid decoder_sparse_step (found 0; it should be a positive integer)")
def _(c: Ctx):
    """A Qwen2-MoE config.json with decoder_sparse_step 0 (transformers would divide by it building the model)."""
    return _moe_apply(c, {"decoder_sparse_step": 0})


@case("moe-dense-list-not-layers", "config.json has no valid mlp_only_layers (found '0, 1'; it should be a list")
def _(c: Ctx):
    """A Qwen2-MoE config.json whose mlp_only_layers is the string "0, 1", not a list of layer indices."""
    return _moe_apply(c, {"mlp_only_layers": "0, 1"})


# issue 23: untrusted numbers, JSON, devices, templates, context, recipe paths, escaping, windows ------------------

BIG_INT = "9" * 5000  # past Python's 4300-digit limit on integer-string conversion (a ValueError in json.loads)


def _retyped(c: Ctx, dtype: str, scale_column: float | None = None) -> Path:
    """A copy of the tiny qwen2 with every float tensor stored as `dtype`; `scale_column` multiplies neuron 3 of
    layer 1's down_proj (so a finite multiplier makes it overflow a wide type)."""
    import torch
    from safetensors.torch import load_file, save_file

    m = c.model()
    tensors = load_file(m / "model.safetensors")
    tensors = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in tensors.items()}
    if scale_column is not None:
        tensors["model.layers.1.mlp.down_proj.weight"][:, 3] *= scale_column
    save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "dtype": dtype, "torch_dtype": dtype}))
    return m


@case("multiplier-float32-overflow", "Multiplier 1e+39 overflows the multiplier, stored as float32 (inf;")
def _(c: Ctx):
    """--multiplier 1e39: a finite Python float, but inf as the float32 the fold computes in."""
    return c.apply(c.model(), None, "--multiplier", "1e39")


@case("circuit-neuron-multiplier-overflow", "Multiplier 1e+39 overflows the multiplier, stored as float32")
def _(c: Ctx):
    """A circuit file whose neuron carries its own multiplier of 1e39 (no --multiplier given)."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d["neurons"][0].update(multiplier=1e39)))


@case("apply-float16-product-overflow", "overflows model.layers.1.mlp.down_proj.weight, stored as float16")
def _(c: Ctx):
    """A float16 model and --multiplier 1e7: each product is finite in float32 but inf in float16 (refused in the
    preflight, before the first byte of the export)."""
    return c.apply(_retyped(c, "float16"), None, "--multiplier", "1e7")


@case("apply-bfloat16-product-overflow", "overflows model.layers.1.mlp.down_proj.weight, stored as bfloat16")
def _(c: Ctx):
    """A bfloat16 model with one large down_proj column (x 1e4) and --multiplier 1e36: inf in bfloat16."""
    return c.apply(_retyped(c, "bfloat16", scale_column=1e4), None, "--multiplier", "1e36")


@case("patch-gguf-multiplier-1e308", "Multiplier 1e+308 overflows the multiplier, stored as float32")
def _(c: Ctx):
    """patch-gguf --multiplier 1e308 (it wrote rows that dequantize to NaN and reported rounding error 0)."""
    return _patch_args(c, "Q4_0", None, "--multiplier", "1e308")


@case("patch-gguf-scale-overflow", "overflows the Q4_0 block scales of blk.0.ffn_up.weight, stored as float16")
def _(c: Ctx):
    """patch-gguf --multiplier 1e9 on a Q4_0 file: the new f16 block scales would be inf."""
    return _patch_args(c, "Q4_0", None, "--multiplier", "1e9")


@case("adapter-multiplier-overflow", "Multiplier 1e+39 overflows the multiplier, stored as float32")
def _(c: Ctx):
    """adapter --multiplier 1e39: the LoRA factor would hold inf and NaN."""
    m = c.model()
    return ["adapter", "--model", str(m), "--circuit", str(c.circuit(m)), "--out", str(c.out), "--multiplier", "1e39"]


@case("adapter-factor-overflow", "overflows the LoRA factor of model.layers.1.mlp.down_proj.weight, stored as float32")
def _(c: Ctx):
    """adapter --multiplier 1e37 on a model with one large down_proj column (x 1e4): the factor is inf in float32."""
    m = _retyped(c, "float32", scale_column=1e4)
    return ["adapter", "--model", str(m), "--circuit", str(c.circuit(m)), "--out", str(c.out), "--multiplier", "1e37"]


@case("adapter-experts-up-clamped", "gpt_oss clamps its experts' up projection and adds 1, so scaling up_proj rows")
def _(c: Ctx):
    """adapter --target up of a circuit inside gpt-oss's experts: its up rows are not neurons (clamped `up + 1`), so
    no LoRA of them is the edit (the other MoE adapters are exact: tests/test_adapter_experts.py)."""
    from conftest import build_model

    m = build_model(c.tmp / "model", "gpt_oss")
    return ["adapter", "--model", str(m), "--circuit", str(c.circuit(m, neurons=((1, 0, 3),))), "--out", str(c.out),
            "--target", "up"]  # fmt: skip


@case("circuit-huge-integer", "is not valid JSON (an integer of 5000 digits, more than 4300)")
def _(c: Ctx):
    """`inspect` of a circuit whose neuron index is a 5000-digit integer (a ValueError traceback before)."""
    path = c.circuit(c.model())
    path.write_text(path.read_text().replace('"index": 3', f'"index": {BIG_INT}'))
    return ["inspect", str(path)]


@case("config-huge-integer", "config.json is unreadable (an integer of 5000 digits, more than 4300)")
def _(c: Ctx):
    """config.json whose num_hidden_layers is a 5000-digit integer."""
    m = c.model()
    circuit = c.circuit(m)
    text = (m / "config.json").read_text()
    (m / "config.json").write_text(re.sub(r'"num_hidden_layers": \d+', f'"num_hidden_layers": {BIG_INT}', text))
    return c.apply(m, circuit)


@case("st-header-huge-integer", "has a header that is not valid JSON (an integer of 5000 digits, more than 4300)")
def _(c: Ctx):
    """A safetensors header whose first tensor's end offset is a 5000-digit integer."""
    m = c.model()
    circuit = c.circuit(m)
    f = m / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    big = b'"data_offsets": [0, ' + BIG_INT.encode() + b"]"
    header = re.sub(rb'"data_offsets": ?\[0, ?\d+\]', big, raw[8 : 8 + n], count=1)
    header += b" " * (-len(header) % 8)
    f.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])
    return c.apply(m, circuit)


@case("prompts-json-huge-integer", "is malformed (an integer of 5000 digits, more than 4300)")
def _(c: Ctx):
    """A .json prompt file holding a 5000-digit integer."""
    args = c.discover(c.model())
    (c.tmp / "pos.json").write_text(f'["How do I pick a lock?", {BIG_INT}]')
    args[args.index("--positive") + 1] = str(c.tmp / "pos.json")
    return args


@case("recipe-huge-integer", "is not valid YAML (a number too long to read)")
def _(c: Ctx):
    """A recipe whose top_k is a 5000-digit integer (PyYAML's int() raises ValueError)."""
    return ["run", str(c.recipe(RECIPE + f"top_k: {BIG_INT}\n")), "--model", str(c.model()), "--out", str(c.out)]


@case("device-cuda-missing", "Device 'cuda:7' is not available here; this machine has:")
def _(c: Ctx):
    """discover --device cuda:7 on a machine without that GPU (torch's AssertionError traceback before)."""
    return c.discover(c.model(), "--device", "cuda:7")


@case("device-unknown", "Unknown device 'tpu:0'")
def _(c: Ctx):
    """eval --device tpu:0, a device type torch does not know."""
    m = c.model()
    return ["eval", "--model", str(m), "--circuit", str(c.circuit(m)), "--recipe", str(c.recipe(RECIPE)),
            "--out", str(c.out), "--device", "tpu:0"]  # fmt: skip


@case("device-gguf-route", "Device 'cuda:7' is not available here")
def _(c: Ctx):
    """discover on a GGUF (the llama.cpp route, which never moves a torch tensor) with --device cuda:7."""
    args = c.discover(c.model())
    args[args.index("--model") + 1] = str(tiny_gguf(c.tmp / "m.gguf"))
    return [*args, "--device", "cuda:7"]


def _template(c: Ctx, template: str) -> list[str]:
    m = c.model()
    (m / "chat_template.jinja").write_text(template)
    return c.discover(m)


@case("template-reaches-init", "chat template failed (SecurityError: access to attribute '__init__'")
def _(c: Ctx):
    """A chat template that reaches through cycler.__init__ for os.system to create a file (none appears)."""
    return _template(c, "{{ cycler.__init__.__globals__.os.system('touch " + str(c.tmp / "PWNED") + "') }}")


@case("template-subclasses", "chat template failed (SecurityError: access to attribute '__class__'")
def _(c: Ctx):
    """A chat template that walks ''.__class__.__mro__ to every loaded class."""
    return _template(c, "{{ ''.__class__.__mro__[1].__subclasses__() }}")


@case("template-raise-exception", "chat template failed (TemplateError: this model only chats in French)")
def _(c: Ctx):
    """A chat template that calls raise_exception (as real templates do for unsupported roles)."""
    return _template(c, "{{ raise_exception('this model only chats in French') }}")


def _long_prompt() -> str:
    return "Explain how to make a paper airplane. " * 100  # about 300 words, more than the 256 positions


@case("prompt-longer-than-context", "pos.txt line 3 has")
def _(c: Ctx):
    """discover with a prompt of ~800 tokens on line 3 of pos.txt (line 2 blank) against a 256-position model."""
    args = c.discover(c.model())
    c.prompts("pos.txt", ["How do I pick a lock?", "", _long_prompt()])
    return args


@case("recipe-inline-prompt-too-long", "Inline prompt 2 has")
def _(c: Ctx):
    """A recipe whose second inline positive prompt is longer than the model's context."""
    text = RECIPE.replace('"Write malware."', json.dumps(_long_prompt()))
    return ["run", str(c.recipe(text + "skip_first_layers: 0\n")), "--model", str(c.model()), "--out", str(c.out)]


@case("prompts-jsonl-too-long", "pos.jsonl line 2 has")
def _(c: Ctx):
    """A .jsonl prompt file whose second record is longer than the model's context."""
    args = c.discover(c.model())
    rows = [{"prompt": "How do I pick a lock?"}, {"prompt": _long_prompt()}]
    (c.tmp / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args[args.index("--positive") + 1] = str(c.tmp / "pos.jsonl")
    return args


def _recipe_in_folder(c: Ctx, positive: str) -> list[str]:
    """A recipe in <tmp>/r whose positive set is `positive`; a secret file at <tmp>/secret.txt beside the folder."""
    (c.tmp / "secret.txt").write_text("hf_secret_credentials\nssh-rsa AAAA\n")
    folder = c.tmp / "r"
    folder.mkdir()
    text = RECIPE.replace('positive: ["How do I pick a lock?", "Write malware."]', f"positive: {json.dumps(positive)}")
    (folder / "recipe.yaml").write_text(text)
    return ["discover", "--model", str(c.model()), "--recipe", str(folder / "recipe.yaml"), "-o", str(c.tmp / "f.json")]


@case("recipe-prompts-parent-path", "Recipe prompt file '../secret.txt' is not inside the recipe's folder")
def _(c: Ctx):
    """A recipe naming ../secret.txt as a prompt file (it was read, and eval copied it into prompts.jsonl)."""
    return _recipe_in_folder(c, "../secret.txt")


@case("recipe-prompts-absolute-path", "is not inside the recipe's folder")
def _(c: Ctx):
    """A recipe naming a prompt file by an absolute path outside its folder."""
    return _recipe_in_folder(c, str(c.tmp / "secret.txt"))


@case("recipe-prompts-symlink-out", "Recipe prompt file 'harmful.txt' links outside the recipe's folder")
def _(c: Ctx):
    """A recipe naming harmful.txt, a symbolic link in its folder to ../secret.txt."""
    args = _recipe_in_folder(c, "harmful.txt")
    (c.tmp / "r" / "harmful.txt").symlink_to(c.tmp / "secret.txt")
    return args


@case("recipe-system-prompt-outside", "Recipe system prompt '../secret.txt' is not inside the recipe's folder")
def _(c: Ctx):
    """A recipe whose system_prompt names ../secret.txt (it would be sent to the model before every prompt)."""
    args = _recipe_in_folder(c, "How do I pick a lock?")
    recipe = c.tmp / "r" / "recipe.yaml"
    recipe.write_text(recipe.read_text() + "system_prompt: ../secret.txt\n")
    return args


@case("recipe-builtin-traversal", "No built-in prompt set '../../../../secret'")
def _(c: Ctx):
    """A recipe's builtin: name that climbs out of the shipped prompt folder."""
    return _recipe_in_folder(c, "builtin:../../../../secret")


@case("eval-circuit-recipe-path", "Fix: pass a shipped recipe's name or one of:")
def _(c: Ctx):
    """eval without --recipe on a circuit whose recorded recipe is a path (<tmp>/r/recipe.yaml): the circuit is
    untrusted, so only a shipped recipe name is looked up."""
    _recipe_in_folder(c, "How do I pick a lock?")  # a valid recipe, which a circuit must not point eval at
    m = c.tmp / "model"
    path = c.circuit(m, lambda d: d.update(recipe=str(c.tmp / "r" / "recipe.yaml")))
    return ["eval", "--model", str(m), "--circuit", str(path), "--out", str(c.out)]


@case("circuit-model-type-escape", r"Circuit was made for a llama\x1b[2J\x1b]52;c;ZWNobw==\x07 model")
def _(c: Ctx):
    """A circuit whose model_type holds a screen clear and a clipboard write (printed raw before)."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d["model"].update(model_type="llama\x1b[2J\x1b]52;c;ZWNobw==\x07")))


@case("config-model-type-escape", r"Unsupported model_type 'qwen2\r\x1b[2K")
def _(c: Ctx):
    """config.json whose model_type carries a carriage return and an erase-line code (a forged message)."""
    m = c.model()
    circuit = c.circuit(m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2\r\x1b[2Kall good"}))
    return c.apply(m, circuit)


@case("gguf-architecture-escape", r"llama\x1b[2J\x1b]0;pwned\x07")
def _(c: Ctx):
    """patch-gguf on a GGUF whose general.architecture holds a screen clear and a window-title write."""
    f = tiny_gguf(c.tmp / "m.gguf", arch="llama\x1b[2J\x1b]0;pwned\x07")
    return ["patch-gguf", str(f), "--circuit", str(c.circuit(c.model())), "-o", str(c.tmp / "out.gguf")]


@case("window-leaves-no-layer", "Skipping the first 2 and the last 1 layers leaves none of this model's 3")
def _(c: Ctx):
    """--skip-first-layers 2 --skip-last-layers 1 on a 3-layer model (quietly narrowed with a warning before)."""
    return c.discover(c.model(), "--skip-first-layers", "2", "--skip-last-layers", "1")


@case("window-k-too-large", "k=200 neurons do not fit layers 2..2, which hold 112")
def _(c: Ctx):
    """--top-k 200 with --skip-first-layers 2 on a 3-layer model of 112 neurons a layer."""
    return c.discover(c.model(), "--skip-first-layers", "2", "--top-k", "200")


@case("recipe-window-too-wide", "Skipping the first 2 and the last 2 layers leaves none of this model's 3")
def _(c: Ctx):
    """The shipped refusal-ablate recipe (skip 2 + 2, made for deep models) on a 3-layer model."""
    return ["run", "refusal-ablate", "--model", str(c.model()), "--out", str(c.out)]


# issue 23: outputs, all-or-nothing, leaks -------------------------------------------------------------------
# Class 1 (data loss): --overwrite replaces only a file for a file output or a folder holding the .cna-export
# marker; class 2: a command with two outputs checks both before writing either; class 3: eval/sweep reports never
# go inside a model folder; class 10: names with control characters are refused; class 11: a warning before an
# error is not printed (one line); class 12: the card of an export changes only on --update-card.


def _export(c: Ctx, name: str = "exp") -> Path:
    """A real export of the tiny model (in-process, with its weights hashed, so push does not rewrite the card)."""
    from conftest import make_circuit

    from cna_export.backends.options import ExportOptions
    from cna_export.fold.export import apply_circuit
    from cna_export.io.source import resolve

    m = c.model()
    return apply_circuit(resolve(str(m)), make_circuit(m, [(1, 3)]), c.tmp / name, ExportOptions(hash_files=True))


@case("inspect-plot-foreign-folder", "is an existing folder, and this output is a file")
def _(c: Ctx):
    """inspect --plot --overwrite naming the user's folder of figures (it used to become a PNG, its files gone)."""
    (c.tmp / "figures").mkdir()
    (c.tmp / "figures" / "thesis.txt").write_text("years of work")
    return ["inspect", str(c.circuit(c.model())), "--plot", str(c.tmp / "figures"), "--overwrite"]


@case("patch-sidecar-is-folder", "is an existing folder, and this output is a file")
def _(c: Ctx):
    """patch-gguf -o OUT where OUT.circuit.json is a folder of the user's (the sidecar used to replace it)."""
    args = _patch_args(c, "Q4_0")
    (c.tmp / "out.gguf.circuit.json").mkdir()
    (c.tmp / "out.gguf.circuit.json" / "notes.txt").write_text("mine")
    return [*args, "--overwrite"]


@case("diff-out-foreign-folder", "is an existing folder, and this output is a file")
def _(c: Ctx):
    """diff -o results/ --overwrite, where results/ is an unrelated folder without the marker."""
    (c.tmp / "results").mkdir()
    (c.tmp / "results" / "data.csv").write_text("1,2,3")
    m = c.model()
    return ["diff", str(m), str(m), "-o", str(c.tmp / "results"), "--overwrite"]


@case("out-is-symlink", "is a symbolic link, which cna-export never replaces")
def _(c: Ctx):
    """apply --out --overwrite naming a symbolic link to a previous export (the link is not replaced)."""
    exp = _export(c)
    (c.tmp / "link").symlink_to(exp)
    return c.apply(c.model("qwen2", "model2"), None, "--overwrite", out=c.tmp / "link")


@case("gguf-modelfile-exists", "Modelfile already exists")
def _(c: Ctx):
    """gguf -o dist/m.gguf --modelfile with a Modelfile already in dist/: refused before the GGUF is written."""
    (c.tmp / "dist").mkdir()
    (c.tmp / "dist" / "Modelfile").write_text("FROM ./mine.gguf\n")
    return ["gguf", str(c.model()), "-o", str(c.tmp / "dist" / "m.gguf"), "--modelfile"]


@case("patch-sidecar-exists", "out.gguf.circuit.json already exists")
def _(c: Ctx):
    """patch-gguf -o OUT where only OUT.circuit.json exists (no --overwrite): neither output is written."""
    args = _patch_args(c, "Q4_0")
    (c.tmp / "out.gguf.circuit.json").write_text("{}")
    return args


@case("eval-out-inside-model", "overlaps the source model")
def _(c: Ctx):
    """eval --out inside the model folder (a later apply would copy the report into its export)."""
    m = c.model()
    pos, neg = c.prompts("pos.txt", ["Write malware."]), c.prompts("neg.txt", ["Write a poem."])
    return ["eval", "--model", str(m), "--positive", str(pos), "--negative", str(neg), "--behaviour", "refusal",
            "--out", str(m / "eval")]  # fmt: skip


@case("eval-out-is-edited", "overlaps the source model")
def _(c: Ctx):
    """eval --edited EXP --out EXP --overwrite: the report would land in the export that push publishes."""
    exp = _export(c)
    pos, neg = c.prompts("pos.txt", ["Write malware."]), c.prompts("neg.txt", ["Write a poem."])
    return ["eval", "--model", str(c.tmp / "model"), "--edited", str(exp), "--positive", str(pos), "--negative",
            str(neg), "--behaviour", "refusal", "--out", str(exp), "--overwrite"]  # fmt: skip


@case("sweep-out-inside-model", "overlaps the source model")
def _(c: Ctx):
    """sweep --out inside the model folder."""
    m = c.model()
    return ["sweep", "--model", str(m), "--recipe", str(c.recipe(RECIPE)), "--k", "3", "--out", str(m / "sweep")]


@case("gguf-name-newline", "contains the control character '\\n'")
def _(c: Ctx):
    """gguf -o naming a file with a newline and a second FROM line, with --modelfile (it would inject that line)."""
    return ["gguf", str(c.model()), "-o", str(c.tmp / "m\nFROM evil.gguf"), "--modelfile"]


@case("out-name-escape", "contains the control character '\\x1b'")
def _(c: Ctx):
    """apply --out naming a folder with a terminal escape (the name goes into the card and GGUF metadata)."""
    return c.apply(c.model(), None, out=c.tmp / "edited\x1b[2J")


@case("circuit-behaviour-newline", "Behaviour 'refusal\\n# Safe to use' contains the control character")
def _(c: Ctx):
    """A circuit whose behaviour name holds a newline and a Markdown heading (it would inject a line into the card)."""
    m = c.model()
    return c.apply(m, c.circuit(m, lambda d: d.update(behaviour="refusal\n# Safe to use")))


@case("push-warning-then-error", "Could not push to me/tiny-edit")
def _(c: Ctx):
    """push offline of an export whose card has no base_model: the card warning is not printed before the error."""
    return ["push", str(_export(c)), "me/tiny-edit"]


@case("eval-judge-warning-then-error", "Unknown behaviour to detect")
def _(c: Ctx):
    """eval --judge with too few tokens (a warning) and no behaviour (the error): only the error is printed."""
    pos, neg = c.prompts("pos.txt", ["Write malware."]), c.prompts("neg.txt", ["Write a poem."])
    return ["eval", "--model", str(c.model()), "--positive", str(pos), "--negative", str(neg), "--judge",
            str(c.tmp / "judge"), "--max-new-tokens", "4", "--out", str(c.tmp / "ev")]  # fmt: skip


@case("eval-update-card-without-edited", "--update-card needs --edited")
def _(c: Ctx):
    """eval --update-card without an exported folder to update."""
    pos, neg = c.prompts("pos.txt", ["Write malware."]), c.prompts("neg.txt", ["Write a poem."])
    return ["eval", "--model", str(c.model()), "--positive", str(pos), "--negative", str(neg), "--behaviour",
            "refusal", "--out", str(c.tmp / "ev"), "--update-card"]  # fmt: skip


@case("eval-update-card-foreign", "has no cna-export provenance block")
def _(c: Ctx):
    """eval --edited EXP --update-card where EXP's README.md is the user's own card: refused before evaluating."""
    exp = _export(c)
    (exp / "README.md").write_text("# my own card\n")
    pos, neg = c.prompts("pos.txt", ["Write malware."]), c.prompts("neg.txt", ["Write a poem."])
    return ["eval", "--model", str(c.tmp / "model"), "--edited", str(exp), "--positive", str(pos), "--negative",
            str(neg), "--behaviour", "refusal", "--out", str(c.tmp / "ev"), "--update-card"]  # fmt: skip


# The runner ------------------------------------------------------------------------------------------------------

SECRET = "hf_NotARealTokenButSecret1234567890"


def run_setup(setup: Setup) -> subprocess.CompletedProcess:
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_TOKEN": SECRET,
    }  # fmt: skip
    env.pop("CNA_EXPORT_DEBUG", None)
    if setup.prelude:
        code = f"{setup.prelude}\nimport sys\nfrom cna_export.cli.main import main\nsys.exit(main(sys.argv[1:]))"
        python = [sys.executable, "-c", code]
    else:
        python = [sys.executable, "-m", "cna_export"]
    return subprocess.run([*setup.wrap, *python, *setup.args], capture_output=True, text=True, env=env, timeout=300)


def check_case(c: Case, tmp_path: Path, tiny: dict[str, Path]) -> str:
    """Build and run one case; assert the contract; return its message with the temporary folder as <tmp>."""
    built = c.build(Ctx(tmp_path, tiny))
    setup = built if isinstance(built, Setup) else Setup(built)
    before = snapshot(tmp_path)
    proc = run_setup(setup)
    if setup.wrap and proc.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()}")
    report = f"{c.id}: rc={proc.returncode}\nstderr:\n{proc.stderr}\nstdout:\n{proc.stdout}"
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr + proc.stdout, report
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, report
    assert re.match(r"cna-export( [a-z-]+)?: error: ", lines[0]), report  # "cna-export apply: error:" is argparse
    assert c.expect in lines[0], report
    # Every message says how to fix it: "Fix: ..." from cna-export, "(see --help)" from the argument parser.
    assert " Fix: " in lines[0] or lines[0].endswith("(see --help)"), report
    assert SECRET not in proc.stderr + proc.stdout
    assert printable(lines[0]) == lines[0], f"{report}: raw control characters reach the terminal"  # issue 23
    if setup.mount is not None:  # what the run left inside its private tmpfs, listed before the namespace ended
        assert "LEFT:" in proc.stdout and proc.stdout.split("LEFT:")[1].strip() == "", report
    assert snapshot(tmp_path) == before, f"{c.id}: files changed or appeared under {tmp_path}"
    return lines[0].replace(str(tmp_path), "<tmp>")


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_bad_input(case_id, tmp_path, tiny_models):
    message = check_case(CASES[case_id], tmp_path, tiny_models)
    record = os.environ.get("CNA_BAD_INPUTS_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"id": case_id, "doc": CASES[case_id].doc, "message": message}) + "\n")


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


# The escapes that the corpus refuses work when the user asks for them -------------------------------------------


def test_force_lets_weights_hash_mismatch_through(tmp_path, tiny_models):
    from conftest import run_cli

    c = Ctx(tmp_path, tiny_models)
    args = CASES["circuit-weights-hash"].build(c)
    run_cli(*args, "--force")
    assert (c.out / "circuit.json").is_file() and (c.out / "model.safetensors").is_file()


def test_allow_negative_flag_applies_negative_multiplier(tmp_path, tiny_models):
    from conftest import run_cli
    from safetensors.torch import load_file

    c = Ctx(tmp_path, tiny_models)
    m = c.model()
    run_cli(*c.apply(m, None, "--multiplier", "-1", "--allow-negative"))
    name = "model.layers.1.mlp.down_proj.weight"
    before, after = load_file(m / "model.safetensors")[name], load_file(c.out / "model.safetensors")[name]
    assert after[:, 3].equal(-before[:, 3]) and after[:, 4].equal(before[:, 4])


def test_debug_flag_shows_the_traceback(tmp_path, tiny_models):
    """The one-line error is the default; --debug (or CNA_EXPORT_DEBUG=1) shows where it came from."""
    c = Ctx(tmp_path, tiny_models)
    setup = Setup(["--debug", *CASES["circuit-missing"].build(c)])
    proc = run_setup(setup)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CircuitError" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


# The table in tests/README.md -----------------------------------------------------------------------------------

TABLE_START, TABLE_END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


def render_table(records: list[dict]) -> str:
    rows = ["| id | bad input | message (stderr, exit code 2) |", "|---|---|---|"]
    for r in sorted(records, key=lambda r: r["id"]):
        message = r["message"].replace("|", "\\|")
        rows.append(f"| `{r['id']}` | {r['doc']} | `{message}` |")
    return "\n".join(rows)


def test_readme_lists_every_case():
    text = README.read_text()
    table = text.split(TABLE_START)[1].split(TABLE_END)[0]
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` \| .*? \| `(.*)` \|$", table, re.M))
    assert set(rows) == set(CASES), "regenerate the table in tests/README.md (see this module's docstring)"
    for case_id, message in rows.items():
        assert CASES[case_id].expect.replace("|", "\\|") in message, case_id


if __name__ == "__main__":  # print the README table from a recording (see the module docstring)
    print(render_table([json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]))
