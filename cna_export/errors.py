"""The project's error hierarchy.

Every error a user can cause is a `CnaExportError`: the CLI prints it as one line (problem, then the fix) and
exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CnaExportError(Exception):
    """A problem the user can fix. `str()` gives one line: the problem, then how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        line = self.problem if self.fix is None else f"{self.problem} Fix: {self.fix}"
        return " ".join(line.split())


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
