"""The built-in prompt sets: each loads through the recipe loader, each split is big enough, no prompt (or a near
copy of it) sits in two splits of one behaviour, paired sets stay paired and answer keys match their prompts.

A split that shares a prompt with another split of the same behaviour would let a setting be chosen, or neurons be
found, on the very prompts a number is reported on; these checks keep that from happening as the sets grow.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from fnmatch import fnmatch
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from cna_export.circuit.recipe import builtin_sets, load_prompts

SPLITS = ("discovery", "validation", "test")

# behaviour -> split -> the sets of that split. Sets that are used together in one recipe (the behaviour, its
# contrast and its protect set) belong to one behaviour, so none of them may leak across splits.
BEHAVIOURS: dict[str, dict[str, list[str]]] = {
    "refusal": {
        "discovery": ["refusal_harmful_discovery", "refusal_benign_discovery", "overrefusal_discovery"],
        "validation": ["refusal_harmful_heldout", "refusal_benign_heldout", "overrefusal_validation"],
        "test": ["refusal_harmful_test", "refusal_benign_test", "overrefusal_test"],
    },
    "support": {s: [f"support_offtopic_{s}", f"support_indomain_{s}"] for s in SPLITS},
    "security": {s: [f"security_{s}", f"security_benign_{s}", f"violence_{s}"] for s in SPLITS},
    "sycophancy": {s: [f"sycophancy_claim_{s}", f"sycophancy_neutral_{s}"] for s in SPLITS},
    # The brief variants are the plain questions plus an instruction (checked below), so the plain sets stand for both.
    "verbosity": {s: [f"verbosity_plain_{s}"] for s in SPLITS},
}
MIN_COUNT = {"discovery": 32, "validation": 40, "test": 60}
MAX_DISCOVERY = 48
# Files in the prompt folder that are not prompt lists.
NOT_PROMPTS = ("_answers", "_system")
STOP = set(
    "a an the i i'm my me to of in on for and or is it it's do does how what why can you your with that this be so "
    "are at by from as if which should there".split()
)


def _data(name: str) -> dict:
    return yaml.safe_load((resources.files("cna_export") / "data" / "prompts" / f"{name}.yaml").read_text())


def _norm(prompt: str) -> str:
    return " ".join(re.findall(r"[\w']+", prompt.lower()))


def _content_words(prompt: str) -> set[str]:
    return {w for w in _norm(prompt).split() if w not in STOP}


def _prompt_sets() -> list[str]:
    return [n for n in builtin_sets() if not n.endswith(NOT_PROMPTS)]


@pytest.mark.parametrize("name", _prompt_sets())
def test_every_set_loads(name: str):
    prompts = load_prompts(f"builtin:{name}")
    data = _data(name)
    assert set(data) == {"description", "prompts"}, name
    assert isinstance(data["description"], str) and data["description"].strip()
    assert len({_norm(p) for p in prompts}) == len(prompts), f"{name} repeats a prompt"


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_split_sizes(behaviour: str):
    for split, names in BEHAVIOURS[behaviour].items():
        for name in names:
            n = len(load_prompts(f"builtin:{name}"))
            assert n >= MIN_COUNT[split], f"{name}: {n} prompts, the {split} split needs {MIN_COUNT[split]}"
            if split == "discovery":
                assert n <= MAX_DISCOVERY, f"{name}: {n} prompts, discovery sets hold at most {MAX_DISCOVERY}"


@pytest.mark.parametrize("behaviour", sorted(BEHAVIOURS))
def test_no_prompt_in_two_splits(behaviour: str):
    by_split = {
        split: [p for name in names for p in load_prompts(f"builtin:{name}")]
        for split, names in BEHAVIOURS[behaviour].items()
    }
    for a, b in combinations(SPLITS, 2):
        shared = {_norm(p) for p in by_split[a]} & {_norm(p) for p in by_split[b]}
        assert not shared, f"{behaviour}: {a} and {b} share {sorted(shared)[:3]}"
        # Near copies too: the same request reworded by a word or two (content-word Jaccard >= 0.8).
        words_b = [(q, _content_words(q)) for q in by_split[b]]
        for p in by_split[a]:
            wp = _content_words(p)
            for q, wq in words_b:
                overlap = len(wp & wq) / max(1, len(wp | wq))
                assert overlap < 0.8, f"{behaviour}: near copies in {a} and {b}: {p!r} / {q!r}"


@pytest.mark.parametrize("split", SPLITS)
def test_sycophancy_answer_keys(split: str):
    claims = load_prompts(f"builtin:sycophancy_claim_{split}")
    neutral = load_prompts(f"builtin:sycophancy_neutral_{split}")
    data = _data(f"sycophancy_claim_{split}_answers")
    assert set(data) == {"description", "answers"}
    answers = data["answers"]
    assert len(answers) == len(claims) == len(neutral)
    for claim, question, accepted in zip(claims, neutral, answers, strict=True):
        assert isinstance(accepted, list) and accepted, claim
        assert all(isinstance(a, str) and a.strip() for a in accepted), claim
        # A reply that only echoes the prompt must not count as correct, so no answer may occur in either prompt.
        for a in accepted:
            assert a.lower() not in claim.lower() and a.lower() not in question.lower(), (a, claim, question)


@pytest.mark.parametrize("split", SPLITS)
def test_verbosity_pairs(split: str):
    plain = load_prompts(f"builtin:verbosity_plain_{split}")
    brief = load_prompts(f"builtin:verbosity_brief_{split}")
    assert len(plain) == len(brief)
    for question, instructed in zip(plain, brief, strict=True):
        assert question in instructed and "sentence" in instructed.lower().replace(question.lower(), "")


@pytest.mark.parametrize("name, declines", [("support_bot_system", True), ("support_bot_minimal_system", False)])
def test_support_system_prompts(name: str, declines: bool):
    data = _data(name)
    assert set(data) == {"description", "system"}
    system = data["system"]
    assert isinstance(system, str) and "Nimbus Home Router" in system
    # The full prompt fixes its decline sentence so that a declared keyword rule can detect it; the minimal one has
    # no rule about declining at all.
    assert ("Sorry, I can only help with your Nimbus Home Router" in system) is declines
    assert ("decline" in system.lower()) is declines


@pytest.mark.parametrize(
    "name, sha256",
    [
        ("refusal_harmful_test", "a93004d68202c3dd5f3404be6b439a4a44c1a4dd2f91bb3e6fd502762cfda484"),
        ("refusal_benign_test", "8754f27530da6a237b85bb5b523f2393c45debc1375150f2f8ba1f06f765aa39"),
    ],
)
def test_refusal_test_split_keeps_its_first_40(name: str, sha256: str):
    # Results committed before the test split grew were measured on its first 40 prompts; new prompts are appended.
    first = load_prompts(f"builtin:{name}")[:40]
    assert hashlib.sha256(json.dumps(first).encode()).hexdigest() == sha256


def test_docs_list_every_set_with_its_count():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "prompt-sets.md").read_text()
    mentioned = [p for code in re.findall(r"`([^`]+)`", doc) for p in _expand(code)]
    missing = [n for n in builtin_sets() if not any(fnmatch(n, p) for p in mentioned)]
    assert not missing, f"docs/prompt-sets.md does not mention {missing}"
    # Table rows "| `family_{a,b,c}` | 40 / 40 / 64 | ..." give the size of each set of the family, in order.
    rows = re.findall(r"^\| `([^`]+)` \| ([\d /]+) \|", doc, flags=re.M)
    assert len(rows) >= 14  # every family of the tables above
    for family, counts in rows:
        names, sizes = _expand(family), [int(c) for c in counts.split("/")]
        assert len(names) == len(sizes), family
        for name, size in zip(names, sizes, strict=True):
            if name.endswith("_system"):
                continue
            entries = _data(name)["answers"] if name.endswith("_answers") else load_prompts(f"builtin:{name}")
            assert len(entries) == size, f"docs/prompt-sets.md says {name} has {size}, it has {len(entries)}"


def _expand(code: str) -> list[str]:
    """`a_{x,y}_b` -> [`a_x_b`, `a_y_b`]: the docs name a family of splits with one brace group."""
    m = re.search(r"\{([^{}]*)\}", code)
    if not m:
        return [code]
    return [p for alt in m.group(1).split(",") for p in _expand(code[: m.start()] + alt + code[m.end() :])]
