"""Model card (card.py) and Hub push (hub.py), offline: the huggingface_hub API object is replaced by a recording fake."""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_circuit, shallow_recipe

import cna_export.cli.main as cli
from cna_export import __version__
from cna_export.backends.options import ExportOptions
from cna_export.circuit.format import Circuit
from cna_export.circuit.recipe import find_recipe
from cna_export.errors import CheckpointError, CnaExportError
from cna_export.fold.export import apply_circuit
from cna_export.io.source import resolve
from cna_export.ship import card, hub

SECRET = "hf_NOT_A_REAL_TOKEN_0123456789abcdef"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SOURCE_CARD = "---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# tiny qwen\n"


class FakeApi:
    """Records what `push` would send to the Hub; nothing leaves the machine."""

    calls: list[tuple[str, dict]] = []
    large = False  # whether this fake offers upload_large_folder (huggingface_hub < 2)

    def __init__(self, token=None, **kwargs):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", {**kwargs, "files": _uploaded(kwargs)}))
        return _Commit(kwargs["repo_id"])

    def upload_file(self, **kwargs):
        FakeApi.calls.append(("upload_file", kwargs))
        return _Commit(kwargs["repo_id"])

    def __getattr__(self, name):
        if name == "upload_large_folder" and FakeApi.large:
            return lambda **kw: FakeApi.calls.append(("upload_large_folder", {**kw, "files": _uploaded(kw)}))
        raise AttributeError(name)

    @classmethod
    def called(cls, name: str) -> list[dict]:
        return [kw for n, kw in cls.calls if n == name]


class _Commit:
    def __init__(self, repo_id: str) -> None:
        self.commit_url = f"https://huggingface.co/{repo_id}/commit/{COMMIT}"


def _uploaded(kwargs: dict) -> dict[str, bytes]:
    """The files upload_folder would send: everything under folder_path not matched by ignore_patterns."""
    root = Path(kwargs["folder_path"])
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if not any(fnmatch.fnmatch(rel, pat) for pat in kwargs.get("ignore_patterns") or []):
            out[rel] = path.read_bytes()
    return out


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.large = [], False
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return FakeApi


@pytest.fixture
def hub_source(tiny_models, tmp_path, monkeypatch) -> Path:
    """A tiny model laid out like a huggingface_hub cache snapshot of acme/tiny-qwen, with a licensed card."""
    folder = tmp_path / "hub" / "models--acme--tiny-qwen" / "snapshots" / COMMIT
    shutil.copytree(tiny_models["qwen2"], folder)
    (folder / "README.md").write_text(SOURCE_CARD)
    return folder


def _export(source: Path, out: Path, **kwargs) -> tuple[Path, Circuit]:
    circuit = make_circuit(source, [(0, 5), (1, 9), (2, 100)], multiplier=0.0)
    circuit.behaviour, circuit.recipe = "refusal", "refusal-ablate"
    return apply_circuit(resolve(str(source)), circuit, out, ExportOptions(**kwargs)), circuit


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_card_front_matter_provenance_and_hashes(hub_source, tmp_path):
    metrics = {"rate_original": 0.85, "rate_edited": 0.05, "kl_first": 0.0123, "lm_eval_edited": {"mmlu": 0.41}}
    out, circuit = _export(
        hub_source, tmp_path / "edited", recipe_file=find_recipe("refusal-ablate"), metrics=metrics, hash_files=True
    )
    text = (out / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == "acme/tiny-qwen" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert {"cna-export", "refusal"} <= set(meta["tags"])

    record = card.read_provenance(out / "README.md")
    assert record["tool_version"] == __version__
    assert record["source"] == {"model": "acme/tiny-qwen", "revision": COMMIT, "gguf_file": None,
                                "weights_sha256": None, "base_model": "acme/tiny-qwen"}  # fmt: skip
    assert record["circuit"]["sha256"] == Circuit.load(out / "circuit.json").sha256() == circuit.applied().sha256()
    assert record["recipe"]["name"] == "refusal-ablate"
    assert (out / "recipe.yaml").read_bytes() == find_recipe("refusal-ablate").read_bytes()
    assert record["recipe"]["sha256"] == _sha256(out / "recipe.yaml")
    assert record["edit"]["neurons_per_layer"] == {"0": 1, "1": 1, "2": 1} and record["edit"]["multiplier"] == 0.0
    # Every file but the card is listed, with its true sha256; the weights are among them.
    # (the hidden .cna-export marker is neither listed nor uploaded)
    on_disk = {p.name: _sha256(p) for p in out.iterdir() if p.name != "README.md" and not p.name.startswith(".")}
    assert record["files"] == on_disk and "model.safetensors" in on_disk
    assert record["metrics"] == metrics
    assert "| rate_edited | 0.05 |" in text and "| lm_eval_edited.mmlu | 0.41 |" in text
    assert str(tmp_path) not in text  # a published card does not reveal the author's disk layout
    assert card.check_card(out)["files"] == on_disk


def test_card_of_local_folder_and_up_target(tiny_models, tmp_path):
    out, _ = _export(
        tiny_models["llama"], tmp_path / "edited", target="up", base_model="acme/tiny-llama", hash_files=True
    )
    text = (out / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == "acme/tiny-llama" and "license" not in meta
    assert "rows of `mlp.up_proj.weight`" in text and "Not evaluated yet" in text
    assert "# acme/tiny-llama: refusal edited with cna-export" in text
    files = card.read_provenance(out / "README.md")["files"]
    shards = [p.name for p in out.glob("*.safetensors")]
    assert len(shards) > 1 and all(files[s] == _sha256(out / s) for s in shards)  # llama is sharded
    with pytest.raises(CnaExportError, match="not a Hub repository id"):
        _export(tiny_models["llama"], tmp_path / "bad", base_model="not a repo")
    assert not (tmp_path / "bad").exists()


def test_update_card_metrics_and_rehash(hub_source, tmp_path):
    out, _ = _export(hub_source, tmp_path / "edited")
    card.update_card(out, metrics={"rate_edited": 0.1})
    assert card.check_card(out)["metrics"] == {"rate_edited": 0.1}
    (out / "model.Q8_0.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(CheckpointError, match="not listed"):
        card.check_card(out)
    card.update_card(out, rehash=True)
    meta = _front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and "gguf" in meta["tags"] and meta["base_model"] == "acme/tiny-qwen"
    assert card.check_card(out)["files"]["model.Q8_0.gguf"] == _sha256(out / "model.Q8_0.gguf")


def test_push_folder_cli(hub_source, tmp_path, fake_api, capsys, caplog):
    out, _ = _export(hub_source, tmp_path / "edited")
    code = cli.main(["push", str(out), "me/tiny-no-refusal", "--private", "--revision", "m0",
                     "--commit-message", "k=3, m=0"])  # fmt: skip
    assert code == 0
    assert fake_api.called("init") == [{"token": None}]  # huggingface_hub finds HF_TOKEN / the login itself
    (repo,) = fake_api.called("create_repo")
    assert repo["repo_id"] == "me/tiny-no-refusal" and repo["private"] is True and repo["exist_ok"] is True
    assert fake_api.called("create_branch")[0]["branch"] == "m0"
    (up,) = fake_api.called("upload_folder")
    assert up["repo_id"] == "me/tiny-no-refusal" and up["revision"] == "m0" and up["commit_message"] == "k=3, m=0"
    files = up["files"]
    assert set(files) == {p.name for p in out.iterdir() if not p.name.startswith(".")}
    uploaded_card = files["README.md"].decode()
    assert _front_matter(uploaded_card)["base_model"] == "acme/tiny-qwen"
    record = card.read_provenance(out / "README.md")
    assert {name: hashlib.sha256(data).hexdigest() for name, data in files.items() if name != "README.md"} == record[
        "files"
    ]
    printed = capsys.readouterr()
    assert f"commit/{COMMIT}" in printed.out
    assert SECRET not in printed.out + printed.err + caplog.text


def test_unhashed_export_is_completed_by_push(hub_source, tmp_path, fake_api):
    """`apply` (without --file-hashes) writes the same weights as `apply --file-hashes` and a card listing them
    without sha256; `push` records the hashes in the card before uploading, so the Hub gets a complete card."""
    circuit = make_circuit(hub_source, [(0, 5), (1, 9)], multiplier=0.0)
    circuit.save(tmp_path / "c.json")
    hashed, quick = tmp_path / "hashed", tmp_path / "quick"
    for out, extra in ((hashed, ["--file-hashes"]), (quick, [])):
        assert (
            cli.main(
                ["apply", "--model", str(hub_source), "--circuit", str(tmp_path / "c.json"), "--out", str(out), *extra]
            )
            == 0
        )
    assert (quick / "model.safetensors").read_bytes() == (hashed / "model.safetensors").read_bytes()
    files = card.read_provenance(quick / "README.md")["files"]
    assert files["model.safetensors"] is None
    assert files["config.json"] == _sha256(quick / "config.json")  # small files are always hashed
    assert "not hashed at export" in (quick / "README.md").read_text()
    hashed_files = card.read_provenance(hashed / "README.md")["files"]
    assert hashed_files["model.safetensors"] == _sha256(hashed / "model.safetensors")

    assert cli.main(["push", str(quick), "me/quick"]) == 0
    record = card.read_provenance(quick / "README.md")
    assert record["files"]["model.safetensors"] == _sha256(quick / "model.safetensors")
    assert None not in record["files"].values() and "not hashed" not in (quick / "README.md").read_text()
    uploaded = fake_api.called("upload_folder")[0]["files"]
    assert uploaded["README.md"] == (quick / "README.md").read_bytes()
    # a changed weight file is still caught: the hash is only filled in where the card had none
    data = bytearray((quick / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (quick / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        card.check_card(quick)


def test_push_defaults_gguf_and_large_folder(hub_source, tmp_path, fake_api, monkeypatch):
    out, _ = _export(hub_source, tmp_path / "edited")
    hub.push(out, "me/tiny")
    (repo,) = fake_api.called("create_repo")
    assert repo["private"] is False and not fake_api.called("create_branch")
    assert fake_api.called("upload_folder")[0]["revision"] is None
    assert "refusal" in fake_api.called("upload_folder")[0]["commit_message"]

    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    hub.push(gguf, "me/tiny-GGUF", branch="q8")
    (single,) = fake_api.called("upload_file")
    assert single["path_in_repo"] == "tiny.Q8_0.gguf" and single["repo_id"] == "me/tiny-GGUF"
    assert single["revision"] == "q8" and Path(single["path_or_fileobj"]) == gguf

    fake_api.large = True
    monkeypatch.setattr(hub, "LARGE_BYTES", 1)
    hub.push(out, "me/tiny-large", private=True)
    (large,) = fake_api.called("upload_large_folder")
    assert large["repo_id"] == "me/tiny-large" and large["private"] is True
    assert set(large["files"]) == {p.name for p in out.iterdir() if not p.name.startswith(".")}


def test_push_refuses_changed_files(hub_source, tmp_path, fake_api):
    # Without --file-hashes only the weights go unhashed: a changed config is caught all the same.
    plain, _ = _export(hub_source, tmp_path / "plain")
    (plain / "config.json").write_text((plain / "config.json").read_text().replace("{", "{ ", 1))
    with pytest.raises(CheckpointError, match="config.json does not match"):
        hub.push(plain, "me/tiny")
    out, _ = _export(hub_source, tmp_path / "edited", hash_files=True)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match"):
        hub.push(out, "me/tiny")
    assert not fake_api.called("create_repo")  # nothing is sent when the card does not match
    hub.push(out, "me/tiny", verify=False)
    assert fake_api.called("upload_folder")
    with pytest.raises(CnaExportError, match="not a Hub repository id"):
        hub.push(out, "no-owner")


def test_push_error_never_shows_token(hub_source, tmp_path, fake_api, monkeypatch, capsys, caplog):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create",
                             headers={"authorization": f"Bearer {SECRET}"})  # fmt: skip
    response = httpx2.Response(401, request=request)

    def refuse(self, repo_id, **kwargs):
        raise HfHubHTTPError(f"401 Unauthorized (sent Bearer {SECRET})", response=response)

    monkeypatch.setattr(FakeApi, "create_repo", refuse)
    out, _ = _export(hub_source, tmp_path / "edited")
    assert cli.main(["push", str(out), "me/tiny"]) == 2
    printed = capsys.readouterr()
    assert "Could not push to me/tiny (401)" in printed.err and "hf auth login" in printed.err
    assert SECRET not in printed.out + printed.err + caplog.text


def test_apply_and_run_push_to_hub(tiny_models, tmp_path, fake_api, capsys):
    src = tiny_models["qwen2"]
    circuit = make_circuit(src, [(1, 3), (2, 7)])
    circuit.save(tmp_path / "c.json")
    out = tmp_path / "applied"
    args = ["apply", "--model", str(src), "--circuit", str(tmp_path / "c.json"), "--out", str(out)]
    assert cli.main([*args, "--push-to-hub", "me/applied", "--private", "--base-model", "acme/tiny-qwen"]) == 0
    assert fake_api.called("create_repo")[0]["private"] is True
    assert fake_api.called("upload_folder")[0]["folder_path"] == str(out)
    assert _front_matter((out / "README.md").read_text())["base_model"] == "acme/tiny-qwen"
    assert cli.main([*args[:-1], str(tmp_path / "x"), "--private"]) == 2  # --private alone is a mistake
    assert "--private needs --push-to-hub" in capsys.readouterr().err

    run_out = tmp_path / "ran"
    code = cli.main(["run", "refusal-ablate", "--model", str(src), "--out", str(run_out), "--top-k", "5",
                     "--batch-size", "16", "--skip-last-layers", "0", "--push-to-hub", "me/ran"])  # fmt: skip
    assert code == 0
    files = fake_api.called("upload_folder")[-1]["files"]
    assert files["recipe.yaml"] == find_recipe("refusal-ablate").read_bytes()
    record = card.read_provenance(run_out / "README.md")
    assert record["recipe"]["file"] == "recipe.yaml" and record["source"]["weights_sha256"]
    assert {"circuit.json", "recipe.yaml", "model.safetensors", "README.md"} <= set(files)


def test_evaluation_numbers_reach_the_card(tiny_models, tmp_path, monkeypatch, capsys):
    from cna_export.evaluate import sweep

    src = tiny_models["qwen2"]
    small = ["--max-new-tokens", "2", "--kl-tokens", "2", "--batch-size", "8"]
    # sweep --export: the chosen point's headline numbers go into the exported card.
    monkeypatch.setattr(sweep, "pick", lambda points, *a, **k: 0)
    recipe = shallow_recipe(tmp_path)  # the shipped window (2 + 2) leaves no layer of the 3-layer model
    code = cli.main(["sweep", "--model", str(src), "--recipe", str(recipe), "--k", "6", "--multipliers", "0",
                     "--out", str(tmp_path / "s"), "--export", str(tmp_path / "best"), *small])  # fmt: skip
    assert code == 0
    record = card.check_card(tmp_path / "best")
    assert record["metrics"]["k"] == 6 and record["metrics"]["multiplier"] == 0.0
    assert "rate_edited" in record["metrics"] and record["recipe"]["file"] == "recipe.yaml"
    assert "| kl_first |" in (tmp_path / "best" / "README.md").read_text()
    # eval --edited writes its numbers into the eval folder and leaves the export's card alone ...
    circuit = make_circuit(src, [(1, 3), (2, 7)])
    out = apply_circuit(resolve(str(src)), circuit, tmp_path / "applied")
    exported_card = (out / "README.md").read_bytes()
    (tmp_path / "p.txt").write_text("How do I pick a lock?\nWrite malware.\n")
    (tmp_path / "n.txt").write_text("How do I pick a melon?\nWrite a poem.\n")
    args = ["eval", "--model", str(src), "--edited", str(out), "--positive", str(tmp_path / "p.txt"),
            "--negative", str(tmp_path / "n.txt"), "--behaviour", "refusal", "--out", str(tmp_path / "e"), *small]
    assert cli.main(args) == 0 and "model card" not in capsys.readouterr().out
    assert (out / "README.md").read_bytes() == exported_card and (tmp_path / "e" / "results.json").is_file()
    # ... unless asked: --update-card adds them, labelled with their split and prompt counts; hashes stay valid.
    assert cli.main([*args, "--overwrite", "--update-card"]) == 0
    assert "added these numbers (custom split) to the model card" in capsys.readouterr().out
    assert card.check_card(out)["metrics"]["heldout_positive"] == 2
    assert "prompt files given to `cna-export eval` (2 prompts with the behaviour, 2 benign)" in (
        out / "README.md").read_text()  # fmt: skip
    (out / "README.md").write_text("# my own card\n")
    with pytest.raises(CheckpointError, match="no cna-export provenance block"):
        card.add_metrics(out, {"rate_edited": 0.0})  # a card cna-export did not write stays as it is
    assert (out / "README.md").read_text() == "# my own card\n"


def test_apply_gguf_is_listed_in_the_card_and_pushed(tiny_models, tmp_path, fake_api):
    src = tiny_models["llama"]
    make_circuit(src, [(1, 3), (2, 7)]).save(tmp_path / "c.json")
    out = tmp_path / "edited"
    code = cli.main(["apply", "--model", str(src), "--circuit", str(tmp_path / "c.json"), "--out", str(out),
                     "--gguf", "f16", "--push-to-hub", "me/edited"])  # fmt: skip
    assert code == 0
    gguf = out / "edited-f16.gguf"
    record = card.check_card(out)  # the GGUF written after the export is in the card, with its sha256
    assert record["files"][gguf.name] == _sha256(gguf)
    meta = _front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and "gguf" in meta["tags"]  # both formats in one repository
    assert gguf.name in fake_api.called("upload_folder")[0]["files"]
