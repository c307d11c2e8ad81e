"""Reliability: a user's mistake is an error naming the field, the value and what was expected; no fault
destroys work already done.

Bad input goes through the same paths a user takes (tokenizer, Agent, dataset loaders, the CLIs);
faults are real: SIGKILLed training and dataset-build subprocesses at random points, a disk that
fills up in the middle of a checkpoint, damaged checkpoint and shard files. Related tests elsewhere:
damaged ``model.safetensors`` (test_model), damaged tokenizer JSON (test_tokenizer), Hub outages
(test_hub), an environment that raises mid-rollout (test_eval_control), random spaces and values
(test_tokenizer_properties).
"""

# Over 400 lines: every fault and bad input the README promises to survive is tested here, in one file.

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import train
from datasets_build import iter_episodes, load_episodes, synthetic
from datasets_build.episodes import load_shard, shard_dirs
from datasets_build.registry import MIXTURES
from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer, TaskSpec, TokenizationError
from generalist.agent import Agent
from generalist.integrity import CORRUPT_PREFIX, MANIFEST
from generalist.training import checkpoints
from generalist.training.run_folder import RunFolder
from generalist.vocab import Modality
from tests.conftest import DEFAULT_TOKENIZER, TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def tok() -> GeneralistTokenizer:
    """A private copy: these tests add task specs."""
    return GeneralistTokenizer.from_pretrained(DEFAULT_TOKENIZER)


@pytest.fixture
def model(tok) -> GeneralistForCausalLM:
    torch.manual_seed(0)
    return GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=dict(TINY_LLAMA)))


def box_spec(tok, name="box") -> TaskSpec:
    spec = TaskSpec.from_spaces(name, spaces.Box(-1, 1, (3,), np.float32), spaces.Box(-1, 1, (1,), np.float32))
    tok.add_task_spec(spec)
    return spec


# --- bad input: observations, actions, text, images ------------------------------------------------


def test_agent_applies_the_tokenizer_rule_to_observations(tok, model):
    """Wrong shape, NaN, non-numbers: errors naming the field. Outside the Box, ±inf: saturate, no error."""
    spec = box_spec(tok)
    agent = Agent(model, tok, "gato")
    agent.reset(spec.name, num_envs=2)
    with pytest.raises(TokenizationError, match=r"observation: expected values of shape \(2, 3\).*got \(2, 4\)"):
        agent.act(np.zeros((2, 4), np.float32))
    with pytest.raises(TokenizationError, match=r"observation: NaN at index \[1, 2\]"):
        agent.act(np.array([[0, 0, 0], [0, 0, np.nan]], np.float32))
    with pytest.raises(TokenizationError, match="observation: continuous values must be numbers, got <U"):
        agent.act(np.array([["a", "b", "c"]] * 2))
    with pytest.raises(ValueError, match=r"observations\['observation'\]: a batch of 3, but reset\(\) set up 2"):
        agent.act(np.zeros((3, 3), np.float32))
    # the documented rule: observations are not bound-checked; beyond ±256 and ±inf they saturate
    far = np.array([[1e6, -np.inf, 5.0], [np.inf, 300.0, -2.0]])
    actions = agent.act(far)
    assert spec.action_space().contains(actions[0]) and actions.shape == (2, 1)
    prompts = tok.encode_steps(spec, {"observation": far})
    saturated = np.array([[256, -256, 5.0], [256, 256, -2.0]])
    for prompt, row in zip(prompts, tok.encode_steps(spec, {"observation": saturated}), strict=True):
        np.testing.assert_array_equal(prompt["input_ids"], row["input_ids"])


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_reward_is_an_error_naming_the_environment_row(tok, model, bad):
    spec = TaskSpec.from_spaces("finite-rewards", spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2),
                                expert_return=1.0, random_return=0.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "dt")
    agent.reset(spec, num_envs=3)
    agent.act(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"non-finite reward .* environment 1 "):
        agent.observe(np.array([0.0, bad, 1.0]), np.zeros(3, bool), np.zeros(3, bool))


def test_small_uint8_grids_are_discrete_values_not_images():
    """The documented rule: an image is uint8 (H, W, C) with H, W >= 16; a smaller one (MiniGrid's 7x7x3
    symbolic grid) is read as discrete values, one token per element, like any integer Box."""
    small = TaskSpec.from_spaces("grid", spaces.Box(0, 255, (8, 8, 3), np.uint8), spaces.Discrete(2))
    large = TaskSpec.from_spaces("pixels", spaces.Box(0, 255, (16, 16, 3), np.uint8), spaces.Discrete(2))
    assert small.observation_fields[0].kind == "discrete" and large.observation_fields[0].kind == "image"


@pytest.mark.parametrize("path", ["some/missing/folder", "./missing", "/tmp/definitely/missing"])
def test_a_missing_local_tokenizer_folder_says_so(path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer folder"):
        GeneralistTokenizer.from_pretrained(path)


def test_actions_outside_the_space_are_errors(tok):
    spec = box_spec(tok)
    with pytest.raises(TokenizationError, match=r"action: action value 1.5 .* outside the Box bounds \[-1, 1\]"):
        tok.encode_action(spec, np.array([1.5], np.float32))
    disc = TaskSpec.from_spaces("disc", spaces.Box(-1, 1, (2,), np.float32), spaces.MultiDiscrete([3, 4]))
    with pytest.raises(TokenizationError, match=r"action: value 4 at index \[0, 1\] is outside the space "
                                                r"\(expected 0 <= value < 4\)"):
        tok.encode_action(disc, np.array([0, 4]))
    start = TaskSpec.from_spaces("start", spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(3, start=-1))
    with pytest.raises(TokenizationError, match=r"expected -1 <= value < 2"):
        tok.encode_episode(start, {"observation": np.zeros((2, 2))}, {"action": np.array([0, 2])}, np.zeros(2))
    with pytest.raises(TokenizationError, match="must be integers"):
        tok.encode_action(start, 0.5)


def test_text_field_with_unseen_characters_goes_through_an_episode(tok):
    spec = TaskSpec.from_spaces("text", spaces.Dict({"mission": spaces.Text(64), "state": spaces.Box(-1, 1, (2,))}),
                                spaces.Discrete(3))
    missions = ["go to the 🟥 door", "ramassez la clé ✓", "去红色的门", "\x00\x7f tab\there"]
    obs = {"observation.mission": missions, "observation.state": np.zeros((4, 2))}
    steps = tok.encode_steps(spec, obs, {"action": np.arange(4) % 3})
    for mission, step in zip(missions, steps, strict=True):
        text_ids = step["input_ids"][step["input_ids"] < tok.layout.text_size]
        assert tok.decode_text(text_ids) == mission
        assert (step["modality_ids"][step["input_ids"] < tok.layout.text_size] == Modality.OBSERVATION).all()
    episode = tok.encode_episode(spec, obs, {"action": np.zeros(4, int)}, np.ones(4))
    assert len(episode["input_ids"]) == 2 + sum(len(s["input_ids"]) + 1 for s in steps)  # + r_t, <bos>, <eos>


def test_images_of_odd_sizes_modes_and_dtypes_in_an_episode(tok):
    spec = TaskSpec.from_spaces(
        "pixels", spaces.Dict({"pixels": spaces.Box(0, 255, (40, 24, 3), np.uint8), "state": spaces.Box(-1, 1, (2,))}),
        spaces.Discrete(2))
    frames = [np.zeros((17, 90, 3), np.uint8), np.zeros((3, 5, 3), np.uint8), np.zeros((33, 33), np.uint8),
              np.zeros((200, 50, 4), np.uint8), Image.new("L", (19, 7)), Image.new("RGBA", (64, 64)),
              Image.new("P", (31, 30))]
    t = len(frames)

    def obs(pixels):
        return {"observation.pixels": pixels, "observation.state": np.zeros((len(pixels), 2))}

    sample = tok.encode_episode(spec, obs(frames), {"action": np.zeros(t, int)}, np.zeros(t))
    assert sample["patches"].shape == (t * tok.patches_per_image, 768)
    assert (sample["input_ids"] == tok.image_id).sum() == t * tok.patches_per_image
    with pytest.raises(TokenizationError, match="observation.pixels: image arrays must be uint8.*float32"):
        tok.encode_episode(spec, obs([np.zeros((40, 24, 3), np.float32)]), {"action": [0]}, [0.0])
    with pytest.raises(TokenizationError, match=r"observation.pixels: image arrays must have shape \(H, W, 1\|3\|4\)"):
        tok.encode_episode(spec, obs([np.zeros((40, 24, 2), np.uint8)]), {"action": [0]}, [0.0])
    # the first observation field sets the number of steps; a field with another count is named
    with pytest.raises(TokenizationError, match=r"observation.state: expected values of shape \(1, 2\).*got \(2, 2\)"):
        tok.encode_episode(spec, {**obs(frames[:1]), "observation.state": np.zeros((2, 2))}, {"action": [0]}, [0.0])


# --- bad input: checkpoints, tasks, datasets, episodes ---------------------------------------------


def small_text_tokenizer(vocab_size: int = 300) -> Tokenizer:
    text = Tokenizer(models.BPE())
    text.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text.decoder = decoders.ByteLevel()
    text.train_from_iterator(["a tiny corpus for a tiny vocabulary"] * 10, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return text


def test_a_tokenizer_that_does_not_match_the_model_is_refused(tok, model, tmp_path):
    other = GeneralistTokenizer(small_text_tokenizer())
    assert other.vocab_size != tok.vocab_size
    with pytest.raises(ValueError, match=rf"model's vocabulary \({tok.vocab_size} ids.*tokenizer's "
                                         rf"\({other.vocab_size} ids"):
        Agent(model, other, "dt")
    # the same pair saved side by side: eval.* loading refuses it too
    from eval.checkpoint import load_checkpoint

    model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match its tokenizer's"):
        load_checkpoint(tmp_path)


def test_a_task_the_model_does_not_know_lists_the_known_ones(tok, model, tmp_path, capsys):
    box_spec(tok, "Box-v0")
    agent = Agent(model, tok, "gato")
    with pytest.raises(KeyError, match=r"unknown task 'CartPole-v0'; this tokenizer knows \['Box-v0'\]"):
        agent.reset("CartPole-v0", num_envs=1)
    from eval import control

    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exit_info:
        control.main(["--model", str(tmp_path / "ckpt"), "--tasks", "Box-v0", "CartPol-v1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--tasks CartPol-v1: neither a task of this model (Box-v0) nor a registered gymnasium environment" in err
    assert not list(tmp_path.glob("control*.json"))  # refused before any rollout


def test_episodes_that_do_not_match_their_spec_name_row_task_and_column(tmp_path):
    synthetic.write_datasets(tmp_path)
    folder = tmp_path / "tiny_box"
    ds, specs = load_episodes(folder)
    wrong = TaskSpec.from_spaces("Box-v0", spaces.Box(-8, 8, (4,), np.float32), spaces.Box(-2, 2, (1,), np.float32))
    with pytest.raises(ValueError, match=r"episode row 0 \(Box-v0\), column 'observation': does not match the "
                                         r"task spec's Box of per-step shape \(4,\)"):
        next(iter_episodes(ds, {"Box-v0": wrong}))
    with pytest.raises(ValueError, match=r"task 'Box-v0' has no task spec; the dataset's specs are \['Disc-v0'\]"):
        next(iter_episodes(ds, {"Disc-v0": specs["Box-v0"]}))
    box = specs["Box-v0"]
    renamed = dataclasses.replace(box, action_fields=(dataclasses.replace(box.action_fields[0], name="act"),),
                                  action_tree="act")
    with pytest.raises(ValueError, match=r"no column 'act', which the task spec declares"):
        next(iter_episodes(ds, {"Box-v0": renamed}))
    short = ds.map(lambda row: {"rewards": row["rewards"][:-1]})
    with pytest.raises(ValueError, match=r"column 'observation': \d+ steps but \d+ rewards"):
        next(iter_episodes(short, specs))


def test_empty_and_truncated_episodes_are_errors(tok):
    spec = box_spec(tok)
    good = {"observations": {"observation": np.zeros((3, 3))}, "actions": {"action": np.zeros((3, 1))},
            "rewards": np.zeros(3)}
    tok.encode_episode(spec, **good)
    with pytest.raises(TokenizationError, match="box: episode is empty"):
        tok.encode_episode("box", {"observation": np.zeros((0, 3))}, {"action": np.zeros((0, 1))}, [])
    with pytest.raises(TokenizationError, match=r"action: expected values of shape \(3, 1\).*got \(2, 1\)"):
        tok.encode_episode(spec, **{**good, "actions": {"action": np.zeros((2, 1))}})
    with pytest.raises(TokenizationError, match="rewards: expected 3 values .one per step., got 2"):
        tok.encode_episode(spec, **{**good, "rewards": np.zeros(2)})
    with pytest.raises(TokenizationError, match=r"actions has no field 'action'; got fields \[\]"):
        tok.encode_episode(spec, **{**good, "actions": {}})


# --- bad input: damaged files ----------------------------------------------------------------------


def test_a_truncated_dataset_shard_is_an_error_naming_it(tmp_path):
    synthetic.write_datasets(tmp_path)
    shard = shard_dirs(tmp_path / "tiny_disc")[0]
    arrow = next(shard.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(OSError, match=f"episode shard {shard} is truncated or corrupted"):
        load_episodes(tmp_path / "tiny_disc")


@pytest.fixture
def short_run(tiny_flags, train_in_process):
    """``short_run(out, *extra)``: 6 steps in this process, a checkpoint every 2, three kept."""

    def run(out: Path, *extra: str) -> dict:
        return train_in_process(*tiny_flags(out, run_name="r", total_steps=6, save_every=2, eval_every=3,
                                            keep_last=3, run_eval=False), *extra)

    return run


def ckpts(run_dir: Path) -> list[Path]:
    return checkpoints.checkpoint_dirs(RunFolder(run_dir).checkpoints)


def logged_losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "train_metrics.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_resume_falls_back_past_a_damaged_checkpoint(short_run, tmp_path, capsys):
    short_run(tmp_path)
    run_dir = tmp_path / "r"
    before = logged_losses(run_dir)
    step2, step4, step6 = ckpts(run_dir)
    weights = step4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    optimizer = sorted((step6 / checkpoints.STATE_DIR).glob("optimizer*"))[0]
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    optimizer.write_bytes(bytes(data))
    capsys.readouterr()

    summary = short_run(tmp_path, "--resume")
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint step_00000006: {optimizer} is corrupted" in out
    assert f"skipping damaged checkpoint step_00000004: {weights} is truncated or corrupted: 1000 bytes" in out
    assert "falling back to step_00000002" in out and f"resumed from {step2} at step 2" in out
    assert summary["steps"] == 6
    assert logged_losses(run_dir) == pytest.approx(before, rel=1e-5)  # same data order, same updates
    assert [p.name for p in ckpts(run_dir)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert all(checkpoints.verify_checkpoint(p) is None for p in ckpts(run_dir))
    assert sorted(p.name for p in RunFolder(run_dir).checkpoints.glob(CORRUPT_PREFIX + "*")) == [
        "corrupt-step_00000004", "corrupt-step_00000006"]

    # nothing complete left: refuse, naming the damaged file
    for ckpt in ckpts(run_dir):
        (ckpt / MANIFEST).write_text("{trunc")
    with pytest.raises(SystemExit, match=r"--resume: no complete checkpoint in .*manifest.json is unreadable"):
        short_run(tmp_path, "--resume")


def test_evaluation_takes_the_newest_model_that_verifies(short_run, tmp_path, capsys):
    """eval's checkpoint lookup follows --resume's rule: a damaged final model is named and skipped."""
    from eval.checkpoint import load_checkpoint, resolve_checkpoint

    short_run(tmp_path)
    run = RunFolder(tmp_path / "r")
    assert resolve_checkpoint(run.root) == run.model
    weights = run.model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert resolve_checkpoint(run.root) == ckpts(run.root)[-1]  # the last checkpoint: the same weights
    assert f"skipping damaged checkpoint {run.model}: {weights} is corrupted" in capsys.readouterr().err
    with pytest.raises(OSError, match=r"model.safetensors is corrupted: its sha256 differs"):
        load_checkpoint(run.model)  # named directly, it is an error naming the file


def test_disk_full_while_checkpointing_leaves_the_previous_checkpoint_intact(short_run, tmp_path, monkeypatch):
    real_export, calls = checkpoints.export_model, []

    def export_until_the_disk_is_full(accelerator, model, tok, folder):
        calls.append(folder)
        if len(calls) == 2:  # the second checkpoint: half a weight file, then ENOSPC
            (folder / "model.safetensors").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_export(accelerator, model, tok, folder)

    monkeypatch.setattr(checkpoints, "export_model", export_until_the_disk_is_full)
    with pytest.raises(OSError, match=r"writing checkpoint .*step_00000004 failed \(No space left on device\).*"
                                      r"previous checkpoint .*step_00000002 is intact") as info:
        short_run(tmp_path)
    assert info.value.errno == errno.ENOSPC
    run_dir = tmp_path / "r"
    (only,) = ckpts(run_dir)
    assert only.name == "step_00000002" and checkpoints.verify_checkpoint(only) is None
    assert not list(RunFolder(run_dir).checkpoints.glob(".*"))  # the half-written tmp folder is gone
    GeneralistForCausalLM.from_pretrained(only)

    monkeypatch.setattr(checkpoints, "export_model", real_export)  # space freed: resume finishes the run
    assert short_run(tmp_path, "--resume")["steps"] == 6


# --- CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--resume", "--overwrite"], "--resume continues the run folder and --overwrite deletes it"),
    (["--mixture", "demoo"], "--mixture 'demoo': not a dataset, not one of " + re.escape(str(sorted(MIXTURES)))),
    (["--mixture", "text=heavy"], "bad weight in 'text=heavy'"),
    (["--keep_last", "0"], "--keep_last must be >= 1, got 0"),
    (["--mixture", "txt=1", "--data_root", "/nonexistent"], r"no dataset 'txt' under --data_root /nonexistent"),
])
def test_conflicting_or_unknown_training_flags_stop_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train.main(train.parse_args(["--output_dir", str(tmp_path), "--no_build_missing", *flags]))
    assert not list(tmp_path.iterdir())  # no run folder, no dataset, no model


def test_unknown_preset_and_dataset_names_list_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "large"])
    choices = ", ".join(f"'{p}'" for p in sorted(train.PRESETS))
    assert f"invalid choice: 'large' (choose from {choices})" in capsys.readouterr().err
    from datasets_build.__main__ import main as build_main

    with pytest.raises(SystemExit, match=r"unknown dataset or mixture 'controll'; datasets: \['babyai', 'captions', "
                                         r"'control-core'.*mixtures: " + re.escape(str(sorted(MIXTURES)))):
        build_main(["controll", "--out", "/nonexistent"])


# --- faults: SIGKILL -------------------------------------------------------------------------------


def test_training_killed_at_random_points_resumes_exactly(tiny_flags, tmp_path):
    """SIGKILL four times at random points: a random step, then either a random moment of it or the
    middle of writing its checkpoint (one is written every step). After each kill every published
    checkpoint is whole; the resumed runs log the same losses as the killed ones for the steps both
    ran (same data order, same updates), and the run completes."""
    rng = random.Random(1234)
    total = 16
    cmd = [sys.executable, "train.py", *tiny_flags(tmp_path, run_name="k", total_steps=total, save_every=1,
                                                   keep_last=2, eval_every=8, run_eval=False)]
    run_dir = tmp_path / "k"
    ckpt_root = RunFolder(run_dir).checkpoints
    seen: dict[int, float] = {}
    kills, mid_save = 0, 0
    for round_, where in enumerate(["mid-save", "anywhere", "mid-save", "anywhere"]):
        start = ckpts(run_dir)
        target = (int(start[-1].name.removeprefix("step_")) if start else 0) + rng.randint(1, 3)
        proc = subprocess.Popen(cmd + (["--resume"] if round_ else []), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and max(_csv_steps(run_dir), default=0) < target:
            time.sleep(0.005)  # until the random step is logged
        if where == "mid-save":
            while proc.poll() is None and time.monotonic() < deadline and not list(ckpt_root.glob(".tmp-step_*")):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.02))
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        mid_save += bool(list(ckpt_root.glob(".tmp-*")))
        for ckpt in ckpts(run_dir):
            assert checkpoints.verify_checkpoint(ckpt) is None, ckpt
        names = [p.name for p in ckpt_root.iterdir() if not p.name.startswith(".")]
        assert all((ckpt_root / n / checkpoints.TRAINER_STATE).exists() for n in names), names
        _check_same(seen, run_dir)
    assert kills == 4 and mid_save >= 1, (kills, mid_save)
    proc = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_same(seen, run_dir)
    assert sorted(logged_losses(run_dir)) == list(range(1, total + 1))
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == total
    assert not list(ckpt_root.glob(".tmp-*"))  # what the killed saves left was cleaned up
    GeneralistForCausalLM.from_pretrained(run_dir / "model")


def _csv_steps(run_dir: Path) -> list[int]:
    try:
        return list(logged_losses(run_dir))
    except (OSError, ValueError, KeyError):
        return []


def _check_same(seen: dict[int, float], run_dir: Path) -> None:
    for step, loss in logged_losses(run_dir).items() if (run_dir / "train_metrics.csv").exists() else ():
        assert loss == pytest.approx(seen.setdefault(step, loss), rel=1e-5, abs=1e-6), step


BUILD_SCRIPT = """
import sys
from pathlib import Path
from datasets_build.base import BuildOptions
from datasets_build.control import CORE_TASKS, ControlDatasetBuilder
builder = ControlDatasetBuilder("killed", lambda: CORE_TASKS[:2], "", default_episodes=8)
builder.build(Path(sys.argv[1]), BuildOptions(episodes=8, num_envs=2, episodes_per_shard=1, progress=False))
"""


def _episode_ids(folder: Path) -> Counter:
    dataset, _ = load_episodes(folder)
    rows = dataset.select_columns(["task", "source", "seed", "episode_return"]).to_list()
    return Counter((r["task"], r["source"], r["seed"], round(r["episode_return"], 4)) for r in rows)


def test_dataset_build_killed_mid_shard_resumes_without_duplicates_or_gaps(tmp_path):
    from datasets_build.common import is_built

    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(reference)], cwd=ROOT, env=ENV, check=True, timeout=120)
    root = tmp_path / "killed-root"
    folder = root / "killed"
    rng = random.Random(7)
    kills = 0
    def published() -> int:  # polled while the build renames its temporary folders: one may vanish mid-listing
        while True:
            with contextlib.suppress(FileNotFoundError):
                return len(shard_dirs(folder))

    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(root)], cwd=ROOT, env=ENV)
        before = published()
        deadline = time.monotonic() + 60
        while proc.poll() is None and published() <= before and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for shard in shard_dirs(folder):  # a published shard is always whole
            assert len(load_shard(shard)) == 1
    assert kills >= 1 and not is_built(folder)
    subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(root)], cwd=ROOT, env=ENV, check=True, timeout=120)
    assert is_built(folder)
    resumed = _episode_ids(folder)
    assert resumed == _episode_ids(reference / "killed") and max(resumed.values()) == 1
    assert not [p for p in (folder / "shards").rglob(".*")]
    shutil.rmtree(reference)
