"""The circuit file: which neurons to scale, why (their deltas), and where they came from.

A circuit is human-readable JSON. It is validated twice: on load (schema, ranges, duplicates) and against the
model it is applied to (architecture, layer count, MLP width, and optionally the weights hash: circuit/identity.py).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from cna_export import __version__
from cna_export.arch import ModelShape
from cna_export.circuit.identity import MAX_SIZE, MOE_IDENTITY, ModelIdentity, moe_fields, shape_fields
from cna_export.circuit.selection import Selection, Strict
from cna_export.errors import CircuitError
from cna_export.fold.scale import LayerEdits, UnitEdits, check_multiplier, group_by_unit
from cna_export.io.names import check_name, public_name
from cna_export.io.output import write_text_atomic
from cna_export.io.untrusted_json import parse_json

# `ModelIdentity` and its helpers live in circuit/identity.py; they are imported from here too.
__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_SIZE",
    "Circuit",
    "ExpertRouting",
    "ModelIdentity",
    "Neuron",
    "PromptSet",
    "RecordedSelection",
    "Routing",
    "StackedSource",
    "moe_fields",
    "prompt_set",
    "shape_fields",
]

FORMAT = "cna-circuit"
CIRCUIT_FILE = "circuit.json"  # the applied circuit in every export and adapter folder (the card's audit names it)
# Version 2 (issue 15) adds neurons inside experts: `Neuron.expert`, the model's expert sizes and `routing`. A
# circuit with none of them is still written as version 1, byte for byte as before; both versions load. A model
# whose layers differ in MLP width (Gemma 4's double-wide layers) records `layer_widths`, also as version 2.
FORMAT_VERSION = 2


class Neuron(Strict):
    layer: int = Field(ge=0, lt=MAX_SIZE, description="Decoder layer index.")
    expert: int | Literal["shared"] | None = Field(
        default=None,
        description="None: a dense MLP; an int: that routed expert of the layer; 'shared': the shared expert.",
    )
    index: int = Field(ge=0, lt=MAX_SIZE, description="Neuron index inside the layer's MLP (column of down_proj).")
    delta: float = Field(description="mean(positive) - mean(negative) of the neuron's activation at the last token.")
    multiplier: float | None = Field(default=None, description="Per-neuron multiplier; None uses the circuit's.")


class PromptSet(Strict):
    count: int = Field(ge=0, description="Number of prompts.")
    sha256: str = Field(description="sha256 of the prompts joined by newlines, before any chat template.")


class ExpertRouting(Strict):
    """How often the last token of each prompt set was routed to one expert of the circuit (format version 2)."""

    layer: int = Field(ge=0, lt=MAX_SIZE, description="Decoder layer.")
    expert: int | Literal["shared"] = Field(description="Routed expert (or 'shared', which sees every token).")
    routed: dict[str, int] = Field(description="Prompt set -> prompts whose last token was routed to the expert.")


class Routing(Strict):
    """What a neuron's activation means inside an expert, and the routing coverage of the selected experts."""

    activation: Literal["router_weight_x_down_input"] = Field(
        default="router_weight_x_down_input",
        description="At the last token: the expert's router weight times the neuron's input to the expert's "
        "down projection (0 when the token is not routed there); the shared expert's weight is its sigmoid gate.",
    )
    coverage: list[ExpertRouting] = Field(default_factory=list, description="Per selected expert.")


class RecordedSelection(Selection):
    """The selection as a circuit records it: the knobs, and what they produced."""

    top_k: int = Field(ge=0, description="Number of neurons selected.")
    universal_excluded: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(layer, column) excluded as universal: a dense layer's neuron index; an MoE layer's attribution "
        "column, expert * width + index (the shared expert's after the routed ones, arch/experts.py).",
    )
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
        # A "before" validator turns JSON input into Python objects, where strict mode takes no list for a tuple:
        # without this a circuit with universal exclusions could not be loaded.
        if isinstance(data, dict) and isinstance(data.get("universal_excluded"), list):
            data = {
                **data,
                "universal_excluded": [tuple(x) if isinstance(x, list) else x for x in data["universal_excluded"]],
            }
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
    format_version: Literal[1, 2] = 1  # raised to FORMAT_VERSION (2) by validation when the circuit has experts
    tool_version: str = Field(default=__version__, description="cna-export version that wrote the file.")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    behaviour: str = Field(default="custom", description="What the positive prompts elicit, e.g. 'refusal'.")
    recipe: str | None = Field(default=None, description="Recipe name, when made from one.")
    multiplier: float = Field(default=0.0, description="Default multiplier for every neuron.")
    model: ModelIdentity
    prompts: dict[str, PromptSet] = Field(description="positive, negative and neutral prompt sets.")
    selection: RecordedSelection
    neurons: list[Neuron]
    routing: Routing | None = Field(default=None, description="MoE attribution: activation and routing coverage.")
    sources: list[StackedSource] | None = Field(
        default=None, description="The circuits this one stacks (a neuron in several gets the product)."
    )

    @model_validator(mode="after")
    def _check(self) -> Circuit:
        seen = Counter(
            (n.layer, n.expert, n.index) if n.expert is not None else (n.layer, n.index) for n in self.neurons
        )
        dup = [key for key, count in seen.items() if count > 1]
        if dup:
            raise ValueError(
                f"neuron {'(layer, expert, index)' if len(dup[0]) == 3 else '(layer, index)'} {dup[0]} is listed twice"
            )
        for n in self.neurons:
            if n.layer >= self.model.num_layers or n.index >= self.model.unit_width(n.expert, n.layer):
                raise ValueError(f"neuron {self._key(n)} lies outside the model it claims")
            if not math.isfinite(n.delta) or (n.multiplier is not None and not math.isfinite(n.multiplier)):
                raise ValueError(f"neuron ({n.layer}, {n.index}) has a non-finite value")
        if not math.isfinite(self.multiplier):
            raise ValueError("multiplier is not finite")
        if self.is_moe or self.model.layer_widths is not None:
            object.__setattr__(self, "format_version", 2)
        return self

    @property
    def is_moe(self) -> bool:
        """Whether the circuit needs format version 2 (experts in the model or among its neurons)."""
        return bool(self.model.num_experts or self.routing or any(n.expert is not None for n in self.neurons))

    @property
    def num_neurons(self) -> int:
        """Neurons of the model the circuit was made on (an MoE layer: all its experts' and the shared one's)."""
        return self.model.num_neurons

    @staticmethod
    def _key(n: Neuron) -> tuple:
        return (n.layer, n.index) if n.expert is None else (n.layer, n.expert, n.index)

    # Use ---------------------------------------------------------------------------------------------------

    def edits(self, multiplier: float | None = None, allow_negative: bool = False) -> LayerEdits:
        """Per-layer (indices, multipliers). `multiplier` overrides every neuron's multiplier.

        Only for circuits of dense MLPs: a circuit with expert neurons refuses (use `unit_edits`), so that no
        consumer skips experts silently."""
        if any(n.expert is not None for n in self.neurons):
            raise CircuitError(
                "This circuit has neurons inside experts, which this operation does not handle.",
                "use export (safetensors) for mixture-of-experts circuits.",
            )
        return {layer: edit for (layer, _), edit in self.unit_edits(multiplier, allow_negative).items()}

    def unit_edits(self, multiplier: float | None = None, allow_negative: bool = False) -> UnitEdits:
        """(layer, expert) -> (indices, multipliers); expert None for dense MLPs. `multiplier` overrides all."""
        quads = []
        for n in self.neurons:
            own = n.multiplier if n.multiplier is not None else self.multiplier
            m = multiplier if multiplier is not None else own
            quads.append((n.layer, n.expert, n.index, check_multiplier(m, allow_negative)))
        return group_by_unit(quads)

    def hook_edits(self, multiplier: float | None = None, allow_negative: bool = False) -> LayerEdits | UnitEdits:
        """The edits that runtime hooks take (`attribution.hooks.scaled_neurons`, what eval, sweep and chat use):
        per layer for a dense circuit (its down_proj inputs are scaled), per (layer, expert) once a neuron is inside
        an expert (the experts' fused down projections are scaled: the same edit as the exported fold)."""
        if any(n.expert is not None for n in self.neurons):
            return self.unit_edits(multiplier, allow_negative)
        return self.edits(multiplier, allow_negative)

    def check_fits(
        self, model_type: str, shape: ModelShape, weights_sha256: str | None = None, force: bool = False
    ) -> None:
        """Refuse to apply this circuit to a model it was not made for (`force` skips only the hash check)."""
        self.model.check_fits(model_type, shape, weights_sha256, force, experts=self.is_moe)

    def layer_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(n.layer for n in self.neurons).items()))

    def applied(self, multiplier: float | None = None) -> Circuit:
        """The circuit as folded in, the record an export publishes: `multiplier`, when given, replaces the default
        and every per-neuron one; the model's source is named by its Hub id or file name, never a local path. The
        behaviour and recipe names go into the card's Markdown, so one with a control character is refused."""
        check_name(self.behaviour, "Behaviour")
        if self.recipe is not None:
            check_name(self.recipe, "Recipe name")
        model = self.model.model_copy(update={"source": public_name(self.model.source)})
        if multiplier is None:
            return self.model_copy(update={"model": model})
        neurons = [n.model_copy(update={"multiplier": None}) for n in self.neurons]
        return self.model_copy(update={"multiplier": multiplier, "neurons": neurons, "model": model})

    def summary(self, top: int = 20) -> str:
        """A readable summary: what it was made on, exclusions, neurons per layer, the top neurons by |delta|."""
        circuit = self
        m, s = circuit.model, circuit.selection
        total = circuit.num_neurons
        lines = [
            f"circuit: {circuit.behaviour} on {m.source} ({m.model_type}, {m.num_layers} layers "
            + (f"x {m.intermediate_size})" if m.layer_widths is None else f"of widths {m.layer_widths})"),
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
        if self.is_moe:
            lines[0] += (
                f"; {m.num_experts} experts x {m.expert_size}, shared expert {m.shared_expert_size or 0}, "
                f"dense layers {m.dense_layers or []}"
            )
            lines += ["", *self._expert_table()]
        lines += ["", f"top {min(top, len(circuit.neurons))} by |delta|:", "layer  index        delta"]
        ranked = sorted(circuit.neurons, key=lambda n: -abs(n.delta))[:top]
        lines += [
            f"{n.layer:5d}  {n.index:5d}  {n.delta:+11.5f}" + ("" if n.expert is None else f"  expert {n.expert}")
            for n in ranked
        ]
        return "\n".join(lines)

    def expert_counts(self) -> dict[tuple[int, int | str | None], int]:
        """(layer, expert) -> neurons of the circuit there (expert None: a dense MLP)."""
        counts = Counter((n.layer, n.expert) for n in self.neurons)
        return {k: counts[k] for k in group_by_unit((l, e, 0, 1.0) for l, e in counts)}

    def _expert_table(self) -> list[str]:
        """Neurons per (layer, expert), with how many prompts of each set were routed there."""
        routed = {(r.layer, r.expert): r.routed for r in (self.routing.coverage if self.routing else [])}
        sets = sorted({k for r in routed.values() for k in r})
        lines = ["layer  expert  neurons" + "".join(f"  routed {k}" for k in sets)]
        for (layer, expert), count in self.expert_counts().items():
            cover = routed.get((layer, expert), {})
            where = "dense" if expert is None else str(expert)
            lines.append(
                f"{layer:5d}  {where:>6}  {count:7d}" + "".join(f"  {cover.get(k, '-'):>{7 + len(k)}}" for k in sets)
            )
        return lines

    # Files -------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        # A circuit that stacks nothing is written as before (same bytes, same sha256).
        exclude: dict = {} if self.sources is not None else {"sources": True}
        if not self.is_moe:  # a dense circuit stays version 1, byte for byte
            exclude |= {"routing": True, "model": set(MOE_IDENTITY), "neurons": {"__all__": {"expert"}}}
        if self.model.layer_widths is None:  # a uniform model's circuit is written as before
            exclude.setdefault("model", set()).add("layer_widths")
        return self.model_dump_json(indent=1, exclude=exclude or None)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: Path, overwrite: bool = False) -> None:
        """Write atomically: a temporary sibling, then a rename (`output.OutputPlan`); an existing `path` is
        replaced only with `overwrite`. A temporary left by a killed run is removed by the next save to `path`."""
        write_text_atomic(Path(path), self.to_json(), overwrite)

    @classmethod
    def load(cls, path: Path) -> Circuit:
        """Read and validate a circuit file; every problem becomes a one-line CircuitError."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CircuitError(f"Circuit file {path} does not exist.", "pass the path written by discover.") from None
        except OSError as exc:  # a folder, no permission, an I/O error
            raise CircuitError(f"Circuit file {path} cannot be read ({exc.strerror}).", "check the path.") from None
        data = parse_json(
            raw, lambda why: CircuitError(f"Circuit file {path} is not valid JSON ({why}).", "re-run discover.")
        )
        if isinstance(data, dict) and data.get("format") not in (None, FORMAT):
            raise CircuitError(f"{path} is not a cna-export circuit.", "pass a circuit written by discover.")
        try:  # from the JSON text: strict types, but JSON arrays are valid tuples
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "top level"
            raise CircuitError(
                f"Circuit file {path} is invalid at {where}: {err['msg']}.", "re-run discover."
            ) from None


def prompt_set(prompts: list[str]) -> PromptSet:
    return PromptSet(count=len(prompts), sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest())
