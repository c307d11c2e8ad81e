"""D4RL-style locomotion datasets rebuilt from the committed SAC policies (issue: Locomotion)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasets_build import iter_episodes, load_episodes
from datasets_build.__main__ import main as datasets_build_main
from datasets_build.base import BuildOptions
from datasets_build.collector import EXPERT
from datasets_build.experts.mujoco import MEDIUM_REPLAY_FILE, WEIGHTS_DIR, SACActor, training_record
from datasets_build.experts.train_locomotion import measure, replay_arrays
from datasets_build.locomotion import LOCOMOTION_TASKS
from datasets_build.offline import d4rl_episode_bounds, import_d4rl, read_d4rl_arrays
from datasets_build.registry import DATASETS, MIXTURES
from generalist.task_spec import d4rl_normalized_scores

pytest.importorskip("mujoco")
TRAINED = [task for task in LOCOMOTION_TASKS.values() if (WEIGHTS_DIR / task / "training.json").exists()]
SHORT = {short: task for short, task in LOCOMOTION_TASKS.items() if task in TRAINED}
needs_policies = pytest.mark.skipif(not SHORT, reason="no committed locomotion policies")
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
def test_the_committed_policies_play_as_their_training_record_says(task):
    """The NumPy actor of the committed weights on the record's own final-evaluation seeds, deterministic and
    with sampled actions (as the datasets are collected): what the record measured with the same actor (to
    the bit on the machine that made it; another CPU's float rounding can change where a hopper falls,
    hence the tolerance), and the medium policy about a third of the expert."""
    record = training_record(task)
    for kind in ("expert", "medium"):
        again = measure(task, SACActor(WEIGHTS_DIR / task / f"{kind}.safetensors"), episodes=3)
        deterministic, sampled = again["returns"], again["sampled_returns"]
        assert np.mean(deterministic) == pytest.approx(np.mean(record[kind]["returns"][:3]), rel=0.25), kind
        assert np.mean(sampled) == pytest.approx(np.mean(record[kind]["sampled_returns"][:3]), rel=0.25), kind
    expert, medium = record["expert"]["mean"], record["medium"]["mean"]
    assert abs(medium - expert / 3) <= 0.1 * expert, "the medium policy is about a third of the expert"


@pytest.mark.parametrize("short", list(SHORT))
def test_medium_expert_holds_the_medium_and_the_expert_episodes(short, tmp_path, monkeypatch):
    """Collected on its own it is the same episodes as those two datasets (whatever ran beside them in other
    env slots); built beside them, it copies their shards and collects nothing."""
    import datasets_build.control

    alone = episodes_by_source(DATASETS[f"{short}-medium-expert"].build(
        tmp_path / "alone", BuildOptions(episodes=2, num_envs=3, episodes_per_shard=2, progress=False)))
    built = {kind: episodes_by_source(DATASETS[f"{short}-{kind}"].build(tmp_path, TWO))
             for kind in ("medium", "expert")}
    collect = datasets_build.control.collect_task
    monkeypatch.setattr(datasets_build.control, "collect_task", lambda task, folder, counts, **kw: (
        collect(task, folder, counts, **{**kw, "max_shards": 0})))  # any episode collected would be missing
    built["medium-expert"] = episodes_by_source(DATASETS[f"{short}-medium-expert"].build(tmp_path, TWO))
    assert set(alone) == set(built["medium-expert"]) == {"policy-medium", EXPERT}
    for source, kind in (("policy-medium", "medium"), (EXPERT, "expert")):
        for a, b, c in zip(alone[source], built[kind][source], built["medium-expert"][source], strict=True):
            for part, leaf in (("observations", "observation"), ("actions", "action")):
                np.testing.assert_array_equal(a[part][leaf], b[part][leaf])
                np.testing.assert_array_equal(c[part][leaf], b[part][leaf])
    spec = load_episodes(tmp_path / f"{short}-medium")[1][SHORT[short]]
    assert spec.expert_return == training_record(SHORT[short])["expert"]["mean"]
    assert spec.random_return < 0.1 * spec.expert_return


@needs_policies
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
    with_flags = read_d4rl_arrays(path)
    assert with_flags["terminals"].sum() + with_flags["timeouts"].sum() == 4
    for a, b in zip(sorted(ours, key=lambda e: e["rewards"].sum()), sorted(back, key=lambda e: e["rewards"].sum()),
                    strict=True):
        np.testing.assert_array_equal(a["observations"]["observation"], b["observations"]["observation"])
        np.testing.assert_array_equal(a["actions"]["action"], b["actions"]["action"])
        np.testing.assert_array_equal(a["rewards"], b["rewards"])
        assert (a["terminated"], a["truncated"]) == (b["terminated"], b["truncated"])


@pytest.mark.parametrize("short", list(SHORT))
def test_medium_replay_is_the_real_replay_buffer_up_to_the_medium_policy(short, tmp_path):
    task = SHORT[short]
    record, arrays = training_record(task), read_d4rl_arrays(WEIGHTS_DIR / task / MEDIUM_REPLAY_FILE)
    assert len(arrays["rewards"]) == record["medium_replay"]["steps"] == record["medium"]["step"]
    folder = DATASETS[f"{short}-medium-replay"].build(tmp_path, TWO)
    episodes = [e for source in episodes_by_source(folder).values() for e in source]
    bounds = d4rl_episode_bounds(arrays["terminals"], arrays["timeouts"])
    assert len(episodes) == len(bounds) == record["medium_replay"]["episodes_ended"]
    first = episodes[0]  # random play first: the buffer's start, as it was stored
    np.testing.assert_array_equal(first["rewards"], arrays["rewards"][: bounds[0][1]])
    assert sum(e["terminated"] for e in episodes) == arrays["terminals"].sum()  # a hopper fell
    assert sum(e["truncated"] for e in episodes) == arrays["timeouts"].sum()  # 1,000 steps


def test_an_sb3_replay_buffer_becomes_d4rl_arrays_with_terminals_and_timeouts_apart():
    dones = np.array([0, 1, 0, 0, 1, 0, 1, 0], bool)  # sb3: terminated or truncated
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], bool)
    buffer = {"observations": np.arange(16.0).reshape(8, 2), "actions": np.ones((8, 1)), "rewards": np.arange(8.0),
              "dones": dones, "timeouts": timeouts}
    arrays = replay_arrays(buffer, end=7)
    np.testing.assert_array_equal(arrays["terminals"], [0, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(arrays["timeouts"], [0, 0, 0, 0, 1, 0, 0])
    assert d4rl_episode_bounds(arrays["terminals"], arrays["timeouts"]) == [
        (0, 2, True, False), (2, 5, False, True), (5, 7, True, False)]


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
