"""The llama.cpp backend: a GGUF file run by llama.cpp (llama-cpp-python's C API), quantized and mmapped as it is;
nothing is dequantized in Python and nothing loads in transformers.

Opening reads the file's checked header (`Source.layout`, parsed once when the source was resolved): the
architecture row, the shape (experts included), the small metadata and the chat template. Attribution taps the
input of every `ffn_down` inside llama.cpp's graph (`cna_export.backends.llamacpp_sums`); evaluation and chat run
`LlamaCppRunner`s. A circuit applied to the model is the file patched by it (`patch_gguf` into a temporary file:
same quantization, only the f16 block scales of the circuit's `ffn_up` rows change), which is also what `run`
and `apply` write (`write`). llama-cpp-python is needed only once a model is loaded, so writing a patched GGUF
works without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from gguf import Keys

from cna_export.arch import ArchSpec, ModelShape, arch_for
from cna_export.attribution.collect import SetStats
from cna_export.backends.base import write_edit
from cna_export.backends.llamacpp_runner import LlamaCppRunner
from cna_export.backends.options import ExportOptions, LoadOptions
from cna_export.circuit.format import Circuit, ModelIdentity, shape_fields
from cna_export.circuit.selection import Selection
from cna_export.errors import CnaExportError, RecipeError
from cna_export.gguf.check import gguf_model_type, gguf_shape
from cna_export.io.hashing import combined_sha256, sha256_files
from cna_export.io.source import Source


def gguf_identity(source_name: str, path: Path, spec: ArchSpec, shape: ModelShape, metadata: dict) -> ModelIdentity:
    """The circuit's provenance for a GGUF file: the same weights hash as the torch route (sha256 over
    "NAME DIGEST"), a config hash over the file's small metadata values."""
    config = json.dumps(metadata, sort_keys=True, default=str).encode()
    return ModelIdentity(
        source=source_name,
        model_type=spec.model_type,
        weights_sha256=combined_sha256(sha256_files([path])),
        config_sha256=hashlib.sha256(config).hexdigest(),
        num_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size,
        hidden_size=shape.hidden_size,
        **shape_fields(shape),
    )


class LlamaCppBackend:
    """A GGUF source run in llama.cpp (see the module docstring).

    Example:
        >>> backend = LlamaCppBackend(resolve("smollm2.Q4_1.gguf"), LoadOptions(threads=2))
        >>> stats = backend.attribute([harmful, benign], Selection(), None, backend.shape.num_layers - 1)
    """

    runtime = "llama.cpp"
    supports_lm_eval = False
    dtype = "float32"  # llama.cpp computes the activations the tap reads in f32

    def __init__(self, source: Source, options: LoadOptions | None = None) -> None:
        self.source, self.options = source, options or LoadOptions()
        self.model_name = source.public_name  # results and cards are published: a Hub id or file name, no path
        layout = source.layout
        self.spec = arch_for(gguf_model_type(layout))
        self.model_type = self.spec.model_type
        self.shape = gguf_shape(layout, self.spec, source.path)
        self.metadata = layout.metadata
        self.chat_template: str | None = layout.get(Keys.Tokenizer.CHAT_TEMPLATE) or None
        self._runner: LlamaCppRunner | None = None
        self._identity: ModelIdentity | None = None

    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self._identity = gguf_identity(
                self.source.public_name, self.source.path, self.spec, self.shape, self.metadata
            )
        return self._identity

    def _open(self, path: Path) -> LlamaCppRunner:
        from cna_export.gguf.llamacpp import LlamaCppModel

        model = LlamaCppModel(path, self.options.threads)
        if model.n_layer != self.shape.num_layers:
            model.close()
            raise RecipeError(
                f"llama.cpp reads {model.n_layer} layers in {path}, the header {self.shape.num_layers}.",
                "re-convert the model.",
            )
        return LlamaCppRunner(model, self.chat_template)

    def load(self) -> LlamaCppRunner:
        if self._runner is None:
            self._runner = self._open(self.source.path)
        return self._runner

    def attribute(
        self, sets: Sequence[Sequence[str]], selection: Selection, top_n: int | None, last_layer: int
    ) -> list[SetStats]:
        from cna_export.backends.llamacpp_sums import collect_sets_gguf

        runner = self.load()
        encoded = [runner.encode(prompts, selection.chat_template, selection.system_prompt) for prompts in sets]
        return collect_sets_gguf(runner.model, self.spec, self.shape, encoded, selection.batch_size, top_n, last_layer)

    @contextlib.contextmanager
    def _file(self, path: Path) -> Iterator[LlamaCppRunner]:
        # One model in memory at a time: a variant never needs the original (its encodings are plain token ids),
        # which `load` maps again if it is asked for later.
        self.close()
        runner = self._open(path)
        try:
            yield runner
        finally:
            runner.model.close()

    @contextlib.contextmanager
    def variant(
        self, circuit: Circuit, multiplier: float | None = None, allow_negative: bool = False
    ) -> Iterator[LlamaCppRunner]:
        """The file patched by `circuit` at `multiplier`, in a temporary file removed afterwards."""
        from cna_export.gguf.patch import patch_gguf

        path = self.source.path
        with tempfile.TemporaryDirectory(prefix="cna-eval-") as tmp:
            out = Path(tmp) / path.name
            patch_gguf(
                path, circuit, out, multiplier=multiplier, allow_negative=allow_negative, layout=self.source.layout
            )
            with self._file(out) as runner:
                yield runner

    @contextlib.contextmanager
    def edited(self, path: Path) -> Iterator[LlamaCppRunner]:
        with self._file(edited_gguf(Path(path), self.source.path.name)) as runner:
            yield runner

    def can_run(self, path: Path) -> bool:
        try:
            edited_gguf(Path(path), self.source.path.name)
        except CnaExportError:
            return False
        return True

    def write(self, circuit: Circuit, out: Path, options: ExportOptions) -> Path:
        return write_edit(self.source, circuit, out, options)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.model.close()
            self._runner = None


def edited_gguf(edited: Path, name: str) -> Path:
    """The edited GGUF file: a .gguf, or an export folder from `run` (the GGUF of the source's name `name`, or its
    only .gguf)."""
    if edited.is_dir():
        files = [edited / name] if (edited / name).is_file() else sorted(edited.glob("*.gguf"))
        if len(files) != 1:
            raise CnaExportError(f"{edited} holds {len(files)} GGUF files, not one.", "pass the edited .gguf itself.")
        return files[0]
    if edited.suffix != ".gguf" or not edited.is_file():
        raise CnaExportError(
            f"--edited {edited} is not a GGUF file or an export folder with one.",
            "pass the patched .gguf (or the folder `run` wrote), or --backend torch.",
        )
    return edited
