"""What an evaluation or a sweep is asked to do, as typed models made once (by the CLI, or by a caller):

- `Variants`: the edit(s) measured against the original (a circuit at some multipliers, or an exported model);
- `HeldOut`: the held-out prompts of one split;
- `SweepOptions`: the grid of a sweep and its selection rule;
- `EvalRequest` and `SweepRequest`: everything the `eval` and `sweep` commands take besides the model, the
  report folder and the generation settings (`EvalConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cna_export.circuit.format import Circuit
from cna_export.evaluate.depth import DepthOptions


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class HeldOut(_Options):
    """The held-out prompts an evaluation runs on (`sweep.heldout_sets`) and the split they are (`sweep.split_of`:
    "test", "validation" or "custom"), recorded in the results."""

    positive: list[str] = Field(description="prompts with the behaviour")
    negative: list[str] = Field(description="benign prompts")
    split: str = "test"


class Variants(_Options):
    """The edits compared with the original: `circuit` at each of `multipliers` (default: its own), applied the
    backend's way (hooks in torch, a patched temporary file in llama.cpp), or an `edited` model (an export
    folder, a patched .gguf, or the folder `run` wrote from a GGUF)."""

    circuit: Circuit | None = None
    multipliers: list[float] | None = None
    edited: Path | None = None
    allow_negative: bool = False


class SweepOptions(_Options):
    """A sweep's grid and its selection rule."""

    ks: list[int | float] = Field(
        description="neuron counts (cuts of the one ranking); `sweep_source` also takes "
        "fractions of all MLP neurons (0.014) and resolves them"
    )
    multipliers: list[float] = Field(description="multipliers; m = 1 is the original and is not re-run")
    kl_budget: float | None = Field(default=0.1, description="max mean first-token KL of the chosen point")
    benign_budget: float | None = Field(default=None, description="max benign rate of the chosen point")
    goal: str | None = Field(default=None, description="decrease or increase the rate (default: from the smallest m)")
    allow_negative: bool = False
    recipe: str | None = Field(default=None, description="the recipe's name, recorded in the results and circuits")
    split: str = Field(default="validation", description="the prompt split the points are measured on")
    out: Path | None = Field(default=None, description="save the results after every point into this folder")
    limit: int | None = Field(default=None, description="the first N prompts of each held-out set only")


class EvalRequest(_Options):
    """What `eval` measures besides the model: the edit, the prompts, and the optional capability checks."""

    circuit: Path | None = Field(default=None, description="circuit applied at runtime")
    edited: Path | None = Field(default=None, description="an exported model")
    multipliers: list[float] | None = None
    allow_negative: bool = False
    recipe: str | None = Field(default=None, description="recipe whose held-out sets to use")
    positive: str | None = None
    negative: str | None = None
    behaviour: str | None = None
    split: Literal["test", "validation"] = "test"
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_limit: int | None = None
    lm_eval_include: Path | None = None
    mmlu_per_topic: int | None = Field(default=None, description="MMLU offline: questions per topic")
    mmlu_file: Path | None = None
    judge: str | None = Field(default=None, description="LLM judge: a model folder, a .gguf file or a .../v1 URL")
    judge_model: str | None = None
    limit: int | None = Field(default=None, description="the first N prompts of each set only (a quick look)")
    depth: DepthOptions = Field(default_factory=DepthOptions, description="over-refusal set, long context")
    overwrite: bool = Field(default=False, description="replace an existing report folder written by cna-export")
    update_card: bool = Field(default=False, description="add the headline numbers to the card of `edited`")


class SweepRequest(_Options):
    """What `sweep` does besides the model: the recipe, the grid, the selection rule and an optional export."""

    recipe: str
    ks: list[str] = Field(description="neuron counts (1600) or fractions (0.014, 1.4%)")
    multipliers: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0])
    positive: str | None = None
    negative: str | None = None
    kl_budget: float | None = 0.1
    benign_budget: float | None = None
    allow_negative: bool = False
    export: Path | None = Field(default=None, description="export the chosen point to this folder")
    overwrite: bool = False
    limit: int | None = Field(default=None, description="the first N prompts of each held-out set only")
