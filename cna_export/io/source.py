"""Model sources: a local Hugging Face folder, a Hub id (through huggingface_hub's cache) or a GGUF file (also as
the folder `run` writes from one: the patched .gguf with its circuit and card).

`resolve()` turns what the user typed into a `Source` (a GGUF's header is checked there, once: `Source.layout`);
`describe()` reads its architecture and shape; `load_model()` loads it in transformers for the torch backend;
`identity()` fingerprints it for the circuit's provenance.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from cna_export.arch import ArchSpec, ModelShape, arch_for, shape_of
from cna_export.attribution.distributed import local_rank
from cna_export.circuit.format import ModelIdentity, shape_fields
from cna_export.errors import ArchitectureError, CheckpointError, CnaExportError
from cna_export.gguf.check import GGUFLayout, check_gguf
from cna_export.io.checkpoint import CheckpointReader
from cna_export.io.config import read_config_json
from cna_export.io.hashing import combined_sha256, sha256_files
from cna_export.io.names import public_name

log = logging.getLogger(__name__)

# What a Hub download fetches: weights as safetensors only (never pickles), config, tokenizer, templates, and the
# model card (its license travels into the card of an export).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "LICENSE*", "README.md"]
# PEFT's config file: a folder holding it is a LoRA adapter, not a model (cna_export.ship.adapter writes one).
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Source:
    """A resolved model. `folder` holds config/tokenizer; `gguf_file` is set for GGUF sources."""

    name: str
    folder: Path
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def public_name(self) -> str:
        """The name a card or circuit may publish: the Hub id (also of a folder in the Hugging Face cache), or the
        file or folder name; never a local path (`cna_export.io.names.public_name`)."""
        if self.is_gguf:
            return public_name(self.gguf_file)
        return public_name(self.name if self.revision is not None else str(self.folder))

    @property
    def path(self) -> Path:
        """The file or folder to protect from writes."""
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    @cached_property
    def layout(self) -> GGUFLayout:
        """A GGUF source's checked header, read once (`resolve` reads it; every later reader shares it)."""
        if not self.is_gguf:
            raise ValueError(f"{self.name} is not a GGUF source")
        return check_gguf(self.path)


def resolve(model: str, revision: str | None = None) -> Source:
    """Resolve a path or Hub id. Hub ids download to (or reuse) the huggingface_hub cache. A folder without
    config.json that holds one .gguf (what `run` writes from a GGUF source) is that GGUF."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist.", "check the path.")
        source = Source(str(path), path.parent.resolve(), path.name)
        source.layout  # noqa: B018 - a damaged file fails here, with one clear message, before any parser sees it
        return source
    if path.is_dir():
        if not (path / "config.json").is_file():
            return resolve(str(_gguf_in(path)))
        return Source(str(path), path.resolve())
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CheckpointError(
            f"Model {model!r} is neither a model folder, a .gguf file nor a Hub id (owner/name).",
            "check the path or the repository id.",
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise CheckpointError(
            f"Could not fetch {model!r} from the Hugging Face Hub ({exc.__class__.__name__}).",
            "check the id, your network and HF_TOKEN, or pass a local folder.",
        ) from None
    return Source(model, folder, revision=folder.name)


def _gguf_in(folder: Path) -> Path:
    """The one model .gguf of a folder without config.json (a folder `run` wrote from a GGUF source)."""
    if (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(
            f"{folder} is a LoRA adapter folder, not a model.", "pass its base model (the adapter loads on top of it)."
        )
    files = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if len(files) == 1:
        return files[0]
    if files:
        raise CheckpointError(
            f"{folder} has no config.json and holds {len(files)} .gguf files.", f"pass one of them, e.g. {files[0]}."
        )
    raise CheckpointError(
        f"{folder} has no config.json.",
        "pass a Hugging Face model folder, a .gguf file, or the folder `run` wrote from one.",
    )


def read_config(source: Source) -> dict[str, Any]:
    """The model config as a dict (from config.json, or from the GGUF metadata through transformers)."""
    if source.is_gguf:
        from transformers import AutoConfig

        _refuse_moe_gguf(source)

        try:
            config = AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file).to_dict()
        except Exception as exc:  # transformers' GGUF parsing of an untrusted file raises many types
            problem = f"Could not read the model config from GGUF {source.path}: {exc}".splitlines()[0]
            raise CheckpointError(problem, "check that the file is a complete GGUF model file.") from None
        return config
    return read_config_json(source.folder)


def _refuse_moe_gguf(source: Source) -> None:
    """transformers' GGUF loader does not read experts: it fails on a Qwen2-MoE file and loads a Mixtral file as a
    dense Llama whose MLPs keep their random initialization. Its torch route would then measure noise."""
    layout = source.layout
    if layout.get(f"{layout.architecture}.expert_count", int):
        raise CheckpointError(
            f"{source.path.name} is a mixture-of-experts GGUF, whose experts transformers' GGUF loader does not "
            "read (the torch route would run random MLPs).",
            "drop --backend torch (the GGUF runs in llama.cpp), or pass the model's safetensors folder.",
        )


def describe(source: Source) -> tuple[ArchSpec, ModelShape, dict[str, Any]]:
    """Architecture spec, shape and config of a source, checked against the table."""
    config = read_config(source)
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ArchitectureError("config.json has no model_type.", "use the config that came with the checkpoint.")
    spec = arch_for(model_type)
    if spec.checkpoint_layouts and not source.is_gguf:
        spec = spec.for_checkpoint(CheckpointReader(source.folder).entries)
    return spec, shape_of(spec.text_of(config)), config


def identity(source: Source, config: dict[str, Any], shape: ModelShape) -> ModelIdentity:
    """Provenance for a circuit: source, revision, weights hash, config hash, shape."""
    if source.is_gguf:
        weights = combined_sha256(sha256_files([source.path]))
        config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    else:
        reader = CheckpointReader(source.folder)
        weights = combined_sha256(sha256_files(source.folder / f for f in reader.files))
        config_hash = hashlib.sha256((source.folder / "config.json").read_bytes()).hexdigest()
    return ModelIdentity(
        source=source.public_name,
        model_type=config["model_type"],
        revision=source.revision,
        weights_sha256=weights,
        config_sha256=config_hash,
        num_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size,
        hidden_size=shape.hidden_size,
        **shape_fields(shape),
    )


def available_devices() -> list[str]:
    """The devices this machine has, as `--device` takes them: cpu, cuda:N for each GPU, mps."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def pick_device(device: str) -> torch.device:
    """The one resolution of `--device`: auto, or a device that exists here (cuda:7 on a machine without CUDA is
    one line listing the devices there are, not torch's assertion when the first tensor moves).

    Raises:
        CnaExportError: an unknown device name, or one this machine does not have.
    """
    if device == "auto":
        if torch.cuda.is_available():
            # Under torchrun each process takes its own GPU.
            return torch.device("cuda", local_rank())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    names = available_devices()
    if dev is not None and (
        dev.type == "cpu"
        or dev.type == "cuda"
        and torch.cuda.is_available()
        and (dev.index or 0) < torch.cuda.device_count()
        or dev.type == "mps"
        and torch.backends.mps.is_available()
    ):
        return dev
    problem = f"Unknown device {device!r}" if dev is None else f"Device {device!r} is not available here"
    raise CnaExportError(f"{problem}; this machine has: {', '.join(names)}.", "pass --device auto or one of those.")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise CnaExportError(f"Unknown dtype {dtype!r}.", f"use auto or one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source.folder, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"Could not load the tokenizer of {source.name}: {exc}", "check the model files."
        ) from None


def load_model(
    source: Source,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    offload_folder: Path | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load model (eval mode) and tokenizer. GGUF weights are dequantized by transformers.

    Args:
        device: where the whole model goes, unless `device_map` is given.
        device_map: accelerate's big-model placement ("auto", "balanced", or {module: device}), spreading
            layers over GPUs, the CPU and disk (`offload_folder`) for models larger than one device.
    """
    import transformers

    spec, _, _ = describe(source)  # fail early, with our message, on unsupported architectures
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    placement = {}
    if device_map is not None:
        placement = {"device_map": device_map, "offload_folder": str(offload_folder) if offload_folder else None}
    log.info("loading %s (%s on %s)", source.name, torch_dtype, device_map or dev)
    try:
        model = getattr(transformers, spec.loader).from_pretrained(
            source.folder,
            gguf_file=source.gguf_file,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if source.is_gguf else True,
            **placement,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first_line = f"Could not load {source.name}: {exc}".splitlines()[0]
        raise CheckpointError(first_line, "check the model files.") from None
    if device_map is None:
        model.to(dev)
    model.eval()
    return model, load_tokenizer(source, trust_remote_code)
