"""Convert a Hugging Face safetensors folder (an export or any supported model) into a GGUF file for llama.cpp.

Built on gguf-py: `GGUFWriter` writes the format, `get_tensor_name_map` names the tensors, `gguf.quants` makes
BF16/Q8_0 blocks, `SpecialVocab` reads special tokens, merges and the chat template. What differs between model
families is data in `arch.ARCHITECTURES` (q/k permutation, norm offset, query scale, ...), applied here by one
code path.

Streaming: the plan (every tensor's GGUF name, type and byte size) is computed from the safetensors headers, so
the GGUF header and tensor table are written first; then each tensor is read, converted and appended, one at a
time. Peak memory is about one tensor (in float32). The file is written to a temporary sibling and renamed at the
end, so `out` is either complete or untouched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, LlamaFileType
from tqdm.auto import tqdm

from cna_export import __version__
from cna_export.arch import ArchSpec, arch_for, shape_of
from cna_export.errors import ArchitectureError, CheckpointError, CnaExportError
from cna_export.gguf.external import convert_external, converter_command
from cna_export.gguf.ollama import MODELFILE, modelfile_for
from cna_export.gguf.outtypes import OUTTYPE_NAMES
from cna_export.gguf.vocab import load_vocab
from cna_export.io.checkpoint import CheckpointReader
from cna_export.io.config import read_config_json
from cna_export.io.output import OutputPlan, check_free_space

log = logging.getLogger(__name__)

# --outtype (gguf/outtypes.py, in its order) -> (type of 2-D weights, general.file_type). 1-D tensors (norms, biases)
# always stay F32.
OUTTYPES: dict[str, tuple[Q, LlamaFileType]] = dict(
    zip(
        OUTTYPE_NAMES,
        [
            (Q.F32, LlamaFileType.ALL_F32),
            (Q.F16, LlamaFileType.MOSTLY_F16),
            (Q.BF16, LlamaFileType.MOSTLY_BF16),
            (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
        ],
        strict=True,
    )
)
# Tensors that models save but llama.cpp computes itself.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
LM_HEAD = "lm_head.weight"
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


@dataclass
class PlannedTensor:
    """One GGUF tensor: where it comes from, its GGUF name, numpy shape, type, byte size and conversion."""

    name: str
    source: str | None  # checkpoint tensor name; None for tensors computed here (rope_freqs)
    shape: tuple[int, ...]
    qtype: Q
    transforms: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    values: torch.Tensor | None = None  # for computed tensors

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


@dataclass(frozen=True)
class Hyper:
    """The config values the conversion needs, read once (transformers 4.x and 5.x spellings)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    explicit_head_dim: bool
    ctx: int
    rms_eps: float
    rope: dict[str, Any]
    rope_local: dict[str, Any] | None
    tied: bool
    config: dict[str, Any]


def read_hyper(config: dict[str, Any], spec: ArchSpec) -> Hyper:
    """Hyperparameters from config.json; missing required values raise ArchitectureError."""
    shape = shape_of(config)
    n_head = config.get("num_attention_heads")
    if not isinstance(n_head, int) or n_head <= 0 or shape.hidden_size % n_head:
        raise ArchitectureError(
            f"config.json has no valid num_attention_heads (found {n_head!r}).", "use the model's own config.json."
        )
    head_dim = config.get("head_dim") or shape.hidden_size // n_head
    rope = config.get("rope_parameters") or {}
    rope_local = None
    if "full_attention" in rope:  # transformers 5 with per-layer-type rope (Gemma 3)
        rope, rope_local = rope["full_attention"], rope.get("sliding_attention")
    rope = {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {}), **rope}
    if rope_local is None and "rope_local_base_freq" in config:
        rope_local = {"rope_theta": config["rope_local_base_freq"]}
    return Hyper(
        n_layer=shape.num_layers,
        n_embd=shape.hidden_size,
        n_ff=shape.intermediate_size,
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        head_dim=head_dim,
        explicit_head_dim=bool(config.get("head_dim")),
        ctx=config.get("max_position_embeddings") or 4096,
        rms_eps=config.get("rms_norm_eps", 1e-6),
        rope=rope,
        rope_local=rope_local,
        tied=config.get("tie_word_embeddings", spec.tied_default),
        config=config,
    )


def export_gguf(
    folder: Path, out: Path, *, outtype: str = "f16", overwrite: bool = False, modelfile: bool = False
) -> Path:
    """Convert the Hugging Face safetensors model in `folder` to the GGUF file `out`.

    Args:
        folder: model folder with config.json, *.safetensors and the tokenizer files.
        out: GGUF file to write (`.gguf`); must not exist unless `overwrite`.
        outtype: type of the 2-D weights: f32, f16, bf16 or q8_0 (rows not a multiple of 32 values fall back to
            f16 under q8_0). Norms, biases and other 1-D tensors stay f32.
        overwrite: replace an existing `out` (and Modelfile).
        modelfile: also write an Ollama `Modelfile` beside `out`; both are checked before either is written, and
            appear together or not at all.

    Returns:
        `out`.

    Example:
        >>> export_gguf(Path("qwen-no-refusal"), Path("qwen-no-refusal-f16.gguf"))
    """
    folder, out = Path(folder), Path(out)
    if outtype not in OUTTYPES:
        raise CnaExportError(f"Unknown GGUF outtype {outtype!r}.", f"use one of {', '.join(OUTTYPES)}.")
    if out.suffix != ".gguf":
        raise CnaExportError(f"GGUF output {out} does not end in .gguf.", "name the output file NAME.gguf.")
    outputs = _outputs(out, folder, overwrite, modelfile)
    config = read_config_json(folder)
    spec = arch_for(config.get("model_type", ""))
    if not spec.own_gguf:  # the other families go through llama.cpp's converter (gguf/external.py)
        converter_command()  # not installed: one line saying how, before anything is written
        with outputs:
            convert_external(folder, outputs.temp(out), outtype)
            _add_modelfile(outputs, out, modelfile)
        return out
    hyper = read_hyper(config, spec)
    reader = CheckpointReader(folder)
    tensors = plan_tensors(reader, spec, hyper, OUTTYPES[outtype][0])
    n_vocab = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    vocab = load_vocab(folder, n_vocab)
    check_free_space(out.absolute().parent, sum(t.nbytes for t in tensors) + 64 * 1024 * 1024)
    arch_name = gguf.MODEL_ARCH_NAMES[spec.gguf_arch]
    with outputs:
        writer = GGUFWriter(outputs.temp(out), arch_name)
        try:
            _add_metadata(writer, folder, reader, spec, hyper, outtype)
            writer.add_vocab_size(n_vocab)
            vocab.add_to(writer)
            for t in tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="gguf") as bar:
                for t in tensors:
                    writer.write_tensor_data(_convert(reader, t))
                    bar.update(t.nbytes)
        finally:
            writer.close()
        _add_modelfile(outputs, out, modelfile)
    log.info("wrote %s (%s, %d tensors)", out, outtype, len(tensors))
    return out


def _outputs(out: Path, folder: Path, overwrite: bool, modelfile: bool) -> OutputPlan:
    """The GGUF (and its Modelfile) as one `OutputPlan`. They may go inside the model folder (an export ships
    both): nothing the conversion reads ends in .gguf or is a Modelfile, so neither replaces a source file."""
    inside = out.absolute().parent.resolve() == folder.resolve()
    plan = OutputPlan(overwrite, protect=[] if inside else [folder])
    plan.file(out)
    if modelfile:
        plan.file(out.parent / MODELFILE)
    return plan


def _add_modelfile(outputs: OutputPlan, out: Path, modelfile: bool) -> None:
    """Write the Modelfile of the staged GGUF `outputs.temp(out)`, naming it as `out` (its FROM line)."""
    if modelfile:
        text = modelfile_for(outputs.temp(out), name=out.name)
        outputs.temp(out.parent / MODELFILE).write_text(text, encoding="utf-8")


def plan_tensors(reader: CheckpointReader, spec: ArchSpec, hyper: Hyper, qtype: Q) -> list[PlannedTensor]:
    """Every GGUF tensor with its source, shape, type and conversion steps (no tensor data is read)."""
    names = gguf.get_tensor_name_map(spec.gguf_arch, hyper.n_layer)
    scale_q = _query_scale(spec, hyper)
    scaled_q = {spec.query_scale_weight.format(i=i) for i in range(hyper.n_layer)} if scale_q != 1.0 else set()
    plan = []
    for src, entry in reader.entries.items():
        if src.endswith(SKIPPED_SUFFIXES) or (src == LM_HEAD and hyper.tied):
            continue  # tied: llama.cpp reuses token_embd, as transformers does
        name = names.get_name(src, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ArchitectureError(
                f"Tensor {src} of {reader.folder} has no GGUF counterpart for {spec.model_type}.",
                "convert an unmodified model of a supported architecture.",
            )
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
        if spec.permute_qk and src.endswith(("q_proj.weight", "q_proj.bias")):
            steps.append(lambda w: _permute(w, hyper.n_head))
        if spec.permute_qk and src.endswith(("k_proj.weight", "k_proj.bias")):
            steps.append(lambda w: _permute(w, hyper.n_head_kv))
        if spec.norm_offset and src.endswith("norm.weight"):
            steps.append(lambda w: w + spec.norm_offset)
        if src in scaled_q:
            steps.append(lambda w: w * scale_q)
        plan.append(PlannedTensor(name, src, entry.shape, _tensor_type(name, entry.shape, qtype), steps))
    if not any(t.name == "token_embd.weight" for t in plan):
        raise CheckpointError(f"{reader.folder} has no token embedding.", "convert a complete model folder.")
    if (factors := _llama3_rope_factors(hyper)) is not None:
        plan.append(PlannedTensor(ROPE_FREQS, None, tuple(factors.shape), Q.F32, values=factors))
    return plan


def _tensor_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """F32 for 1-D tensors and norms; otherwise `qtype`, or F16 where a row is not whole Q8_0 blocks."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        log.info("%s: rows of %d values are not whole Q8_0 blocks; written as F16", name, shape[-1])
        return Q.F16
    return qtype


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k rows from transformers' rotate-half layout to llama.cpp's interleaved-pair rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _query_scale(spec: ArchSpec, hyper: Hyper) -> float:
    """Factor that makes llama.cpp's fixed query scale equal the model's `query_pre_attn_scalar ** -0.5`."""
    if spec.query_scale_weight is None:
        return 1.0
    scalar = hyper.config.get("query_pre_attn_scalar") or hyper.head_dim
    llama_dim = hyper.n_embd // hyper.n_head if hyper.n_layer == spec.query_scale_n_layer else hyper.head_dim
    return math.sqrt(llama_dim / scalar)


def _llama3_rope_factors(hyper: Hyper) -> torch.Tensor | None:
    """Llama 3.1+ rope scaling: llama.cpp takes the per-frequency factors as a `rope_freqs` tensor."""
    rope = hyper.rope
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base, dim = rope["rope_theta"], hyper.head_dim
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < old_ctx / high, 1.0, torch.where(wavelen > old_ctx / low, factor, factors))
    return factors.to(torch.float32)


def _convert(reader: CheckpointReader, t: PlannedTensor) -> np.ndarray:
    """Read one tensor, apply its steps in float32 and encode it as `t.qtype`."""
    w = t.values if t.source is None else reader.tensor(t.source)
    w = w.to(torch.float32)
    for step in t.transforms:
        w = step(w)
    data = w.contiguous().numpy()
    if t.qtype == Q.F32:
        return data
    if t.qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, t.qtype)


def _add_metadata(
    writer: GGUFWriter, folder: Path, reader: CheckpointReader, spec: ArchSpec, hyper: Hyper, outtype: str
) -> None:
    """general.*, the architecture's hyperparameters and cna-export provenance."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.resolve().name)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(hyper.ctx)
    writer.add_embedding_length(hyper.n_embd)
    writer.add_block_count(hyper.n_layer)
    writer.add_feed_forward_length(hyper.n_ff)
    writer.add_head_count(hyper.n_head)
    writer.add_head_count_kv(hyper.n_head_kv)
    writer.add_layer_norm_rms_eps(hyper.rms_eps)
    writer.add_rope_freq_base(hyper.rope["rope_theta"])
    writer.add_rope_dimension_count(hyper.head_dim)
    if hyper.explicit_head_dim:
        writer.add_key_length(hyper.head_dim)
        writer.add_value_length(hyper.head_dim)
    _add_rope_scaling(writer, hyper.rope, hyper.ctx)
    config = hyper.config
    if spec.sliding_window and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if spec.local_rope_base is not None and hyper.rope_local is not None:
        local = hyper.rope_local.get("rope_theta", spec.local_rope_base)
        if local != spec.local_rope_base:
            raise ArchitectureError(
                f"The sliding-window layers use rope base {local}, but llama.cpp fixes it at {spec.local_rope_base} "
                f"for {spec.model_type}.",
                "this model cannot be run by llama.cpp as is; export safetensors instead.",
            )
    if not spec.sliding_window and (window := config.get("sliding_window")) and window < hyper.ctx:
        if config.get("use_sliding_window", True):
            log.warning("llama.cpp runs %s without its %d-token sliding window", spec.model_type, window)
    # Provenance of exports (circuit hash, source, version) travels from the safetensors metadata.
    provenance = {k: v for meta in reader.file_metadata.values() for k, v in meta.items() if k.startswith("cna_")}
    for key, value in sorted(provenance.items()):
        writer.add_string(key, value)
    writer.add_string("cna_export.gguf_converter", f"cna-export {__version__}")


def _add_rope_scaling(writer: GGUFWriter, rope: dict[str, Any], ctx: int) -> None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", "llama3"):  # llama3's factors go into the rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", ctx))
    else:
        raise ArchitectureError(
            f"Rope scaling {kind!r} is not supported by the GGUF conversion.",
            "use a model with default, linear, llama3 or yarn rope scaling.",
        )
