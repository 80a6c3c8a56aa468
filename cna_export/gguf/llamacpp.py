"""llama.cpp through llama-cpp-python's C API: a GGUF model mmapped by llama.cpp (nothing is dequantized in
Python), tokenized and chat-templated with its own metadata, run in batches of sequences, with a tap on the input
of every layer's `ffn_down` matrix multiplication.

The tap is the graph evaluation callback (`cb_eval`), the mechanism llama.cpp's imatrix tool uses: the scheduler
asks about every graph node; for the MUL_MAT nodes whose weight (first source) is `blk.N.ffn_down.weight` the tap
says yes, and once the node is computed it copies the rows it needs of the second source (the activations, one
value per MLP neuron) with `ggml_backend_tensor_get`. In a mixture of experts it also says yes to the MUL_MAT_ID
by `ffn_down_exps` (its second source holds each token's selected experts, the third their ids), to the MUL_MAT
by `ffn_down_shexp`, and to the MUL whose first source is one of those products where the product is weighted
(the second source: the router weights, or the shared expert's gate). The struct layout is that of the
`include/ggml.h` that llama-cpp-python installs. Returning False after the last needed layer ends the graph there.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from cna_export.attribution.chat_template import render_chat
from cna_export.circuit.recipe import check_prompt_fits
from cna_export.errors import CheckpointError, CnaExportError, RecipeError

log = logging.getLogger(__name__)

INSTALL_FIX = 'pip install "cna-export[gguf]" (builds llama.cpp: about 6-15 minutes on 2 cores), or pass --backend torch.'
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_MAX_OP_PARAMS = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26


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


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of ggml.h (llama-cpp-python 0.3.36): only the fields the tap reads are used."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _ggml() -> tuple[ctypes.CDLL, dict[str, int]]:
    """ggml's library (with `ggml_backend_tensor_get` typed) and the enum values of the operations the tap looks
    at (MUL_MAT, MUL_MAT_ID, MUL), looked up by name through `ggml_op_name` rather than counted from the header."""
    from llama_cpp._ggml import libggml

    libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    libggml.ggml_backend_tensor_get.restype = None
    libggml.ggml_op_name.argtypes = [ctypes.c_int]
    libggml.ggml_op_name.restype = ctypes.c_char_p
    ops: dict[str, int] = {}
    # Stop at the last one wanted: the name table has no end marker (a look-up past GGML_OP_COUNT reads garbage).
    for i in range(200):
        name = libggml.ggml_op_name(i).decode()
        if name in ("MUL_MAT", "MUL_MAT_ID", "MUL"):
            ops[name] = i
        if len(ops) == 3:
            return libggml, ops
    raise CnaExportError("This llama.cpp build lacks MUL_MAT, MUL_MAT_ID or MUL.", INSTALL_FIX)  # pragma: no cover


@dataclass(frozen=True)
class Unit:
    """One down projection the tap reads in a layer: a dense MLP's `ffn_down`, the stacked routed experts'
    `ffn_down_exps` (a MUL_MAT_ID), or the shared expert's `ffn_down_shexp`.

    Attributes:
        layer, kind: where it is and what it is ("dense", "routed", "shared"): the collector's keys.
        width: neurons per row of its input (per expert for the routed experts).
        weighted: its output is multiplied by a weight that the tap reads too (the routed experts' router weights,
            a gated shared expert's gate): the second source of the MUL node whose first source is this product.
    """

    layer: int
    kind: str
    width: int
    weighted: bool = False


class FfnDownTap:
    """The `cb_eval` callback: hands `on_rows(layer, part, rows)` the last-token rows of each down projection's
    input (`part` = the unit's kind), of the expert ids of a MUL_MAT_ID (`kind + "_ids"`), and of the weight that
    multiplies a weighted unit's output (`kind + "_weight"`).

    Attributes:
        rows: the batch rows to read (the last token of each sequence) in a full-width activation.
        outputs: how many batch rows request outputs; llama.cpp's last layer keeps only those rows.
        recording: False while a shared prefix runs (its activations are not wanted).
        stop_after: the last layer read; the graph ends once all of its parts are read.
    """

    def __init__(self, units: dict[bytes, Unit], stop_after: int, on_rows: Callable, family: str = "") -> None:
        self.lib, self.ops = _ggml()
        self.units, self.stop_after, self.on_rows, self.family = units, stop_after, on_rows, family
        self.expect: dict[int, set[str]] = {}
        for u in units.values():
            self.expect.setdefault(u.layer, set()).update([u.kind] + [u.kind + "_weight"] * u.weighted)
        self.rows: list[int] = []
        self.outputs = 0
        self.recording = True
        self.seen: set[int] = set()
        self.got: dict[int, set[str]] = {}
        self.error: BaseException | None = None
        self.callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)(self._eval)

    def start(self, rows: list[int], outputs: int) -> None:
        """Before a decode: the rows to read and the number of output rows."""
        self.rows, self.outputs, self.got = rows, outputs, {}

    def _unit(self, ptr: int) -> Unit | None:
        """The unit of a down-projection node (a MUL_MAT or MUL_MAT_ID by one of the tapped weights)."""
        t = GgmlTensor.from_address(ptr)
        if t.op not in (self.ops["MUL_MAT"], self.ops["MUL_MAT_ID"]) or not t.src[0]:
            return None
        return self.units.get(GgmlTensor.from_address(t.src[0]).name)

    def _match(self, t: GgmlTensor) -> tuple[Unit, bool] | None:
        """(unit, whether the node is its weight multiplication) for a node the tap reads, else None."""
        if t.op == self.ops["MUL"] and t.src[0]:
            unit = self._unit(t.src[0])
            return (unit, True) if unit is not None and unit.weighted else None
        unit = self._unit(ctypes.addressof(t))
        return None if unit is None else (unit, False)

    def _eval(self, ptr: int, ask: bool, _user: int) -> bool:
        # An exception must not cross the C boundary: keep it, stop the graph, re-raise after the decode.
        try:
            t = GgmlTensor.from_address(ptr)
            match = self._match(t)
            if ask:
                return match is not None
            if match is None:
                return True
            unit, weight = match
            product = GgmlTensor.from_address(t.src[0]) if weight else t
            dims = 3 if product.op == self.ops["MUL_MAT_ID"] else 2  # [width, slots, tokens] or [width, tokens]
            part = unit.kind + "_weight" if weight else unit.kind
            got = self.got.setdefault(unit.layer, set())
            got.add(part)
            self.seen.add(unit.layer)
            if self.recording:
                self.on_rows(unit.layer, part, self._read(t.src[1], dims, 1 if weight else unit.width))
                if dims == 3 and not weight:  # the expert id of each slot [n_expert_used, tokens]
                    self.on_rows(unit.layer, unit.kind + "_ids", self._read(t.src[2], 2, None, GGML_TYPE_I32))
            return not (unit.layer == self.stop_after and got >= self.expect[unit.layer])
        except BaseException as exc:  # noqa: BLE001 - re-raised by `check`
            self.error = exc
            return False

    def _read(self, ptr: int, dims: int, width: int | None, dtype: int = GGML_TYPE_F32) -> np.ndarray:
        """The wanted rows of a tensor [width, (slots,) tokens] (GGUF dims: ne[0] = width, the tokens last), as an
        array [rows, (slots,) width]; `width` None takes any."""
        x = GgmlTensor.from_address(ptr)
        inner = [int(n) for n in x.ne[: dims - 1]]
        contiguous = x.nb[0] == 4 and all(x.nb[d] == x.nb[d - 1] * x.ne[d - 1] for d in range(1, dims - 1))
        flat = all(n == 1 for n in x.ne[dims:])
        if x.type != dtype or not contiguous or not flat or width is not None and inner[0] != width:
            raise CnaExportError(f"The ffn_down input is not an f32 [{width}, tokens] tensor (or its ids or weights "
                                 "are not the shape llama.cpp gives them).", "use --backend torch for this model.")  # fmt: skip
        # llama.cpp's last layer keeps only the rows that produce outputs (its `inp_out_ids`); the others hold
        # every token of the batch.
        n = int(x.ne[dims - 1])
        rows = range(self.outputs) if n == self.outputs else self.rows
        if n != self.outputs and n <= max(self.rows, default=-1):
            raise CnaExportError(f"The ffn_down input has {n} rows, expected the batch's tokens or outputs.",
                                 "use --backend torch for this model.")  # fmt: skip
        out = np.empty((len(rows), *reversed(inner)), dtype=np.float32 if dtype == GGML_TYPE_F32 else np.int32)
        row_bytes, stride = out[0].nbytes if len(rows) else 0, int(x.nb[dims - 1])
        for k, r in enumerate(rows):
            self.lib.ggml_backend_tensor_get(ptr, out[k].ctypes.data, r * stride, row_bytes)
        return out

    def check(self) -> None:
        """Re-raise an error from inside the callback; fail when no ffn_down input was seen at all, or when a
        layer's down projection was read without the weight that multiplies its output."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if not self.seen:
            name = next(iter(self.units), b"ffn_down").decode()
            raise CheckpointError(
                f"llama.cpp's graph has no matrix multiplication by {name} for this model, so the ffn_down "
                "input cannot be read.", "use --backend torch for this model.",
            )  # fmt: skip
        for layer, got in self.got.items():
            for part in sorted(self.expect[layer] - got):
                kind = part.removesuffix("_weight")
                name = next(n for n, u in self.units.items() if (u.layer, u.kind) == (layer, kind)).decode()
                what = f"has no matrix multiplication by {name}"
                if part != kind:
                    what = (f"does not multiply the output of {name} by a weight the tap can read (the router "
                            "weights or the shared expert's gate)")  # fmt: skip
                raise CheckpointError(f"llama.cpp's graph for {self.family or 'this model'} {what}, so its expert "
                                      "activations cannot be measured inside llama.cpp.",
                                      "use --backend torch on the model's safetensors folder.")  # fmt: skip


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
            raise CnaExportError(f"{THREADS_ENV}={value!r} is not a positive number of threads.",
                                 f"set {THREADS_ENV} to e.g. 2, or unset it.")  # fmt: skip
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
                "not know, or a damaged file).", "upgrade llama-cpp-python, or pass --backend torch.",
            )  # fmt: skip
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

    def encode(self, prompt: str, chat_template: str | None) -> list[int]:
        """A prompt's ids: chat-templated (user turn + generation prompt) when the GGUF has a template."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecipeError(f"Prompt {prompt!r} is empty.", "remove empty prompts from the set.")
        if chat_template:
            bos, eos = self.lc.llama_vocab_bos(self.vocab), self.lc.llama_vocab_eos(self.vocab)
            text = render_chat(chat_template, prompt, self.token_text(bos), self.token_text(eos))
            ids = self.tokenize(text, add_special=False)
        else:
            ids = self.tokenize(prompt, add_special=True)
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
            raise CnaExportError(f"llama.cpp could not create a context of {n_ctx} tokens for {model.path.name}.",
                                 "lower --batch-size.")  # fmt: skip
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
                b.logits[n] = s.output and (i == len(s.tokens) - 1 or (s.logits_from is not None and i >= s.logits_from))
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
