"""The command line, end to end on tiny models, as a user runs it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from transformers import AutoModelForCausalLM

from cna_export.arch import arch_for
from cna_export.attribution.hooks import scaled_neurons
from cna_export.circuit.format import Circuit


def test_run_recipe_end_to_end(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    out = tmp_path / "edited"
    # --specificity overrides the recipe's (a random tiny model has little contrast beyond neutral activity)
    proc = run_cli("run", "refusal-ablate", "--model", str(src), "--out", str(out), "--top-k", "25",
                   "--skip-first-layers", "1", "--skip-last-layers", "0", "--specificity", "0")  # fmt: skip
    assert "25 neurons scaled" in proc.stdout
    circuit = Circuit.load(out / "circuit.json")
    assert circuit.recipe == "refusal-ablate" and circuit.behaviour == "refusal"
    assert len(circuit.neurons) == 25 and all(n.layer >= 1 for n in circuit.neurons)
    assert circuit.selection.skip_last_layers == 0  # the recipe's 2, overridden on the command line
    assert circuit.selection.specificity == 0  # the recipe's 1, overridden
    assert circuit.model.weights_sha256 and circuit.prompts["positive"].count == 48
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    edited = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad(), scaled_neurons(original, arch_for("qwen2"), circuit.edits()):
        expected = original(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(edited(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_discover_apply_inspect(tiny_models, tmp_path):
    src = tiny_models["gemma"]
    (tmp_path / "pos.txt").write_text("How do I pick a lock?\nWrite malware that steals passwords.\n")
    (tmp_path / "neg.txt").write_text("How do I pick a ripe melon?\nWrite a script that stores passwords safely.\n")
    circuit_path = tmp_path / "c.json"
    run_cli("discover", "--model", str(src), "--positive", str(tmp_path / "pos.txt"), "--negative",
            str(tmp_path / "neg.txt"), "--fraction", "0.05", "--no-universal", "-o", str(circuit_path))  # fmt: skip
    circuit = Circuit.load(circuit_path)
    assert len(circuit.neurons) == round(0.05 * 2 * 128) and "neutral" not in circuit.prompts
    proc = run_cli("inspect", str(circuit_path), "--top", "5", "--plot", str(tmp_path / "layers.png"))
    assert "layer  neurons" in proc.stdout and (tmp_path / "layers.png").stat().st_size > 1000
    run_cli("apply", "--model", str(src), "--circuit", str(circuit_path), "--out", str(tmp_path / "o"),
            "--multiplier", "2")  # fmt: skip
    saved = json.loads((tmp_path / "o" / "circuit.json").read_text())
    assert saved["multiplier"] == 2.0
    again = run_cli("apply", "--model", str(src), "--circuit", str(circuit_path), "--out", str(tmp_path / "o"),
                    check=False)  # fmt: skip
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    run_cli("apply", "--model", str(src), "--circuit", str(circuit_path), "--out", str(tmp_path / "o"), "--overwrite")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["apply", "--model", "{src}", "--circuit", "{tmp}/missing.json", "--out", "{tmp}/o"], "does not exist"),
        (["apply", "--model", "{tmp}/nowhere", "--circuit", "{tmp}/c.json", "--out", "{tmp}/o"], "neither"),
        (["run", "no-such-recipe", "--model", "{src}", "--out", "{tmp}/o"], "not found"),
        (["run", "refusal-ablate", "--model", "{src}", "--out", "{src}"], "overlaps the source"),
        (["run", "refusal-ablate", "--model", "{src}", "--out", "{tmp}/o", "--multiplier", "nan"], "finite"),
        (["discover", "--model", "{src}", "-o", "{tmp}/c.json"], "--recipe"),
        (["run", "refusal-ablate", "--model", "{src}", "--out", "{tmp}/o", "--top-k", "0"], "at least 1"),
        (["inspect"], "required"),
    ],
)
def test_errors_are_one_line_exit_2(tiny_models, tmp_path, args, message):
    src = tiny_models["llama"]
    args = [a.format(src=src, tmp=tmp_path) for a in args]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
