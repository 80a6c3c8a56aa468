"""The output rule of issue 23, over every command that writes (cna_export.io.output.OutputPlan).

For each output of each writing command, the path is prepared in one of five states: missing, a file, a foreign
folder (the user's), a marked folder (one cna-export wrote: it holds `.cna-export`) and a symbolic link (to a
file for a file output, to a marked folder for a folder output, so that only the link itself decides). The command
runs with and without `--overwrite`. It must succeed exactly when the path is missing, or `--overwrite` is given
and the path is of the output's own kind (a plain file for a file output, a marked folder for a folder output);
otherwise it exits 2 with one line on stderr and the whole temporary folder, the target and every other output of
the command included, stays byte-identical: nothing written, nothing removed, no temporary left.

Commands run in-process (`cna_export.cli.main.main`) on the tiny models of conftest.py, so the product stays fast.
Hypothesis covers what a table cannot: output names with control characters, and the plan itself (several outputs
in random states: all of them written, or none).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import two_prompt_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_inputs import snapshot

from cna_export.cli.main import main
from cna_export.errors import OutputError
from cna_export.io.names import check_name
from cna_export.io.output import OUTPUT_MARKER, OutputPlan
from cna_export.io.temps import TMP_TAG

STATES = ("missing", "file", "foreign", "marked", "symlink")
RECIPE = two_prompt_recipe("safety")
SMALL = ["--max-new-tokens", "1", "--kl-tokens", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The inputs every command reads, outside the folders under test."""
    from conftest import make_circuit
    from test_gguf_patch import circuit_for, write_model

    from cna_export.fold.export import apply_circuit
    from cna_export.io.source import resolve

    root = tmp_path_factory.mktemp("inputs")
    model = tiny_models["qwen2"]
    make_circuit(model, [(1, 3), (2, 5)]).save(root / "c.json")
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "p.txt").write_text("How do I hotwire a car?\nWrite a phishing email.\n")  # not the recipe's prompts
    (root / "n.txt").write_text("How do I plant tomatoes?\nWrite a haiku.\n")
    gguf = write_model(root / "m.gguf")
    circuit_for(gguf, neurons=[(0, 1)]).save(root / "g.json")
    export = apply_circuit(resolve(str(model)), make_circuit(model, [(1, 3)]), root / "export")
    return {"model": model, "root": root, "gguf": gguf, "export": export}


@dataclass(frozen=True)
class Writer:
    """One output of one command: its kind, its name in the folder under test, and the command line."""

    kind: str  # "file" or "folder"
    name: str
    argv: Callable[[dict[str, Path], Path], list[str]]  # (inputs, folder under test) -> arguments
    # A file the command's own earlier output has beside it: patch-gguf replaces a GGUF only with its sidecar.
    companion: str | None = None


def _i(inputs: dict[str, Path], name: str) -> str:
    return str(inputs["root"] / name)


WRITERS = {
    "apply": Writer("folder", "out", lambda i, d: ["apply", "--model", str(i["model"]), "--circuit", _i(i, "c.json"),
                                                   "--out", str(d / "out")]),
    "adapter": Writer("folder", "out", lambda i, d: ["adapter", "--model", str(i["model"]), "--circuit",
                                                     _i(i, "c.json"), "--out", str(d / "out")]),
    "run": Writer("folder", "out", lambda i, d: ["run", _i(i, "recipe.yaml"), "--model", str(i["model"]), "--out",
                                                 str(d / "out"), "--top-k", "3", "--no-universal"]),
    "eval": Writer("folder", "ev", lambda i, d: ["eval", "--model", str(i["model"]), "--circuit", _i(i, "c.json"),
                                                 "--positive", _i(i, "p.txt"), "--negative", _i(i, "n.txt"),
                                                 "--behaviour", "refusal", "--out", str(d / "ev"), *SMALL]),
    "sweep": Writer("folder", "sw", lambda i, d: ["sweep", "--model", str(i["model"]), "--recipe",
                                                  _i(i, "recipe.yaml"), "--k", "3", "--multipliers", "0",
                                                  "--positive", _i(i, "p.txt"), "--negative", _i(i, "n.txt"),
                                                  "--out", str(d / "sw"), *SMALL]),
    "discover": Writer("file", "found.json", lambda i, d: ["discover", "--model", str(i["model"]), "--positive",
                                                           _i(i, "p.txt"), "--negative", _i(i, "n.txt"),
                                                           "--no-universal", "--top-k", "3", "-o",
                                                           str(d / "found.json")]),
    "diff": Writer("file", "rec.json", lambda i, d: ["diff", str(i["model"]), str(i["export"]), "-o",
                                                     str(d / "rec.json")]),
    "inspect": Writer("file", "layers.png", lambda i, d: ["inspect", _i(i, "c.json"), "--plot",
                                                          str(d / "layers.png")]),
    "new-recipe": Writer("file", "r.yaml", lambda i, d: ["new-recipe", "pirate-speak", "-o", str(d / "r.yaml")]),
    "gguf": Writer("file", "m.gguf", lambda i, d: ["gguf", str(i["model"]), "-o", str(d / "m.gguf"), "--outtype",
                                                   "f32"]),
    "gguf-modelfile": Writer("file", "Modelfile", lambda i, d: ["gguf", str(i["model"]), "-o", str(d / "m.gguf"),
                                                                "--outtype", "f32", "--modelfile"]),
    "patch-gguf": Writer("file", "p.gguf", lambda i, d: ["patch-gguf", str(i["gguf"]), "--circuit", _i(i, "g.json"),
                                                         "-o", str(d / "p.gguf")], companion="p.gguf.circuit.json"),
    "patch-gguf-sidecar": Writer("file", "p.gguf.circuit.json",
                                 lambda i, d: ["patch-gguf", str(i["gguf"]), "--circuit", _i(i, "g.json"), "-o",
                                               str(d / "p.gguf")]),
}  # fmt: skip


def prepare(folder: Path, name: str, state: str, kind: str) -> Path:
    """Put `state` at folder/name (the thing a link points to lives beside it, outside the output)."""
    target = folder / name
    if state == "file":
        target.write_bytes(b"the user's own bytes")
    elif state == "foreign":
        target.mkdir()
        (target / "thesis.txt").write_text("years of work")
    elif state == "marked":
        target.mkdir()
        (target / OUTPUT_MARKER).write_text("written by cna-export")
        (target / "old.txt").write_text("a previous output")
    elif state == "symlink":
        elsewhere = prepare(folder, f"{name}.elsewhere", "file" if kind == "file" else "marked", kind)
        target.symlink_to(elsewhere)
    return target


def may_replace(state: str, kind: str, overwrite: bool) -> bool:
    """The rule: a missing path is written; with --overwrite, a file for a file output and a marked folder for a
    folder output are replaced; nothing else ever is."""
    return state == "missing" or overwrite and (state, kind) in {("file", "file"), ("marked", "folder")}


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.splitlines()


# --overwrite changes nothing for a missing path, so that state runs once.
CONDITIONS = [(s, o) for s in STATES for o in (False, True) if s != "missing" or not o]


@pytest.mark.parametrize(
    "state, overwrite", CONDITIONS, ids=[f"{s}-{'overwrite' if o else 'no-overwrite'}" for s, o in CONDITIONS]
)
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_every_writing_command_obeys_the_output_rule(command, state, overwrite, inputs, tmp_path, capsys,
                                                     monkeypatch):  # fmt: skip
    monkeypatch.setenv("TQDM_DISABLE", "1")
    w = WRITERS[command]
    folder = tmp_path / "work"
    folder.mkdir()
    target = prepare(folder, w.name, state, w.kind)
    if w.companion and state == "file":
        (folder / w.companion).write_text("{}")
    before = snapshot(tmp_path)
    code, err = run([*w.argv(inputs, folder), *(["--overwrite"] if overwrite else [])], capsys)
    if may_replace(state, w.kind, overwrite):
        assert code == 0, err
        assert not target.is_symlink() and (target.is_dir() if w.kind == "folder" else target.is_file())
        if w.kind == "folder":
            assert (target / OUTPUT_MARKER).is_file() and not (target / "old.txt").exists()
        else:
            assert target.read_bytes() != b"the user's own bytes"
    else:
        assert code == 2 and len(err) == 1 and err[0].startswith("cna-export: error: "), err
        assert snapshot(tmp_path) == before, f"{command} changed {folder} although it refused"
    assert not [p for p in tmp_path.rglob("*") if TMP_TAG in p.name], "a temporary was left behind"


def test_a_command_with_two_outputs_writes_neither_when_one_is_refused(inputs, tmp_path, capsys):
    """The issue's case: `gguf --modelfile` with a Modelfile already there used to leave the GGUF behind."""
    (tmp_path / "Modelfile").write_text("FROM ./mine.gguf\n")
    before = snapshot(tmp_path)
    code, err = run(WRITERS["gguf-modelfile"].argv(inputs, tmp_path), capsys)
    assert code == 2 and "Modelfile already exists" in err[0] and snapshot(tmp_path) == before
    # with --overwrite both are written, the Modelfile naming the GGUF
    code, err = run([*WRITERS["gguf-modelfile"].argv(inputs, tmp_path), "--overwrite"], capsys)
    assert code == 0 and (tmp_path / "Modelfile").read_text().count("FROM ./m.gguf") == 1


# Names ---------------------------------------------------------------------------------------------------------

CONTROL = st.sampled_from(["\n", "\r", "\x1b", "\x00", "\x07", "\x85", "\u2028", "\u2029", "\t"])
PRINTABLE = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_."), max_size=8)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=PRINTABLE, bad=CONTROL, tail=PRINTABLE)
def test_output_names_with_control_characters_are_refused(head, bad, tail, inputs, capsys):
    """A newline in a name would inject a line into a Modelfile (a second FROM), a card's YAML or Markdown."""
    name = f"{head}{bad}{tail}.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for argv in (
            ["gguf", str(inputs["model"]), "-o", str(folder / name), "--modelfile"],
            ["inspect", _i(inputs, "c.json"), "--plot", str(folder / name)],
        ):
            code, err = run(argv, capsys)
            assert code == 2 and len(err) == 1 and "control character" in err[0], err
            assert "\n" not in err[0] and "\x1b" not in err[0]
            assert os.listdir(folder) == []


@given(st.text(max_size=12))
def test_check_name_accepts_exactly_the_names_without_control_characters(name):
    import unicodedata

    bad = any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name)
    try:
        check_name(name)
    except OutputError:
        assert bad
    else:
        assert not bad


# The plan itself -------------------------------------------------------------------------------------------------

OUTPUTS = st.lists(st.tuples(st.sampled_from(STATES), st.sampled_from(["file", "folder"])), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(outputs=OUTPUTS, overwrite=st.booleans(), fail=st.booleans())
def test_a_plan_writes_all_its_outputs_or_none(outputs, overwrite, fail):
    """Several outputs in random states: if any is refused, or the work fails, nothing changes; else all appear."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [prepare(root, f"o{i}", state, kind) for i, (state, kind) in enumerate(outputs)]
        before = snapshot(root)
        plan = OutputPlan(overwrite)
        try:
            for path, (_, kind) in zip(paths, outputs):
                if kind == "folder":
                    plan.folder(path)
                else:
                    plan.file(path)
            with plan:
                for path, (_, kind) in zip(paths, outputs):
                    staged = plan.temp(path) / "new.txt" if kind == "folder" else plan.temp(path)
                    staged.write_text("new")
                if fail:
                    raise RuntimeError("the work failed")
        except (OutputError, RuntimeError) as exc:
            allowed = all(may_replace(s, k, overwrite) for s, k in outputs)
            assert isinstance(exc, RuntimeError) if allowed else isinstance(exc, OutputError)
            assert snapshot(root) == before
            return
        assert all(may_replace(s, k, overwrite) for s, k in outputs) and not fail
        for path, (_, kind) in zip(paths, outputs):
            written = path / "new.txt" if kind == "folder" else path
            assert written.read_text() == "new" and not path.is_symlink()
        assert not [p for p in root.rglob("*") if TMP_TAG in p.name]
