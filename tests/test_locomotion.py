"""D4RL-style locomotion datasets rebuilt from the committed SAC policies (issue: Locomotion)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

from datasets_build import iter_episodes, load_episodes
from datasets_build.__main__ import main as datasets_build_main
from datasets_build.base import BuildOptions
from datasets_build.collector import EXPERT
from datasets_build.experts.mujoco import WEIGHTS_DIR, SACActor, training_record
from datasets_build.locomotion import LOCOMOTION_TASKS, replay_counts
from datasets_build.offline import import_d4rl
from datasets_build.registry import DATASETS, MIXTURES
from generalist.task_spec import d4rl_normalized_scores

pytest.importorskip("mujoco")
TRAINED = [task for task in LOCOMOTION_TASKS.values() if (WEIGHTS_DIR / task / "training.json").exists()]
SHORT = {short: task for short, task in LOCOMOTION_TASKS.items() if task in TRAINED}
TWO = BuildOptions(episodes=2, num_envs=2, episodes_per_shard=2, progress=False)


def episodes_by_source(folder) -> dict[str, list[dict]]:
    dataset, specs = load_episodes(folder)
    out: dict[str, list[dict]] = {}
    for episode in iter_episodes(dataset, specs):
        out.setdefault(episode["source"], []).append(episode)
    return out


def test_every_task_has_committed_policies_and_the_twelve_datasets_are_listed():
    assert list(LOCOMOTION_TASKS.values()) == TRAINED, f"trained: {TRAINED}"
    names = {f"{short}-{kind}" for short in LOCOMOTION_TASKS
             for kind in ("expert", "medium", "medium-replay", "medium-expert")}
    assert names <= set(DATASETS) and set(MIXTURES["locomotion"]) == names


@pytest.mark.parametrize("task", TRAINED)
def test_the_committed_expert_plays_as_its_training_record_says(task):
    """The NumPy actor of the committed weights, on the record's own evaluation seeds: the same mean
    return as sbx measured (float rounding differs from JAX's, and a hopper's fall is chaotic, so the
    returns match in distribution, not to the decimal)."""
    record, actor, env = training_record(task), SACActor(WEIGHTS_DIR / task / "expert.safetensors"), gym.make(task)
    returns = []
    for episode in range(3):
        obs, _ = env.reset(seed=20_000 + episode)  # train_locomotion's final evaluation seeds
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(actor(obs[None])[0])
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    expert, medium = record["expert"]["mean"], record["medium"]["mean"]
    assert np.mean(returns) > 0.8 * expert, (returns, expert)
    assert abs(medium - expert / 3) < 0.2 * expert, "the medium policy is about a third of the expert"


@pytest.mark.parametrize("short", list(SHORT))
def test_medium_expert_holds_the_medium_and_the_expert_episodes(short, tmp_path):
    """Collected on its own it is the same episodes as those two datasets; built beside them, it copies their
    shards instead of collecting them again."""
    built = {kind: episodes_by_source(DATASETS[f"{short}-{kind}"].build(tmp_path, TWO))
             for kind in ("medium", "expert", "medium-expert")}
    alone = episodes_by_source(DATASETS[f"{short}-medium-expert"].build(tmp_path / "alone", TWO))
    assert set(alone) == set(built["medium-expert"]) == {"policy-medium", EXPERT}
    for source, kind in (("policy-medium", "medium"), (EXPERT, "expert")):
        for a, b, c in zip(alone[source], built[kind][source], built["medium-expert"][source], strict=True):
            for part, leaf in (("observations", "observation"), ("actions", "action")):
                np.testing.assert_array_equal(a[part][leaf], b[part][leaf])
                np.testing.assert_array_equal(c[part][leaf], b[part][leaf])
    spec = load_episodes(tmp_path / f"{short}-medium")[1][SHORT[short]]
    assert spec.expert_return == training_record(SHORT[short])["expert"]["mean"]
    assert spec.random_return < 0.1 * spec.expert_return


def test_a_dataset_exported_as_d4rl_and_imported_again_gives_the_same_episodes(tmp_path):
    """Terminals (fell) and timeouts (1,000 steps) stay apart through the round trip, so a user with real
    D4RL files runs the same pipeline."""
    short = next(iter(SHORT))
    DATASETS[f"{short}-medium-expert"].build(tmp_path, TWO)
    path = tmp_path / "export.hdf5"
    datasets_build_main(["export-d4rl", "--dataset", f"{short}-medium-expert", "--d4rl_path", str(path),
                         "--out", str(tmp_path)])
    folder = import_d4rl(path, SHORT[short], tmp_path / "imported", BuildOptions(progress=False), name="back")
    ours = [e for source in episodes_by_source(tmp_path / f"{short}-medium-expert").values() for e in source]
    back = [e for source in episodes_by_source(folder).values() for e in source]
    assert len(back) == len(ours) == 4
    for a, b in zip(sorted(ours, key=lambda e: e["rewards"].sum()), sorted(back, key=lambda e: e["rewards"].sum()),
                    strict=True):
        np.testing.assert_array_equal(a["observations"]["observation"], b["observations"]["observation"])
        np.testing.assert_array_equal(a["actions"]["action"], b["actions"]["action"])
        np.testing.assert_array_equal(a["rewards"], b["rewards"])
        assert (a["terminated"], a["truncated"]) == (b["terminated"], b["truncated"])


@pytest.mark.parametrize("short", list(SHORT))
def test_medium_replay_holds_as_many_episodes_per_snapshot_as_the_real_replay_buffer(short):
    counts = replay_counts(SHORT[short])
    record = training_record(SHORT[short])
    assert sum(counts.values()) > 0 and "random" in counts
    snapshots = sorted(WEIGHTS_DIR.joinpath(SHORT[short], "replay").glob("step-*.safetensors"))
    assert [f"policy-step{int(p.stem.removeprefix('step-'))}" for p in snapshots] == [
        s for s in counts if s != "random"]
    assert all(int(p.stem.removeprefix("step-")) < record["medium"]["step"] for p in snapshots)


def test_d4rl_scores_use_d4rl_references():
    np.testing.assert_allclose(d4rl_normalized_scores("Hopper-v5", [-20.272305, 3234.3]), [0.0, 100.0])
    np.testing.assert_allclose(d4rl_normalized_scores("walker2d-medium-replay", [1.629008]), [0.0])
    np.testing.assert_allclose(d4rl_normalized_scores("HalfCheetah-v5", [12135.0]), [100.0])
    assert d4rl_normalized_scores("CartPole-v1", [500.0]) is None


def test_training_records_say_how_the_policies_were_made():
    for task in TRAINED:
        record = json.loads((WEIGHTS_DIR / task / "training.json").read_text())
        assert record["command"].startswith("python -m datasets_build.experts.train_locomotion")
        assert record["curve"] and record["wall_s"] > 0 and len(record["expert"]["returns"]) >= 10
