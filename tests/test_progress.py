"""Quiet progress and sensible threads on a CPU (issue 24, items 2 and 4): no empty bars on stderr, one overall
bar across an evaluation's phases, llama.cpp's log silenced unless -v, threads = physical cores."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from conftest import REPO

from cna_export import progress
from cna_export.cpus import physical_cores


def test_physical_cores_counts_hyperthread_siblings_once():
    topo = {0: ("0", "0"), 1: ("0", "1"), 2: ("0", "0"), 3: ("0", "1"), 4: ("1", "0")}  # 2 siblings pairs, 2 sockets

    def read(cpu, name):
        return topo[cpu][0 if name == "physical_package_id" else 1]

    assert physical_cores([0, 1, 2, 3, 4], read) == 3
    assert physical_cores([0, 2], read) == 1  # two threads of one core
    assert physical_cores([0, 1, 2], lambda cpu, name: None) == 3  # no topology: every CPU counts
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_llama_threads_default_to_physical_cores(monkeypatch):
    from cna_export.gguf.llamacpp import THREADS_ENV, threads_default

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert threads_default() == physical_cores()
    monkeypatch.setenv(THREADS_ENV, "3")
    assert threads_default() == 3  # the variable still overrides


def test_bars_stay_quiet_for_no_or_short_work(tmp_path, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress.bar(total=0, unit="B", desc="hashing", file=err) as b:
        b.update(0)
    with progress.bar(total=10, desc="short", file=err) as b:
        b.update(10)
    assert err.getvalue() == ""
    from cna_export.io.hashing import sha256_files

    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    sha256_files([f])
    sha256_files([f])  # cached: zero bytes to hash
    assert "0.00B" not in err.getvalue() and "hashing" not in err.getvalue()


def test_overall_bar_counts_every_phase():
    out = io.StringIO()
    with progress.overall(total=2 * 3 + 4, desc="eval") as b:
        b.fp = out
        assert list(progress.track([[1, 2], [3]], "original: positive", lambda g: len(g) * 2)) == [[1, 2], [3]]
        list(progress.track([[1]], "original: score", lambda g: len(g) * 4))
        assert b.n == 10 and b.total == 10 and "score" in b.postfix
    assert not progress._current  # inner loops outside a job show their own quiet bar again


def test_llama_cpp_log_is_silent_unless_verbose(tmp_path):
    """Loading a GGUF prints nothing of llama.cpp's log on stderr (on the real Qwen2.5-Coder GGUF that was "this is
    probably a bug in the model"); with -v (INFO) its log shows."""
    pytest.importorskip("llama_cpp")
    from cna_export.gguf.convert import export_gguf

    gguf = tmp_path / "m.gguf"
    # a tiny model in a subprocess (session fixtures are not needed for this one)
    code = (
        "import logging, sys; from pathlib import Path; from cna_export.gguf.llamacpp import LlamaCppModel; "
        "logging.basicConfig(level=logging.INFO if sys.argv[2] == 'v' else logging.WARNING); "
        "m = LlamaCppModel(Path(sys.argv[1])); m.close()"
    )
    from conftest import build_model

    export_gguf(build_model(tmp_path / "tiny", "qwen2"), gguf, outtype="f32")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    quiet = subprocess.run([sys.executable, "-c", code, str(gguf), "q"], capture_output=True, text=True, env=env)
    loud = subprocess.run([sys.executable, "-c", code, str(gguf), "v"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert loud.returncode == 0 and "llama_model_loader" in loud.stderr
