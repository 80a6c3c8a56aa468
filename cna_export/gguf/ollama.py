"""Ollama: a Modelfile next to a GGUF (FROM, TEMPLATE, SYSTEM, PARAMETER stop), and `ollama create`.

Ollama's TEMPLATE is a Go template, not the Jinja chat template of the tokenizer. The chat format is recognised
by the markers the Jinja template contains (not by the model's name), and the matching Go template and stop
tokens come from `CHAT_FORMATS`. An unrecognised template is left out of the Modelfile, with a comment: Ollama
then derives one from the GGUF's own `tokenizer.chat_template` where it can.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cna_export.errors import CnaExportError, OutputError
from cna_export.io.names import check_name
from cna_export.io.output import check_output_path, write_text_atomic

log = logging.getLogger(__name__)

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatFormat:
    """A chat format: the marker that identifies its Jinja template, its Go template and its stop tokens."""

    name: str
    marker: str
    template: str
    stops: tuple[str, ...]
    system_pattern: str | None = None  # regex for a default system prompt written literally in the Jinja template


CHAT_FORMATS: tuple[ChatFormat, ...] = (
    ChatFormat(
        "chatml",
        "<|im_start|>",
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
        ("<|im_start|>", "<|im_end|>"),
        r"<\|im_start\|>system(?:\\n|\n)([^{}'\"<]+?)<\|im_end\|>",
    ),
    ChatFormat(
        "llama3",
        "<|start_header_id|>",
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFormat(
        "gemma",
        "<start_of_turn>",
        "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
        "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    ChatFormat(
        "mistral",
        "[INST]",
        "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
        ("[INST]", "[/INST]"),
    ),
)


def chat_format(chat_template: str | None) -> ChatFormat | None:
    """The known chat format whose marker occurs in `chat_template`, or None."""
    if not chat_template:
        return None
    return next((fmt for fmt in CHAT_FORMATS if fmt.marker in chat_template), None)


def modelfile_text(gguf_name: str, chat_template: str | None) -> str:
    """The Modelfile for the GGUF file `gguf_name` (relative to the Modelfile) and its Jinja chat template.

    A name with a control character is refused: a newline in it would start a line of its own (a second FROM)."""
    check_name(gguf_name, "GGUF file name")
    lines = [f"# Written by cna-export for {gguf_name}.", f"FROM ./{gguf_name}", ""]
    fmt = chat_format(chat_template)
    if fmt is None:
        why = "has no chat template" if not chat_template else "has a chat template in no format cna-export knows"
        lines += [
            f"# No TEMPLATE: the model {why} (known: {', '.join(f.name for f in CHAT_FORMATS)}).",
            "# Ollama falls back to the GGUF's tokenizer.chat_template where it can; add a TEMPLATE to override.",
        ]
        return "\n".join(lines) + "\n"
    lines.append(f"# Chat format recognised from the tokenizer's chat template: {fmt.name}.")
    lines.append(f'TEMPLATE """{fmt.template}"""')
    if fmt.system_pattern and (m := re.search(fmt.system_pattern, chat_template or "")):
        lines.append(f'SYSTEM """{m.group(1)}"""')
    lines += [f"PARAMETER stop {stop}" for stop in fmt.stops]
    return "\n".join(lines) + "\n"


def read_chat_template(gguf_path: Path) -> str | None:
    """`tokenizer.chat_template` from a GGUF file's metadata, or None."""
    from gguf import Keys

    from cna_export.gguf.check import check_gguf

    return check_gguf(Path(gguf_path)).get(Keys.Tokenizer.CHAT_TEMPLATE)


def modelfile_for(gguf_path: Path, name: str | None = None, chat_template: str | None = None) -> str:
    """The Modelfile text for the GGUF file `gguf_path`, whose FROM line names it `name` (default: its own name);
    the chat template is read from the GGUF's metadata when not given. Warns when it is not recognised."""
    gguf_path = Path(gguf_path)
    if chat_template is None:
        chat_template = read_chat_template(gguf_path)
    text = modelfile_text(name or gguf_path.name, chat_template)
    if chat_format(chat_template) is None:
        log.warning("no Ollama TEMPLATE written for %s: the chat template was not recognised", name or gguf_path.name)
    return text


def write_modelfile(
    gguf_path: Path, chat_template: str | None = None, *, out: Path | None = None, overwrite: bool = False
) -> Path:
    """Write an Ollama Modelfile for `gguf_path` (by default `Modelfile` in the same folder).

    Args:
        gguf_path: the GGUF model file.
        chat_template: the tokenizer's Jinja chat template; read from the GGUF's metadata when None.
        out: Modelfile path; must be in the GGUF's folder (FROM is relative).
        overwrite: replace an existing Modelfile (only a file).

    Returns:
        The Modelfile path.

    Example:
        >>> write_modelfile(Path("smol-edited/smol-edited-f16.gguf"))
    """
    gguf_path = Path(gguf_path)
    out = Path(out) if out is not None else gguf_path.parent / MODELFILE
    if out.absolute().parent != gguf_path.absolute().parent:
        raise OutputError(f"Modelfile {out} is not in the folder of {gguf_path}.", "write it next to the GGUF.")
    check_output_path(out, None, overwrite, folder=False)  # before the GGUF's metadata is read
    return write_text_atomic(out, modelfile_for(gguf_path, chat_template=chat_template), overwrite)


def ollama_create(name: str, modelfile: Path) -> None:
    """Run `ollama create NAME -f Modelfile` (in the Modelfile's folder, so its relative FROM resolves).

    Raises:
        CnaExportError: ollama is not on PATH, or it failed (its last output line is included).
    """
    exe = shutil.which("ollama")
    if exe is None:
        raise CnaExportError(
            f"ollama is not on PATH, so model {name!r} was not created (the Modelfile {modelfile} was written).",
            f"install Ollama and run `ollama create {name} -f {modelfile}`.",
        )
    modelfile = Path(modelfile).absolute()
    proc = subprocess.run(
        [exe, "create", name, "-f", str(modelfile)], cwd=modelfile.parent, capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CnaExportError(
            f"ollama create {name} failed (exit {proc.returncode}): {last[0]}", "check that the Ollama server runs."
        )
    log.info("ollama create %s: done", name)


def convert_for_ollama(
    model_dir: Path,
    out: Path,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    modelfile: bool = False,
    ollama_name: str | None = None,
) -> tuple[Path, Path | None]:
    """Convert a model folder to GGUF; with `modelfile` (or `ollama_name`) write the Modelfile beside it (both
    checked before either is written, and renamed into place together), and with `ollama_name` run `ollama
    create`. Returns (the GGUF, the Modelfile or None)."""
    from cna_export.gguf.convert import export_gguf

    modelfile = modelfile or ollama_name is not None
    gguf = export_gguf(model_dir, out, outtype=outtype, overwrite=overwrite, modelfile=modelfile)
    if not modelfile:
        return gguf, None
    written = gguf.parent / MODELFILE
    if ollama_name:
        ollama_create(ollama_name, written)
    return gguf, written
