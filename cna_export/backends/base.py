"""The backend interface: what every command needs from a model, whichever runtime runs it.

A `Backend` is one opened model source (its header or config read and checked once, its architecture row and
shape known) with five abilities: `load` it (a `Runner`), `attribute` (the per-set float64 sums of every neuron at
the last token, for `cna_export.attribution.select`), run it edited (`variant`: a circuit at a multiplier, applied
the runtime's way; `edited`: an exported model), and `write` the edit. A `Runner` is one model variant as
evaluation and chat see it: prompts in, greedy answers (`generate`), teacher-forced log-probabilities (`score`, for
KL and perplexity) and MMLU letter log-probabilities (`letter_logprobs`) out.

`open_backend` chooses the implementation once per command from the source and the `--backend` option: a GGUF file
runs in llama.cpp (`cna_export.backends.llamacpp`), quantized as it is, unless torch is asked for; everything else
in torch (`cna_export.backends.torch`). Commands never branch on the file type themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cna_export.backends.options import ExportOptions, LoadOptions
from cna_export.circuit.format import CIRCUIT_FILE, Circuit
from cna_export.errors import RecipeError
from cna_export.io.source import Source, resolve

if TYPE_CHECKING:
    import torch

    from cna_export.arch import ArchSpec, ModelShape
    from cna_export.attribution.collect import SetStats
    from cna_export.circuit.format import ModelIdentity
    from cna_export.circuit.selection import Selection
    from cna_export.evaluate.measure import EvalConfig, Scored


class Runner(Protocol):
    """One model variant (the original, a circuit applied at runtime, an exported model) as evaluation and chat
    use it. Token ids are the original's: a variant's answers are scored on the original's encodings."""

    has_chat_template: bool

    def encode(self, prompts: Sequence[str], chat_template: bool = True, system: str | None = None) -> list[list[int]]:
        """Token ids per prompt, chat-templated (user turn + generation prompt) when asked and the model has one,
        after a `system` message when given (without a template: the system text, a blank line, the prompt)."""
        ...

    def generate(
        self, encoded: list[list[int]], cfg: EvalConfig, desc: str = "generate", first: list | None = None
    ) -> list[list[int]]:
        """Greedy answers, `cfg.batch_size` prompts at a time, each ending with the end token if the model stopped;
        with `first` (a list), each answer's first-token log-probabilities ([vocab] float32 tensors: the distribution
        after the prompt) appended to it in prompt order, so first-token KL needs no second pass."""
        ...

    def score(self, encoded: list[list[int]], answers: list[list[int]], cfg: EvalConfig, desc: str = "score",
            ref: Sequence[Scored] | None = None) -> list[Scored]:  # fmt: skip
        """Prompt + answer through the model: per answer token its NLL, and the log-probabilities of the first
        `cfg.kl_tokens` positions (with `ref`, the original's scores of the same answers: the KL to them instead,
        `Scored.of`)."""
        ...

    def letter_logprobs(self, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """[prompts, 4] next-token log-probabilities of " A".." D" after each raw prompt (MMLU)."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (end tokens dropped with `skip_special_tokens`)."""
        ...

    def lm_eval(self, tasks: Sequence[str], limit: int | None = None, include: Path | None = None) -> dict:
        """lm-evaluation-harness scores of this variant ({task: {metric: value}})."""
        ...


class Backend(Protocol):
    """One opened model source and the runtime that runs it.

    Attributes:
        runtime: "torch" or "llama.cpp" (recorded in results documents).
        source: what the user named, resolved (None for a model handed over already loaded).
        model_name: the model as results and reports name it.
        model_type, spec, shape: the architecture row and the model's shape (MoE experts, per-layer widths).
        dtype: the dtype the forward passes compute in (recorded in circuits).
        supports_lm_eval: whether `Runner.lm_eval` can run (lm-evaluation-harness needs a torch model).
    """

    runtime: str
    source: Source | None
    model_name: str
    model_type: str
    spec: ArchSpec
    shape: ModelShape
    supports_lm_eval: bool

    @property
    def dtype(self) -> str: ...

    def identity(self) -> ModelIdentity:
        """The circuit's provenance of this model (weights hash, config hash, shape); computed once."""
        ...

    def load(self) -> Runner:
        """The original model, loaded once and kept."""
        ...

    def attribute(
        self, sets: Sequence[Sequence[str]], selection: Selection, top_n: int | None, last_layer: int
    ) -> list[SetStats]:
        """Per prompt set, the float64 sums of every neuron's activation at the last token (with `top_n`, the
        per-layer top-|act| counts and |act| sums too); layers after `last_layer` are never computed."""
        ...

    def variant(
        self, circuit: Circuit, multiplier: float | None = None, allow_negative: bool = False
    ) -> AbstractContextManager[Runner]:
        """The model with `circuit` applied at `multiplier` (default: the circuit's own), for the `with` block."""
        ...

    def edited(self, path: Path) -> AbstractContextManager[Runner]:
        """An exported model (a folder, a patched .gguf, or a folder `run` wrote from a GGUF), for the `with`
        block; it reuses the original's tokenizer, so the encodings of the original apply."""
        ...

    def can_run(self, path: Path) -> bool:
        """Whether `edited(path)` can run this exported model (llama.cpp runs a .gguf, not a safetensors folder)."""
        ...

    def write(self, circuit: Circuit, out: Path, options: ExportOptions) -> Path:
        """Write the edited model to `out` (see `write_edit`)."""
        ...

    def close(self) -> None:
        """Free the loaded model(s)."""
        ...


def open_backend(source: Source, options: LoadOptions | None = None) -> Backend:
    """The backend of `source`, chosen once: a GGUF file runs in llama.cpp unless `options.backend` is "torch";
    anything else runs in torch. Opening reads and checks the model's header or config, never its weights.

    Example:
        >>> backend = open_backend(resolve("smollm2.Q4_1.gguf"))
        >>> backend.runtime, backend.shape.num_layers
        ('llama.cpp', 30)
    """
    options = options or LoadOptions()
    if options.backend == "llama.cpp" and not source.is_gguf:
        raise RecipeError(
            f"--backend llama.cpp needs a .gguf model; {source.name} is not one.",
            "pass a GGUF file, or --backend torch.",
        )
    if source.is_gguf and options.backend != "torch":
        from cna_export.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(source, options)
    from cna_export.backends.torch import TorchBackend

    return TorchBackend(source, options)


def open_model(model: str, options: LoadOptions | None = None) -> Backend:
    """`open_backend` of what the user typed (a folder, a Hub id, a .gguf file or a folder `run` wrote from one)."""
    options = options or LoadOptions()
    return open_backend(resolve(model, options.revision), options)


def write_edit(source: Source, circuit: Circuit, out: Path, options: ExportOptions) -> Path:
    """The edit in the source's own format: a GGUF source gives a folder with the GGUF patched in place (the same
    quantization, nothing dequantized) unless safetensors (or a GGUF conversion of them) is asked for; anything
    else the streamed safetensors export. Which runtime discovered the circuit does not matter."""
    if source.is_gguf and not options.safetensors and options.gguf is None:
        from cna_export.gguf.patched_export import export_patched_gguf

        return export_patched_gguf(source, circuit, out, options)
    from cna_export.fold.export import apply_circuit

    return apply_circuit(source, circuit, out, options)


def applied_circuit(path: Path) -> Circuit | None:
    """The circuit an exported model records: `circuit.json` of an export folder, or the sidecar patch-gguf wrote
    next to a patched .gguf (`OUT.gguf.circuit.json`); None when there is none."""
    from cna_export.gguf.patch import sidecar_path

    path = Path(path)
    record = path / CIRCUIT_FILE if path.is_dir() else sidecar_path(path)
    return Circuit.load(record) if record.is_file() else None
