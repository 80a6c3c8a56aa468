"""The one reader of untrusted JSON: configs, safetensors headers and indexes, circuits, prompt files, tokenizers.

`json.loads` fails in more ways than `JSONDecodeError`: a nesting of 100,000 arrays raises `RecursionError`, bytes
that are not UTF-8 raise `UnicodeDecodeError`, and an integer of more than 4300 digits raises a plain `ValueError`
(Python's limit on integer-string conversion). Every reader of a file a user did not write goes through
`parse_json`, which turns each of them into the caller's one-line `CnaExportError`, built from a short reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cna_export.errors import CnaExportError

# Python refuses to convert longer integer strings (sys.int_info.default_max_str_digits); the reader refuses them
# itself, with its own reason, so the limit does not depend on the interpreter's setting.
MAX_INT_DIGITS = 4300


class _Refused(ValueError):
    """A value the reader refuses (its message is the reason)."""


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {digits} digits, more than {MAX_INT_DIGITS}")
    return int(text)


def reason(exc: BaseException) -> str:
    """A short, stable description of why `json.loads` failed."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, _Refused):
        return str(exc)
    return exc.__class__.__name__


def parse_json(text: str | bytes, fail: Callable[[str], CnaExportError]) -> Any:
    """`text` parsed as JSON; any parser failure raises `fail(reason)` (the caller words the message).

    Example:
        >>> parse_json(raw, lambda why: CheckpointError(f"{path} is not valid JSON ({why}).", "restore it."))
    """
    try:
        return json.loads(text, parse_int=_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(reason(exc)) from None


def read_json(path: Path, fail: Callable[[str], CnaExportError]) -> Any:
    """The JSON file at `path` (bytes: `json.loads` detects UTF-8/16/32); `OSError`s propagate to the caller."""
    return parse_json(Path(path).read_bytes(), fail)
