"""The project's error hierarchy.

Every error a user can cause is a `CnaExportError`: the CLI prints it as one line (problem, then the fix) and
exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# What a terminal may act on rather than show: C0 and C1 controls and DEL (escape sequences, a carriage return
# that overwrites the line), line and paragraph separators, and the bidirectional overrides and isolates that
# reorder what a reader sees (CVE-2021-42574).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str, keep: str = "") -> str:
    """`text` with every control character escaped as Python writes it (`\\x1b`, `\\u202e`), except those in
    `keep` (e.g. `"\\n\\t"` for multi-line output).

    Everything printed from an untrusted file (a circuit's behaviour, a recipe's description, prompts, GGUF
    metadata, tensor names) goes through this, so a file cannot clear the screen, write the clipboard or forge a
    line of output.

    Example:
        >>> printable("refusal\\x1b]52;c;ZWNobw==\\x07")
        'refusal\\\\x1b]52;c;ZWNobw==\\\\x07'
    """
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else m.group().encode("unicode_escape").decode(), text)


class CnaExportError(Exception):
    """A problem the user can fix. `str()` gives one line: the problem, then how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        line = self.problem if self.fix is None else f"{self.problem} Fix: {self.fix}"
        # One line, whatever the untrusted strings inside it hold.
        return printable(" ".join(line.split()))


class ArchitectureError(CnaExportError):
    """The model's architecture is unsupported or its weights do not match its config."""


class CheckpointError(CnaExportError):
    """A checkpoint file (safetensors, index, GGUF) is missing, malformed or unsafe."""


class CircuitError(CnaExportError):
    """A circuit file is malformed or does not fit the model it is applied to."""


class RecipeError(CnaExportError):
    """A recipe or prompt set is malformed."""


class OutputError(CnaExportError):
    """The output location cannot be written safely."""
