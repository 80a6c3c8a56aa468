"""A newcomer's first run: the README's GGUF quick start, as written, on a real quantized model, timed command by
command (wall seconds, CPU seconds, peak memory), in a fresh folder with the installed `cna-export` on PATH.

The block's `MODEL=` line is replaced by the model's path; every other line runs as the README prints it
(`run` with its quick check, `inspect`, `chat` side by side, the card's audit `diff --verify`).

    python -m benchmarks.first_run [--model qwen0.5b] [--keep DIR]

Writes benchmarks/results/first_run.json. Run it on an otherwise idle machine (the load average before each command
is recorded): llama.cpp's threads wait for each other, so a busy core slows it far more than its share.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gguf_native import MODELS  # the real quantized files, by short name

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results" / "first_run.json"


def quickstart_commands(name: str = "gguf") -> list[str]:
    """The commands of the README block marked `<!-- quickstart:NAME -->`, continuation lines joined, MODEL= dropped."""
    match = re.search(rf"<!-- quickstart:{name} -->\s*```bash\n(.*?)```", README.read_text(), flags=re.S)
    if not match:
        raise SystemExit(f"README.md has no bash block after <!-- quickstart:{name} -->")
    joined = match.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("MODEL=")]


def timed(command: str, model: Path, cwd: Path) -> dict:
    """Run one README line through bash under GNU time; its wall and CPU seconds and peak memory."""
    script = f"set -euo pipefail\nMODEL={shlex.quote(str(model))}\n{command}\n"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", "bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for kind in ("User", "System"))
    return {"command": command, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_gb": round(rss_kb / 1e6, 2),
            "load_avg_before": round(load, 2), "stdout_tail": public(proc.stdout[-1500:], model, cwd)}  # fmt: skip


def public(text: str, model: Path, cwd: Path) -> str:
    """`text` with this machine's paths replaced by what the README writes: `$MODEL` and the current folder."""
    return text.replace(str(model), "$MODEL").replace(f"{cwd}/", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen0.5b")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep what the commands write")
    args = parser.parse_args()
    model = MODELS[args.model]
    if not model.is_file():
        raise SystemExit(f"{model} is missing: run ../shared/scripts/fetch-real-models.sh first.")
    if shutil.which("cna-export") is None:
        raise SystemExit("cna-export is not on PATH: install the project (pip install '.[gguf]') first.")
    work = args.keep or Path(tempfile.mkdtemp(prefix="cna-first-run-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = []
    try:
        for command in quickstart_commands("gguf"):
            steps.append(timed(command, model, work))
            print(f"{steps[-1]['wall_s']:7.1f} s  {steps[-1]['peak_rss_gb']:5.2f} GB  {command}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"model": model.name, "model_gb": round(model.stat().st_size / 1e9, 2), "cpu_count": os.cpu_count(),
              "python": sys.version.split()[0], "steps": steps, "total_wall_s": round(sum(s["wall_s"] for s in steps), 1)}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"total {result['total_wall_s']} s; wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
