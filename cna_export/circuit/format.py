"""The circuit file: which neurons to scale, why (their deltas), and where they came from.

A circuit is human-readable JSON. It is validated twice: on load (schema, ranges, duplicates) and against the
model it is applied to (architecture, layer count, MLP width, and optionally the weights hash).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from cna_export import __version__
from cna_export.arch import ModelShape, compatible
from cna_export.circuit.selection import Selection, Strict
from cna_export.errors import CircuitError
from cna_export.fold.scale import LayerEdits, check_multiplier, group_by_layer
from cna_export.io.output import write_text_atomic

FORMAT = "cna-circuit"
FORMAT_VERSION = 1
# Sizes and indices beyond this are damage, not models; without a bound they would overflow int64 tensors.
MAX_SIZE = 2**31



class Neuron(Strict):
    layer: int = Field(ge=0, lt=MAX_SIZE, description="Decoder layer index.")
    index: int = Field(ge=0, lt=MAX_SIZE, description="Neuron index inside the layer's MLP (column of down_proj).")
    delta: float = Field(description="mean(positive) - mean(negative) of the neuron's activation at the last token.")
    multiplier: float | None = Field(default=None, description="Per-neuron multiplier; None uses the circuit's.")


class PromptSet(Strict):
    count: int = Field(ge=0, description="Number of prompts.")
    sha256: str = Field(description="sha256 of the prompts joined by newlines, before any chat template.")


class ModelIdentity(Strict):
    source: str = Field(description="Path or Hub id the circuit was discovered on.")
    model_type: str = Field(description="config.model_type.")
    revision: str | None = Field(default=None, description="Hub commit, when the model came from the Hub.")
    weights_sha256: str | None = Field(default=None, description="Combined sha256 of the weight files.")
    config_sha256: str | None = Field(default=None, description="sha256 of config.json.")
    num_layers: int = Field(gt=0, lt=MAX_SIZE, description="Decoder layers.")
    intermediate_size: int = Field(gt=0, lt=MAX_SIZE, description="MLP neurons per layer.")
    hidden_size: int = Field(gt=0, lt=MAX_SIZE, description="Residual width.")


class RecordedSelection(Selection):
    """The selection as a circuit records it: the knobs, and what they produced."""

    top_k: int = Field(ge=0, description="Number of neurons selected.")
    universal_excluded: list[tuple[int, int]] = Field(default_factory=list, description="(layer, index) excluded.")
    dtype: str = Field(default="float32", description="Activation dtype during attribution.")

    @model_validator(mode="after")
    def _one_size(self) -> RecordedSelection:
        return self  # a circuit records both the count it selected and the fraction that was asked for

    @model_validator(mode="before")
    @classmethod
    def _version_1(cls, data: Any) -> Any:
        """Circuits before the `universal` key said 'no universal exclusion' with a null threshold."""
        if isinstance(data, dict) and "universal" not in data:
            data = {**data, "universal": data.get("universal_threshold") is not None}
            if data.get("universal_threshold") is None:
                data.pop("universal_threshold", None)
        return data


class StackedSource(Strict):
    """One circuit of a stack (`cna_export.circuit.stack`): what it contributed, for the card and for audits."""

    file: str = Field(description="File name of the circuit (no folder: the record is published).")
    sha256: str = Field(description="sha256 of the circuit as loaded (`Circuit.sha256`).")
    behaviour: str = Field(description="The circuit's behaviour.")
    recipe: str | None = Field(default=None, description="Its recipe, when made from one.")
    multiplier: float = Field(description="Its default multiplier.")
    neurons: int = Field(ge=0, description="Number of neurons it lists.")


class Circuit(Strict):
    format: Literal["cna-circuit"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    tool_version: str = Field(default=__version__, description="cna-export version that wrote the file.")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    behaviour: str = Field(default="custom", description="What the positive prompts elicit, e.g. 'refusal'.")
    recipe: str | None = Field(default=None, description="Recipe name, when made from one.")
    multiplier: float = Field(default=0.0, description="Default multiplier for every neuron.")
    model: ModelIdentity
    prompts: dict[str, PromptSet] = Field(description="positive, negative and neutral prompt sets.")
    selection: RecordedSelection
    neurons: list[Neuron]
    sources: list[StackedSource] | None = Field(
        default=None, description="The circuits this one stacks (a neuron in several gets the product)."
    )

    @model_validator(mode="after")
    def _check(self) -> Circuit:
        seen = Counter((n.layer, n.index) for n in self.neurons)
        dup = [key for key, count in seen.items() if count > 1]
        if dup:
            raise ValueError(f"neuron (layer, index) {dup[0]} is listed twice")
        for n in self.neurons:
            if n.layer >= self.model.num_layers or n.index >= self.model.intermediate_size:
                raise ValueError(f"neuron ({n.layer}, {n.index}) lies outside the model it claims")
            if not math.isfinite(n.delta) or (n.multiplier is not None and not math.isfinite(n.multiplier)):
                raise ValueError(f"neuron ({n.layer}, {n.index}) has a non-finite value")
        if not math.isfinite(self.multiplier):
            raise ValueError("multiplier is not finite")
        return self

    # Use ---------------------------------------------------------------------------------------------------

    def edits(self, multiplier: float | None = None, allow_negative: bool = False) -> LayerEdits:
        """Per-layer (indices, multipliers). `multiplier` overrides every neuron's multiplier."""
        triples = []
        for n in self.neurons:
            m = (
                multiplier
                if multiplier is not None
                else (n.multiplier if n.multiplier is not None else self.multiplier)
            )
            triples.append((n.layer, n.index, check_multiplier(m, allow_negative)))
        return group_by_layer(triples)

    def check_fits(
        self, model_type: str, shape: ModelShape, weights_sha256: str | None = None, force: bool = False
    ) -> None:
        """Refuse to apply this circuit to a model it was not made for (`force` skips only the hash check)."""
        me = self.model
        if not compatible(me.model_type, model_type):
            raise CircuitError(
                f"Circuit was made for a {me.model_type} model but this model is {model_type}.",
                "discover a circuit on this model.",
            )
        if (me.num_layers, me.intermediate_size) != (shape.num_layers, shape.intermediate_size):
            raise CircuitError(
                f"Circuit was made for {me.num_layers} layers x {me.intermediate_size} neurons, "
                f"this model has {shape.num_layers} x {shape.intermediate_size}.",
                "discover a circuit on this model.",
            )
        if weights_sha256 and me.weights_sha256 and weights_sha256 != me.weights_sha256 and not force:
            raise CircuitError(
                f"Circuit was made on weights {me.weights_sha256[:12]}, this model's are {weights_sha256[:12]}.",
                "pass --force to apply it to a fine-tune or re-upload of the same model.",
            )

    def layer_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(n.layer for n in self.neurons).items()))

    def summary(self, top: int = 20) -> str:
        """A readable summary: what it was made on, exclusions, neurons per layer, the top neurons by |delta|."""
        circuit = self
        m, s = circuit.model, circuit.selection
        total = m.num_layers * m.intermediate_size
        lines = [
            f"circuit: {circuit.behaviour} on {m.source} ({m.model_type}, {m.num_layers} layers x {m.intermediate_size})",
            f"neurons: {len(circuit.neurons)} ({100 * len(circuit.neurons) / total:.3f}% of {total}), "
            f"default multiplier {circuit.multiplier:g}",
            f"excluded: first {s.skip_first_layers} and last {s.skip_last_layers} layers, "
            f"{len(s.universal_excluded)} universal neurons"
            + (f"; specificity {s.specificity:g}" if s.specificity else ""),
            "prompts: " + ", ".join(f"{k} {v.count}" for k, v in circuit.prompts.items()),
            "",
            "layer  neurons",
        ]
        lines += [f"{layer:5d}  {count:7d}" for layer, count in circuit.layer_counts().items()]
        lines += ["", f"top {min(top, len(circuit.neurons))} by |delta|:", "layer  index        delta"]
        ranked = sorted(circuit.neurons, key=lambda n: -abs(n.delta))[:top]
        lines += [f"{n.layer:5d}  {n.index:5d}  {n.delta:+11.5f}" for n in ranked]
        return "\n".join(lines)

    # Files -------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        # A circuit that stacks nothing is written as before (same bytes, same sha256).
        return self.model_dump_json(indent=1, exclude=None if self.sources is not None else {"sources"})

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: Path) -> None:
        """Write atomically: a temporary sibling, then a rename (`output.staged_output`). The temporary is named
        like every cna-export temporary, so one left by a killed run is removed by the next save to `path`."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> Circuit:
        """Read and validate a circuit file; every problem becomes a one-line CircuitError."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text)
        except FileNotFoundError:
            raise CircuitError(f"Circuit file {path} does not exist.", "pass the path written by discover.") from None
        except OSError as exc:  # a folder, no permission, an I/O error
            raise CircuitError(f"Circuit file {path} cannot be read ({exc.strerror}).", "check the path.") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise CircuitError(f"Circuit file {path} is not valid JSON ({what}).", "re-run discover.") from None
        if isinstance(data, dict) and data.get("format") not in (None, FORMAT):
            raise CircuitError(f"{path} is not a cna-export circuit.", "pass a circuit written by discover.")
        try:  # from the JSON text: strict types, but JSON arrays are valid tuples
            return cls.model_validate_json(text)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "top level"
            raise CircuitError(
                f"Circuit file {path} is invalid at {where}: {err['msg']}.", "re-run discover."
            ) from None


def prompt_set(prompts: list[str]) -> PromptSet:
    return PromptSet(count=len(prompts), sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest())
