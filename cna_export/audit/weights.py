"""Read-only, tensor-at-a-time access to a checkpoint, whatever its format, for comparing two of them.

A `Weights` object lists tensor names in storage order, knows which are MLP projections (`down`/`up` of which
layer), and gives each tensor as raw bytes (a memory map, read only when compared), as values, or for quantized
GGUF tensors as (rows, bytes per row). `open_pair` opens an original and an edited checkpoint so that both
sides use the same tensor names: a GGUF file compared with a safetensors folder is dequantized first.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cna_export.arch import ArchSpec, ModelShape, Site, arch_for
from cna_export.arch.experts import ExpertKey
from cna_export.fold.mxfp4 import decode_mxfp4
from cna_export.gguf.quant import scale_fields
from cna_export.io.checkpoint import CheckpointReader

if TYPE_CHECKING:
    from cna_export.gguf.check import GGUFLayout
    from cna_export.io.source import Source

log = logging.getLogger(__name__)

CHUNK = 16 * 1024 * 1024  # raw comparison works on slices this large, so it never holds a whole tensor twice


class Weights:
    """Read-only, tensor-at-a-time access to one checkpoint, with the names of its MLP tensors.

    Attributes:
        label: what the user typed.
        fmt: "safetensors" or "gguf".
        names: tensor names in storage order.
        mlp: tensor name -> ("down" | "up", layer) for the MLP projections.
        experts_in: MLP tensor name -> the units it holds: (None,) for a dense MLP, (e,) or ("shared",) for one
            expert's tensor, (0, ..., E-1) for a tensor that stacks a layer's routed experts (GGUF `ffn_up_exps`).

    A unit's part of a tensor (`unit_raw`, `unit_values`, `neuron_values`, `quant_rows` with `expert`) is the whole
    tensor, except in a stacked one: there it is the expert's slice along the outermost axis, read alone.
    """

    label: str
    fmt: str
    model_type: str
    spec: ArchSpec
    shape: ModelShape
    names: list[str]
    mlp: dict[str, tuple[str, int]]
    experts_in: dict[str, tuple[ExpertKey, ...]]

    def _index_mlp(self) -> None:
        """Name the MLP tensors from the architecture's sites in this format (an MoE model's experts too, see
        arch/experts.py)."""
        self.mlp, self.experts_in = {}, {}
        moe = self.shape.moe
        for i in range(self.shape.num_layers):
            for expert, _ in moe.units(i, self.shape.width(i)) if moe is not None else [(None, 0)]:
                for kind, site in self._unit_sites(expert).items():
                    name = site.name(i, expert)
                    self.mlp[name] = (kind, i)
                    self.experts_in[name] = self.experts_in.get(name, ()) + (expert,)

    def _unit_sites(self, expert: ExpertKey) -> dict[str, Site]:
        if expert is None:
            return self.spec.sites(self.fmt)
        return {kind: self.spec.experts.site(kind, expert, self.fmt) for kind in self.spec.targets}

    def site(self, name: str) -> Site:
        return self._unit_sites(self.experts_in[name][0])[self.mlp[name][0]]

    def unit_site(self, name: str) -> Site:
        """The site inside one unit's part of tensor `name`'s values (`Site.of_expert` of a stacked tensor's site;
        of the decoded values for MXFP4 codes)."""
        return self.site(name).decoded().of_expert()

    def width(self, name: str) -> int:
        """Neurons of the MLP or expert that tensor `name` belongs to."""
        return self.shape.width_of(self.experts_in[name][0], self.mlp[name][1])

    def stacked(self, name: str) -> bool:
        """Whether tensor `name` stacks a layer's routed experts (along its outermost axis)."""
        return name in self.experts_in and self.site(name).expert_axis is not None

    def unit_raw(self, name: str, expert: ExpertKey = None) -> np.ndarray:
        """The stored bytes of `expert`'s part of tensor `name` (experts are stacked along the outermost axis)."""
        raw = self.raw(name)
        if not self.stacked(name):
            return raw
        step = raw.size // len(self.experts_in[name])
        return raw[expert * step : (expert + 1) * step]

    def unit_values(self, name: str, expert: ExpertKey = None) -> torch.Tensor:
        """The values of `expert`'s part of tensor `name`."""
        return (
            self.values(name).select(self.site(name).expert_axis, expert) if self.stacked(name) else self.values(name)
        )

    def neuron_values(self, name: str, expert: ExpertKey = None) -> torch.Tensor:
        """The values of an MLP tensor (one unit's part) with one row per neuron (neuron axis first)."""
        return self.unit_site(name).rows(self.unit_values(name, expert), self.width(name))

    def quant_rows(self, name: str, expert: ExpertKey = None) -> np.ndarray | None:
        """Raw (neurons, bytes per row) of a quantized tensor (one unit's part) whose neurons are whole rows with
        f16 block scales (GGUF ffn_up, ffn_up_exps), or None when the tensor is not stored that way."""
        return None

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(storage type, shape in PyTorch order)."""
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        raise NotImplementedError

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes, as a flat uint8 memory map (not read until compared)."""
        raise NotImplementedError

    def values(self, name: str) -> torch.Tensor:
        """Float values: native dtype for float storage, float32 dequantized for quantized GGUF types."""
        raise NotImplementedError

    def quant(self, name: str) -> str | None:
        """The quantized GGUF type name, or None for float storage."""
        return None

    def pair(self, layer: int, expert: ExpertKey = None) -> dict[str, str]:
        """kind -> tensor name of the down and up sites of one unit (a dense MLP, or an expert of `layer`)."""
        return {
            kind: name for name, (kind, lay) in self.mlp.items() if lay == layer and expert in self.experts_in[name]
        }


class SafetensorsWeights(Weights):
    """A Hugging Face folder (or Hub snapshot) of safetensors shards."""

    def __init__(self, folder: Path, label: str) -> None:
        from cna_export.io.source import Source, describe

        self.label, self.fmt, self.folder = label, "safetensors", Path(folder)
        self.spec, self.shape, config = describe(Source(label, self.folder))
        self.model_type = config["model_type"]
        self.reader = CheckpointReader(self.folder)
        self.names = [e.name for f in self.reader.files for e in self.reader.entries_in(f)]
        self._index_mlp()

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self.reader.entries[name]
        return entry.dtype, entry.shape

    def nbytes(self, name: str) -> int:
        return self.reader.entries[name].nbytes

    def raw(self, name: str) -> np.ndarray:
        e = self.reader.entries[name]
        if not e.nbytes:
            return np.empty(0, np.uint8)
        return np.memmap(self.folder / e.file, dtype=np.uint8, mode="r", offset=e.start, shape=(e.nbytes,))

    def values(self, name: str) -> torch.Tensor:
        if name in self.mlp and self.site(name).codec == "mxfp4":  # gpt-oss's 4-bit experts: their values
            return decode_mxfp4(self.reader.tensor(name), self.reader.tensor(name.replace("_blocks", "_scales")))
        return self.reader.tensor(name)


class GGUFWeights(Weights):
    """A GGUF file: the layout from `check_gguf` (a bounded header walk) and one read-only memory map.

    gguf-py's `GGUFReader` would give the same tensors, but it decodes every metadata entry into numpy views
    (about 13 s for the 151k-token vocabulary of Qwen2.5, which was most of a diff); nothing here needs the metadata
    beyond the architecture, and the shape comes from the ffn_up tensors themselves.
    """

    FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def __init__(self, path: Path, label: str, layout: GGUFLayout | None = None) -> None:
        from gguf import GGML_QUANT_SIZES

        from cna_export.gguf.check import check_gguf, gguf_model_type, gguf_shape

        self.label, self.fmt, self.path = label, "gguf", Path(path)
        # Every tensor lies inside the file (checked here, or already by `resolve`), so the slices below are safe.
        layout = layout or check_gguf(self.path)
        self.model_type = gguf_model_type(layout)
        self.spec = arch_for(self.model_type)
        self.tensors = layout.tensors
        self.names = list(layout.tensors)
        self.sizes = GGML_QUANT_SIZES
        self.shape = gguf_shape(layout, self.spec, self.path)
        self._index_mlp()
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else np.empty(0, np.uint8)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        t = self.tensors[name]
        return t.ggml_type.name, tuple(reversed(t.dims))

    def nbytes(self, name: str) -> int:
        return self.tensors[name].nbytes

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self.map[t.start : t.start + t.nbytes]

    def rows(self, name: str, expert: ExpertKey = None) -> np.ndarray:
        """The tensor (one unit's part) as (rows, bytes per row) uint8."""
        t = self.tensors[name]
        block, type_size = self.sizes[t.ggml_type]
        return self.unit_raw(name, expert).reshape(-1, t.dims[0] // block * type_size)

    def quant_rows(self, name: str, expert: ExpertKey = None) -> np.ndarray | None:
        site, width = self.unit_site(name), self.width(name)
        if site.axis != 0 or scale_fields(self.tensors[name].ggml_type) is None:
            return None
        return self.rows(name, expert)[site.offset(width) : site.offset(width) + width]

    def values(self, name: str) -> torch.Tensor:
        return self._decode(name, None, self.meta(name)[1])

    def unit_values(self, name: str, expert: ExpertKey = None) -> torch.Tensor:
        if not self.stacked(name):
            return self.values(name)
        return self._decode(name, expert, self.meta(name)[1][1:])  # only that expert's bytes are decoded

    def _decode(self, name: str, expert: ExpertKey, shape: tuple[int, ...]) -> torch.Tensor:
        from gguf.quants import dequantize

        dtype = self.meta(name)[0]
        if dtype in self.FLOATS:
            raw = np.array(self.unit_raw(name, expert))  # one copy: writable and independent of the map
            return torch.from_numpy(raw).view(self.FLOATS[dtype]).reshape(shape)
        return torch.from_numpy(dequantize(self.rows(name, expert), self.tensors[name].ggml_type)).reshape(shape)

    def quant(self, name: str) -> str | None:
        dtype = self.tensors[name].ggml_type.name
        return None if dtype in self.FLOATS else dtype


def open_weights(ref: str) -> Weights:
    """A GGUF path, a model folder, a Hub id (downloaded through the huggingface_hub cache), or the folder `run`
    wrote from a GGUF (its patched .gguf)."""
    from cna_export.io.source import resolve

    return weights_of(resolve(ref), ref)


def weights_of(source: Source, label: str | None = None) -> Weights:
    """The weights of a resolved source, tensor at a time (a GGUF through the header `resolve` already checked)."""
    if source.is_gguf:
        return GGUFWeights(source.path, label or source.name, source.layout)
    return SafetensorsWeights(source.folder, label or source.name)


@contextlib.contextmanager
def open_pair(original: str, edited: str) -> Iterator[tuple[Weights, Weights]]:
    """Open both checkpoints. A GGUF file compared with a folder is first dequantized into a temporary folder
    (through transformers, in the folder's dtype), which is how `apply` exports a GGUF source."""
    a, b = open_weights(original), open_weights(edited)
    if a.fmt == b.fmt:
        yield a, b
        return
    gguf_side, dense = (a, b) if a.fmt == "gguf" else (b, a)
    from cna_export.fold.export import materialize_gguf
    from cna_export.io.source import resolve

    down = dense.spec.down.name(0)
    dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dense.meta(down)[0], "float32")
    log.warning("dequantizing %s to %s to compare it with a safetensors folder", gguf_side.label, dtype)
    with tempfile.TemporaryDirectory(prefix="cna-diff-") as tmp:
        materialize_gguf(resolve(gguf_side.label), Path(tmp), dtype)
        converted = SafetensorsWeights(Path(tmp), gguf_side.label)
        yield (converted, b) if a.fmt == "gguf" else (a, converted)


def same_bytes(x: np.ndarray, y: np.ndarray) -> bool:
    """Raw equality, slice by slice (never two whole tensors in memory)."""
    if x.shape != y.shape:
        return False
    return all(np.array_equal(x[i : i + CHUNK], y[i : i + CHUNK]) for i in range(0, x.size, CHUNK))
