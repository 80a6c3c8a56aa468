"""Detectors declared in a recipe (`cna_export.circuit.detector`), made runnable.

A declared detector judges one answer from its text, its prompt (an answer key looks the expected answer up by
prompt) and its length in generated tokens (a `tokens` measure): `verdict(text, prompt, tokens)` gives the name of
what fired or None, and `value(...)` the number a measure detector compares (None for the others). The built-in
detectors stay plain `text -> reason` functions; `judge` calls either kind.

A recipe's behaviour travels through `eval` and `sweep` as a `Behaviour`: a `str` (its name, as reports and
circuits record it) that also carries the recipe's detector, so `detector_for` finds it without a registry.

Example:
    >>> recipe, base = load_recipe("pirate.yaml")
    >>> behaviour = behaviour_of(recipe, base)          # "pirate", with its keyword rules
    >>> detector_for(behaviour)("Arr, matey!")          # "pirate-words"
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import regex

from cna_export.circuit.detector import (
    SCAN_CHARS,
    AnswerKeyDetector,
    BuiltinDetector,
    MeasureDetector,
    Rule,
    RulesDetector,
)
from cna_export.errors import RecipeError
from cna_export.evaluate.detectors import _QUOTES, DETECTORS, normalize, opening

log = logging.getLogger(__name__)

REGEX_TIMEOUT_S = 0.5  # a second line of defence after the static checks: no answer takes longer to scan
_WORD = regex.compile(r"\w+(?:['’-]\w+)*")


class Behaviour(str):
    """A behaviour name that carries its recipe's declared detector (`detector_for` uses it)."""

    detector: DeclaredDetector

    def __new__(cls, name: str, detector: DeclaredDetector) -> Behaviour:
        obj = super().__new__(cls, name)
        obj.detector = detector
        return obj


class CompiledRules:
    """A list of named rules compiled once; `first` names the first that fires, `count` counts every match."""

    def __init__(self, rules: Sequence[Rule], case_sensitive: bool) -> None:
        # MULTILINE: ^ and $ match at every line of the answer (bullets, headings); case-insensitive by default
        flags = regex.MULTILINE | regex.UNICODE | (0 if case_sensitive else regex.IGNORECASE)
        self.case_sensitive = case_sensitive
        self.rules = [
            (r.name, regex.compile(r.regex if r.regex is not None else _keywords(r.keywords or []), flags))
            for r in rules
        ]

    def _text(self, text: str) -> str:
        """Straight quotes (a rule's "can't" matches a typographic apostrophe), lower case unless case-sensitive;
        lines are kept."""
        text = text[:SCAN_CHARS].translate(_QUOTES)
        return text if self.case_sensitive else text.lower()

    def first(self, text: str) -> str | None:
        scanned = self._text(text)
        for name, pattern in self.rules:
            if _search(pattern, scanned, name) is not None:
                return name
        return None

    def count(self, text: str) -> int:
        scanned = self._text(text)
        return sum(len(_findall(pattern, scanned, name)) for name, pattern in self.rules)


def _keywords(words: Sequence[str]) -> str:
    """One alternation of the keywords, each a whole word or phrase (its inner spaces match any spacing)."""
    parts = [r"\s+".join(regex.escape(w) for w in phrase.split()) for phrase in words]
    return r"(?<!\w)(?:" + "|".join(sorted(parts, key=len, reverse=True)) + r")(?!\w)"


def _search(pattern: regex.Pattern, text: str, name: str):
    return _timed(pattern.search, text, name)


def _findall(pattern: regex.Pattern, text: str, name: str) -> list:
    return _timed(pattern.findall, text, name)


def _timed(method, text: str, name: str):
    """`method(text)` of a compiled rule, stopped after REGEX_TIMEOUT_S (a recipe's regex is untrusted)."""
    try:
        return method(text, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise RecipeError(
            f"Detector rule {name!r} took over {REGEX_TIMEOUT_S} s on one answer.",
            "simplify its regex (avoid nested or overlapping repeats).",
        ) from None


class DeclaredDetector:
    """A recipe's detector. `verdict` is the reason the behaviour is present (or None); `value` the measured
    number of a measure detector (None otherwise); `describe` one line for reports and cards."""

    def verdict(self, text: str, prompt: str = "", tokens: int = 0) -> str | None:
        raise NotImplementedError

    def value(self, text: str, prompt: str = "", tokens: int = 0) -> float | None:
        return None

    def describe(self) -> str:
        raise NotImplementedError

    def __call__(self, text: str) -> str | None:  # the built-in detectors' shape, for text-only callers
        return self.verdict(text)


class BuiltinDeclared(DeclaredDetector):
    def __init__(self, spec: BuiltinDetector) -> None:
        self.name, self.fn = spec.name, DETECTORS[spec.name]

    def verdict(self, text: str, prompt: str = "", tokens: int = 0) -> str | None:
        return self.fn(text)

    def describe(self) -> str:
        return f"built-in detector '{self.name}'"


class RulesDeclared(DeclaredDetector):
    def __init__(self, spec: RulesDetector) -> None:
        self.spec, self.rules = spec, CompiledRules(spec.rules, spec.case_sensitive)

    def verdict(self, text: str, prompt: str = "", tokens: int = 0) -> str | None:
        return self.rules.first(opening(text) if self.spec.scope == "opening" else text)

    def describe(self) -> str:
        kinds = ", ".join(
            f"{r.name} ({'regex' if r.regex is not None else f'{len(r.keywords or [])} keywords'})"
            for r in self.spec.rules
        )
        return f"rules in the {self.spec.scope}: {kinds}"


class AnswerKeyDeclared(DeclaredDetector):
    """Looks each prompt's expected answers up (normalized prompt text -> acceptable answers)."""

    def __init__(self, spec: AnswerKeyDetector, key: dict[str, list[str]]) -> None:
        self.spec, self.key, self._missing = spec, key, 0
        self.patterns = {
            prompt: CompiledRules([Rule(name="expected", keywords=answers)], False) for prompt, answers in key.items()
        }
        self.lowered = {prompt: [a.translate(_QUOTES).lower() for a in answers] for prompt, answers in key.items()}

    def verdict(self, text: str, prompt: str = "", tokens: int = 0) -> str | None:
        key = normalize(prompt)
        if key not in self.key:
            self._missing += 1
            if self._missing == 1:
                log.warning(
                    "a prompt has no expected answer in the answer key (not scored as the behaviour): %.60r", prompt
                )
            return None
        scanned = opening(text) if self.spec.scope == "opening" else text
        if self.spec.match == "substring":
            lowered = scanned[:SCAN_CHARS].translate(_QUOTES).lower()
            right = any(a in lowered for a in self.lowered[key])
        else:
            right = self.patterns[key].first(scanned) is not None
        if self.spec.fires_when == "wrong":
            return None if right else "wrong-answer"
        return "right-answer" if right else None

    def describe(self) -> str:
        return (
            f"answer key ({len(self.key)} prompts, {self.spec.match} match): the behaviour is a "
            f"{self.spec.fires_when} answer"
        )


class MeasureDeclared(DeclaredDetector):
    def __init__(self, spec: MeasureDetector) -> None:
        self.spec = spec
        self.rules = CompiledRules(spec.rules, spec.case_sensitive) if spec.rules else None

    def value(self, text: str, prompt: str = "", tokens: int = 0) -> float:
        kind = self.spec.measure
        if kind == "words":
            return float(len(_WORD.findall(text[: SCAN_CHARS * 4])))
        if kind == "tokens":
            return float(tokens)
        if kind == "characters":
            return float(len(text.strip()))
        assert self.rules is not None
        return float(self.rules.count(text))

    def verdict(self, text: str, prompt: str = "", tokens: int = 0) -> str | None:
        v, t = self.value(text, prompt, tokens), self.spec.threshold
        if self.spec.direction == "above":
            return f"{self.spec.measure}>{t:g}" if v > t else None
        return f"{self.spec.measure}<{t:g}" if v < t else None

    def describe(self) -> str:
        side = ">" if self.spec.direction == "above" else "<"
        return f"measure: {self.spec.measure} {side} {self.spec.threshold:g}"


def judge(detector, text: str, prompt: str = "", tokens: int = 0) -> tuple[str | None, float | None]:
    """(reason or None, measured value or None) of one answer, for a built-in `text -> reason` function or a
    declared detector."""
    if isinstance(detector, DeclaredDetector):
        return detector.verdict(text, prompt, tokens), detector.value(text, prompt, tokens)
    return detector(text), None


def detector_description(behaviour: str) -> str:
    """How a behaviour is detected, in one line (reports, cards)."""
    declared = getattr(behaviour, "detector", None)
    if isinstance(declared, DeclaredDetector):
        return declared.describe()
    return f"built-in detector '{behaviour}'" if behaviour in DETECTORS else "unknown"


# Building a recipe's detector ----------------------------------------------------------------------------------


def build_detector(spec, recipe, base: Path | None) -> DeclaredDetector:
    """The runnable detector of a recipe's `detector:` block (an answer key reads its files and pairs them with the
    recipe's prompt sets, which must be as long)."""
    from cna_export.circuit.companions import load_answers
    from cna_export.circuit.recipe import load_prompts

    if isinstance(spec, BuiltinDetector):
        return BuiltinDeclared(spec)
    if isinstance(spec, RulesDetector):
        return RulesDeclared(spec)
    if isinstance(spec, MeasureDetector):
        return MeasureDeclared(spec)
    key: dict[str, list[str]] = {}
    for field, ref in spec.answers.items():
        prompts_ref = getattr(recipe, field)
        if prompts_ref is None:
            raise RecipeError(
                f"The answer key names {field}, which the recipe does not set.",
                f"add {field} to the recipe or remove it from detector.answers.",
            )
        prompts, answers = load_prompts(prompts_ref, base), load_answers(ref, base)
        if len(prompts) != len(answers):
            raise RecipeError(
                f"{field} has {len(prompts)} prompts but its answers file {ref} has {len(answers)}.",
                "give one expected answer per prompt, in the same order.",
            )
        for prompt, options in zip(prompts, answers):
            key[normalize(prompt)] = options
    return AnswerKeyDeclared(spec, key)


def behaviour_of(recipe, base: Path | None) -> str:
    """The recipe's behaviour name, carrying its declared detector when it has one (else the plain name, looked
    up among the built-in detectors)."""
    if getattr(recipe, "detector", None) is None:
        return recipe.behaviour
    return Behaviour(recipe.behaviour, build_detector(recipe.detector, recipe, base))
