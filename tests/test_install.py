"""What a regular install gives a user (not the source tree that pytest imports): the wheel holds every module and
the built-in recipes, and the installed `cna-export` runs the README's main command with a built-in recipe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


def test_wheel_ships_recipes_and_every_module(tmp_path):
    """Recipes live at the repository's top level and must still be inside the wheel (design v2 defect: a plain
    `pip install .` answered `Recipe 'refusal-ablate' not found ... one of: none`)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for folder in ("cna_export", "recipes"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (REPO / "recipes").glob("*.yaml"):
        assert f"cna_export/recipes/{recipe.name}" in names
    for module in (REPO / "cna_export").rglob("*.py"):
        assert module.relative_to(REPO).as_posix() in names, f"{module} is not in the wheel (pyproject packages)"
    assert any(n.startswith("cna_export/data/prompts/") for n in names)


def test_installed_cli_runs_a_builtin_recipe(tiny_models, tmp_path):
    """The installed console script, run outside the repository, finds the built-in recipe (CI installs the
    project non-editable, so there this is the wheel's code and data)."""
    exe = shutil.which("cna-export", path=str(Path(sys.executable).parent)) or shutil.which("cna-export")
    if exe is None:
        pytest.skip("cna-export is not installed (pip install .)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [exe, "run", "refusal-ablate", "--model", str(tiny_models["qwen2"]), "--out", str(tmp_path / "o"),
         "--top-k", "3", "--skip-last-layers", "0"], cwd=tmp_path, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "recipe.yaml").is_file() and (tmp_path / "o" / "circuit.json").is_file()
