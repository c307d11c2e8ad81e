"""Dataset builders: real properties of tiny builds (CPU, no network)."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from datasets_build import iter_episodes, load_episodes
from datasets_build.base import BuildOptions
from datasets_build.captions import HELD_OUT_PAIRS, CaptionDatasetBuilder, caption_compositions
from datasets_build.collector import BURST_PREFIX, BURST_STEPS, EXPERT, RANDOM, TWIN, split_episodes
from datasets_build.common import is_built
from datasets_build.control import CORE_TASKS, PIXEL_TASKS, ControlDatasetBuilder, babyai_tasks
from datasets_build.episodes import SHARDS_DIR, shard_dirs
from datasets_build.registry import DATASETS, MIXTURES, load_split_dataset
from datasets_build.text import TextDatasetBuilder
from datasets_build.wrappers import PixelsAndState

SHORT_EPISODE = 40
TINY = BuildOptions(episodes=10, num_envs=4, episodes_per_shard=2, progress=False)


def check_episodes(folder: Path) -> dict[str, dict[str, list[float]]]:
    """Check the episode contract for every row; return {task: {source: [returns]}}."""
    dataset, specs = load_episodes(folder)
    returns: dict[str, dict[str, list[float]]] = {}
    rows = dataset.select_columns(["episode_return", "seed"]).to_list()
    for episode, row in zip(iter_episodes(dataset, specs), rows, strict=True):
        spec = specs[episode["task"]]
        steps = len(episode["rewards"])
        assert steps > 0 and episode["rewards"].dtype == np.float32
        assert episode["terminated"] or episode["truncated"], "episodes must be complete"
        np.testing.assert_allclose(episode["rewards"].sum(dtype=np.float64), row["episode_return"], rtol=1e-6)
        for leaf in spec.observation_fields:
            assert len(episode["observations"][leaf.name]) == steps
        action_space = spec.action_space()
        for t in range(steps):
            action = spec.unflatten_action({k: v[t] for k, v in episode["actions"].items()})
            assert action_space.contains(action), (episode["task"], t, action)
        returns.setdefault(episode["task"], {}).setdefault(episode["source"], []).append(row["episode_return"])
    return returns


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> Path:
    return DATASETS["control-core"].build(tmp_path_factory.mktemp("core"), TINY)


def test_core_episodes_are_complete_and_consistent(core):
    returns = check_episodes(core)
    assert set(returns) == {t.name for t in CORE_TASKS}
    counts = split_episodes(TINY.episodes, ControlDatasetBuilder("x", tuple, "", 1).source_mix)
    for task, by_source in returns.items():
        assert {s: len(r) for s, r in by_source.items()} == counts, task


def test_core_experts_are_experts(core):
    _, specs = load_episodes(core)
    cartpole = specs["CartPole-v1"]
    assert cartpole.expert_return >= 475
    for name, spec in specs.items():
        gap = spec.expert_return - spec.random_return
        assert gap > 0.5 * abs(spec.random_return) or gap > 50, (name, spec.expert_return, spec.random_return)
        assert abs(spec.expert_return) * spec.return_scale <= 10.0 + 1e-9
        assert abs(spec.random_return) * spec.return_scale <= 10.0 + 1e-9


def test_every_step_records_the_experts_action_beside_the_executed_one(core):
    """DART labels: equal to the executed action on expert episodes, the clean action under noise and
    random play (for Pendulum's continuous torque, different at almost every noisy step)."""
    dataset, specs = load_episodes(core)
    seen = set()
    for episode in iter_episodes(dataset, specs):
        executed, expert = episode["actions"]["action"], episode["expert_actions"]["action"]
        assert expert.shape == executed.shape and spec_contains(specs[episode["task"]], expert)
        same = np.mean([np.array_equal(a, b) for a, b in zip(executed, expert, strict=True)])
        if episode["source"] == "expert":
            assert same == 1.0
        elif episode["source"].startswith(BURST_PREFIX) and episode["task"] == "Pendulum-v1":
            assert 0.0 < same < 1.0, same
            assert_bursts_hold_their_action(executed, expert)
        elif episode["task"] == "Pendulum-v1":
            assert same < 0.5, (episode["source"], same)
        seen.add(episode["source"])
    assert {"expert", "random", "burst-0.05"} <= seen


def test_a_lagged_expert_acts_on_the_observation_of_k_steps_before(tmp_path):
    """``lag-<k>``: the executed action at step t is the expert's answer at step t - k, which the DART labels
    record (the expert is stateless); the first k steps answer the first observation. A stateful expert
    cannot be lagged."""
    pendulum = next(t for t in CORE_TASKS if t.name == "Pendulum-v1")
    builder = ControlDatasetBuilder("lagged", lambda: (pendulum,), "", 4,
                                    source_mix={"expert": 0.4, "lag-3": 0.4, "random": 0.2})
    dataset, specs = load_episodes(builder.build(tmp_path, TINY))
    lagged = [e for e in iter_episodes(dataset, specs) if e["source"] == "lag-3"]
    assert lagged
    for e in lagged:
        executed, expert = e["actions"]["action"], e["expert_actions"]["action"]
        np.testing.assert_array_equal(executed[3:], expert[:-3])
        np.testing.assert_array_equal(executed[:3], np.repeat(expert[:1], 3, axis=0))
        assert not np.array_equal(executed, expert)
    babyai = ControlDatasetBuilder("stateful", lambda: babyai_tasks()[:1], "", 2, source_mix={"lag-2": 1.0})
    pytest.importorskip("minigrid")
    with pytest.raises(ValueError, match="lag-<k> sources ask the expert about past observations"):
        babyai.build(tmp_path / "b", TINY)


def assert_bursts_hold_their_action(executed: np.ndarray, expert: np.ndarray) -> None:
    """Away from the expert, a burst source holds one random action for BURST_STEPS steps (the last
    burst may be cut by the episode's end)."""
    off = ~np.all(executed == expert, axis=-1)
    run_start = 0
    for t in range(1, len(executed) + 1):
        if t == len(executed) or not off[t] or not off[t - 1] or not np.array_equal(executed[t], executed[t - 1]):
            if off[run_start]:
                assert t - run_start == BURST_STEPS or t == len(executed), (run_start, t)
            run_start = t


def spec_contains(spec, actions) -> bool:
    space = spec.action_space()
    return all(space.contains(spec.unflatten_action({"action": a})) for a in actions)


def test_core_card_records_the_build(core):
    import json

    record = json.loads((core / "build.json").read_text())
    assert record["episodes"] == 10 * len(CORE_TASKS) and record["steps"] > 0
    assert record["tasks"]["CartPole-v1"]["expert_return"] >= 475
    assert "gymnasium" in record["versions"]
    assert "CartPole-v1" in (core / "README.md").read_text()


def _identity(folder: Path) -> Counter:
    dataset, _ = load_episodes(folder)
    rows = dataset.select_columns(["task", "source", "seed", "episode_return"]).to_list()
    return Counter((r["task"], r["source"], r["seed"], round(r["episode_return"], 4)) for r in rows)


def test_interrupted_build_resumes_without_duplicates(tmp_path):
    builder = ControlDatasetBuilder("resume", lambda: CORE_TASKS[:2], "", default_episodes=10)
    reference = _identity(builder.build(tmp_path / "reference", TINY))

    root = tmp_path / "interrupted"
    folder = builder.build(root, BuildOptions(**{**TINY.__dict__, "max_shards": 2}))
    assert not is_built(folder) and len(shard_dirs(folder)) == 4  # 2 shards per task, then "crash"
    shutil.rmtree(shard_dirs(folder)[0])  # a lost shard
    (folder / SHARDS_DIR / "CartPole-v1" / ".tmp-expert-00001-123").mkdir()  # a half-written one
    folder = builder.build(root, TINY)
    assert is_built(folder)
    resumed = _identity(folder)
    assert resumed == reference and max(resumed.values()) == 1
    assert not list((folder / SHARDS_DIR).rglob(".tmp-*"))


def test_episodes_do_not_depend_on_num_envs(tmp_path):
    builder = ControlDatasetBuilder("envs", lambda: CORE_TASKS[4:5], "", default_episodes=6)
    one = _identity(builder.build(tmp_path / "one", BuildOptions(**{**TINY.__dict__, "num_envs": 1})))
    three = _identity(builder.build(tmp_path / "three", BuildOptions(**{**TINY.__dict__, "num_envs": 3})))
    assert one == three


def test_resume_refuses_other_settings(tmp_path):
    builder = ControlDatasetBuilder("cfg", lambda: CORE_TASKS[:1], "", default_episodes=5)
    builder.build(tmp_path, BuildOptions(**{**TINY.__dict__, "max_shards": 1}))
    with pytest.raises(ValueError, match="was started with"):
        builder.build(tmp_path, BuildOptions(**{**TINY.__dict__, "seed": 1}))


def _short_pendulum_pixels() -> gym.Env:
    return PixelsAndState(gym.make("Pendulum-v1", render_mode="rgb_array", max_episode_steps=SHORT_EPISODE))


def test_pixel_observations_are_images(tmp_path):
    task = replace(PIXEL_TASKS[0], make_env=_short_pendulum_pixels)  # same task, shorter episodes
    builder = ControlDatasetBuilder("pixels", lambda: [task], "", default_episodes=5)
    folder = builder.build(tmp_path, BuildOptions(num_envs=5, progress=False))
    check_episodes(folder)
    dataset, specs = load_episodes(folder)
    spec = specs["Pendulum-v1-pixels"]
    assert [f.kind for f in spec.observation_fields] == ["image", "continuous"]
    episode = next(iter_episodes(dataset, specs))
    image = episode["observations"]["observation.image"]
    assert image.dtype == np.uint8 and image.shape == (len(episode["rewards"]), 64, 64, 3)
    assert image.min() < 128 < image.max()  # something is drawn on the background
    assert not np.array_equal(image[0], image[-1])  # and it moves


def test_captions_hold_out_compositions(tmp_path):
    folder = CaptionDatasetBuilder().build(tmp_path, BuildOptions(samples=300, progress=False))
    data = load_split_dataset(folder.name, tmp_path)
    assert set(data) == {"train", "test"}
    train_pairs = set().union(*map(caption_compositions, data["train"]["caption"]))
    test_pairs = set().union(*map(caption_compositions, data["test"]["caption"]))
    assert train_pairs and not train_pairs & HELD_OUT_PAIRS
    assert test_pairs & HELD_OUT_PAIRS
    for caption in data["test"]["caption"]:
        assert caption_compositions(caption) & HELD_OUT_PAIRS or "on the right of the track" in caption
    assert not any("leaning left, the cart on the right" in c for c in data["train"]["caption"])
    assert len(set(data["train"]["caption"])) > 0.5 * len(data["train"])  # real variety
    image = np.asarray(data["train"][0]["image"])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_text_splits_are_disjoint(tmp_path):
    folder = TextDatasetBuilder().build(tmp_path, BuildOptions(progress=False))
    data = load_split_dataset(folder.name, tmp_path)
    train, validation = set(data["train"]["text"]), set(data["validation"]["text"])
    assert train and validation and not train & validation
    assert max(map(len, train | validation)) <= 2000


def test_d4rl_arrays_become_episodes(tmp_path):
    from datasets_build.offline import import_d4rl

    steps = 25
    terminals, timeouts = np.zeros(steps, bool), np.zeros(steps, bool)
    terminals[9], timeouts[19] = True, True  # 2 episodes, then 5 trailing steps of no episode
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(path, observations=rng.normal(size=(steps, 3)), actions=rng.uniform(-1, 1, (steps, 2)),
             rewards=np.arange(steps, dtype=np.float32), terminals=terminals, timeouts=timeouts)
    folder = import_d4rl(path, "toy-v0", tmp_path / "out", BuildOptions(progress=False))
    check_episodes(folder)
    dataset, _ = load_episodes(folder)
    assert dataset["terminated"] == [True, False] and dataset["truncated"] == [False, True]
    assert dataset["episode_return"] == [float(sum(range(10))), float(sum(range(10, 20)))]


def test_minari_dataset_is_imported(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    import gymnasium as gym

    from datasets_build.offline import import_minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = minari.DataCollector(gym.make("CartPole-v1"))
    env.action_space.seed(0)
    returns = []
    for seed in range(3):
        env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total, done = total + reward, terminated or truncated
        returns.append(total)
    env.create_dataset(dataset_id="toy/cartpole-v0", algorithm_name="random", ref_min_score=20.0,
                       ref_max_score=500.0)
    folder = import_minari("toy/cartpole-v0", tmp_path / "out", BuildOptions(progress=False))
    check_episodes(folder)
    dataset, specs = load_episodes(folder)
    assert sorted(dataset["episode_return"]) == sorted(returns)
    assert specs["toy/cartpole-v0"].expert_return == 500.0


def test_minari_import_trains_and_evaluates_in_the_recovered_environment(tmp_path, monkeypatch, tiny_flags,
                                                                         train_in_process):
    """Minari -> train -> evaluate: the task is named by the Minari id (no gymnasium env has it), so the
    rollouts run in the environment minari recovers, scored against the dataset's ref scores."""
    minari = pytest.importorskip("minari")
    import gymnasium as gym

    from datasets_build.offline import import_minari
    from eval import control

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = minari.DataCollector(gym.make("CartPole-v1"))
    env.action_space.seed(0)
    for seed in range(4):
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            done = terminated or truncated
    env.create_dataset(dataset_id="toy/cartpole-v0", algorithm_name="random", ref_min_score=20.0,
                       ref_max_score=500.0)
    data = tmp_path / "data"
    import_minari("toy/cartpole-v0", data, BuildOptions(progress=False))
    summary = train_in_process(*tiny_flags(tmp_path / "runs", run_name="minari", data_root=data,
                                           mixture="toy_cartpole-v0=1", total_steps=4, save_every=4,
                                           eval_every=4, run_eval=False))
    assert summary["steps"] == 4
    result = control.main(["--model", str(tmp_path / "runs" / "minari"), "--mode", "gato", "--episodes", "2",
                           "--out", str(tmp_path / "eval")])
    (record,) = result["results"]
    assert record["task"] == "toy/cartpole-v0" and record["episodes"] == 2 and "errors" not in record
    assert result["references"]["toy/cartpole-v0"]["expert_return"] == 500.0
    assert result["references"]["toy/cartpole-v0"]["random_return"] == 20.0
    assert record["normalized_score"] == pytest.approx((record["mean_return"] - 20.0) / 480.0)


def test_babyai_grid_is_one_token_per_cell_and_loses_nothing():
    """The compact grid holds what the raw 7x7x3 grid holds (every cell decodes back to object, colour,
    state), and a step is short enough that a 1,024-token context holds over ten of them."""
    pytest.importorskip("minigrid")
    from datasets_build.control import make_task_env
    from generalist import GeneralistTokenizer
    from generalist.task_spec import TaskSpec

    env = make_task_env("BabyAI-OpenDoor-v0")  # doors: the state channel is used
    obs, _ = env.reset(seed=3)
    for action in [2, 1, 2, 2, 0, 5, 2]:
        raw = env.unwrapped.gen_obs()["image"]  # (7, 7, 3) as minigrid gives it
        cell = obs["image"].astype(int)  # (7, 7)
        assert cell.shape == (7, 7) and env.observation_space["image"].contains(obs["image"])
        np.testing.assert_array_equal(np.stack([cell % 11, cell // 11 % 6, cell // 66], -1), raw)
        obs, *_ = env.step(action)
    spec = TaskSpec.from_env(env, name="babyai-compact")
    tok = GeneralistTokenizer.default()
    tok.add_task_spec(spec)
    step = tok.encode_steps(spec, {f"observation.{k}": [v] for k, v in obs.items()}, {"action": [0]},
                            rewards=[0.0])[0]
    assert len(step["input_ids"]) <= 80


@pytest.mark.slow
def test_babyai_bot_is_an_expert(tmp_path):
    pytest.importorskip("minigrid")
    builder = ControlDatasetBuilder("babyai", lambda: DATASETS["babyai"].tasks()[:1], "", default_episodes=5)
    folder = builder.build(tmp_path, BuildOptions(num_envs=5, progress=False))
    returns = check_episodes(folder)
    dataset, specs = load_episodes(folder)
    spec = next(iter(specs.values()))
    assert {f.kind for f in spec.observation_fields} == {"text", "discrete"}
    episode = next(iter_episodes(dataset, specs))
    assert isinstance(episode["observations"]["observation.mission"][0], str)
    (task,) = returns
    assert np.mean(returns[task][EXPERT]) > 0.5 > np.mean(returns[task][RANDOM])


def test_babyai_detours_face_wrong_objects_under_the_bots_labels(tmp_path):
    """A detour walks up to an object the mission does not name; the bot's label there is never
    "pick up" (it turns away, or drops what the detour picked up), which is the lesson expert-only
    data lacks. Experts without a detour policy refuse the source."""
    pytest.importorskip("minigrid")
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

    objects = {i: name for name, i in OBJECT_TO_IDX.items()}
    colours = {i: name for name, i in COLOR_TO_IDX.items()}
    pickup = 3  # minigrid's Actions.pickup
    builder = ControlDatasetBuilder("detours", lambda: [t for t in babyai_tasks() if t.name == "BabyAI-PickupLoc-v0"],
                                    "", default_episodes=8, source_mix={EXPERT: 0.1, RANDOM: 0.1, "detour-0.3": 0.8})
    dataset, specs = load_episodes(builder.build(tmp_path, replace(TINY, episodes=8)))
    facing_wrong = wrong_pickups = detour_steps = 0
    for e in iter_episodes(dataset, specs):
        if e["source"] != "detour-0.3":
            continue
        executed, label = e["actions"]["action"].ravel(), e["expert_actions"]["action"].ravel()
        detour_steps += int((executed != label).sum())  # the detours act, the bot labels
        for t, (grid, mission) in enumerate(zip(e["observations"]["observation.image"],
                                                e["observations"]["observation.mission"], strict=True)):
            front = int(grid[3, 5])  # the cell in front of the agent in minigrid's egocentric view
            kind, colour = objects[front % 11], colours[front // 11 % 6]
            named = kind in mission and (colour in mission or not any(c in mission for c in colours.values()))
            if kind in ("key", "ball", "box") and not named:  # (a location in the mission is not checked)
                facing_wrong += 1
                assert label[t] != pickup, (mission, colour, kind)
                wrong_pickups += int(executed[t] == pickup)
    assert detour_steps >= 10 and facing_wrong >= 5 and wrong_pickups >= 1

    cartpole = ControlDatasetBuilder("nodetour", lambda: CORE_TASKS[:1], "", 2, source_mix={"detour-0.1": 1.0})
    with pytest.raises(ValueError, match="needs an expert with a `detour` policy"):
        cartpole.build(tmp_path / "c", TINY)


def test_babyai_twins_replay_the_experts_layout_with_another_mission(tmp_path):
    """A twin episode starts from its expert episode's layout (same seed, same first view) with a mission
    naming another object, and the bot reaches *that* object (the env rewards it): pairs that differ only
    in the mission. Envs that cannot rewrite their goal refuse the source."""
    pytest.importorskip("minigrid")
    builder = ControlDatasetBuilder("twins", lambda: [t for t in babyai_tasks() if t.name == "BabyAI-GoToLocal-v0"],
                                    "", default_episodes=8, source_mix={EXPERT: 0.5, TWIN: 0.5})
    dataset, specs = load_episodes(builder.build(tmp_path, replace(TINY, episodes=8)))
    episodes = list(zip(dataset["seed"], iter_episodes(dataset, specs), strict=True))
    experts = {seed: e for seed, e in episodes if e["source"] == EXPERT}
    twins = [(seed, e) for seed, e in episodes if e["source"] == TWIN]
    assert len(twins) == len(experts) == 4
    first_actions_differ = 0
    for seed, twin in twins:
        expert = experts[seed]  # the same layout ...
        view = {k: v[0] for k, v in twin["observations"].items() if k != "observation.mission"}
        assert all(np.array_equal(v, expert["observations"][k][0]) for k, v in view.items())
        mission, expert_mission = twin["observations"]["observation.mission"][0], \
            expert["observations"]["observation.mission"][0]
        assert mission != expert_mission  # ... another goal, which the bot reached
        assert twin["terminated"] and twin["rewards"].sum() > 0, mission
        first_actions_differ += int(twin["actions"]["action"][0] != expert["actions"]["action"][0])
    assert first_actions_differ >= 1

    cartpole = ControlDatasetBuilder("notwin", lambda: CORE_TASKS[:1], "", 2, source_mix={TWIN: 1.0})
    with pytest.raises(ValueError, match="needs an env that can rewrite its goal"):
        cartpole.build(tmp_path / "c", TINY)


@pytest.mark.slow
def test_metaworld_scripted_policy_is_an_expert(tmp_path):
    pytest.importorskip("metaworld")
    builder = ControlDatasetBuilder("mw", lambda: DATASETS["metaworld"].tasks()[:1], "", default_episodes=5)
    folder = builder.build(tmp_path, BuildOptions(num_envs=5, progress=False))
    returns = check_episodes(folder)
    (task,) = returns
    assert np.mean(returns[task][EXPERT]) > 3 * np.mean(returns[task][RANDOM])


def test_registry_and_cli():
    from datasets_build.__main__ import main

    for weights in MIXTURES.values():
        assert set(weights) <= set(DATASETS) and abs(sum(weights.values()) - 1.0) < 1e-9
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_ensure_built_builds_what_is_missing(tmp_path):
    from datasets_build.registry import ensure_built

    folders = ensure_built("text", tmp_path, BuildOptions(progress=False))
    assert is_built(folders["text"])
    stamp = (folders["text"] / "build.json").stat().st_mtime_ns
    ensure_built("text", tmp_path, BuildOptions(progress=False))  # already built: untouched
    assert (folders["text"] / "build.json").stat().st_mtime_ns == stamp
