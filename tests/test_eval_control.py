"""eval.control: an env that raises ends only its own episode; scores, rliable IQM over checkpoints, the
JSON the docs' result tables are generated from."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from eval import results
from eval.control import ErrorAsTermination, aggregate, main, mean_stderr, normalised, pooled_results, rollout
from generalist import GeneralistConfig, GeneralistForCausalLM, TaskSpec
from generalist.agent import Agent
from tests.conftest import ROOT, TINY_LLAMA, with_task_spec


class Flaky(gym.Env):
    """Reward 1 per step, episodes of 5 steps; raises on its 3rd step when ``broken``."""

    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, broken: bool):
        self.broken, self.t = broken, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.broken and self.t == 3:
            raise RuntimeError("simulator exploded")
        return np.zeros(2, np.float32), 1.0, self.t >= 5, False, {}


def test_an_env_error_ends_only_its_episode(tok):
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    envs = gym.vector.SyncVectorEnv([lambda: ErrorAsTermination(Flaky(True)), lambda: ErrorAsTermination(Flaky(False))],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    spec = TaskSpec.from_env(envs, name="flaky", expert_return=5.0, random_return=0.0)
    tok.add_task_spec(spec)
    episodes = rollout(Agent(model, tok, "dt"), envs, spec, episodes=4, seed=0)
    errors = [e for e in episodes if e["error"]]
    good = [e for e in episodes if not e["error"]]
    assert errors and all("simulator exploded" in e["error"] for e in errors)
    assert good and all(e["return"] == 5.0 and e["length"] == 5 for e in good)


class Slow(Flaky):
    """Flaky's 5-step episodes, never broken, each step slower than the progress bar's redraw interval."""

    def __init__(self):
        super().__init__(broken=False)

    def step(self, action):
        time.sleep(0.12)
        return super().step(action)


def test_the_progress_bar_keeps_showing_the_step_after_an_episode_ends(tok, capsys):
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    envs = gym.vector.SyncVectorEnv([lambda: ErrorAsTermination(Slow())],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    spec = TaskSpec.from_env(envs, name="slow", expert_return=5.0, random_return=0.0)
    tok.add_task_spec(spec)
    rollout(Agent(model, tok, "gato"), envs, spec, episodes=2, seed=0)
    shown = capsys.readouterr().err
    assert "1/2" in shown and "step 4" in shown
    assert "step 8" in shown  # after the first episode ended at step 5 (the bar froze there before)


class Fixed(Flaky):
    """Never broken, episodes of ``length`` steps."""

    def __init__(self, length: int):
        super().__init__(broken=False)
        self.length = length

    def step(self, action):
        obs, reward, _, truncated, info = super().step(action)
        return obs, reward, self.t >= self.length, truncated, info


def test_each_env_plays_its_share_so_short_episodes_are_not_favoured(tok):
    """With one env whose episodes last 2 steps and one whose last 10, 4 episodes are 2 of each: counting the first 4
    to finish took the short env's episodes at steps 2, 4, 6 and 8 and none of the long one's."""
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    envs = gym.vector.SyncVectorEnv([lambda: ErrorAsTermination(Fixed(2)), lambda: ErrorAsTermination(Fixed(10))],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    spec = TaskSpec.from_env(envs, name="fixed", expert_return=10.0, random_return=0.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "gato")
    rows_decided, act = [], agent.act
    agent.act = lambda obs: rows_decided.append(len(agent.active)) or act(obs)
    episodes = rollout(agent, envs, spec, episodes=4, seed=0)
    assert sorted(e["length"] for e in episodes) == [2, 2, 10, 10]
    assert rows_decided == [2] * 4 + [1] * 16  # the short env is retired once it has its 2 episodes
    three = rollout(Agent(model, tok, "gato"), envs, spec, episodes=3, seed=0)
    assert sorted(e["length"] for e in three) == [2, 10, 10]  # env i plays (3 + i) // 2


def test_scores():
    spec = TaskSpec.from_spaces("s", spaces.Box(-1, 1, (1,)), spaces.Discrete(2), expert_return=10.0, random_return=2.0)
    assert normalised(spec, [2.0, 10.0, 6.0]) == [0.0, 1.0, 0.5]
    assert mean_stderr([1.0, 3.0]) == (2.0, 1.0)


def test_iqm_over_checkpoints_and_tasks_has_a_bootstrap_ci():
    run = lambda scores: [{"task": f"t{i}", "normalized_score": x} for i, x in enumerate(scores)]  # noqa: E731
    agg = aggregate([run([0.0, 1.0, 2.0, 3.0]), run([4.0, 5.0, 6.0, 100.0])], [f"t{i}" for i in range(4)], reps=200)
    assert agg["iqm"] == pytest.approx(3.5)  # the middle half of the 8 scores, not the outlier
    lo, hi = agg["iqm_ci95"]
    assert lo <= agg["iqm"] <= hi and hi > lo
    assert agg["checkpoints"] == 2 and np.asarray(agg["matrix"]).shape == (2, 4)


def two_checkpoints(tok, tmp_path: Path, spec: TaskSpec) -> list[str]:
    """Two saved "seeds" of a tiny random model whose tokenizer knows ``spec``."""
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    local = with_task_spec(tok, spec)
    for k in range(2):
        model.save_pretrained(tmp_path / f"s{k}")
        local.save_pretrained(tmp_path / f"s{k}")
    return [str(tmp_path / f"s{k}") for k in range(2)]


def write_seed_by_seed(result_file: Path) -> list[str]:
    """One result file of two checkpoints written again as two files of one checkpoint each, as if each seed had
    been evaluated by a process of its own (``eval.control --model <one> ...``); their paths."""
    whole = json.loads(result_file.read_text())
    tasks = [entry["task"] for entry in whole["results"]]
    paths = []
    for k in range(len(whole["models"])):
        runs = whole["per_checkpoint"][k: k + 1]
        part = dict(whole, models=whole["models"][k: k + 1], per_checkpoint=runs, command=f"{whole['command']}_s{k}",
                    results=pooled_results(runs, tasks, whole["mode"]))
        paths.append(str(result_file.with_name(f"{result_file.stem}_s{k}.json")))
        Path(paths[-1]).write_text(json.dumps(part))
    return paths


def test_two_checkpoints_in_a_real_env_make_the_file_the_readme_is_generated_from(tok, tmp_path, capsys):
    spec = TaskSpec.from_env(gym.make("CartPole-v1"), expert_return=500.0, random_return=20.0)
    models = two_checkpoints(tok, tmp_path, spec)
    out = tmp_path / "results"
    main(["--model", *models, "--mode", "dt", "--tasks", "CartPole-v1",
          "--episodes", "3", "--out", str(out), "--name", "control_tiny_dt"])
    assert "CartPole-v1 [dt]" in capsys.readouterr().err  # the rollouts' progress bar (a TT episode takes minutes)
    data = json.loads((out / "control_tiny_dt.json").read_text())
    assert [len(run) for run in data["per_checkpoint"]] == [1, 1]
    assert all(len(run[0]["returns"]) == 3 for run in data["per_checkpoint"])
    assert data["results"][0]["episodes"] == 6 and data["results"][0]["checkpoints"] == 2
    assert data["references"]["CartPole-v1"]["expert_return"] == 500.0
    assert data["references"]["CartPole-v1"]["env_reward_threshold"] == 475.0  # gymnasium's own bar
    assert data["iqm"]["checkpoints"] == 2 and "iqm_ci95" in data["iqm"]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.START}\nstale\n{results.END}\noutro\n")
    assert results.main(["--results", str(out), "--pages", str(readme), "--check"]) == 1  # stale
    results.main(["--results", str(out), "--pages", str(readme)])
    text = readme.read_text()
    assert "stale" not in text and "| CartPole-v1 |" in text and "3 × 2" in text and text.endswith("outro\n")
    assert results.main(["--results", str(out), "--pages", str(readme), "--check"]) == 0


def test_the_committed_pages_say_what_the_committed_result_files_say(monkeypatch):
    """README.md, docs/control.md and docs/locomotion.md: every generated table is what `python -m eval.results`
    makes of docs/results/ and docs/bench/ now, so no figure there can drift from the file behind it."""
    monkeypatch.chdir(ROOT)
    assert results.main(["--check"]) == 0


def test_the_readme_headline_reads_each_figure_and_verdict_from_its_file(tmp_path):
    from eval.headline import EPISODES_COUNTED, HEADLINE_END, HEADLINE_START, Bench, Gap, Iqm, Row, Sweep, headline

    def write(name: str, scores: list[list[float]], **extra) -> None:
        iqm = {"iqm": float(np.mean(scores)), "iqm_ci95": [0.0, 1.0], "checkpoints": len(scores),
               "tasks": ["A-v0", "B-v0"][: len(scores[0])], "matrix": scores}
        entries = [{"task": t, "episodes": 40, "checkpoints": 2} for t in iqm["tasks"]]
        (tmp_path / f"{name}.json").write_text(json.dumps({"iqm": iqm, "results": entries, **extra}))

    write("dt", [[0.9, 0.7], [0.8, 0.6]], episodes_counted=EPISODES_COUNTED)
    write("bc", [[0.6, 0.6], [0.6, 0.6]])  # a file from before the counting fix
    sweep = [{"task": t, "target_return": x, "mean_return": 0.0} for t in ("A-v0", "B-v0") for x in (1, 2, 3)]
    write("sweep", [[0.5, 0.5], [0.5, 0.5]], dt_sweep=sweep, episodes_per_checkpoint=20,
          dt_sweep_spearman={"A-v0": 1.0, "B-v0": 0.5})
    (tmp_path / "bench.log").write_text("x=1\nthing_speedup=12.5x (target >= 10)\n")
    rows = [Row("dt", Iqm("dt", 0.9), "≥ 0.9"), Row("gap", Gap("dt", "bc", 0.2), "≥ +0.2"),
            Row("sweep", Sweep("sweep", tasks_needed=1), "1 task"),
            Row("speed", Bench("bench.log", r"thing_speedup=([\d.]+)x", "×", at_least=10), "≥ 10×")]
    page = tmp_path / "README.md"
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in
             headline(tmp_path, tmp_path, page, rows).splitlines() if line.startswith("| ")}
    assert lines["dt"][0] == "IQM **0.75 [0.00, 1.00]**" and lines["dt"][1] == "20 episodes × 2 seeds × 2 tasks"
    assert lines["dt"][3] == "**no**"  # 0.75 < 0.9
    assert lines["gap"][0].startswith("**+0.15**") and lines["gap"][3] == "**no**"  # 0.75 - 0.6 < 0.2
    assert lines["gap"][1] == "20 episodes × 2 seeds × 2 tasks (counted first-to-finish)"  # bc's count is said
    assert lines["sweep"][0].startswith("ρ ≥ 0.8 on **1 of 2** tasks (A 1.0, B 0.5)") and lines["sweep"][3] == "yes"
    assert lines["speed"][0] == "**12.5×**" and lines["speed"][3] == "yes"
    assert lines["speed"][4] == "[bench](bench.log) |"
    page.write_text(f"intro\n{HEADLINE_START}\nstale\n{HEADLINE_END}\n")
    (tmp_path / "bench.log").write_text("thing_speedup=9.0x\n")  # a slower run: the verdict flips
    assert "| **no** |" in headline(tmp_path, tmp_path, page, rows[3:])


def test_a_file_from_before_the_count_field_stands_only_where_the_count_could_not_differ():
    """Before ``episodes_counted`` existed eval.control kept the first N episodes to finish: the same episodes as
    now only where every env's first episode ended at the same step (one env per episode, equal lengths)."""
    from eval.headline import EPISODES_COUNTED, counted_by_share

    def old(lengths: list[int], command: str = "python -m eval.control --model m --episodes 2") -> dict:
        return {"command": command, "per_checkpoint": [[{"task": "t", "lengths": lengths}]]}

    assert counted_by_share(old([200, 200]))  # Pendulum: every episode 200 steps
    assert not counted_by_share(old([30, 200]))  # the 30-step env could end twice before the 200-step one
    assert not counted_by_share(old([200, 200], "python -m eval.control --model m --episodes 2 --num_envs 1"))
    assert not counted_by_share({"command": "python -m eval.control"})  # nothing to tell from
    assert counted_by_share({"episodes_counted": EPISODES_COUNTED, **old([30, 200])})


def test_results_run_task_by_task_pool_into_one_file(tok, tmp_path):
    """eval.pool: files of the same checkpoints, one task each (TT is run task by task), give one table and the
    IQM over every task; so do files of one checkpoint each on the same task (seeds run apart); files of other
    checkpoints on other tasks, or a task twice, are refused."""
    from eval.pool import main as pool

    spec = TaskSpec.from_env(gym.make("CartPole-v1"), expert_return=500.0, random_return=20.0)
    models = two_checkpoints(tok, tmp_path, spec)
    out = tmp_path / "results"
    main(["--model", *models, "--mode", "dt", "--tasks", "CartPole-v1", "--episodes", "2", "--out", str(out),
          "--name", "control_a"])
    other = json.loads((out / "control_a.json").read_text())  # the same checkpoints on a second task
    for run in other["per_checkpoint"]:
        run[0].update(task="Other-v0", normalized_score=run[0]["normalized_score"] + 0.5)
    other["results"][0]["task"] = "Other-v0"
    other["references"] = {"Other-v0": other["references"]["CartPole-v1"]}
    other["command"] = "python -m eval.control --tasks Other-v0"
    (out / "control_b.json").write_text(json.dumps(other))
    files = [str(out / "control_a.json"), str(out / "control_b.json")]
    pooled = pool(["--files", *files, "--name", "control_ab", "--out", str(out)])
    assert [r["task"] for r in pooled["results"]] == ["CartPole-v1", "Other-v0"]
    both = aggregate(pooled["per_checkpoint"], ["CartPole-v1", "Other-v0"])
    assert pooled["iqm"]["iqm"] == both["iqm"] and pooled["iqm"]["matrix"] == both["matrix"]
    assert [row[1] - row[0] for row in both["matrix"]] == pytest.approx([0.5, 0.5])  # (checkpoints, tasks)
    assert pooled["pooled_from"][1] == "python -m eval.control --tasks Other-v0"
    with pytest.raises(SystemExit, match="more than one file"):
        pool(["--files", files[0], files[0], "--name", "x", "--out", str(out)])
    other["models"] = other["models"][::-1]
    (out / "control_b.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="models"):
        pool(["--files", *files, "--name", "x", "--out", str(out)])
    # seed by seed: one file per checkpoint, the same task -> the two checkpoints' table, as if run together
    whole = json.loads((out / "control_a.json").read_text())
    seeds = write_seed_by_seed(out / "control_a.json")
    by_seed = pool(["--files", *seeds, "--name", "control_seeds", "--out", str(out)])
    assert by_seed["models"] == whole["models"] and by_seed["iqm"]["matrix"] == whole["iqm"]["matrix"]
    assert by_seed["results"][0]["episodes"] == whole["results"][0]["episodes"] == 4
    with pytest.raises(SystemExit, match="more than one file"):  # the same checkpoint twice is not two seeds
        pool(["--files", seeds[0], seeds[0], "--name", "x", "--out", str(out)])
    page = results.render(out, tmp_path / "README.md")  # the parts are shown as their pooled tables only
    assert re.findall(r"#### `(\w+)`", page) == ["control_ab", "control_seeds"]


def test_locomotion_results_fill_the_summary_beside_the_published_scores(tok, tmp_path):
    from eval.pool import main as pool

    pytest.importorskip("mujoco")
    spec = TaskSpec.from_env(gym.make("Hopper-v5"), expert_return=3241.0, random_return=-18.0)
    models = two_checkpoints(tok, tmp_path, spec)
    out = tmp_path / "results"
    for mode, name in ((["gato"], "gato"), (["dt", "--target_return", "500"], "dt_target500"),
                       (["dt", "--expert_returns"], "dt_mgdt"),
                       (["tt", "--beam_width", "2", "--horizon", "2", "--dtype", "bfloat16", "--cdf_density", "False"],
                        "tt_bf16")):
        main(["--model", *models, "--mode", *mode, "--tasks", "Hopper-v5", "--episodes", "2", "--out", str(out),
              "--name", f"locomotion_hopper_medium_replay_{name}"])
    # an earlier checkpoint of one run beside the other's final model, on other env seeds than the table's
    earlier = tmp_path / "run" / "checkpoints" / "step_00000300"
    shutil.copytree(models[0], earlier)
    main(["--model", str(earlier), models[1], "--mode", "gato", "--tasks", "Hopper-v5", "--episodes", "2", "--seed",
          "5000", "--out", str(out), "--name", "locomotion_hopper_medium_replay_gato_chosen"])
    longer = out / "locomotion_hopper_medium_replay_gato_4000steps.json"  # the same models trained longer, say
    longer.write_text((out / "locomotion_hopper_medium_replay_gato.json").read_text())
    windows = out / "locomotion_hopper_medium_replay_dtwin1_gato.json"  # models trained with --dt_window_steps 1
    windows.write_text((out / "locomotion_hopper_medium_replay_gato.json").read_text())
    # TT run seed by seed: its parts are left out of the summary, the pooled file is the cell, with the parts' flags
    parts = write_seed_by_seed(out / "locomotion_hopper_medium_replay_tt_bf16.json")
    pool(["--files", *parts, "--name", "locomotion_hopper_medium_replay_tt_pooled", "--out", str(out)])
    readme = tmp_path / "README.md"
    readme.write_text(f"{results.START}\n{results.END}\n{results.LOCO_START}\nstale\n{results.LOCO_END}\n")
    results.main(["--results", str(out), "--pages", str(readme)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in readme.read_text().splitlines()
            if line.startswith("| ") and "-medium" in line}
    assert len(rows) == 9 and "stale" not in readme.read_text() and "1 of 9 datasets measured" in readme.read_text()
    gato = json.loads((out / "locomotion_hopper_medium_replay_gato.json").read_text())["results"][0]
    imitation, dt_expert, dt_target, mgdt, tt, published = rows["hopper-medium-replay"]
    assert imitation.startswith(f"{gato['d4rl_score']:.1f} ± ") and "(2 × 2)" in imitation
    assert imitation.count("(2 × 2)") == 4 and "4,000 training steps (2 × 2)" in imitation  # named by its file
    assert "checkpoints step 300 / final, env seeds from 5000 (2 × 2)" in imitation  # named by its command
    assert "DT trained on 1-step windows (2 × 2)" in imitation
    assert dt_expert == "–" and "target 500" in dt_target and "(2 × 2)" in mgdt
    # a planner and weights other than the defaults are named
    assert tt.count("beam 2, horizon 2, bfloat16, cdf by bin probability (2 × 2)") == 2 and "(2 × 1)" not in tt
    assert published.rstrip(" |") == "18.1 / 82.7 / 91.5" and rows["hopper-medium"][0] == "–"


def test_dt_sweep_rank_correlation_averages_the_checkpoints_per_target():
    from eval.control import sweep_spearman

    follows = [{"task": "a", "target_return": t, "mean_return": t + noise}
               for t in (0.0, 1.0, 2.0) for noise in (-0.4, 0.4)]  # two checkpoints per target
    ignores = [{"task": "b", "target_return": t, "mean_return": r}
               for t, r in ((0.0, 5.0), (1.0, 4.0), (2.0, 3.0))]
    rho = sweep_spearman(follows + ignores, ["a", "b"])
    assert rho["a"] == pytest.approx(1.0) and rho["b"] == pytest.approx(-1.0)


def test_video_records_one_rendered_episode_per_task_and_the_report_embeds_it(tok, tmp_path):
    from PIL import Image

    from eval.report import control_section

    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    local = with_task_spec(tok, TaskSpec.from_env(gym.make("CartPole-v1"), expert_return=500.0,
                                                  random_return=20.0))
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    local.save_pretrained(run / "model")
    summary = main(["--model", str(run / "model"), "--mode", "gato", "--tasks", "CartPole-v1", "--episodes", "2",
                    "--video", "--out", str(run / "eval")])
    (record,) = summary["per_checkpoint"][0]
    gif = run / "eval" / record["video"][0]
    assert gif.name == "control_gato_CartPole-v1.gif" and gif.parent.name == "videos"
    with Image.open(gif) as im:  # the whole episode, one frame per step plus the first
        assert im.n_frames >= 2 and im.size == (600, 400)
    assert "![control_gato_CartPole-v1](eval/videos/control_gato_CartPole-v1.gif)" in control_section(
        run, tmp_path / "figures", rollout=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "eval" / "tensorboard")).Reload()
    (shown,) = events.Images("videos/control_gato_CartPole-v1")  # TensorBoard gets the same GIF
    assert shown.encoded_image_string == gif.read_bytes() and (shown.width, shown.height) == (600, 400)


class Checkpoints(gym.Env):
    """Episodes of 3 steps; ``info["success"]`` (as Meta-World reports it) on the 2nd step of every other episode."""

    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self):
        self.t, self.episode = 0, -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(2, np.float32), 0.0, False, self.t >= 3, {"success": self.t == 2 and self.episode % 2 == 0}


def test_success_is_what_the_env_reports_and_is_kept_across_the_vector_envs_autoreset(tok):
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    envs = gym.vector.SyncVectorEnv([lambda: ErrorAsTermination(Checkpoints())],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    spec = TaskSpec.from_env(envs, name="checkpoints")
    tok.add_task_spec(spec)
    episodes = rollout(Agent(model, tok, "gato"), envs, spec, episodes=4, seed=0)
    assert [e["success"] for e in episodes] == [True, False, True, False]  # success mid-episode counts
    flaky = gym.vector.SyncVectorEnv([lambda: ErrorAsTermination(Flaky(False))])
    assert rollout(Agent(model, tok, "gato"), flaky, TaskSpec.from_env(flaky, name="flaky"), 1, 0)[0]["success"] is None


def test_babyai_success_is_reaching_the_goal_and_the_mission_is_kept():
    from minigrid.utils.baby_ai_bot import BabyAIBot

    from datasets_build.control import make_task_env

    env = ErrorAsTermination(make_task_env("BabyAI-GoToRedBallGrey-v0"))
    obs, _ = env.reset(seed=1)
    bot, terminated, truncated, total = BabyAIBot(env.unwrapped), False, False, 0.0
    while not (terminated or truncated):
        _, reward, terminated, truncated, _ = env.step(bot.replan())
        total += reward
    assert total > 0 and env.outcome() == (None, True)
    assert env.mission == obs["mission"] == "go to the red ball"  # the ended episode's, for per-mission tallies
    assert env.carrying is None
    pickup = ErrorAsTermination(make_task_env("BabyAI-PickupLoc-v0"))  # what the agent ends up holding
    obs, _ = pickup.reset(seed=3)
    bot, terminated, truncated = BabyAIBot(pickup.unwrapped), False, False
    while not (terminated or truncated):
        _, _, terminated, truncated, _ = pickup.step(bot.replan())
    assert pickup.outcome() == (None, True) and pickup.carrying.split()[1] in obs["mission"], (pickup.carrying, obs)
    env.reset(seed=1)
    truncated = False
    while not truncated:  # turning in place never reaches the ball
        _, _, terminated, truncated, _ = env.step(0)
        assert not terminated
    assert env.outcome() == (None, False)


def test_a_babyai_video_env_renders_with_the_datas_observation_wrappers():
    """The report's rollout of a BabyAI model plays in an env made again with render_mode: it must keep the
    compact grid the model was trained on (it once got minigrid's raw (7, 7, 3) grid and the report failed)."""
    from eval.control import make_render_env

    env = make_render_env("BabyAI-GoToLocal-v0")
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (7, 7) and env.render().ndim == 3


def test_a_swapped_mission_fails_a_policy_that_reads_it_and_not_one_that_does_not():
    """``--swap_mission``: the agent is shown a mission naming a decoy while the env rewards its own target.
    BabyAIBot told to go where the *shown* mission says succeeds on the true mission, fails on the swapped
    one and meets the decoy first only when it is shown; a mission-blind policy scores the same on both and
    meets the decoy first about as often shown or not."""
    from minigrid.core.constants import COLOR_NAMES
    from minigrid.envs.babyai.core.verifier import ObjDesc
    from minigrid.utils.baby_ai_bot import BabyAIBot, GoNextToSubgoal

    from eval.control import MissionDecoy, make_envs

    def reader(env: gym.Env, mission: str) -> BabyAIBot:  # goes next to what the mission it was shown names
        colour, kind = mission.split()[-2:]
        assert mission.startswith("go to ") and colour in COLOR_NAMES, mission
        desc = ObjDesc(kind, colour)
        desc.find_matching_objs(env.unwrapped)
        bot = BabyAIBot(env)
        bot.stack = [GoNextToSubgoal(bot, desc)]
        return bot

    def play(swap: bool, policy: str, episodes: int = 16) -> tuple[float, float]:
        """(success rate, share of the episodes meeting decoy or target that met the decoy first)"""
        envs = make_envs("BabyAI-GoToLocal-v0", 8, swap_mission=swap)
        obs, _ = envs.reset(seed=0)
        bots = [reader(e, m) for e, m in zip(envs.envs, obs["mission"], strict=True)]
        rng, outcomes, decoy_first = np.random.default_rng(0), [], []
        while len(outcomes) < episodes:
            actions = ([int(b.replan()) for b in bots] if policy == "reader"
                       else rng.integers(0, 3, size=8))  # blind: left, right, forward at random
            obs, _, terminated, truncated, _ = envs.step(np.asarray(actions))
            for i in np.flatnonzero(terminated | truncated):
                outcomes.append(envs.envs[i].outcome()[1])
                assert (envs.envs[i].shown_mission is not None) == swap  # recorded when it differs
                if envs.envs[i].decoy_first is not None:
                    decoy_first.append(envs.envs[i].decoy_first)
                bots[i] = reader(envs.envs[i], obs["mission"][i])
        return float(np.mean(outcomes[:episodes])), float(np.mean(decoy_first))

    (true_success, true_decoy), (swapped_success, swapped_decoy) = play(False, "reader"), play(True, "reader")
    assert true_success >= 0.9 and swapped_success <= 0.2
    assert true_decoy <= 0.3 and swapped_decoy >= 0.7  # (on its way it may face the target: success)
    (true_success, true_decoy), (swapped_success, swapped_decoy) = play(False, "blind"), play(True, "blind")
    assert abs(true_success - swapped_success) <= 0.3 and abs(true_decoy - swapped_decoy) <= 0.3
    with pytest.raises(ValueError, match="--swap_mission needs a BabyAI level"):
        MissionDecoy(gym.make("CartPole-v1"))
    envs = make_envs("BabyAI-GoToLocal-v0", 8, swap_mission=True)  # worded as BabyAI would: "a" if several match
    for seed in range(3):
        obs, _ = envs.reset(seed=seed)
        for env, mission in zip(envs.envs, obs["mission"], strict=True):
            decoy = env.get_wrapper_attr("decoy")  # (colour, type)
            matches = sum(o is not None and (o.color, o.type) == decoy for o in env.unwrapped.grid.grid)
            assert mission == f"go to {'a' if matches > 1 else 'the'} {' '.join(decoy)}"
    blank = make_envs("BabyAI-GoToLocal-v0", 2, blank_mission=True)  # --blank_mission: the verb, no object
    obs, _ = blank.reset(seed=0)
    assert list(obs["mission"]) == ["go to the object"] * 2


def test_the_score_curve_plays_every_checkpoint_and_scores_locomotion_on_d4rls_scale(tok, tmp_path):
    from eval.score_curve import main as curve_main
    from generalist.task_spec import d4rl_normalized_scores

    local = with_task_spec(tok, TaskSpec.from_env(gym.make("Hopper-v5"), expert_return=3000.0,
                                                  random_return=20.0))
    run = tmp_path / "run"
    for step in (4, 8):  # two checkpoints, as train.py writes them
        torch.manual_seed(step)
        folder = run / "checkpoints" / f"step_{step:08d}"
        GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(),
                                               text_config=TINY_LLAMA)).save_pretrained(folder)
        local.save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "tokens_seen": 256 * step}))
    record = curve_main(["--runs", str(run), "--mode", "gato", "--episodes", "2", "--out", str(tmp_path / "out"),
                         "--name", "hop", "--tasks", "Hopper-v5"])
    points = record["runs"][str(run)]
    assert [p["tokens"] for p in points] == [1024, 2048] and Path(record["plot"]).exists()
    played = json.loads((tmp_path / "out" / "curves" / "hop_run.json").read_text())["per_checkpoint"]
    for point, (rec,) in zip(points, played, strict=True):
        assert point["d4rl_score"] == pytest.approx(d4rl_normalized_scores("Hopper-v5", rec["returns"]).mean())
        assert point["normalized_score"] == pytest.approx((np.mean(rec["returns"]) - 20.0) / 2980.0)


def test_a_flat_score_curve_is_drawn_flat():
    """Autoscaling a curve that moves 0.03 D4RL points (halfcheetah-medium-replay's imitation, which stands still
    at every checkpoint) would stretch it over the whole axis and look like learning: the axis spans 10 points."""
    from eval.score_curve import Args, _plot

    curves = {"runs/a": [{"tokens": 1e6 * i, "d4rl_score": 2.22 + 0.01 * (i % 2)} for i in range(1, 6)]}
    low, high = _plot(curves, Args(runs=[Path("runs/a")], name="flat")).axes[0].get_ylim()
    assert high - low >= 10.0 and low <= 2.22 and high >= 2.23
    steep = {"runs/a": [{"tokens": 1e6 * i, "d4rl_score": 20.0 * i} for i in range(1, 6)]}
    low, high = _plot(steep, Args(runs=[Path("runs/a")], name="steep")).axes[0].get_ylim()
    assert low <= 20.0 and high >= 100.0 and high - low < 100.0  # a real curve keeps matplotlib's own limits
