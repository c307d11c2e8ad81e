"""train.py end to end on a tiny model and tiny datasets: checkpoints, exact resume after a kill, 2 processes.

The subprocess tests run the real command lines (`python train.py`, `accelerate launch`), so they
also cover argument parsing, DataLoader workers and the process group. Each stays well under a
minute with a 2-layer, 32-wide model.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from generalist import GeneralistForCausalLM, GeneralistTokenizer
from tests import train_fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
LOSS_COLUMNS = ("loss", *train.MODALITIES)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    fx.write_datasets(root)
    return root


def tiny_flags(data_root: Path, out: Path, **overrides) -> list[str]:
    flags = {"mixture": "tiny_text=1,tiny_captions=1,tiny_box=1,tiny_disc=1", "data_root": data_root,
             "output_dir": out, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
             "seq_len": 64, "batch_size": 4, "total_steps": 12, "warmup_steps": 2, "log_every": 1,
             "eval_every": 6, "eval_batches": 2, "save_every": 4, "num_workers": 0, "lr": 3e-3, **overrides}
    out_flags = []
    for k, v in flags.items():
        if isinstance(v, bool):
            out_flags.append(f"--{k}" if v else f"--no_{k}")
        else:
            out_flags += [f"--{k}", str(v)]
    return out_flags


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    with (run_dir / "train_metrics.csv").open() as f:
        return {int(r["step"]): {k: float(r[k]) for k in LOSS_COLUMNS if r.get(k)} for r in csv.DictReader(f)}


def test_presets_set_defaults_and_flags_override_them():
    small = train.parse_args(["--preset", "small"])
    assert (small.hidden_size, small.seq_len) == (384, 1024)
    assert train.parse_args(["--preset", "small", "--hidden_size", "64"]).hidden_size == 64
    assert train.parse_args([]) == train.Args()
    args = train.parse_args(["--preset", "base", "--lr", "0.01", "--no_build_missing"])
    assert train.parse_args(train.command_line(args).split()[2:]) == args


@pytest.mark.slow
def test_training_writes_a_loadable_run_folder_and_rotates_checkpoints(data_root, tmp_path):
    run([sys.executable, "train.py", *tiny_flags(data_root, tmp_path, run_name="r", keep_last=2)])
    run_dir = tmp_path / "r"
    ckpts = train.checkpoint_dirs(run_dir)
    assert [p.name for p in ckpts] == ["step_00000008", "step_00000012"]
    assert not list((run_dir / train.CHECKPOINTS_DIR).glob(train.TMP_PREFIX + "*"))
    state = json.loads((ckpts[-1] / train.TRAINER_STATE).read_text())
    assert state["step"] == 12 and state["data"]["next_batch"] == 12
    for folder in (ckpts[-1], run_dir / "model"):
        model = GeneralistForCausalLM.from_pretrained(folder)
        tok = GeneralistTokenizer.from_pretrained(folder)
        assert model.config.layout == tok.layout and set(tok.task_specs) == {"Box-v0", "Disc-v0"}
    assert (run_dir / "learning_curves.png").stat().st_size > 0
    assert (run_dir / "README.md").read_text().count("tiny_captions") >= 1
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["steps"] == 12 and set(summary["final"]["held-out"]) >= {"text", "caption", "action"}
    assert any((run_dir / "tensorboard").iterdir())
    # a second run into the same folder must not silently clobber it
    proc = subprocess.run([sys.executable, "train.py", *tiny_flags(data_root, tmp_path, run_name="r")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0 and "--resume" in proc.stderr


def test_resume_after_a_kill_continues_the_same_loss_curve(data_root, tmp_path):
    flags = dict(total_steps=16, save_every=4, keep_last=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    full_cmd = [sys.executable, "train.py", *tiny_flags(data_root, tmp_path, run_name="full", **flags)]
    full_log = (tmp_path / "full.log").open("w")  # a file, not a pipe: nobody reads it while both run
    full_run = subprocess.Popen(full_cmd, cwd=ROOT, env=env, stdout=full_log, stderr=subprocess.STDOUT)

    # meanwhile the same run, killed (SIGKILL: no cleanup) as soon as its first checkpoint is published
    cmd = [sys.executable, "train.py", *tiny_flags(data_root, tmp_path, run_name="killed", **flags)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_dir = tmp_path / "killed"
    deadline = time.monotonic() + 120
    while not train.checkpoint_dirs(killed_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "metrics.json").exists(), "the run finished before it could be killed"
    resumed_at = json.loads((train.checkpoint_dirs(killed_dir)[-1] / train.TRAINER_STATE).read_text())["step"]
    assert 0 < resumed_at < 16

    full_run.wait(timeout=120)
    full_log.close()
    assert full_run.returncode == 0, (tmp_path / "full.log").read_text()[-5000:]
    out = run([*cmd, "--resume"])
    assert f"at step {resumed_at}" in out.stdout + out.stderr
    full, resumed = losses(tmp_path / "full"), losses(killed_dir)
    assert sorted(resumed) == sorted(full) == list(range(1, 17))
    for step in full:
        for k, v in full[step].items():
            assert resumed[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)


def test_two_processes_train_the_same_parameters(data_root, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs/ddp_cpu_2proc.yaml"), "train.py",
           *tiny_flags(data_root, tmp_path, run_name="ddp", total_steps=6, save_every=3, num_workers=1)]
    run(cmd, timeout=180)
    run_dir = tmp_path / "ddp"
    hashes = {p.name: p.read_text() for p in (run_dir / "param_hashes").iterdir()}
    assert set(hashes) == {"rank0.txt", "rank1.txt"}
    assert hashes["rank0.txt"] == hashes["rank1.txt"]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["processes"] == 2 and summary["tokens"] == 6 * 2 * 4 * 64
    # both ranks' RNG states are in the checkpoint, so a 2-process run resumes exactly too
    assert {p.name for p in (train.checkpoint_dirs(run_dir)[-1] / train.STATE_DIR).glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
