"""Behaviours declared in a recipe: each detector kind, bad declarations refused in one line, the system prompt in
attribution, eval and GGUF encoding, and `eval` of a recipe whose behaviour only its own detector knows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import build_model, make_circuit, run_cli
from transformers import AutoTokenizer

from cna_export.attribution.collect import encode_prompts
from cna_export.attribution.discover import plan_discovery
from cna_export.circuit.detector import check_regex, nested_repeat
from cna_export.circuit.recipe import load_recipe
from cna_export.errors import RecipeError
from cna_export.evaluate.declared import Behaviour, behaviour_of, judge
from cna_export.evaluate.declared import detector_description as describe
from cna_export.evaluate.detectors import detector_for

BASE = {"version": 1, "name": "pirate", "behaviour": "pirate", "multiplier": 0.0,
        "positive": ["Talk like a pirate about the sea.", "Say ahoy as a pirate would."],
        "negative": ["Talk about the sea.", "Say hello politely."]}  # fmt: skip


def write_recipe(folder: Path, **fields) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, **fields}, sort_keys=False))
    return path


def declared(folder: Path, detector: dict, **fields):
    recipe, base = load_recipe(write_recipe(folder, detector=detector, **fields))
    return behaviour_of(recipe, base)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("behaviours") / "qwen2", "qwen2")


# Each kind of detector ------------------------------------------------------------------------------------------


def test_builtin_detector(tmp_path):
    behaviour = declared(tmp_path, {"kind": "builtin", "name": "refusal"})
    assert isinstance(behaviour, Behaviour) and behaviour == "pirate"
    assert detector_for(behaviour)("I'm sorry, but I can't help with that.") == "will-not"
    assert judge(detector_for(behaviour), "Sure, here it is.") == (None, None)
    assert describe(behaviour) == "built-in detector 'refusal'"


def test_rules_report_the_rule_that_fired(tmp_path):
    behaviour = declared(tmp_path, {"kind": "rules", "rules": [
        {"name": "arr", "regex": r"\barr+\b"},
        {"name": "pirate-words", "keywords": ["matey", "shiver me timbers", "Ahoy"]},
    ]})  # fmt: skip
    detect = detector_for(behaviour)
    assert detect("Arrr, the sea is wide.") == "arr"
    assert detect("Ahoy there, MATEY!") == "pirate-words"  # case-insensitive by default
    assert detect("Shiver   me\ntimbers") == "pirate-words"  # a phrase matches across any spacing
    assert detect("The harbour is calm; mateyness is not a word.") is None  # keywords are whole words
    assert "arr (regex)" in describe(behaviour) and "pirate-words (3 keywords)" in describe(behaviour)
    opening = declared(tmp_path, {"kind": "rules", "scope": "opening", "rules": [{"name": "arr", "regex": "arr"}]})
    assert detector_for(opening)("Fine. Calm seas. Then arr.") is None  # third sentence: outside the opening
    rules = [{"name": "A", "keywords": ["Ahoy"]}]
    strict = declared(tmp_path, {"kind": "rules", "case_sensitive": True, "rules": rules})
    assert detector_for(strict)("ahoy") is None and detector_for(strict)("Ahoy") == "A"


def test_answer_key_pairs_answers_with_prompts(tmp_path):
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump({"prompts": [
        "I'm sure the capital of Australia is Sydney. What is it?", "2 + 2 is 5, right? What is 2 + 2?"]}))
    (tmp_path / "claims_answers.yaml").write_text(yaml.safe_dump({"answers": ["Canberra", ["4", "four"]]}))
    behaviour = declared(tmp_path, {"kind": "answer_key", "answers": {"validation_positive": "claims_answers.yaml"}},
                         validation_positive="claims.yaml")  # fmt: skip
    detect = detector_for(behaviour)
    capital, arithmetic = yaml.safe_load((tmp_path / "claims.yaml").read_text())["prompts"]
    assert detect.verdict("Yes, Sydney is the capital.", capital) == "wrong-answer"
    assert detect.verdict("Actually it is Canberra.", capital) is None
    assert detect.verdict("It is four.", arithmetic) is None
    assert detect.verdict("It is 44.", arithmetic) == "wrong-answer"
    assert detect.verdict("Anything", "a prompt with no key") is None  # unkeyed prompts are not scored
    right = declared(tmp_path, {"kind": "answer_key", "fires_when": "right",
                                "answers": {"validation_positive": "claims_answers.yaml"}},
                     validation_positive="claims.yaml")  # fmt: skip
    assert detector_for(right).verdict("Canberra.", capital) == "right-answer"
    loose = declared(tmp_path, {"kind": "answer_key", "match": "substring",
                                "answers": {"validation_positive": "claims_answers.yaml"}},
                     validation_positive="claims.yaml")  # fmt: skip
    assert detector_for(loose).verdict("It is 44.", arithmetic) is None  # "4" is a substring of "44"
    assert detector_for(loose).verdict("CANBERRA’s the one", capital) is None
    (tmp_path / "short_answers.yaml").write_text(yaml.safe_dump({"answers": ["Canberra"]}))
    with pytest.raises(RecipeError, match="2 prompts but its answers file short_answers.yaml has 1"):
        declared(tmp_path, {"kind": "answer_key", "answers": {"validation_positive": "short_answers.yaml"}},
                 validation_positive="claims.yaml")  # fmt: skip
    with pytest.raises(RecipeError, match="does not set"):
        declared(tmp_path, {"kind": "answer_key", "answers": {"heldout_positive": "claims_answers.yaml"}})
    with pytest.raises(RecipeError, match="answers file '../elsewhere.yaml' is not inside the recipe's folder"):
        declared(tmp_path, {"kind": "answer_key", "answers": {"positive": "../elsewhere.yaml"}})


@pytest.mark.parametrize(
    "measure, text, tokens, value, fires",
    [
        ({"measure": "words", "threshold": 3, "direction": "above"}, "one two three four", 9, 4.0, "words>3"),
        ({"measure": "words", "threshold": 3, "direction": "above"}, "don't re-run it", 9, 3.0, None),
        ({"measure": "tokens", "threshold": 5, "direction": "below"}, "ignored", 4, 4.0, "tokens<5"),
        ({"measure": "characters", "threshold": 4, "direction": "above"}, "  abc  ", 1, 3.0, None),
        ({"measure": "matches", "threshold": 1, "direction": "above", "rules": [{"name": "b", "regex": r"^\s*[-*] "}]},
         "- a\n- b\nc - d", 1, 2.0, "matches>1"),  # ^ is every line's start
        ({"measure": "matches", "threshold": 1, "direction": "above", "rules": [{"name": "s", "keywords": ["sorry"]}]},
         "Sorry, sorry!", 1, 2.0, "matches>1"),
    ],
)
def test_measure_detector(tmp_path, measure, text, tokens, value, fires):
    detect = detector_for(declared(tmp_path, {"kind": "measure", **measure}))
    assert judge(detect, text, "", tokens) == (fires, value)


# Bad declarations: one line each ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "detector, message",
    [
        ({"kind": "rules", "rules": [{"name": "x", "regex": "(unclosed"}]}, "does not compile"),
        ({"kind": "rules", "rules": [{"name": "x", "regex": "(a+)+$"}]}, "catastrophic backtracking"),
        ({"kind": "rules", "rules": [{"name": "x", "regex": "a" * 301}]}, "more than 300"),
        ({"kind": "rules", "rules": [{"name": "x", "regex": "a", "keywords": ["a"]}]}, "exactly one of regex"),
        ({"kind": "rules", "rules": [{"name": "x", "regex": "a"}, {"name": "x", "regex": "b"}]}, "used twice"),
        ({"kind": "rules", "rules": [{"name": "bad name", "regex": "a"}]}, "rules.0.name"),
        ({"kind": "rules", "rules": []}, "at least 1"),
        ({"kind": "builtin", "name": "pirate"}, "no built-in detector 'pirate'"),
        ({"kind": "measure", "measure": "words", "threshold": 3}, "direction"),
        ({"kind": "measure", "measure": "matches", "threshold": 1, "direction": "above"}, "exactly when"),
        ({"kind": "measure", "measure": "words", "threshold": "3", "direction": "above"}, "valid number"),
        ({"kind": "oracle"}, "does not match any of the expected tags"),
    ],
)
def test_bad_detector_is_one_line(tmp_path, detector, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, detector=detector))
    assert message in str(err.value) and "\n" not in str(err.value) and "detector" in str(err.value)


def test_invalid_regex_through_the_cli(tmp_path, qwen):
    recipe = write_recipe(tmp_path, detector={"kind": "rules", "rules": [{"name": "x", "regex": r"(\w+\s?)*$"}]})
    proc = run_cli("eval", "--model", str(qwen), "--recipe", str(recipe), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "catastrophic backtracking" in proc.stderr and not (tmp_path / "o").exists()


def test_regex_checks():
    assert nested_repeat(r"(?:x+y)*") and nested_repeat(r"(?>a+)+") and not nested_repeat(r"(?:ab|cd){2,3}x+")
    assert check_regex(r"\bi (?:can't|cannot) help\b")


# The system prompt ---------------------------------------------------------------------------------------------


def test_system_prompt_reaches_attribution_and_eval(tmp_path, qwen):
    tok = AutoTokenizer.from_pretrained(qwen)
    ids = encode_prompts(tok, ["hello"], system="You are AcmeBot.")[0]
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are AcmeBot.<|im_end|>\n<|im_start|>user\nhello")
    raw = encode_prompts(tok, ["hello"], chat_template=False, system="Be brief.")[0]
    assert tok.decode(raw) == "Be brief.\n\nhello"
    (tmp_path / "bot.yaml").write_text(yaml.safe_dump({"system": "You are AcmeBot, support for Acme routers."}))
    recipe, base = load_recipe(write_recipe(tmp_path, system_prompt="bot.yaml"))
    plan = plan_discovery(recipe, base)
    assert plan.selection.system_prompt == "You are AcmeBot, support for Acme routers."
    inline, base = load_recipe(write_recipe(tmp_path, system_prompt="Answer only router questions."))
    assert plan_discovery(inline, base).selection.system_prompt == "Answer only router questions."
    override = plan_discovery(inline, base, overrides={"system_prompt": "Other text."})
    assert override.selection.system_prompt == "Other text."
    with pytest.raises(RecipeError, match="does not exist"):
        plan_discovery(*load_recipe(write_recipe(tmp_path, system_prompt="missing.txt")))


def test_gguf_chat_renders_the_system_message():
    pytest.importorskip("jinja2")
    from conftest import CHATML

    from cna_export.gguf.llamacpp import render_chat

    text = render_chat(CHATML, "hi", "", "", system="Be nice.")
    assert text == "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# eval with a declared behaviour ---------------------------------------------------------------------------------


def test_eval_of_a_behaviour_only_its_recipe_can_detect(tmp_path, qwen):
    """'pirate' is no built-in detector: eval, its report and the card's headline use the recipe's rules."""
    recipe = write_recipe(
        tmp_path, heldout_positive=["Describe a ship as a pirate.", "Greet me like a pirate."],
        heldout_negative=["Describe a ship.", "Greet me."], system_prompt="You are a helpful assistant.",
        protect=["Describe the sea as a sailor."], heldout_protect=["Describe a harbour as a sailor.", "Say bye."],
        detector={"kind": "rules", "rules": [{"name": "anything", "regex": r"\S"},
                                             {"name": "never", "keywords": ["zzq"]}]},
    )  # fmt: skip
    circuit = make_circuit(qwen, [(1, 3), (2, 7)])
    circuit.recipe, circuit.behaviour = "pirate", "pirate"
    circuit.save(tmp_path / "c.json")
    out = tmp_path / "ev"
    proc = run_cli("eval", "--model", str(qwen), "--circuit", str(tmp_path / "c.json"), "--recipe", str(recipe),
                   "--out", str(out), "--max-new-tokens", "4", "--kl-tokens", "2", check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "No detector" not in proc.stderr and "pirate rate on 2 held-out prompts" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["behaviour"] == "pirate" and results["detector"].startswith("rules in the answer: anything (regex)")
    assert results["config"]["system_prompt"] == "You are a helpful assistant."
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert {r["rule"] for r in records} <= {"anything", None} and any(r["rule"] == "anything" for r in records)
    report = (out / "report.md").read_text()
    assert "Detector: rules in the answer" in report
    assert "Protect set (prompts whose behaviour must not change)" in report
    # The protect set is measured beside the positive prompts and split off: its own rate, its own records.
    assert results["heldout"]["positive"] == 2 and results["heldout"]["protect"] == 2
    for metrics in [results["baseline"], *results["points"]]:
        assert metrics["n_positive"] == 2 and metrics["n_protect"] == 2
        mine = [r for r in records if r["label"] == metrics["label"] and r["set"] == "protect"]
        assert [r["prompt"] for r in mine] == ["Describe a harbour as a sailor.", "Say bye."]
        assert metrics["protect_hits"] == sum(r["behaviour"] for r in mine)
