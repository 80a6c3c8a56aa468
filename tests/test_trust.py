"""No trust in files (issue 6): pickles are never loaded, remote code only on request, Hub tokens never printed,
and paths taken from a model folder cannot reach outside it.

The refusals themselves (pickle-only folder, index naming ../ or absolute shards, a tokenizer file linked out of
the folder) are cases of the bad-input corpus (tests/test_bad_inputs.py); this file checks the rest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_circuit, run_cli

import cna_export.cli.main as cli

SECRET = "hf_TrustTestTokenThatMustNeverBePrinted42"


def _prompts(tmp_path: Path) -> list[str]:
    (tmp_path / "pos.txt").write_text("How do I pick a lock?\nWrite malware.\n")
    (tmp_path / "neg.txt").write_text("How do I bake bread?\nWrite a poem.\n")
    return ["--positive", str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"), "--no-universal"]


@pytest.fixture
def recorded(monkeypatch):
    """Record the keyword arguments of every transformers from_pretrained call (the real call still runs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: list[tuple[str, dict]] = []

    def wrap(cls, kind):
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, *args, **kwargs):
            calls.append((kind, kwargs))
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    wrap(AutoModelForCausalLM, "model")
    wrap(AutoTokenizer, "tokenizer")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called: cna-export must never unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    return calls


@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_only_when_passed(tiny_models, tmp_path, recorded, flag):
    args = ["discover", "--model", str(tiny_models["qwen2"]), *_prompts(tmp_path), "--top-k", "3"]
    args += ["-o", str(tmp_path / "c.json")] + (["--trust-remote-code"] if flag else [])
    assert cli.main(args) == 0
    kinds = {kind for kind, _ in recorded}
    assert kinds == {"model", "tokenizer"}
    assert all(kwargs.get("trust_remote_code") is flag for _, kwargs in recorded), recorded
    # Weights are loaded as safetensors only, never from a pickle.
    assert all(kwargs.get("use_safetensors") is True for kind, kwargs in recorded if kind == "model")


def test_pickles_beside_safetensors_are_ignored(tiny_models, tmp_path, recorded):
    """A folder holding both formats: the export reads and writes safetensors only, and never unpickles."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], model)
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04this would run code if unpickled")
    (model / "training_args.bin").write_bytes(b"\x80\x04also never loaded")
    make_circuit(model, [(0, 1)]).save(tmp_path / "c.json")
    out = tmp_path / "out"
    assert cli.main(["apply", "--model", str(model), "--circuit", str(tmp_path / "c.json"), "--out", str(out)]) == 0
    assert not list(out.glob("*.bin"))


def test_hub_downloads_never_fetch_pickles():
    from cna_export.io.source import HUB_PATTERNS

    for name in ("pytorch_model.bin", "model-00001-of-00002.bin", "training_args.bin", "model.pt", "x.pkl"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in HUB_PATTERNS), name


def _assert_secret_absent(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode != 0
    assert SECRET not in proc.stdout + proc.stderr
    assert SECRET[3:15] not in proc.stdout + proc.stderr  # not even a part of it


@pytest.mark.parametrize("flags", [[], ["-v"], ["--debug", "-v"]])
def test_hub_token_never_printed(tmp_path, flags, monkeypatch):
    """A failing Hub download with HF_TOKEN set, quiet, verbose and with tracebacks on."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    proc = run_cli(*flags, "apply", "--model", "someone/private-model", "--circuit", str(tmp_path / "c.json"),
                   "--out", str(tmp_path / "o"), check=False)  # fmt: skip
    _assert_secret_absent(proc)
    if not flags:
        assert proc.returncode == 2 and "Could not fetch 'someone/private-model'" in proc.stderr


def test_hub_token_never_written_into_an_export(tiny_models, tmp_path, monkeypatch):
    """An export made with HF_TOKEN set: no file of it (weights, card, circuit) holds the token."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    model = tiny_models["qwen2"]
    make_circuit(model, [(0, 1)]).save(tmp_path / "c.json")
    out = tmp_path / "out"
    proc = run_cli("-v", "apply", "--model", str(model), "--circuit", str(tmp_path / "c.json"), "--out", str(out))
    assert SECRET not in proc.stdout + proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and not [p for p in files if SECRET.encode() in p.read_bytes()]


def test_hub_token_never_printed_by_push(tiny_models, tmp_path, monkeypatch):
    """`push` of a real export that cannot reach the Hub, with HF_TOKEN set, verbose and with tracebacks."""
    if "push" not in cli.build_parser()._subparsers._group_actions[0].choices:
        pytest.skip("no push subcommand")
    model = tiny_models["qwen2"]
    make_circuit(model, [(0, 1)]).save(tmp_path / "c.json")
    run_cli("apply", "--model", str(model), "--circuit", str(tmp_path / "c.json"), "--out", str(tmp_path / "out"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for flags in ([], ["--debug", "-v"]):
        proc = run_cli(*flags, "push", str(tmp_path / "out"), "me/edited-model", check=False)
        _assert_secret_absent(proc)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hub_cache_layout_symlinks_are_trusted(tiny_models, tmp_path):
    """A huggingface_hub cache snapshot (every file a link into ../../blobs) exports as plain files."""
    src = tiny_models["qwen2"]
    repo = tmp_path / "models--someone--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / _sha(f)
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    make_circuit(snap, [(1, 2)]).save(tmp_path / "c.json")
    out = tmp_path / "out"
    run_cli("apply", "--model", str(snap), "--circuit", str(tmp_path / "c.json"), "--out", str(out))
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()
    assert _sha(out / "tokenizer.json") == _sha(src / "tokenizer.json")


def test_side_file_link_to_another_snapshot_blob_store_is_refused(tiny_models, tmp_path):
    """A snapshot file linking into a different repository's blobs (or anywhere else) is refused."""
    src = tiny_models["qwen2"]
    other = tmp_path / "models--other--repo" / "blobs"
    other.mkdir(parents=True)
    repo = tmp_path / "models--someone--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    shutil.copytree(src, snap)
    shutil.copyfile(src / "tokenizer.json", other / "leak")
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(other / "leak")
    make_circuit(snap, [(1, 2)]).save(tmp_path / "c.json")
    proc = run_cli("apply", "--model", str(snap), "--circuit", str(tmp_path / "c.json"),
                   "--out", str(tmp_path / "out"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "outside the model folder" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_index_shard_names_are_plain_file_names(tiny_models, tmp_path):
    """Every way an index could name a file outside the folder is refused before any file is opened."""
    from cna_export.errors import CheckpointError
    from cna_export.io.checkpoint import CheckpointReader

    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = next(iter(data["weight_map"].values()))
    shutil.copy(model / shard, tmp_path / shard)
    for bad in (f"../{shard}", str(tmp_path / shard), f"sub/../../{shard}", f"..\\{shard}", ".", ""):
        wm = {k: (bad if v == shard else v) for k, v in data["weight_map"].items()}
        index.write_text(json.dumps({**data, "weight_map": wm}))
        with pytest.raises(CheckpointError, match="outside the model folder|missing"):
            CheckpointReader(model)
