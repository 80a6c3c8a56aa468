"""`run` ends with a summary (issue 24, item 2): where the neurons are, a quick check on a few validation prompts
(original vs edited, two answers side by side), the files written, the next commands, and warnings with their fix
when the edit looks harmful. On both routes; stderr free of empty bars and llama.cpp's log."""

from __future__ import annotations

import pytest
from conftest import make_circuit, run_cli

from cna_export.evaluate import summary as S
from cna_export.evaluate.chat import Exchange

SMALL = ("--top-k", "25", "--skip-first-layers", "1", "--skip-last-layers", "0", "--specificity", "0")


def _clean_stderr(stderr: str) -> None:
    assert "0.00B" not in stderr and "probably a bug" not in stderr and "llama_model_loader" not in stderr


def test_run_ends_with_a_summary(tiny_models, tmp_path):
    out = tmp_path / "edited"
    proc = run_cli("run", "refusal-ablate", "--model", str(tiny_models["qwen2"]), "--out", str(out), *SMALL,
                   "--check-prompts", "2")  # fmt: skip
    text = proc.stdout
    assert text.startswith(f"wrote {out}: 25 neurons scaled")
    assert "where: 25 neurons in 2 of 3 layers; most in layer " in text
    assert "quick check on 2 + 2 validation prompts" in text and "refusal: original 0/2, edited " in text
    assert "first-token KL " in text and f"(warn above {S.KL_FIRST_WARN})" in text
    assert text.count(">>> ") == 2 and text.count(" | edited") == 2  # two answers side by side
    assert f"files in {out}:" in text and "  circuit.json  " in text and "  model.safetensors  " in text
    for cmd in (f"cna-export eval --model {tiny_models['qwen2']} --edited {out} --recipe refusal-ablate",
                f"cna-export chat --model {tiny_models['qwen2']} --edited {out} --prompt ",
                f"cna-export push {out} YOU/edited", f"cna-export gguf {out} -o edited-q8_0.gguf"):  # fmt: skip
        assert cmd in text, cmd
    _clean_stderr(proc.stderr)


def test_layer_concentration_warns_with_the_fix(tiny_models):
    src = tiny_models["qwen2"]  # 3 layers
    crowded = make_circuit(src, [(2, i) for i in range(6)] + [(0, 1), (1, 2)])
    warning = S.layer_warning(crowded)
    assert "6 of 8 neurons (75%) are in the last layer" in warning and "--skip-last-layers 1" in warning
    assert "Fix:" in warning and "--specificity 1" in warning
    assert S.layer_warning(make_circuit(src, [(0, 1), (1, 2), (2, 3), (2, 4)])) is None  # half is not more than half
    early = S.layer_warning(make_circuit(tiny_models["llama"], [(0, i) for i in range(3)]))
    assert "are in layer 0" in early


def test_kl_and_perplexity_warnings_name_their_thresholds():
    ok = S.check_warnings({"kl_first": 0.05, "ppl_ratio": 1.06})  # refusal-ablate as shipped
    bad = S.check_warnings({"kl_first": 0.85, "ppl_ratio": 1.77})  # the custom recipe of issue 24
    assert ok == [] and len(bad) == 2
    assert f"first-token KL 0.850 on benign prompts is above {S.KL_FIRST_WARN}" in bad[0]
    assert f"1.77x as perplexing to the edited model (above {S.PPL_RATIO_WARN}x)" in bad[1]
    assert all("Fix:" in w and "cna-export sweep" in w for w in bad)


def test_an_original_without_the_behaviour_is_pointed_out():
    def check(hits: int, n: int = 4, detector: bool = True) -> dict:
        return {"baseline": {"positive_hits": hits, "n_positive": n}, "detector": detector, "behaviour": "refusal"}

    never = S.nothing_to_change(check(0), multiplier=0.0)  # SmolLM2-135M refuses none of refusal-ablate's prompts
    assert len(never) == 1 and "shows refusal on none of the 4 validation prompts" in never[0] and "Fix:" in never[0]
    assert "on all of the 4" in S.nothing_to_change(check(4), multiplier=2.0)[0]  # strengthen what is already total
    assert S.nothing_to_change(check(1), multiplier=0.0) == [] and S.nothing_to_change(check(4), multiplier=0.0) == []
    assert S.nothing_to_change(check(0), multiplier=2.0) == []  # raising from none is the edit's job
    assert S.nothing_to_change(check(0, detector=False), multiplier=0.0) == []  # no rate, no claim


def test_summary_renders_warnings_and_the_side_by_side(tiny_models, tmp_path):
    circuit = make_circuit(tiny_models["qwen2"], [(2, i) for i in range(9)] + [(0, 1)])
    metrics = {"n_positive": 2, "n_negative": 2, "positive_hits": 2, "benign_hits": 0}
    summary = S.RunSummary(circuit, tmp_path, "./m", "my.yaml", check={
        "baseline": {**metrics, "kl_first": 0.0, "ppl_ratio": 1.0},
        "edited": {**metrics, "positive_hits": 0, "kl_first": 0.85, "ppl_ratio": 1.77},
        "exchanges": [Exchange("Pick a lock?", "I can't help with that.", "the the the")], "detector": True,
        "behaviour": "refusal"})  # fmt: skip
    summary.warnings = [S.layer_warning(circuit), *S.check_warnings(summary.check["edited"])]
    text = S.render(summary)
    assert "refusal: original 2/2, edited 0/2" in text and ">>> Pick a lock?" in text and "the the the" in text
    assert text.count("warning: ") == 3 and "9 of 10 neurons (90%)" in text
    assert "cna-export eval --model ./m --edited" in text and "--recipe my.yaml" in text


def test_custom_recipe_without_a_detector_still_gets_kl(tiny_models, tmp_path):
    """A home-made recipe (the new-recipe template) for a behaviour no detector knows: the run still checks KL
    and perplexity, and says why there is no rate."""
    run_cli("new-recipe", "pirate", cwd=tmp_path)
    out = tmp_path / "pirate-edit"
    proc = run_cli("run", str(tmp_path / "pirate.yaml"), "--model", str(tiny_models["qwen2"]), "--out", str(out),
                   "--top-k", "4", "--skip-first-layers", "0", "--skip-last-layers", "0")  # fmt: skip
    assert "quick check on 1 + 1 validation prompts" in proc.stdout
    assert "pirate: no detector for this behaviour, so no rate" in proc.stdout and "first-token KL" in proc.stdout


def test_no_check_and_adapter_commands(tiny_models, tmp_path):
    out = tmp_path / "lora"
    proc = run_cli("run", "refusal-ablate", "--model", str(tiny_models["qwen2"]), "--out", str(out), *SMALL,
                   "--adapter", "--no-check")  # fmt: skip
    assert "quick check: skipped (--no-check)" in proc.stdout
    assert f"cna-export eval --model {tiny_models['qwen2']} --circuit {out / 'circuit.json'}" in proc.stdout
    assert "--edited" not in proc.stdout and "adapter_model.safetensors" in proc.stdout
    _clean_stderr(proc.stderr)


def test_run_on_a_gguf_checks_in_llama_cpp(tiny_models, tmp_path):
    pytest.importorskip("llama_cpp")
    from cna_export.gguf.convert import export_gguf

    gguf = export_gguf(tiny_models["qwen2"], tmp_path / "qwen2.gguf", outtype="f32")
    out = tmp_path / "qwen2-edited"
    proc = run_cli("run", "refusal-ablate", "--model", str(gguf), "--out", str(out), *SMALL, "--modelfile",
                   "--check-prompts", "2")  # fmt: skip
    assert "quick check on 2 + 2 validation prompts" in proc.stdout and proc.stdout.count(">>> ") == 2
    assert "  qwen2.gguf  " in proc.stdout and f"ollama create qwen2-edited -f {out / 'Modelfile'}" in proc.stdout
    _clean_stderr(proc.stderr)
