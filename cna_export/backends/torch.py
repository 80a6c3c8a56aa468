"""The torch backend: a Hugging Face folder, a Hub id, or a GGUF file dequantized by transformers, run in PyTorch.

It wraps the torch route as it was: loading through `cna_export.io.source.load_model` (safetensors only, remote
code only when asked), the forward passes of `cna_export.attribution.collect` (pre-hooks on every `down_proj`,
per-set float64 sums at the last token), generation and teacher-forced scoring of `cna_export.evaluate.measure`,
and a circuit applied at runtime by hooks that scale the neurons (`cna_export.attribution.hooks`), which is what
folding it into the weights computes. An exported model is loaded as a second model, after the original is freed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from cna_export.arch import ArchSpec, shape_of
from cna_export.attribution.collect import SetStats, collect_sets, context_of, encode_prompts
from cna_export.attribution.hooks import scaled_neurons
from cna_export.backends.base import write_edit
from cna_export.backends.options import ExportOptions, LoadOptions
from cna_export.circuit.format import Circuit, ModelIdentity
from cna_export.circuit.selection import Selection
from cna_export.errors import CnaExportError
from cna_export.evaluate import measure
from cna_export.evaluate.lm_eval import lm_eval_scores
from cna_export.fold.scale import LayerEdits, UnitEdits
from cna_export.io.source import Source, describe, identity, load_model, resolve


class TorchRunner:
    """A transformers model and its tokenizer as evaluation and chat use them, with `edits` (if any) hooked in
    around every call (runtime scaling of the circuit's neurons: `scaled_neurons`).

    Example:
        >>> runner = TorchRunner(model, tokenizer, spec, circuit.hook_edits(0.0))
        >>> answers = runner.generate(runner.encode(prompts), EvalConfig())
    """

    def __init__(
        self, model: nn.Module, tokenizer, spec: ArchSpec | None = None, edits: LayerEdits | UnitEdits | None = None
    ) -> None:
        if edits is not None and spec is None:
            raise ValueError("runtime edits need the architecture spec")
        self.model, self.tokenizer, self.spec, self.edits = model, tokenizer, spec, edits

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def hooked(self) -> contextlib.AbstractContextManager:
        """The runtime edits, hooked in for one call (nothing for the original)."""
        return scaled_neurons(self.model, self.spec, self.edits) if self.edits is not None else contextlib.nullcontext()

    def encode(self, prompts: Sequence[str], chat_template: bool = True, system: str | None = None) -> list[list[int]]:
        # Every prompt is checked against the model's context before the first forward pass.
        return encode_prompts(self.tokenizer, prompts, chat_template, context_of(self.model), system)

    def generate(
        self, encoded: list[list[int]], cfg: measure.EvalConfig, desc: str = "generate", first: list | None = None
    ) -> list[list[int]]:
        with self.hooked():
            return measure.generate(self.model, self.tokenizer, encoded, cfg, desc, first)

    def score(
        self,
        encoded: list[list[int]],
        answers: list[list[int]],
        cfg: measure.EvalConfig,
        desc: str = "score",
        ref: Sequence[measure.Scored] | None = None,
    ) -> list[measure.Scored]:
        with self.hooked():
            return measure.score(self.model, encoded, answers, cfg, measure.pad_id_of(self.tokenizer), desc, ref)

    def letter_logprobs(self, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        from cna_export.evaluate.mmlu import prompt_letter_logprobs

        with self.hooked():
            return prompt_letter_logprobs(self.model, self.tokenizer, prompts, batch_size)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def lm_eval(self, tasks: Sequence[str], limit: int | None = None, include: Path | None = None) -> dict:
        with self.hooked():
            return lm_eval_scores(self.model, self.tokenizer, tasks, limit=limit, include_path=include)


class TorchBackend:
    """A model source run in PyTorch (see the module docstring). Opening reads its config once (`describe`); the
    weights load on the first `load()`.

    Example:
        >>> backend = TorchBackend(resolve("Qwen/Qwen2.5-0.5B-Instruct"), LoadOptions(device="cpu"))
        >>> with backend.variant(circuit, 0.0) as edited:
        ...     answers = edited.generate(backend.load().encode(prompts), EvalConfig())
    """

    runtime = "torch"
    supports_lm_eval = True

    def __init__(self, source: Source, options: LoadOptions | None = None) -> None:
        self.source, self.options = source, options or LoadOptions()
        self.model_name = source.public_name  # results and cards are published: a Hub id or file name, no path
        self.spec, self.shape, self.config = describe(source)
        self.model_type: str = self.config["model_type"]
        self._runner: TorchRunner | None = None
        self._tokenizer = None
        self._identity: ModelIdentity | None = None

    @classmethod
    def of_model(
        cls,
        model: nn.Module,
        tokenizer,
        spec: ArchSpec,
        model_id: ModelIdentity | None = None,
        model_name: str = "model",
    ) -> TorchBackend:
        """A backend over a model already loaded (tests, benchmarks, several runs on one model); `model_id` is
        needed to attribute (it is recorded in the circuit)."""
        self = cls.__new__(cls)
        self.source, self.options, self.model_name = None, LoadOptions(), model_name
        self.spec, self.shape, self.config = spec, shape_of(model.config.get_text_config()), None
        self.model_type = model.config.model_type if model_id is None else model_id.model_type
        self._runner, self._tokenizer, self._identity = TorchRunner(model, tokenizer, spec), tokenizer, model_id
        return self

    @property
    def dtype(self) -> str:
        return str(next(self.load().model.parameters()).dtype).removeprefix("torch.")

    def identity(self) -> ModelIdentity:
        if self._identity is None:
            if self.source is None:
                raise ValueError("a backend over a loaded model needs its ModelIdentity to attribute")
            self._identity = identity(self.source, self.config, self.shape)
        return self._identity

    def load(self) -> TorchRunner:
        if self._runner is None:
            model, self._tokenizer = self._load(self.source)
            self._runner = TorchRunner(model, self._tokenizer, self.spec)
        return self._runner

    def _load(self, source: Source) -> tuple[nn.Module, object]:
        o = self.options
        return load_model(
            source,
            dtype=o.dtype,
            device=o.device,
            trust_remote_code=o.trust_remote_code,
            device_map=o.device_map,
            offload_folder=o.offload_folder,
        )

    def attribute(
        self, sets: Sequence[Sequence[str]], selection: Selection, top_n: int | None, last_layer: int
    ) -> list[SetStats]:
        runner = self.load()
        encoded = [runner.encode(prompts, selection.chat_template, selection.system_prompt) for prompts in sets]
        return collect_sets(
            runner.model,
            self.spec,
            encoded,
            selection.batch_size,
            measure.pad_id_of(runner.tokenizer),
            top_n=top_n,
            last_layer=last_layer,
        )

    @contextlib.contextmanager
    def variant(
        self, circuit: Circuit, multiplier: float | None = None, allow_negative: bool = False
    ) -> Iterator[TorchRunner]:
        runner = self.load()
        yield TorchRunner(runner.model, runner.tokenizer, self.spec, circuit.hook_edits(multiplier, allow_negative))

    @contextlib.contextmanager
    def edited(self, path: Path) -> Iterator[TorchRunner]:
        tokenizer = self.load().tokenizer
        self._runner = None  # one model in memory at a time: the original is loaded again if asked for
        model, _ = self._load(resolve(str(path)))
        try:
            yield TorchRunner(model, tokenizer)
        finally:
            del model

    def can_run(self, path: Path) -> bool:
        try:
            resolve(str(path))  # a model folder, a .gguf, or a folder holding one (dequantized by transformers)
        except CnaExportError:
            return False
        return True

    def write(self, circuit: Circuit, out: Path, options: ExportOptions) -> Path:
        return write_edit(self.source, circuit, out, options)

    def close(self) -> None:
        self._runner = None
