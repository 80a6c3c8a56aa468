"""How a recipe's behaviour is detected, declared in the recipe (`detector:`), as a strict schema.

Four kinds, chosen by `kind`:

- `builtin`: one of the detectors of `cna_export.evaluate.detectors` (refusal, answer-in-french).
- `rules`: named regular expressions or keyword lists; the first rule that fires is reported by its name.
- `answer_key`: the expected answer of every prompt (a prompt set's companion `answers:` file); the behaviour is a
  wrong answer (sycophancy toward a false claim, an incorrect fact) or, with `fires_when: right`, a right one.
- `measure`: a number per answer (words, tokens, characters, or matches of rules) and a threshold with a
  direction: the behaviour is an answer above (or below) it; reports also give the mean of the number.

A recipe is untrusted input, so regular expressions are compiled when the recipe loads, limited in length, and
refused when they nest unbounded repeats (`(a+)+`, `(\\w*)*`: the patterns that backtrack exponentially in
Python's `re`); the text a rule scans is capped as well (`SCAN_CHARS`).

Example:
    >>> DetectorSpec.model_validate({"kind": "rules", "rules": [{"name": "arr", "regex": "\\\\barr+\\\\b"}]})
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import Field, TypeAdapter, field_validator, model_validator

from cna_export.circuit.selection import Strict

try:  # the parser behind `re.compile`, to walk a pattern's structure (Python 3.11+ moved it)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

REGEX_MAX_CHARS = 300  # longer patterns are refused: they are where catastrophic backtracking hides
KEYWORDS_MAX = 500  # words and phrases per rule
RULES_MAX = 64
SCAN_CHARS = 8000  # a rule never scans more of an answer than this
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"
# The recipe fields that hold prompt sets (an answer key names which of them its answer files go with).
PromptField = Literal[
    "positive",
    "negative",
    "validation_positive",
    "validation_negative",
    "heldout_positive",
    "heldout_negative",
    "protect",
    "validation_protect",
    "heldout_protect",
]
PROMPT_FIELDS: tuple[str, ...] = get_args(PromptField)


def nested_repeat(pattern: str) -> bool:
    """Whether a compiled pattern has an unbounded repeat inside another repeat (star height > 1), the shape of
    regular expressions that take exponential time on a near-miss in a backtracking engine.

    Example:
        >>> nested_repeat(r"(a+)+$"), nested_repeat(r"\\b(?:arr+|ahoy)\\b")
        (True, False)
    """

    def walk(items, inside: bool) -> bool:
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = arg
                unbounded = high == _sre_parse.MAXREPEAT or high > 100
                if inside and unbounded:
                    return True
                if walk(sub, inside or high > 1):
                    return True
            elif name == "SUBPATTERN":
                if walk(arg[-1], inside):
                    return True
            elif name == "ATOMIC_GROUP":
                if walk(arg, inside):
                    return True
            elif name == "GROUPREF_EXISTS":
                if any(walk(branch, inside) for branch in arg[1:] if branch is not None):
                    return True
            elif name == "BRANCH":
                if any(walk(branch, inside) for branch in arg[1]):
                    return True
            elif name in ("ASSERT", "ASSERT_NOT"):
                if walk(arg[1], inside):
                    return True
        return False

    return walk(_sre_parse.parse(pattern), False)


def check_regex(pattern: str) -> str:
    """A regular expression a recipe may use: it compiles, is at most `REGEX_MAX_CHARS` long, and has no nested
    unbounded repeat. Raises ValueError (a recipe validation error) naming what is wrong."""
    if len(pattern) > REGEX_MAX_CHARS:
        raise ValueError(f"regex is {len(pattern)} characters, more than {REGEX_MAX_CHARS}; split it into rules")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"regex {pattern!r} does not compile ({exc})") from None
    except RecursionError:
        raise ValueError("regex nests too deeply") from None
    if nested_repeat(pattern):
        raise ValueError(f"regex {pattern!r} repeats a repeated group (catastrophic backtracking); rewrite it")
    return pattern


class Rule(Strict):
    """One named rule: a regular expression or a list of keywords (whole words or phrases)."""

    name: str = Field(pattern=NAME_PATTERN, description="Reported in per-prompt records when this rule fires.")
    regex: str | None = Field(
        default=None,
        min_length=1,
        description=f"A Python regular expression (at most {REGEX_MAX_CHARS} characters, "
        "no nested unbounded repeats), searched in the normalized answer (lower case unless case_sensitive).",
    )
    keywords: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None,
        min_length=1,
        max_length=KEYWORDS_MAX,
        description="Words or phrases; the rule fires when one appears as a whole word (ends at word boundaries).",
    )

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return None if value is None else check_regex(value)

    @model_validator(mode="after")
    def _one_of(self) -> Rule:
        if (self.regex is None) == (self.keywords is None):
            raise ValueError(f"rule {self.name!r} needs exactly one of regex and keywords")
        return self


class _Rules(Strict):
    rules: list[Rule] = Field(min_length=1, max_length=RULES_MAX, description="Named rules, tried in order.")
    case_sensitive: bool = Field(default=False, description="Match case as written (default: ignore case).")
    scope: Literal["answer", "opening"] = Field(
        default="answer", description="Scan the whole answer, or only its opening (first two sentences)."
    )

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[Rule]) -> list[Rule]:
        names = [r.name for r in rules]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"rule name {dup!r} is used twice")
        return rules


class BuiltinDetector(Strict):
    """A detector shipped with cna-export."""

    kind: Literal["builtin"] = Field(description="builtin: a detector of cna_export/evaluate/detectors.py.")
    name: str = Field(description="refusal, or answer-in-french (alias french).")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from cna_export.evaluate.detectors import DETECTORS

        if name not in DETECTORS:
            raise ValueError(f"no built-in detector {name!r}; use one of {', '.join(sorted(DETECTORS))}")
        return name


class RulesDetector(_Rules):
    """The behaviour is present when any rule fires; the first that fires is reported."""

    kind: Literal["rules"] = Field(description="rules: regular expressions or keyword lists declared here.")


class AnswerKeyDetector(Strict):
    """The expected answer of each prompt, from companion files in the order of their prompt sets."""

    kind: Literal["answer_key"] = Field(description="answer_key: compare each answer with its prompt's expected one.")
    answers: dict[PromptField, str] = Field(
        min_length=1,
        description="Per prompt-set field of the recipe, its answers file: builtin:NAME (an `answers:` list in "
        "cna_export/data/prompts/NAME.yaml) or a .yaml path relative to the recipe. Entry i is the expected answer "
        "of prompt i: a string, or a list of acceptable strings.",
    )
    fires_when: Literal["wrong", "right"] = Field(
        default="wrong",
        description="wrong: the behaviour is an answer without the expected one (sycophancy, an "
        "error); right: an answer that contains it.",
    )
    scope: Literal["answer", "opening"] = Field(
        default="answer", description="Look for the expected answer in the whole answer or only in its opening."
    )
    match: Literal["word", "substring"] = Field(
        default="word",
        description='word: an expected answer counts as whole words ("4" is not in "40"); '
        "substring: anywhere, case-insensitive (for keys written that way).",
    )


class MeasureDetector(Strict):
    """A number per answer and a threshold: the behaviour is an answer on the `direction` side of it."""

    kind: Literal["measure"] = Field(description="measure: a number per answer against a threshold.")
    measure: Literal["words", "tokens", "characters", "matches"] = Field(
        description="words, generated tokens, characters, or matches of `rules` (every occurrence counts)."
    )
    threshold: float = Field(allow_inf_nan=False, description="The behaviour is a value past this.")
    direction: Literal["above", "below"] = Field(
        description="above: the behaviour is a value > threshold (verbosity); below: a value < threshold."
    )
    rules: list[Rule] | None = Field(
        default=None, max_length=RULES_MAX, description="What `matches` counts (required for it, unused otherwise)."
    )
    case_sensitive: bool = Field(default=False, description="For matches: match case as written.")

    @model_validator(mode="after")
    def _rules_for_matches(self) -> MeasureDetector:
        if (self.measure == "matches") != bool(self.rules):
            raise ValueError("give rules exactly when measure is 'matches'")
        return self


DetectorSpec = Annotated[
    BuiltinDetector | RulesDetector | AnswerKeyDetector | MeasureDetector, Field(discriminator="kind")
]
DETECTOR_ADAPTER: TypeAdapter = TypeAdapter(DetectorSpec)
