"""train.py end to end on a tiny model and tiny datasets: checkpoints, exact resume after a kill, 2 processes,
settings restored on --resume, and the run folder ``python -m eval`` reads.

The subprocess tests run the real command lines (`python train.py`, `accelerate launch`), so they
also cover argument parsing, DataLoader workers and the process group. Each stays well under a
minute with a 2-layer, 32-wide model.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from generalist import GeneralistForCausalLM, GeneralistTokenizer, integrity
from generalist.training import checkpoints, settings
from generalist.training.run_folder import RunFolder
from generalist.vocab import LOSS_MODALITIES

ROOT = Path(__file__).resolve().parents[1]
LOSS_COLUMNS = ("loss", *LOSS_MODALITIES)


def run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    with RunFolder(run_dir).train_csv.open() as f:
        return {int(r["step"]): {k: float(r[k]) for k in LOSS_COLUMNS if r.get(k)} for r in csv.DictReader(f)}


def ckpts(run_dir: Path) -> list[Path]:
    return checkpoints.checkpoint_dirs(RunFolder(run_dir).checkpoints)


def test_presets_set_defaults_and_flags_override_them():
    small = train.parse_args(["--preset", "small"])
    assert (small.hidden_size, small.seq_len) == (384, 1024)
    assert train.parse_args(["--preset", "small", "--hidden_size", "64"]).hidden_size == 64
    assert train.parse_args([]) == train.Args()
    args = train.parse_args(["--preset", "base", "--lr", "0.01", "--no_build_missing"])
    assert train.parse_args(settings.command_line(args, train.PRESETS).split()[2:]) == args
    babyai = train.parse_args(["--preset", "babyai"])  # its ~50 observation tokens a step weigh little
    tok = GeneralistTokenizer.default()
    assert train.model_config(babyai, tok).loss_weights["observation"] == 0.1
    assert train.model_config(train.Args(), tok).loss_weights["observation"] == 0.5


FAULTS_OF_A_REUSED_BUFFER = """
import resource, torch, train

def faults_of_a_reused_buffer() -> int:
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, freed at once: what a step's logits are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)  # the next step's
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_a_reused_buffer()
train.keep_freed_memory_in_heap()
faults_of_a_reused_buffer()  # the first block from the heap
print(default, faults_of_a_reused_buffer())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_training_buffers_freed_at_one_step_are_reused_without_page_faults(subprocess_env):
    """train.py keeps freed blocks in the heap: a 64 MiB buffer allocated again costs no page faults
    (by default glibc maps it afresh: one fault per 4 KiB page, which was 40 % of a control-preset step)."""
    proc = run([sys.executable, "-c", FAULTS_OF_A_REUSED_BUFFER], subprocess_env)
    default, kept = (int(v) for v in proc.stdout.split())
    assert default > 2_000, f"a fresh 64 MiB mapping took only {default} faults; the test measures nothing here"
    assert kept < default / 20, f"the reused buffer took {kept} page faults (a fresh mapping: {default})"


def test_metrics_go_to_the_chosen_trackers_and_a_missing_one_is_named(tiny_flags, train_in_process, tmp_path,
                                                                       monkeypatch):
    """``--report_to``: accelerate's trackers (TensorBoard by default) get every CSV row's scalars; ``none``
    keeps the CSV only; a tracker whose package is missing stops the run before any work (accelerate
    alone would drop it without a word)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny = dict(total_steps=2, save_every=2, eval_every=2, run_eval=False)
    train_in_process(*tiny_flags(tmp_path, run_name="tb", **tiny))
    folder = RunFolder(tmp_path / "tb")
    events = EventAccumulator(str(folder.tensorboard / "tb")).Reload()
    assert {"train/loss", "train/tokens_per_s", "eval/action"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    train_in_process(*tiny_flags(tmp_path, run_name="csv_only", **tiny), "--report_to", "none")
    csv_only = RunFolder(tmp_path / "csv_only")
    assert csv_only.train_csv.is_file() and not csv_only.tensorboard.exists()
    args = train.parse_args(["--report_to", "tensorboard", "wandb"])
    assert train.parse_args(settings.command_line(args, train.PRESETS).split()[2:]) == args
    monkeypatch.setattr(train, "get_available_trackers", lambda: [])
    with pytest.raises(SystemExit, match=r"--report_to wandb: the wandb package is not installed \(pip install"):
        train.main(train.parse_args(tiny_flags(tmp_path, run_name="w") + ["--report_to", "wandb"]))
    assert not (tmp_path / "w").exists()


def test_dt_windows_travel_with_the_checkpoint_and_need_a_rotary_backbone(tiny_flags, train_in_process, tmp_path):
    """``--dt_window_steps K`` trains DT on K-step windows and saves K in the model's config, where DT mode reads its
    default context from; a backbone with absolute positions (GPT-2) would read windows restarting at position 0 in
    training and at the episode's positions in play, so it is refused before any work starts (no run folder, no data
    loaded), as is a backbone transformers does not know."""
    tiny = dict(total_steps=2, save_every=2, eval_every=2, run_eval=False, dt_window_steps=2)
    train_in_process(*tiny_flags(tmp_path, run_name="windows", **tiny))
    model = GeneralistForCausalLM.from_pretrained(RunFolder(tmp_path / "windows").model)
    assert model.config.dt_context_steps == 2
    with pytest.raises(SystemExit, match="--dt_window_steps needs a backbone with rotary position embeddings"):
        train_in_process(*tiny_flags(tmp_path, run_name="gpt2", backbone="gpt2", **tiny))
    with pytest.raises(SystemExit, match="--backbone 'lama' is no transformers model_type"):
        train_in_process(*tiny_flags(tmp_path, run_name="lama", backbone="lama", **tiny))
    assert not (tmp_path / "gpt2").exists() and not (tmp_path / "lama").exists()


def test_resume_restores_the_saved_settings_and_refuses_conflicting_flags(tmp_path):
    where = ["--output_dir", str(tmp_path), "--run_name", "r"]
    first = train.parse_args([*where, "--seq_len", "256", "--lr", "0.01", "--hub_token", "secret"])
    (tmp_path / "r").mkdir()
    settings.save(first, RunFolder(tmp_path / "r").args)
    assert "secret" not in RunFolder(tmp_path / "r").args.read_text()  # the file lives next to the model

    resumed = train.parse_args([*where, "--resume"])  # no flags repeated: the run's own settings
    assert (resumed.seq_len, resumed.lr, resumed.resume) == (256, 0.01, True)
    longer = train.parse_args([*where, "--resume", "--total_steps", "900", "--num_workers", "0", "--no_run_eval"])
    assert (longer.seq_len, longer.total_steps, longer.num_workers, longer.run_eval) == (256, 900, 0, False)
    assert train.parse_args([*where, "--resume", "--seq_len", "256"]).seq_len == 256  # agreeing is fine
    with pytest.raises(SystemExit, match=r"--seq_len 512 conflicts with the run's saved seq_len=256; "
                                         r"--batch_size 2 conflicts with the run's saved batch_size=8"):
        train.parse_args([*where, "--resume", "--seq_len", "512", "--batch_size", "2"])
    with pytest.raises(SystemExit, match=r"--preset small conflicts with the run's saved preset=demo"):
        train.parse_args([*where, "--resume", "--preset", "small"])


def test_eval_evaluates_a_run_folder_and_records_what_failed(tiny_flags, train_in_process, tmp_path, monkeypatch):
    """``python -m eval RUN``: each evaluation the mixture calls for, through its script's ``main``; a
    failing one is recorded, not raised, and the others still run."""
    import eval.text
    from eval.__main__ import main as evaluate

    def broken(args):
        raise RuntimeError("text evaluation exploded")

    train_in_process(*tiny_flags(tmp_path, run_name="r", total_steps=2, save_every=2, eval_every=2,
                                 run_eval=False))
    folder = RunFolder(tmp_path / "r")
    results = evaluate([str(folder.root), "--samples", "2", "--episodes", "1"])
    assert results["model"] == str(folder.model)
    assert results["caption/tiny_captions"]["metrics"]["samples"] == 2
    assert results["text/tiny_text"]["documents"] == 2
    assert {"control/dt", "control/gato"} <= set(results)  # the synthetic tasks have no env: errors inside
    monkeypatch.setattr(eval.text, "main", broken)
    again = evaluate([str(folder.root), "--samples", "2", "--episodes", "1"])
    assert again["text/tiny_text"] == "failed: RuntimeError('text evaluation exploded')"
    assert again["caption/tiny_captions"]["metrics"]["samples"] == 2
    assert json.loads(folder.summary.read_text())["evaluation"] == again
    assert results["report"] == str(folder.report) and "## Image captioning" in folder.report.read_text()
    assert {p.name for p in folder.eval.iterdir()} >= {"caption.json", "text.json"}


@pytest.mark.slow
def test_training_writes_a_loadable_run_folder_and_rotates_checkpoints(tiny_flags, subprocess_env, tmp_path):
    run([sys.executable, "train.py", *tiny_flags(tmp_path, run_name="r", keep_last=2, eval_samples=4,
                                                 eval_episodes=1)], subprocess_env, timeout=600)
    folder = RunFolder(tmp_path / "r")
    assert [p.name for p in ckpts(folder.root)] == ["step_00000008", "step_00000012"]
    assert not list(folder.checkpoints.glob(".*"))
    state = checkpoints.read_trainer_state(ckpts(folder.root)[-1])
    assert state["step"] == 12 and state["data"]["next_batch"] == 12
    for model_dir in (ckpts(folder.root)[-1], folder.model):
        model = GeneralistForCausalLM.from_pretrained(model_dir)
        tok = GeneralistTokenizer.from_pretrained(model_dir)
        assert model.config.layout == tok.layout and set(tok.task_specs) == {"Box-v0", "Disc-v0"}
    assert folder.curves.stat().st_size > 0
    assert folder.card.read_text().count("tiny_captions") >= 1
    summary = json.loads(folder.summary.read_text())
    assert summary["steps"] == 12 and set(summary["final"]["held-out"]) >= {"text", "caption", "action"}
    assert any(folder.tensorboard.iterdir())
    # python -m eval ran on the final model: every evaluation of the mixture, and the report
    evaluation = summary["evaluation"]
    assert evaluation["model"] == str(folder.model)
    assert {"caption/tiny_captions", "text/tiny_text", "control/dt", "control/gato"} <= set(evaluation)
    assert isinstance(evaluation["caption/tiny_captions"], dict) and folder.report.is_file()
    # a second run into the same folder must not silently clobber it
    proc = subprocess.run([sys.executable, "train.py", *tiny_flags(tmp_path, run_name="r")], cwd=ROOT,
                          capture_output=True, text=True, env=subprocess_env)
    assert proc.returncode != 0 and "--resume" in proc.stderr


def test_resume_after_a_kill_continues_the_same_loss_curve(tiny_flags, subprocess_env, tmp_path):
    flags = dict(total_steps=16, save_every=4, keep_last=3, run_eval=False)
    full_cmd = [sys.executable, "train.py", *tiny_flags(tmp_path, run_name="full", **flags)]
    full_log = (tmp_path / "full.log").open("w")  # a file, not a pipe: nobody reads it while both run
    full_run = subprocess.Popen(full_cmd, cwd=ROOT, env=subprocess_env, stdout=full_log, stderr=subprocess.STDOUT)

    # meanwhile the same run, killed (SIGKILL: no cleanup) as soon as its first checkpoint is published
    cmd = [sys.executable, "train.py", *tiny_flags(tmp_path, run_name="killed", **flags)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_dir = tmp_path / "killed"
    deadline = time.monotonic() + 120
    while not ckpts(killed_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not RunFolder(killed_dir).summary.exists(), "the run finished before it could be killed"
    resumed_at = checkpoints.read_trainer_state(ckpts(killed_dir)[-1])["step"]
    assert 0 < resumed_at < 16

    full_run.wait(timeout=120)
    full_log.close()
    assert full_run.returncode == 0, (tmp_path / "full.log").read_text()[-5000:]
    out = run([*cmd, "--resume"], subprocess_env)
    assert f"at step {resumed_at}" in out.stdout + out.stderr
    full, resumed = losses(tmp_path / "full"), losses(killed_dir)
    assert sorted(resumed) == sorted(full) == list(range(1, 17))
    for step in full:
        for k, v in full[step].items():
            assert resumed[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)


def test_two_processes_train_the_same_parameters(tiny_flags, subprocess_env, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs/ddp_cpu_2proc.yaml"), "train.py",
           *tiny_flags(tmp_path, run_name="ddp", total_steps=6, save_every=3, num_workers=1, run_eval=False)]
    run(cmd, subprocess_env, timeout=180)
    folder = RunFolder(tmp_path / "ddp")
    hashes = {p.name: p.read_text() for p in folder.param_hashes.iterdir()}
    assert set(hashes) == {"rank0.txt", "rank1.txt"}
    assert hashes["rank0.txt"] == hashes["rank1.txt"]
    summary = json.loads(folder.summary.read_text())
    assert summary["processes"] == 2 and summary["tokens"] == 6 * 2 * 4 * 64
    # both ranks' RNG states are in the checkpoint, so a 2-process run resumes exactly too
    assert {p.name for p in (ckpts(folder.root)[-1] / checkpoints.STATE_DIR).glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}


def _rank_pids(run_name: str) -> dict[int, int]:
    """{rank: pid} of the train.py processes of a run (Linux: read from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"train.py" not in b" ".join(cmdline) or run_name.encode() not in cmdline:
                continue
            environ = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
            if b"RANK" in environ and b"accelerate" not in b" ".join(cmdline):
                found[int(environ[b"RANK"])] = int(proc.name)
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc")
def test_a_rank_killed_mid_run_stops_the_other_naming_it_and_the_run_resumes_exactly(tiny_flags, subprocess_env,
                                                                                      tmp_path):
    """SIGKILL rank 1 of a 2-process run: the launcher stops rank 0 within 60 s and names rank 1 and its
    signal, only whole checkpoints are published, and ``--resume`` continues the uninterrupted run's losses."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs/ddp_cpu_2proc.yaml"), "train.py"]
    flags = dict(total_steps=12, save_every=4, keep_last=3, num_workers=0, run_eval=False)
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([*launch, *tiny_flags(tmp_path, run_name="killed2", **flags)], cwd=ROOT,
                            env=subprocess_env, stdout=log, stderr=subprocess.STDOUT)
    killed_dir, deadline = tmp_path / "killed2", time.monotonic() + 180
    while not ckpts(killed_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = _rank_pids("killed2")
    assert set(pids) == {0, 1} and proc.poll() is None, "the run ended before a rank could be killed"
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    proc.wait(timeout=120)
    detected_s = time.monotonic() - t0
    print(f"rank 1 killed: the launcher stopped in {detected_s:.1f} s")
    log.close()
    text = (tmp_path / "killed.log").read_text()
    assert proc.returncode != 0 and detected_s < 60, text[-3000:]
    # torchrun's failure report names the dead rank and its signal
    assert "rank      : 1 (local_rank: 1)" in text and "(SIGKILL)" in text, text[-3000:]
    assert not RunFolder(killed_dir).summary.exists() and _rank_pids("killed2") == {}  # rank 0 is gone too
    for ckpt in ckpts(killed_dir):  # only complete checkpoints under their final name
        assert integrity.verify(ckpt) is None
    resumed_at = checkpoints.read_trainer_state(ckpts(killed_dir)[-1])["step"]
    run([*launch, *tiny_flags(tmp_path, run_name="killed2", **flags), "--resume"], subprocess_env, timeout=300)
    run([*launch, *tiny_flags(tmp_path, run_name="full2", **flags)], subprocess_env, timeout=300)
    full, resumed = losses(tmp_path / "full2"), losses(killed_dir)
    assert sorted(resumed) == sorted(full) == list(range(1, 13)) and 0 < resumed_at < 12
    for step in full:
        for k, v in full[step].items():
            assert resumed[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)


FULL_DISK_ON_ONE_RANK = '''
import errno, os, sys
sys.path.insert(0, {root!r})
from generalist.training import checkpoints
real, calls = checkpoints.export_model, []

def export_until_the_disk_is_full(accelerator, model, tok, folder):
    calls.append(folder)
    if len(calls) == 2 and os.environ["RANK"] == "1":  # rank 1's second checkpoint: half a file, then ENOSPC
        (folder / "model.safetensors").write_bytes(b"\\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(accelerator, model, tok, folder)

checkpoints.export_model = export_until_the_disk_is_full
import train
train.cli()
'''


@pytest.mark.slow
def test_a_full_disk_on_one_rank_stops_every_rank_naming_the_checkpoint(tiny_flags, subprocess_env, tmp_path):
    """Rank 1's disk fills while it writes the second checkpoint: the run stops on both ranks within 60 s
    (no hang at the barrier), the error names the checkpoint and ENOSPC, and the first checkpoint is intact."""
    script = tmp_path / "train_full_disk.py"
    script.write_text(FULL_DISK_ON_ONE_RANK.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs/ddp_cpu_2proc.yaml"), str(script),
           *tiny_flags(tmp_path, run_name="full_disk", total_steps=12, save_every=4, num_workers=0, run_eval=False)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    text, stopped_s = proc.stdout + proc.stderr, time.monotonic() - t0
    print(f"full disk on rank 1: the run stopped {stopped_s:.1f} s after launch")
    assert proc.returncode != 0 and stopped_s < 120, text[-3000:]
    assert "writing checkpoint" in text and "step_00000008 failed (No space left on device)" in text, text[-3000:]
    assert "rank      : 1 (local_rank: 1)" in text and _rank_pids("full_disk") == {}
    run_dir = tmp_path / "full_disk"
    (only,) = ckpts(run_dir)
    assert only.name == "step_00000004" and checkpoints.verify_checkpoint(only) is None


@pytest.mark.slow
def test_a_shard_truncated_while_training_reads_it_is_named_and_the_run_resumes(data_root, tiny_flags, subprocess_env,
                                                                                tmp_path):
    """Truncate the text dataset's arrow file under a running ``train.py`` (its DataLoader worker dies of
    SIGBUS on the memory-mapped page): the run stops naming the file and its sizes; restored, ``--resume``
    finishes the run."""
    root = tmp_path / "data"
    shutil.copytree(data_root / "tiny_text", root / "tiny_text")
    shard = max((root / "tiny_text").rglob("*.arrow"), key=lambda p: p.stat().st_size)
    original = shard.read_bytes()
    flags = dict(mixture="tiny_text=1", data_root=root, total_steps=3000, save_every=5, eval_every=0, num_workers=1,
                 run_eval=False)
    log = (tmp_path / "truncated.log").open("w")
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_flags(tmp_path, run_name="t", **flags)], cwd=ROOT,
                            env=subprocess_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ckpts(tmp_path / "t") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its data could be truncated"
    shard.write_bytes(b"")  # truncated in place: the worker's memory map now ends at 0 bytes
    proc.wait(timeout=120)
    log.close()
    text = (tmp_path / "truncated.log").read_text()
    assert proc.returncode != 0, text[-3000:]
    assert f"training data changed while the run read it: {shard} (was {len(original):,} bytes, now 0)" in text, \
        text[-3000:]
    shard.write_bytes(original)
    run([sys.executable, "train.py", *tiny_flags(tmp_path, run_name="t", **{**flags, "total_steps": 12}),
         "--resume"], subprocess_env, timeout=300)
    assert checkpoints.read_trainer_state(ckpts(tmp_path / "t")[-1])["step"] == 12
