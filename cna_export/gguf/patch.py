"""Patch a circuit into an existing GGUF file without re-converting it (the "I only have an Ollama model" path).

Neuron j of layer l is row j of `blk.{l}.ffn_up.weight` (GGUF stores ffn_up as n_ff rows of n_embd contiguous
values, and a row is a whole number of quantization blocks). Scaling that row by m scales the neuron by m, exactly
as `cna_export.fold.scale` does for `up_proj`. A mixture of experts has the same rows per expert: llama.cpp stacks
a layer's routed experts into one `blk.{l}.ffn_up_exps.weight` (n_expert x n_ff rows of n_embd values; neuron j of
expert e is row e * n_ff + j) and keeps the shared expert in `blk.{l}.ffn_up_shexp.weight`; the sites come from the
architecture table (`ExpertSpec.gguf_up`). Scaling the row is exact for a gated expert whatever the router does,
as for the fold. How a row is scaled depends on its storage type:

* `values`: F32, F16 and BF16 rows are decoded, multiplied in float32 and rounded once to the storage type,
  which is what `cna_export.fold.scale.scaled_rows` does for safetensors exports.
* `scales`: every dequantized value of a quantized block is linear in the block's f16 scale fields (d, and the
  min/dmin of the Q*_1 and K types), so multiplying those fields by m scales the whole block by m while the
  quantized values stay untouched. The only error is the f16 rounding of each new scale: none for m = 0 and
  for powers of two (unless a scale is subnormal or overflows), about 2**-11 relative otherwise.
* `requantize`: a type without f16 scale fields that gguf-py can quantize (MXFP4) is dequantized, scaled and
  quantized again, which also changes the row's rounding; a warning says so.
Any other type is refused with a `CnaExportError` naming it.

The output is a kernel copy of the source (`os.copy_file_range`, a reflink where the file system supports it,
run on a worker thread while the header is validated and the new rows computed) into a temporary sibling, with
only the edited row bytes then rewritten in place (`os.pwrite`), renamed into place at the end: every byte
outside the edited rows is identical to the source, and the source is only ever read. The GGUF
header is not changed (new metadata would move every tensor); the applied circuit is written next to the output
as `OUT.circuit.json` (for `Y.gguf`: `Y.gguf.circuit.json`), which `cna-export inspect` reads.

The layout (tensor types, dims, absolute offsets) comes from `cna_export.gguf.check.check_gguf`, the project's
bounded header walk that every GGUF goes through before a parser trusts it. gguf-py's `GGUFReader` would give the
same layout but parses every vocabulary entry into its own numpy view (5.5 s for Qwen2.5's 151k tokens, 12x the
time of copying the whole 491 MB file), so the shape checks use the tensor table rather than the metadata keys.
gguf-py supplies the type table (`GGML_QUANT_SIZES`), the tensor names and the (de)quantizers.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from cna_export.arch import ARCHITECTURES, ModelShape
from cna_export.circuit.format import Circuit
from cna_export.errors import ArchitectureError, CheckpointError, CircuitError, CnaExportError
from cna_export.fold.storage import rounding_error, stored
from cna_export.gguf.check import GGUFLayout, GGUFTensorInfo, check_gguf, gguf_shape
from cna_export.gguf.quant import FLOAT_TYPES, SCALE_FIELDS
from cna_export.io.copy import BackgroundCopy
from cna_export.io.hashing import combined_sha256, sha256_files
from cna_export.io.output import OutputPlan, check_free_space

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".circuit.json"


@dataclass
class TensorPatch:
    """What was done to one ffn_up tensor (to one expert's rows, in a tensor that stacks experts)."""

    name: str
    ggml_type: str
    route: str  # "values", "scales" or "requantize"
    rows: int
    max_rel_error: float  # largest relative rounding error of a new scale or value vs m * old (0 when exact)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # absolute [start, end) byte ranges rewritten


@dataclass
class PatchReport:
    """Result of `patch_gguf_report`: the output, its sidecar circuit and what was done per tensor."""

    out: Path
    sidecar: Path
    tensors: list[TensorPatch]

    def summary(self) -> str:
        """One line: rows, tensors and the storage types and routes used."""
        kinds: dict[str, int] = {}
        for t in self.tensors:
            kinds[f"{t.ggml_type} {t.route}"] = kinds.get(f"{t.ggml_type} {t.route}", 0) + t.rows
        routes = ", ".join(f"{k}: {n} rows" for k, n in sorted(kinds.items()))
        worst = max((t.max_rel_error for t in self.tensors), default=0.0)
        return (
            f"{sum(t.rows for t in self.tensors)} rows in {len({t.name for t in self.tensors})} ffn_up tensors "
            f"({routes}); "
            f"largest relative rounding error {worst:.2g}"
        )


def sidecar_path(out: Path) -> Path:
    """Where the applied circuit of a patched GGUF is written: `OUT` + `.circuit.json`."""
    out = Path(out)
    return out.with_name(out.name + SIDECAR_SUFFIX)


def check_circuit_fits(src: Path, layout: GGUFLayout, circuit: Circuit, force: bool) -> ModelShape:
    """Refuse a circuit made for another architecture, shape or (unless `force`) other weights."""
    spec = ARCHITECTURES.get(circuit.model.model_type)
    arch = layout.architecture
    if spec is None or spec.gguf_name != arch:
        raise CircuitError(
            f"Circuit was made for a {circuit.model.model_type} model but {src} is a GGUF of architecture {arch}.",
            "discover a circuit on this model (cna-export discover --model FILE.gguf).",
        )
    shape = gguf_shape(layout, spec, src)
    if circuit.model.hidden_size != shape.hidden_size:
        raise CircuitError(
            f"Circuit was made for hidden size {circuit.model.hidden_size}, {src} has {shape.hidden_size}.",
            "discover a circuit on this model.",
        )
    weights = None
    if circuit.model.weights_sha256 and not force:
        # discover fingerprints a GGUF as sha256 over "NAME DIGEST", so accept the file under its own name
        # and under the name it had when the circuit was made (a renamed or copied file is the same model).
        digest = sha256_files([src])[src.name]
        names = {src.name, Path(circuit.model.source).name}
        matches = [combined_sha256({n: digest}) for n in names]
        weights = circuit.model.weights_sha256 if circuit.model.weights_sha256 in matches else matches[0]
    circuit.check_fits(circuit.model.model_type, shape, weights, force)
    return shape


def _route(qtype: GGMLQuantizationType) -> str:
    if qtype in FLOAT_TYPES:
        return "values"
    if qtype in SCALE_FIELDS:
        return "scales"
    try:  # gguf-py raises NotImplementedError for types it can only dequantize
        block, _ = GGML_QUANT_SIZES[qtype]
        gguf_quants.dequantize(gguf_quants.quantize(np.zeros((1, block), np.float32), qtype), qtype)
    except (NotImplementedError, KeyError, ValueError):
        scale_types = ", ".join(t.name for t in (*FLOAT_TYPES, *SCALE_FIELDS))
        raise CnaExportError(
            f"Unsupported quant type {qtype.name} for patching: it has no f16 block scale to scale and gguf-py "
            "cannot re-quantize it.",
            f"re-quantize the model to one of {scale_types} (llama-quantize), or export safetensors with "
            "cna-export apply and convert those.",
        ) from None
    return "requantize"


# Row math --------------------------------------------------------------------------------------------------------


def scale_rows_bytes(
    rows: np.ndarray,
    qtype: GGMLQuantizationType,
    mult: np.ndarray,
    name: str = "ffn_up",
    index: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Scale raw GGUF rows by per-row multipliers.

    Args:
        rows: uint8 array (k, bytes per row), row i is one neuron's ffn_up row.
        qtype: the tensor's GGML type.
        mult: float32 multipliers, one per row.
        name, index: the tensor's name and the k neurons, for messages.

    Returns:
        The new raw rows (same shape and dtype) and the largest relative rounding error of a new scale or value
        against the exact product (0.0 when every product was exact).

    Raises:
        CnaExportError: the type cannot be patched, or a product is not finite in its storage type (an f16 block
            scale, an F16/BF16/F32 value, a re-quantized value), checked by `fold.storage.stored` before anything
            is written.
    """
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    k = rows.shape[0]
    route = _route(qtype)
    m32 = torch.from_numpy(np.asarray(mult, dtype=np.float32).copy())
    m = m32.to(torch.float64).reshape(k, 1)
    neurons = None if index is None else torch.as_tensor(np.asarray(index))
    if route == "scales":
        _, type_size = GGML_QUANT_SIZES[qtype]
        blocks = rows.reshape(k, -1, type_size).copy()
        worst = 0.0
        for off in SCALE_FIELDS[qtype]:
            old = torch.from_numpy(blocks[:, :, off : off + 2].copy().view(np.float16)[..., 0])
            exact = old.to(torch.float64) * m
            new = stored(
                exact, torch.float16, torch.isfinite(old), m32, f"the {qtype.name} block scales of {name}", neurons
            )
            worst = max(worst, rounding_error(new, exact))
            blocks[:, :, off : off + 2] = new.numpy().reshape(k, -1, 1).view(np.uint8)
        return blocks.reshape(rows.shape), worst
    if route == "values":
        dtype = FLOAT_TYPES[qtype]
        values = torch.from_numpy(rows.copy()).view(dtype).reshape(k, -1)
        exact = values.to(torch.float64) * m
        # As the safetensors fold (fold.scale.scaled_rows): the product in float32, rounded once to the type.
        new = stored(
            values.to(torch.float32) * m32.reshape(k, 1),
            dtype,
            torch.isfinite(values),
            m32,
            f"{name} ({qtype.name})",
            neurons,
        )
        return new.reshape(k, -1).view(torch.uint8).numpy().reshape(rows.shape), rounding_error(new, exact)
    dense = torch.from_numpy(gguf_quants.dequantize(rows, qtype).reshape(k, -1).astype(np.float64))
    exact = dense * m
    finite = torch.isfinite(dense)
    what = f"{name} ({qtype.name}, re-quantized)"
    new = gguf_quants.quantize(stored(exact, torch.float32, finite, m32, what, neurons).numpy(), qtype)
    back = torch.from_numpy(gguf_quants.dequantize(new, qtype).reshape(k, -1).astype(np.float64))
    stored(back, torch.float64, finite, m32, what, neurons)  # the format's own range (its scale exponent)
    return new.reshape(rows.shape), rounding_error(back, exact)


# Patching --------------------------------------------------------------------------------------------------------


def _plan(
    layout: GGUFLayout, circuit: Circuit, shape: ModelShape, multiplier: float | None, allow_negative: bool
) -> list[tuple[GGUFTensorInfo, np.ndarray, np.ndarray, np.ndarray]]:
    """(tensor, row indices, float32 multipliers, neurons) per unit (a layer's dense MLP, or one of its experts), after
    checking every tensor can be patched.

    The rows are those of the unit's up site in GGUF: whole rows of ffn_up (for a fused gate/up tensor, the up
    part), of the shared expert's ffn_up_shexp, or expert e's block of rows of the stacked ffn_up_exps; the
    indices are already offset into the stored tensor read as rows."""
    spec = ARCHITECTURES[circuit.model.model_type]
    if "up" not in spec.targets:  # ffn_up rows are the only per-neuron rows of a GGUF; without a gate (or with
        # gpt-oss' clamped `up + 1`) scaling them does not scale the neurons
        raise ArchitectureError(
            f"{spec.model_type}: scaling ffn_up rows would not scale its neurons (see cna-export's families table).",
            "export safetensors with cna-export apply (it folds into down_proj) and convert those to GGUF.",
        )
    plan = []
    for (layer, expert), (index, mult) in circuit.unit_edits(multiplier, allow_negative).items():
        site = spec.site("up", "gguf") if expert is None else spec.experts.site("up", expert, "gguf")
        width = shape.width_of(expert, layer)
        unit = replace(shape, intermediate_size=width)
        expected = tuple(reversed(site.expected_shape(unit, shape.moe.num_experts if shape.moe else None)))
        info = layout.tensors.get(site.name(layer, expert))
        if info is None or info.dims != expected:
            found = "is missing" if info is None else f"has dims {list(info.dims)}"
            raise ArchitectureError(
                f"{site.name(layer, expert)} {found}, expected dims {list(expected)}.", "re-convert the model."
            )
        _route(info.ggml_type)  # an unsupported type fails before anything is written
        plan.append((info, index.numpy() + site.first_row(width, expert), mult.numpy(), index.numpy()))
    return plan


def patch_gguf_report(
    src: Path,
    circuit: Circuit,
    out: Path,
    *,
    multiplier: float | None = None,
    overwrite: bool = False,
    force: bool = False,
    allow_negative: bool = False,
    layout: GGUFLayout | None = None,
) -> PatchReport:
    """`patch_gguf`, returning what was done per tensor (routes, rows, rounding, byte ranges). `layout`: the
    source's header when the caller has already checked it (`Source.layout`), so it is not parsed again."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise CheckpointError(f"GGUF file {src} does not exist.", "check the path.")
    circuit.unit_edits(multiplier, allow_negative)  # a bad multiplier fails before anything is read or written
    applied = circuit.applied(multiplier)  # the sidecar's record, its names checked before anything is written
    sidecar = sidecar_path(out)
    # Both outputs are checked before either is written, and renamed into place together, the sidecar first: a
    # kill between the two renames leaves a harmless sidecar, never a patched GGUF without its record (which
    # --overwrite would then refuse to replace, as it refuses any GGUF without one).
    plan = OutputPlan(overwrite, protect=[src])
    plan.file(sidecar)
    plan.file(out, written_with=sidecar)
    check_free_space(out.absolute().parent, src.stat().st_size)
    patches = []
    # The copy runs while the header is validated and the new rows are computed; any failure cancels it and
    # the plan removes the temporaries, so a bad input leaves nothing behind.
    with plan, BackgroundCopy(src, plan.temp(out)) as copy:
        tmp = plan.temp(out)
        layout = layout or check_gguf(src)  # bad magic, damaged header, truncated tensor data: one clear error
        shape = check_circuit_fits(src, layout, circuit, force)
        source_data = np.memmap(src, dtype=np.uint8, mode="r")
        writes: list[tuple[int, bytes]] = []
        for info, index, mult, neurons in _plan(layout, circuit, shape, multiplier, allow_negative):
            row_bytes = info.nbytes // math.prod(info.dims[1:])
            rows = source_data[info.start : info.start + info.nbytes].reshape(-1, row_bytes)[index]
            new, worst = scale_rows_bytes(rows, info.ggml_type, mult, info.name, neurons)
            starts = [info.start + j * row_bytes for j in index.tolist()]
            writes += [(start, row.tobytes()) for start, row in zip(starts, new)]
            route = _route(info.ggml_type)
            if route == "requantize":
                log.warning(
                    "%s is %s, which has no f16 block scale: its %d rows were dequantized, scaled "
                    "and re-quantized (rounding changes)",
                    info.name,
                    info.ggml_type.name,
                    len(index),
                )
            ranges = [(start, start + row_bytes) for start in starts]
            patches.append(TensorPatch(info.name, info.ggml_type.name, route, len(index), worst, ranges))
        copy.wait()
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for start, data in writes:
                os.pwrite(fd, data, start)
        finally:
            os.close(fd)
        applied.save(plan.temp(sidecar))
    del source_data
    report = PatchReport(out, sidecar, patches)
    log.info("wrote %s: %s", out, report.summary())
    return report


def patch_gguf(src: Path, circuit: Circuit, out: Path, **options: Any) -> Path:
    """Scale a circuit's neurons inside an existing GGUF file, writing a new file; `src` is never modified.

    Args:
        src: the GGUF file (e.g. an Ollama model blob or a llama.cpp quantization).
        circuit: neurons and multipliers (usually from `cna-export discover --model src`).
        out: the patched GGUF to write; the applied circuit goes to `out` + `.circuit.json`.
        options: keyword options of `patch_gguf_report`:
            multiplier: overrides every neuron's multiplier (0 ablates, 2 doubles).
            overwrite: replace an existing `out` (only one written by patch-gguf, i.e. with its sidecar).
            force: patch even if the circuit was discovered on different weights of the same shape.
            allow_negative: accept negative multipliers.
            layout: the source's checked header, if already read.

    Returns:
        `out`.

    Raises:
        CnaExportError: a damaged GGUF, a circuit that does not fit, an unsupported quant type, or an output
            location that cannot be written safely.

    Example:
        >>> patch_gguf(Path("smollm2.Q4_1.gguf"), Circuit.load("c.json"), Path("smollm2-edited.gguf"))
    """
    return patch_gguf_report(src, circuit, out, **options).out
