"""llama.cpp through llama-cpp-python's C API: a GGUF model mmapped by llama.cpp (nothing is dequantized in
Python), tokenized and chat-templated with its own metadata (`cna_export.attribution.chat_template` renders the
template in jinja2's sandbox), and run in batches of sequences in a context with one unified KV cache. A context may carry the graph tap of
`cna_export.gguf.tap`, which reads the input of every layer's `ffn_down` while the graph runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from cna_export.attribution.chat_template import render_chat
from cna_export.circuit.recipe import check_prompt_fits
from cna_export.errors import CheckpointError, CnaExportError, RecipeError

if TYPE_CHECKING:
    from cna_export.gguf.tap import FfnDownTap

log = logging.getLogger(__name__)

INSTALL_FIX = (
    'pip install "cna-export[gguf]" (builds llama.cpp: about 6-15 minutes on 2 cores), or pass --backend torch.'
)
GGML_TYPE_F32 = 0  # the KV cache's type (f32, so an f32 GGUF computes what transformers computes in fp32)


def require_llama_cpp() -> ModuleType:
    """The `llama_cpp` module, or one clear error saying how to install it."""
    try:
        import llama_cpp
        import llama_cpp._logger  # noqa: F401  (its log callback, so llama.cpp's chatter follows Python logging)
    except ImportError:
        raise CnaExportError("The GGUF route needs llama-cpp-python, which is not installed.", INSTALL_FIX) from None
    # llama.cpp's own log (its warnings about a model's tokenizer included, "this is probably a bug in the model")
    # says nothing a user can act on: our errors name the problem. It shows with -v (INFO) only.
    verbose = log.isEnabledFor(logging.INFO)
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)
    return llama_cpp


@dataclass
class Seq:
    """One sequence of a batch: its tokens, the position of the first, whether its last token is read, and
    (teacher forcing) the index of the first token whose logits are kept as well."""

    tokens: Sequence[int]
    start: int = 0
    output: bool = True
    logits_from: int | None = None


THREADS_ENV = "CNA_EXPORT_LLAMA_THREADS"


def threads_default() -> int:
    """llama.cpp's threads: `CNA_EXPORT_LLAMA_THREADS`, else the physical cores this process may use
    (`cna_export.cpus.physical_cores`). Its threads wait for each other at every graph node by spinning, so
    hyper-thread siblings, and cores other programs keep busy, make it slower, not faster."""
    value = os.environ.get(THREADS_ENV, "")
    if value.strip():
        if not value.strip().isdigit() or int(value) < 1:
            raise CnaExportError(
                f"{THREADS_ENV}={value!r} is not a positive number of threads.",
                f"set {THREADS_ENV} to e.g. 2, or unset it.",
            )
        return int(value)
    from cna_export.cpus import physical_cores

    return physical_cores()


class LlamaCppModel:
    """A GGUF model loaded by llama.cpp (mmapped): vocabulary, chat template, contexts.

    Example:
        >>> with LlamaCppModel(Path("smollm2.Q4_1.gguf")) as m:
        ...     ids = m.encode("Hello", chat_template="{{ messages[0]['content'] }}")
    """

    def __init__(self, path: Path, n_threads: int | None = None) -> None:
        self.lc = require_llama_cpp()
        self.path = Path(path)
        self.n_threads = n_threads or threads_default()
        self.lc.llama_backend_init()
        params = self.lc.llama_model_default_params()
        params.use_mmap = True
        # ggml's AMX kernels crash on VMs whose kernel does not grant AMX tile state; the plain CPU buffers do not.
        params.use_extra_bufts = False
        self.model = self.lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise CheckpointError(
                f"llama.cpp could not load {self.path} (an architecture or tensor type this llama.cpp build does "
                "not know, or a damaged file).",
                "upgrade llama-cpp-python, or pass --backend torch.",
            )
        self.vocab = self.lc.llama_model_get_vocab(self.model)
        self.n_layer = int(self.lc.llama_model_n_layer(self.model))
        self.n_ctx_train = int(self.lc.llama_model_n_ctx_train(self.model))

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "model", None):
            self.lc.llama_model_free(self.model)
            self.model = None

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Token ids of `text`, special-token text parsed (as transformers does), BOS added if the GGUF says so."""
        raw = text.encode("utf-8")
        if add_special and self.lc.llama_vocab_get_add_bos(self.vocab) and self.lc.llama_vocab_bos(self.vocab) < 0:
            add_special = False  # a file that asks for a BOS token it lacks: llama.cpp would abort the process
        n = len(raw) + 8
        for _ in range(2):
            buf = (self.lc.llama_token * n)()
            got = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, n, add_special, True)
            if got >= 0:
                return list(buf[:got])
            n = -got
        raise RecipeError(f"llama.cpp could not tokenize {text[:40]!r}.", "check the prompt.")  # pragma: no cover

    def token_text(self, token: int) -> str:
        """A token's text (for the template's bos_token/eos_token), '' for none."""
        if token < 0:
            return ""
        text = self.lc.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of generated tokens (special tokens rendered, as transformers' decode does not skip them)."""
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = self.lc.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, True)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def encode(self, prompt: str, chat_template: str | None, system: str | None = None) -> list[int]:
        """A prompt's ids: chat-templated (user turn + generation prompt) when the GGUF has a template; a `system`
        message goes first in the template, or before the prompt as plain text without one."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecipeError(f"Prompt {prompt!r} is empty.", "remove empty prompts from the set.")
        if chat_template:
            bos, eos = self.lc.llama_vocab_bos(self.vocab), self.lc.llama_vocab_eos(self.vocab)
            text = render_chat(chat_template, prompt, self.token_text(bos), self.token_text(eos), system=system)
            ids = self.tokenize(text, add_special=False)
        else:
            ids = self.tokenize(f"{system}\n\n{prompt}" if system else prompt, add_special=True)
        if not ids:
            raise RecipeError(f"Prompt {prompt!r} tokenizes to nothing.", "remove it or fix the tokenizer.")
        check_prompt_fits(prompt, len(ids), self.n_ctx_train, self.path.name)
        return ids

    def context(self, n_ctx: int, n_batch: int, n_seq: int, tap: FfnDownTap | None = None) -> LlamaCppContext:
        """A context for `n_seq` sequences sharing one unified KV cache of `n_ctx` cells (f32, so an f32 GGUF
        computes what transformers computes in fp32)."""
        return LlamaCppContext(self, n_ctx, n_batch, n_seq, tap)


class LlamaCppContext:
    """One llama.cpp context: decode batches of sequences, read outputs, manage the KV cache."""

    def __init__(self, model: LlamaCppModel, n_ctx: int, n_batch: int, n_seq: int, tap: FfnDownTap | None) -> None:
        lc = self.lc = model.lc
        self.model, self.tap = model, tap
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max, params.kv_unified, params.swa_full = n_seq, True, True
        params.n_threads = params.n_threads_batch = model.n_threads
        params.type_k = params.type_v = GGML_TYPE_F32
        # ggml's CPU flash attention computes in f16 (1e-3 off an fp32 model); the plain attention path does not.
        params.flash_attn_type = 0
        params.no_perf = True
        if tap is not None:
            params.cb_eval = tap.callback
            params.cb_eval_user_data = None
        self.ctx = lc.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise CnaExportError(
                f"llama.cpp could not create a context of {n_ctx} tokens for {model.path.name}.", "lower --batch-size."
            )
        self.memory = lc.llama_get_memory(self.ctx)
        self.capacity = n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def __enter__(self) -> LlamaCppContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)

    def decode(self, seqs: Sequence[Seq], seq_ids: Sequence[int] | None = None) -> list[int]:
        """Decode sequences together (sequence k as KV sequence `seq_ids[k]`, default k); returns the batch
        row of each sequence's last token, in order (the rows the tap reads, and whose logits exist)."""
        b, n = self.batch, 0
        last = []
        for k, s in enumerate(seqs):
            sid = k if seq_ids is None else seq_ids[k]
            for i, tok in enumerate(s.tokens):
                if n >= self.capacity:
                    raise CnaExportError(f"A batch needs more than {self.capacity} tokens.", "lower --batch-size.")
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, s.start + i, 1
                b.seq_id[n][0] = sid
                b.logits[n] = s.output and (
                    i == len(s.tokens) - 1 or (s.logits_from is not None and i >= s.logits_from)
                )
                n += 1
            last.append(n - 1)
        b.n_tokens = n
        if self.tap is not None:
            self.tap.start([r for r, s in zip(last, seqs) if s.output], sum(s.output for s in seqs))
        rc = self.lc.llama_decode(self.ctx, b)
        if self.tap is not None:
            self.tap.check()
        elif rc != 0:
            raise CnaExportError(f"llama.cpp's decode failed (code {rc}).", "lower --batch-size.")
        return last

    def logits(self, row: int) -> np.ndarray:
        """The logits of an output row (a copy)."""
        n_vocab = self.lc.llama_vocab_n_tokens(self.model.vocab)
        ptr = self.lc.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def share(self, src: int, dst: int, upto: int) -> None:
        """Let KV sequence `dst` see the cells of `src` in positions [0, upto) (no copy: a unified cache)."""
        self.lc.llama_memory_seq_cp(self.memory, src, dst, 0, upto)

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop sequence `seq`'s cells from position `start` on."""
        self.lc.llama_memory_seq_rm(self.memory, seq, start, -1)
