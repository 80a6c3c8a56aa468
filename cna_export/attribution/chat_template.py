"""Chat templates are untrusted code: both routes render them in jinja2's immutable sandbox, and any failure of
one (a `SecurityError` when it reaches for `__init__` or `__subclasses__`, a syntax error, `raise_exception`, a
type error inside an expression) is one line, raised before any forward pass.

A model folder's template runs in transformers' `apply_chat_template`, itself an `ImmutableSandboxedEnvironment`;
a GGUF's `tokenizer.chat_template` runs in `render_chat` below, the same environment with the same extensions
and helpers (trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that
keeps non-ASCII text). `rendering` is the one place their errors become a `RecipeError`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
from collections.abc import Iterator

from cna_export.errors import RecipeError

FOLDER_FIX = "pass --no-chat-template, or fix the chat template (tokenizer_config.json or chat_template.jinja)."
GGUF_FIX = "pass --no-chat-template, or fix tokenizer.chat_template in the file."


@contextlib.contextmanager
def rendering(whose: str, fix: str = FOLDER_FIX) -> Iterator[None]:
    """Turn any failure of the template rendered inside the block into one line naming `whose` template.

    The exception comes from running the template, a file's code, so whatever it is, the fix is the template."""
    try:
        yield
    except RecipeError:
        raise
    except Exception as exc:  # jinja2's TemplateError family, and what an expression in the template raises
        detail = (str(exc).splitlines() or [""])[0].rstrip(".")
        raise RecipeError(f"{whose} chat template failed ({exc.__class__.__name__}: {detail}).", fix) from None


SYSTEM_FIX = "drop the recipe's system_prompt (or --system-prompt), or use a model whose template has a system role."


def messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat: a `system` message when given, then the user's prompt."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def user_turn(tokenizer, prompt: str, whose: str, system: str | None = None) -> str:
    """A user turn (after a `system` message, when given) with the generation prompt, rendered by transformers
    (sandboxed) from a tokenizer's template. A template that refuses a system role (Gemma 2's raises) is one line."""
    with rendering(whose, SYSTEM_FIX if system else FOLDER_FIX):
        return tokenizer.apply_chat_template(messages(prompt, system), tokenize=False, add_generation_prompt=True)


def render_chat(
    template: str, prompt: str, bos: str, eos: str, whose: str = "The GGUF's", system: str | None = None
) -> str:
    """A user turn (after a `system` message, when given) with the generation prompt, rendered as transformers
    renders chat templates (see above)."""
    with rendering(whose, SYSTEM_FIX if system else GGUF_FIX):
        return _compiled(template).render(
            messages=messages(prompt, system), add_generation_prompt=True, bos_token=bos, eos_token=eos
        )


@functools.lru_cache(maxsize=4)
def _compiled(template: str):
    """The jinja2 template, compiled once per template text (compiling costs more than rendering a prompt)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: object, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)
