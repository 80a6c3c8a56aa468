"""Names that cna-export writes into other files: checked for control characters (`check_name`), and reduced to
what may be published (`public_name`: a Hub id or a file name, never a local path)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from cna_export.errors import OutputError


def check_name(name: str, what: str = "Output name") -> str:
    """Refuse a name holding a control character or a line break: written into a Modelfile, YAML or Markdown, a
    newline would start a line of its own (a second FROM, a new YAML key). Returns `name`."""
    bad = next((ch for ch in name if unicodedata.category(ch) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise OutputError(
            f"{what} {name!r} contains the control character {bad!r}.",
            "rename it with printable characters only (it is written into Modelfiles, model cards and metadata).",
        )
    return name


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_CACHE = re.compile(r"^models--([\w.-]+?)--([\w.-]+)$")


def public_name(name: str) -> str:
    """The form of a model name that may be published: a Hub id as it is, a folder of the Hugging Face cache as
    its Hub id, any other path by its last part (a card or circuit is published; the author's disk is not).

    Example:
        >>> public_name("/home/me/.cache/models/smollm2.Q4_1.gguf")
        'smollm2.Q4_1.gguf'
    """
    if _HUB_ID.match(name) and not name.startswith("."):
        return check_name(name, "Model name")
    path = Path(name)
    if path.parent.name == "snapshots" and (m := _HUB_CACHE.match(path.parent.parent.name)):
        return f"{m[1]}/{m[2]}"
    return check_name(path.name or path.resolve().name, "Model name")
