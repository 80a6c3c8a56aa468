"""The options of loading a model and of writing an edit, each one typed model made once per command.

`LoadOptions` is how a model is fetched and run (which backend, device, dtype, threads, ...): the `--model` group
of flags is made from its fields, as the selection flags are made from `Selection`. `ExportOptions` is how an edit
is written (multiplier, target, overwrite, the output's format, ...). Both are plain data: nothing here imports
torch or llama.cpp, so the command line can build them before any heavy import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cna_export.errors import CnaExportError

BACKENDS = ("auto", "llama.cpp", "torch")
Backend = Literal["auto", "llama.cpp", "torch"]


class Options(BaseModel):
    """Base of the option models: unknown names are errors, values are not coerced, instances are immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)

    @classmethod
    def checked(cls, **values: Any):
        """The model from `values` (None: the default), a bad value a one-line error naming its flag."""
        given = {k: v for k, v in values.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "options"
            raise CnaExportError(
                f"--{name.replace('_', '-')} {given.get(name)!r}: {err['msg']}.", "see --help."
            ) from None


class LoadOptions(Options):
    """How a model is fetched and where its forward passes run. The CLI makes the `--model` group from these fields.

    Example:
        >>> open_model("smollm2.Q4_1.gguf", LoadOptions(threads=2))  # llama.cpp, two threads
    """

    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit)")
    backend: Backend = Field(
        default="auto",
        description="where the forward passes run: auto (a .gguf file in llama.cpp, quantized as it is; anything "
        "else in torch), llama.cpp, or torch (dequantizes a GGUF in transformers)",
    )
    dtype: str = Field(default="auto", description="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    device_map: str | None = Field(
        default=None, description="spread layers over devices: auto, balanced, sequential (accelerate)"
    )
    offload_folder: Path | None = Field(
        default=None, description="folder for weights offloaded to disk with --device-map"
    )
    trust_remote_code: bool = Field(default=False, description="allow model code from the Hub (off by default)")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="llama.cpp threads (default: $CNA_EXPORT_LLAMA_THREADS, else every core this process may use)",
    )


class ExportOptions(Options):
    """How an edit is written: as the edited model (a GGUF source: the patched GGUF of the same quantization,
    unless `safetensors` or a `gguf` conversion is asked for), or as a LoRA adapter.

    Attributes mirror the `apply` flags; `recipe_file` and `metrics` are set by `run` and `sweep --export`.
    """

    multiplier: float | None = Field(default=None, description="scale for every neuron (0 ablate, >1 amplify)")
    allow_negative: bool = Field(default=False, description="permit a negative multiplier")
    overwrite: bool = Field(default=False, description="replace an existing output written by cna-export")
    force: bool = Field(default=False, description="apply a circuit discovered on different weights of this shape")
    target: Literal["down", "up"] = Field(default="down", description="fold into down_proj columns or up_proj rows")
    base_model: str | None = Field(default=None, description="Hub id of the source for the card")
    gguf: str | None = Field(default=None, description="also convert the export to OUT/OUT-OUTTYPE.gguf")
    hash_files: bool = Field(default=False, description="record the weight files' sha256 in the card now")
    safetensors: bool = Field(default=False, description="a .gguf model: write dequantized safetensors instead")
    modelfile: bool = Field(default=False, description="a .gguf model: also write an Ollama Modelfile")
    adapter: bool = Field(default=False, description="write a LoRA adapter instead of the edited model")
    recipe_file: Path | None = Field(default=None, description="the recipe, saved as recipe.yaml in the output")
    metrics: dict | None = Field(default=None, description="evaluation numbers for the card")
