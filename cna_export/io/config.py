"""The one reader of a model folder's config.json (untrusted input: any JSON error is one line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cna_export.errors import CheckpointError
from cna_export.io.untrusted_json import read_json


def read_config_json(folder: Path) -> dict[str, Any]:
    """`folder/config.json` as a dict; a missing, unreadable, malformed or absurdly nested file is a
    `CheckpointError` with the fix."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json.", "pass a Hugging Face model folder.")
    try:
        config = read_json(path, lambda why: CheckpointError(f"{path} is unreadable ({why}).", "restore it."))
    except OSError as exc:
        raise CheckpointError(f"{path} is unreadable ({exc.strerror}).", "restore it.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object.", "restore it.")
    return config
