"""Crash safety of a real export (issue 6): kill `cna-export apply` at many points and look at what is left.

The contract (cna_export/output.py): the output path holds either nothing, the previous complete export, or the
new complete export, never a half-written folder; what a SIGKILL may leave is a hidden temporary sibling
(`.out.cna-tmp-HOST-PID-RANDOM`), which the next run writing the same output removes. Ctrl-C (SIGINT) and
SIGTERM remove the temporary before exiting.

The export runs in a subprocess on a ~100 MB model in 9 shards, so the write phase lasts long enough to be hit.
Kill times are random (seeded per run, printed on failure): some counted from the start of the process, most
from the moment its temporary folder appears. No test hook exists in the product code.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, build_tokenizer, make_circuit

from cna_export.circuit.format import Circuit
from cna_export.io.checkpoint import CheckpointReader

TMP_TAG = ".cna-tmp-"


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A llama-shaped random model of ~100 MB (8 layers, hidden 512, MLP 1536), one shard per ~13 MB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("big") / "model"
    folder.mkdir()
    tok = build_tokenizer(folder)
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="14MB")
    return folder


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# The export copies ~100 MB in a few tens of milliseconds, faster than a signal can be aimed at it; the interrupt
# tests run it with every kernel copy delayed by 10 ms (set up in the child before the CLI starts), so the write
# phase lasts most of a second.
SLOW_COPIES = (
    "import os, runpy, sys, time; copy = os.copy_file_range; "
    "os.copy_file_range = lambda *a: (time.sleep(0.01), copy(*a))[1]; "
    "sys.argv[0] = 'cna-export'; runpy.run_module('cna_export', run_name='__main__')"
)


def _default_sigint() -> None:
    """In the child before exec: SIGINT as in a terminal. A test run started in the background (`cmd &`)
    passes SIGINT on ignored, and Python keeps an inherited ignore, as it should."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_slow_export(model: Path, circuit: Path, out: Path) -> subprocess.Popen:
    """An export whose copies are slowed down, to be interrupted; stdout and stderr piped as text."""
    cmd = _apply_cmd(model, circuit, out, slow=True)
    return subprocess.Popen(cmd, env=_env(), preexec_fn=_default_sigint, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _apply_cmd(model: Path, circuit: Path, out: Path, slow: bool = False) -> list[str]:
    start = ["-c", SLOW_COPIES] if slow else ["-m", "cna_export"]
    return [sys.executable, *start, "apply", "--model", str(model), "--circuit", str(circuit),
            "--out", str(out), "--overwrite"]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _temps(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_TAG}"))


def _wait_for_temp(out: Path, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Poll until this run's temporary sibling (named with its pid) appears; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(f"-{proc.pid}-" in p.name for p in _temps(out)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("the export never created its temporary folder")


def _check_complete(out: Path, reference: dict[str, str], source: Path) -> None:
    """`out` is a complete export: the same files as the reference export, byte for byte, and it reads back."""
    files = {p.name: _hash(p) for p in out.iterdir()}
    assert set(files) == set(reference), f"{out} is not a complete export: {sorted(set(reference) ^ set(files))}"
    # The model card (README.md) names its output and time, so it differs between runs; everything else is equal.
    assert {k: v for k, v in files.items() if k != "README.md"} == {
        k: v for k, v in reference.items() if k != "README.md"
    }
    reader = CheckpointReader(out)
    assert set(reader.entries) == set(CheckpointReader(source).entries)
    Circuit.load(out / "circuit.json")


@pytest.fixture(scope="module")
def setup(big_model, tmp_path_factory):
    """The circuit, and a reference export made by an uninterrupted run."""
    root = tmp_path_factory.mktemp("runs")
    circuit = root / "circuit.json"
    make_circuit(big_model, [(1, 3), (4, 700), (7, 1535)]).save(circuit)
    ref = root / "reference"
    t0 = time.monotonic()
    proc = subprocess.Popen(_apply_cmd(big_model, circuit, ref), env=_env(), stderr=subprocess.PIPE)
    assert _wait_for_temp(ref, proc)
    t_temp = time.monotonic()
    while _temps(ref) and proc.poll() is None:
        time.sleep(0.002)
    t_renamed = time.monotonic()
    assert proc.wait() == 0, proc.stderr.read()
    proc.stderr.close()
    # How long the start-up takes, and how long the temporary folder exists (the write, up to the rename).
    timing = {"startup": t_temp - t0, "write": t_renamed - t_temp}
    reference = {p.name: _hash(p) for p in ref.iterdir()}
    assert any(n.startswith("model-") for n in reference) and "circuit.json" in reference
    return root, circuit, reference, timing


def test_sigkill_leaves_nothing_or_a_complete_export(big_model, setup):
    root, circuit, reference, timing = setup
    seed = int(os.environ.get("CNA_KILL_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    source_before = {p.name: _hash(p) for p in big_model.iterdir()}
    out = root / "killed"
    states, leftovers = [], 0
    # 3 kills timed from the start (mostly during start-up and reading), 9 timed from the moment the temporary
    # folder appears (during the write, the rename and the cleanup after it).
    plan = [("start", rng.uniform(0.2, timing["startup"] + timing["write"])) for _ in range(3)]
    plan += [("temp", 0.0)] + [("temp", rng.uniform(0, 1.3 * timing["write"])) for _ in range(8)]
    for i, (when, delay) in enumerate(plan):
        if i % 2 and out.exists():  # every other run is a fresh export, the rest replace one (--overwrite)
            shutil.rmtree(out)
        proc = subprocess.Popen(
            _apply_cmd(big_model, circuit, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if when == "temp":
            _wait_for_temp(out, proc)
        time.sleep(delay)
        proc.kill()
        _, err = proc.communicate()
        context = f"seed {seed}, kill {when}+{delay:.3f}s, rc {proc.returncode}: {err.decode()[-2000:]}"
        assert proc.returncode in (-signal.SIGKILL, 0), context
        if out.exists():
            _check_complete(out, reference, big_model)
            states.append("complete")
        else:
            states.append("absent")
        leftovers = max(leftovers, len(_temps(out)))
    print(f"seed {seed}: {states}, timing {timing}, leftovers {len(_temps(out))}")
    # At least one kill hit a run while its temporary existed (a run started later removed that leftover).
    assert leftovers >= 1, f"no kill landed during a write (seed {seed}, states {states})"
    # One more kill mid-write, so a leftover is there for the next run to remove.
    proc = subprocess.Popen(_apply_cmd(big_model, circuit, out), env=_env(), stderr=subprocess.DEVNULL)
    assert _wait_for_temp(out, proc)
    proc.kill()
    proc.wait()
    assert len(_temps(out)) == 1
    # The next run removes the temporaries of the killed runs and leaves one complete export.
    subprocess.run(_apply_cmd(big_model, circuit, out), check=True, env=_env(), capture_output=True)
    assert _temps(out) == []
    _check_complete(out, reference, big_model)
    assert {p.name: _hash(p) for p in big_model.iterdir()} == source_before
    # And what survives is a model transformers loads (the reference every kept state was compared with).
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert not [p for p in big_model.parent.iterdir() if TMP_TAG in p.name]


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_interrupt_removes_temporaries(big_model, setup, sig, name):
    root, circuit, reference, _ = setup
    out = root / f"interrupted-{name}"
    proc = _start_slow_export(big_model, circuit, out)
    assert _wait_for_temp(out, proc), "the export finished before the temporary folder was seen"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip() == f"cna-export: interrupted ({name}); temporary files removed.", err
    assert "Traceback" not in err
    assert not out.exists() and _temps(out) == []


def test_interrupt_during_overwrite_keeps_previous_export(big_model, setup):
    """Ctrl-C while --overwrite replaces an export: the previous export stays whole and temporaries go."""
    root, circuit, reference, _ = setup
    out = root / "kept"
    subprocess.run(_apply_cmd(big_model, circuit, out), check=True, env=_env(), capture_output=True)
    proc = _start_slow_export(big_model, circuit, out)
    assert _wait_for_temp(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    _check_complete(out, reference, big_model)
    assert _temps(out) == []


def test_circuit_save_removes_a_killed_saves_temporary(tmp_path):
    """A circuit file's temporary left by a SIGKILLed process is removed by the next save to that path."""
    path = tmp_path / "c.json"
    code = (
        "import os, sys; from pathlib import Path; from cna_export.io.temps import temp_sibling; "
        "t = temp_sibling(Path(sys.argv[1])); t.write_text('{\"partial'); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=_env())
    assert proc.returncode == -signal.SIGKILL
    assert len(_temps(path)) == 1 and not path.exists()
    circuit = Circuit.model_validate_json(
        '{"model": {"source": "m", "model_type": "llama", "num_layers": 1, "intermediate_size": 4, '
        '"hidden_size": 4}, "prompts": {}, "selection": {"top_k": 1}, "neurons": [{"layer": 0, "index": 1, '
        '"delta": 1.0}]}'
    )
    circuit.save(path)
    assert _temps(path) == [] and Circuit.load(path).neurons[0].index == 1
