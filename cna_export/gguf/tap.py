"""The graph tap: a `cb_eval` callback on llama.cpp's compute graph that reads the input of every layer's
`ffn_down` matrix multiplication, at C level (ctypes over ggml's `struct ggml_tensor`).

The tap is the graph evaluation callback, the mechanism llama.cpp's imatrix tool uses: the scheduler asks about
every graph node; for the MUL_MAT nodes whose weight (first source) is `blk.N.ffn_down.weight` the tap says yes,
and once the node is computed it copies the rows it needs of the second source (the activations, one value per
MLP neuron) with `ggml_backend_tensor_get`. In a mixture of experts it also says yes to the MUL_MAT_ID by
`ffn_down_exps` (its second source holds each token's selected experts, the third their ids), to the MUL_MAT by
`ffn_down_shexp`, and to the MUL whose first source is one of those products where the product is weighted (the
second source: the router weights, or the shared expert's gate). The struct layout is that of the
`include/ggml.h` that llama-cpp-python installs. Returning False after the last needed layer ends the graph there.
The model and context that run the graph are `cna_export.gguf.llamacpp`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cna_export.errors import CheckpointError, CnaExportError
from cna_export.gguf.llamacpp import GGML_TYPE_F32, INSTALL_FIX

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_MAX_OP_PARAMS = 4, 10, 64, 64
GGML_TYPE_I32 = 26


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
            raise CnaExportError(
                f"The ffn_down input is not an f32 [{width}, tokens] tensor (or its ids or weights "
                "are not the shape llama.cpp gives them).",
                "use --backend torch for this model.",
            )
        # llama.cpp's last layer keeps only the rows that produce outputs (its `inp_out_ids`); the others hold
        # every token of the batch.
        n = int(x.ne[dims - 1])
        rows = range(self.outputs) if n == self.outputs else self.rows
        if n != self.outputs and n <= max(self.rows, default=-1):
            raise CnaExportError(
                f"The ffn_down input has {n} rows, expected the batch's tokens or outputs.",
                "use --backend torch for this model.",
            )
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
                "input cannot be read.",
                "use --backend torch for this model.",
            )
        for layer, got in self.got.items():
            for part in sorted(self.expect[layer] - got):
                kind = part.removesuffix("_weight")
                name = next(n for n, u in self.units.items() if (u.layer, u.kind) == (layer, kind)).decode()
                what = f"has no matrix multiplication by {name}"
                if part != kind:
                    what = (
                        f"does not multiply the output of {name} by a weight the tap can read (the router "
                        "weights or the shared expert's gate)"
                    )
                raise CheckpointError(
                    f"llama.cpp's graph for {self.family or 'this model'} {what}, so its expert "
                    "activations cannot be measured inside llama.cpp.",
                    "use --backend torch on the model's safetensors folder.",
                )
