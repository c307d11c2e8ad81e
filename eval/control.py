"""Vectorised rollouts of one or more checkpoints (training seeds) in real gymnasium environments.

    python -m eval.control --model runs/control-s0/model runs/control-s1/model --mode gato \\
        --demos data/control-core data/control-pixels
    python -m eval.control --model RUN --tasks CartPole-v1 Pendulum-v1 --mode dt --episodes 20
    python -m eval.control --model RUN --tasks Pendulum-v1 --mode dt --sweep 5     # return-conditioning sweep
    python -m eval.control --model RUN --mode tt --tasks CartPole-v1 Pendulum-v1

Each checkpoint plays ``--episodes`` episodes per task (default 20, all batched). Scores are
expert-normalised, ``(R − R_random) / (R_expert − R_random)``, with the task spec's references (the
dataset's measured expert and random returns); the JSON records them next to the environment's own
``reward_threshold`` where gymnasium has one, so a weak "expert" cannot hide. Across tasks the
interquartile mean (IQM) with a stratified-bootstrap 95 % CI comes from ``rliable`` (Agarwal et al.
2021) over the (checkpoints × tasks) matrix of mean scores, and a performance-profile plot is drawn.

Gato mode is prompted as in training (:func:`generalist.packing.demonstration`): for each task and
checkpoint, one episode of the *expert* source of that task in ``--demos`` (pixel tasks from their own
dataset), cut to the model's trained ``prompt_length``, half the time its end, half a uniform window.
Without ``--demos`` Gato mode plays unprompted. With ``--mode dt --sweep K`` the agent is also
conditioned on K targets from the random to the expert return; the Spearman ρ between target and
achieved return is recorded and plotted (``<name>_dt_sweep.png``).

Results go to ``OUT/control_<mode>.json``: ``{"results": [per task, pooled over checkpoints],
"per_checkpoint": [...], "iqm": {...}, "references": {...}, "dt_sweep": [...], "command": ...}``.
An environment that raises during a rollout ends that episode with a recorded error; the others go on.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from eval.headline import EPISODES_COUNTED
from eval.plots import plot_dt_sweep
from eval.results import MISSION_CHANGES
from generalist import GeneralistForCausalLM, GeneralistTokenizer, TaskSpec
from generalist.agent import Agent
from generalist.modes import TT_PRESETS, TTConfig, demonstration_prompt, tt_preset
from generalist.task_spec import D4RL_REFERENCE_RETURNS, d4rl_family, d4rl_normalized_scores
from generalist.training.settings import parse


def _is_minigrid(env: gym.Env) -> bool:
    return any(c.__name__ == "MiniGridEnv" for c in type(env.unwrapped).__mro__)


class ErrorAsTermination(gym.Wrapper):
    """Turns an exception in ``step`` into the end of the episode, remembering the error; also remembers
    whether the episode succeeded, where the env says what success is (``success`` is None otherwise):
    Meta-World's ``info["success"]``, and MiniGrid/BabyAI's reward, which is paid only on success.
    A vector env may reset an env in the step that ends its episode, so both are read (and cleared) by
    :meth:`outcome`, not by ``reset``. For the same reason a MiniGrid episode's mission and what the agent
    held are frozen into ``mission`` / ``carrying`` in the step that ends it (to tell which instructions
    fail), and stay until the next episode ends."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._minigrid = _is_minigrid(env)
        self.error: str | None = None
        self.success: bool | None = False if self._minigrid else None
        self._last_obs = None
        self._mission: str | None = None  # of the episode running
        self.mission: str | None = None  # of the episode that ended (the env's own, which rewards)
        self.shown_mission: str | None = None  # ... and the one the agent saw, where they differ (MissionDecoy)
        self.decoy_first: bool | None = None  # the agent faced MissionDecoy's decoy before a target (BabyAI)
        self.carrying: str | None = None  # what a MiniGrid agent held when it ended ("red key"), else None

    def outcome(self) -> tuple[str | None, bool | None]:
        """(error, success) of the episode that just ended; the next one starts clean."""
        out = self.error, self.success
        self.error, self.success = None, False if self._minigrid else None
        return out

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._last_obs = obs
        self._mission = obs.get("mission") if isinstance(obs, dict) else None
        return obs, info

    def step(self, action):
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as e:  # noqa: BLE001 - any env failure ends only this episode
            self.error = f"{type(e).__name__}: {e}"
            return self._last_obs, 0.0, True, False, {}
        self._last_obs = obs
        if "success" in info:
            self.success = bool(self.success) or bool(info["success"])
        elif self._minigrid:
            self.success = self.success or (bool(terminated) and reward > 0)
        if terminated or truncated:
            self.mission = getattr(self.env.unwrapped, "mission", None) if self._minigrid else self._mission
            self.shown_mission = self._mission if self._mission != self.mission else None
            held = getattr(self.env.unwrapped, "carrying", None) if self._minigrid else None
            self.carrying = None if held is None else f"{held.color} {held.type}"
            self.decoy_first = getattr(self.env, "decoy_first", None)
        return obs, reward, terminated, truncated, info


class MissionDecoy(gym.Wrapper):
    """BabyAI with a *decoy* per episode: another object of the target's kind (a door for a door) whose
    colour and type no target has (``datasets_build.control.other_object``).

    With ``show`` (``--swap_mission``) the agent is shown "<verb> the/a <colour> <type>" of the decoy while
    the env still rewards its own target: a policy that follows its mission heads for the wrong object.
    Success alone cannot tell: a GoTo level ends whenever the agent faces its target, and a search through
    a dense room finds it by the time limit (docs/control.md, BabyAI). So either way ``decoy_first`` records whether
    the agent faced a decoy-like object before any target (None: it faced neither, or the room has no
    decoy). Unshown, that is how often a policy meets the decoy first by chance; shown, a policy that
    follows its mission meets it first (a bot sent to it: 0.0 -> 0.8 in the test). The difference, and the
    episodes' lengths, measure grounding where success rates cannot. An episode without a decoy keeps its mission
    (``ErrorAsTermination.shown_mission`` tells).
    """

    def __init__(self, env: gym.Env, seed: int = 0, show: bool = True, blank: bool = False):
        super().__init__(env)
        if not _is_minigrid(env):
            raise ValueError(f"--swap_mission needs a BabyAI level; {env.spec.id if env.spec else env} is not one")
        self._rng = np.random.default_rng(seed)
        self.show, self.blank = show, blank
        self.decoy: tuple[str, str] | None = None  # (colour, type)
        self.decoy_first: bool | None = None

    def reset(self, **kwargs):
        from datasets_build.control import MISSION_VERBS, instruction_for, other_object

        obs, info = self.env.reset(**kwargs)
        level = self.env.unwrapped
        try:
            other = other_object(level, self._rng)
        except ValueError as e:
            if self.show or self.blank:
                raise ValueError(f"--swap_mission / --blank_mission {e}") from None
            other = None  # an instruction naming several objects: no decoy
        self.decoy = None if other is None else (other.color, other.type)
        self.decoy_first = None
        verb = MISSION_VERBS.get(type(level.instrs).__name__)
        if self.blank:  # the mission without the object it names
            obs = {**obs, "mission": f"{verb} the object"}
        elif other is not None and self.show:  # worded as BabyAI words a mission: "a" when several match
            obs = {**obs, "mission": instruction_for(level, other).surface(level)}
        self._shown = obs["mission"]
        self._meet()
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._meet()
        return {**obs, "mission": self._shown}, reward, terminated, truncated, info

    def _meet(self) -> None:
        """Note which the agent faces first: the decoy or a target."""
        if self.decoy is None or self.decoy_first is not None:
            return
        level = self.env.unwrapped
        front = level.grid.get(*level.front_pos)
        if front is None:
            return
        if (front.color, front.type) == self.decoy:
            self.decoy_first = True
        elif any(front is target for target in level.instrs.desc.obj_set):
            self.decoy_first = False


def make_env(task: str, spec: TaskSpec | None = None, render_mode: str | None = None) -> gym.Env:
    """The env of a task: an imported Minari dataset's is recovered through minari (its task is named by
    the dataset id, which gymnasium does not know); datasets_build's catalogue knows the pixel, BabyAI
    and Meta-World variants the data was collected in; without it, any registered gymnasium id."""
    try:
        from datasets_build.control import make_task_env
        from datasets_build.offline import MINARI_DATASET_ID, recover_minari_env
    except ImportError:
        return gym.make(task, render_mode=render_mode)
    if spec is not None and MINARI_DATASET_ID in spec.extra:
        return recover_minari_env(spec.extra[MINARI_DATASET_ID])
    return make_task_env(task, render_mode)


def make_render_env(task: str, spec: TaskSpec | None = None) -> gym.Env | None:
    """One env of ``task`` that renders ``rgb_array`` frames, or None if this machine cannot make it
    (pixel tasks wrap a rendering env already; plain gymnasium ids are made with ``render_mode``)."""
    try:
        env = make_env(task, spec)
        if env.render_mode != "rgb_array":  # made again rendering, with the same wrappers (BabyAI's grid)
            env.close()
            env = make_env(task, spec, render_mode="rgb_array")
    except (gym.error.Error, ImportError, TypeError):
        return None
    try:  # MuJoCo renders through OpenGL, which a headless machine may lack (MUJOCO_GL=egl / osmesa)
        env.reset(seed=0)
        env.render()
    except Exception as e:  # noqa: BLE001 - mujoco.FatalError and GL errors share no base class
        print(f"WARNING: no video of {task}: rendering failed ({type(e).__name__}: {e})")
        env.close()
        return None
    return env


def play_rendered(agent: Agent, env: gym.Env, spec: TaskSpec, seed: int, max_steps: int, prompt=None,
                  target_return: float | None = None) -> tuple[list[np.ndarray], float, int]:
    """One episode of ``agent`` in a rendering env -> (frames (H, W, 3) uint8, return, steps); closes ``env``."""
    agent.reset(spec, num_envs=None, prompt=prompt, target_return=target_return)
    obs, _ = env.reset(seed=seed)
    frames, total, steps, done = [env.render()], 0.0, 0, False
    while not done and steps < max_steps:
        obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
        agent.observe(reward, terminated, truncated)
        total, steps, done = total + float(reward), steps + 1, terminated or truncated
        frames.append(env.render())
    env.close()
    return frames, total, steps


def save_video(frames: Sequence[np.ndarray], path: Path, fps: int = 30) -> list[Path]:
    """``path``.gif (Pillow, always) and ``path``.mp4 when imageio has an ffmpeg plugin; returns what was written."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.asarray(f)[..., :3]) for f in frames]
    gif = path.with_suffix(".gif")
    images[0].save(gif, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    written = [gif]
    try:  # MP4 needs imageio's ffmpeg plugin (pip install imageio[ffmpeg]); without it the GIF is the video
        import imageio.v3 as iio
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return written
    iio.imwrite(path.with_suffix(".mp4"), np.stack([np.asarray(im) for im in images]), fps=fps)
    return [*written, path.with_suffix(".mp4")]


def video_to_tensorboard(logdir: Path, tag: str, gif: Path, frame: np.ndarray) -> None:
    """The GIF as an animated image in TensorBoard's Images tab, beside the training scalars when ``logdir``
    is under the run folder. ``SummaryWriter.add_video`` would need moviepy to encode; the GIF exists."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    height, width = np.asarray(frame).shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif.read_bytes())
    with SummaryWriter(str(logdir)) as writer:
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), 0)


def make_envs(task: str, num_envs: int, spec: TaskSpec | None = None,
              swap_mission: bool = False, blank_mission: bool = False) -> gym.vector.SyncVectorEnv:
    def make(i: int) -> gym.Env:
        env = make_env(task, spec)
        if swap_mission or blank_mission or _is_minigrid(env):  # BabyAI always has a decoy (met first unshown?)
            env = MissionDecoy(env, seed=i, show=swap_mission, blank=blank_mission)
        return ErrorAsTermination(env)

    return gym.vector.SyncVectorEnv([functools.partial(make, i) for i in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def rollout(agent: Agent, envs: gym.vector.SyncVectorEnv, spec: TaskSpec, episodes: int, seed: int,
            prompt=None, target_return: float | None = None, max_steps: int = 100_000,
            record: bool = False) -> list[dict[str, Any]]:
    """Run until ``episodes`` episodes have finished; one record per episode (return, length, error).

    Each env plays a fixed share of the episodes (env ``i``: ``(episodes + i) // n``, stable-baselines3's
    ``evaluate_policy`` split), and what an env plays after its share is not recorded: counting the first
    ``episodes`` to finish instead would favour short episodes, since an env whose episode ended early restarts
    and can finish again before a long one does (on locomotion short means fallen, so scores came out low; on
    MountainCar or Acrobot short means solved). An env that has played its share is retired from the agent's
    batch (:meth:`Agent.retire`), so the longest episode costs one env's decisions, not every env's. With
    ``record`` each record also holds the episode's observations, actions and rewards.
    """
    n = envs.num_envs
    share = np.array([(episodes + i) // n for i in range(n)])  # (n,) episodes each env plays
    played = np.zeros(n, int)
    agent.reset(spec, num_envs=n, prompt=prompt, target_return=target_return)
    agent.retire(np.flatnonzero(share == 0))  # more envs than episodes
    obs, _ = envs.reset(seed=seed)
    returns, lengths = np.zeros(n), np.zeros(n, int)
    traces: list[dict[str, list]] = [{"obs": [], "act": [], "rew": []} for _ in range(n)]
    done_eps: list[dict[str, Any]] = []
    # a TT episode can take minutes: the bar counts finished episodes and shows the env step reached. miniters=0:
    # tqdm's default (dynamic miniters) stops redrawing on update(0) once an episode has finished, so the step shown
    # froze there and a long run looked hung
    bar = tqdm(total=episodes, desc=f"{spec.name} [{agent.mode.name}]", unit="episode", leave=False, miniters=0)
    for step in range(max_steps):
        bar.set_postfix_str(f"step {step}", refresh=False)
        bar.update(0)  # redraws at most every 0.1 s
        actions = agent.act(obs)
        if record:
            flat_obs, flat_act = spec.flatten_observation(obs), spec.flatten_action(actions)
            for i in range(n):
                traces[i]["obs"].append({k: np.asarray(v[i]) for k, v in flat_obs.items()})
                traces[i]["act"].append({k: np.asarray(v[i]) for k, v in flat_act.items()})
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        agent.observe(rewards, terminated, truncated)
        returns += rewards
        lengths += 1
        if record:
            for i in range(n):
                traces[i]["rew"].append(float(rewards[i]))
        finished = []  # envs that have just played their share
        for i in np.flatnonzero(terminated | truncated):
            if played[i] < share[i]:  # past its share an env only steps (the vector env steps all), unrecorded
                played[i] += 1
                if played[i] == share[i]:
                    finished.append(i)
                error, success = envs.envs[i].outcome()
                episode = {"return": float(returns[i]), "length": int(lengths[i]), "error": error, "success": success,
                           "mission": envs.envs[i].mission, "shown_mission": envs.envs[i].shown_mission,
                           "carrying": envs.envs[i].carrying, "decoy_first": envs.envs[i].decoy_first,
                           "terminated": bool(terminated[i])}
                if record:
                    episode["trace"] = traces[i]
                done_eps.append(episode)
                bar.update(1)
            returns[i], lengths[i] = 0.0, 0
            traces[i] = {"obs": [], "act": [], "rew": []}
        if (played >= share).all():
            break
        agent.retire(finished)  # nothing more is decided for them
    bar.close()
    return done_eps


def normalised(spec: TaskSpec, returns: Sequence[float]) -> list[float] | None:
    scores = spec.normalized_returns(returns)
    return None if scores is None else scores.tolist()


def mean_stderr(x: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


@functools.cache
def load_demos(path: str) -> tuple[Any, dict[str, TaskSpec]]:
    from datasets_build import load_episodes  # lazy: eval.control works without it

    return load_episodes(path)


def expert_episodes(demos: Sequence[str], spec: TaskSpec) -> list[dict]:
    """The task's episodes of the ``expert`` source in the first dataset that has the task (else those
    scoring >= 0.8 expert-normalised: the episodes Gato-mode training shows)."""
    from datasets_build import iter_episodes

    for path in demos:
        ds, specs = load_demos(path)
        if spec.name not in specs:
            continue
        rows = [i for i, t in enumerate(ds["task"]) if t == spec.name]
        sources = np.asarray(ds["source"])[rows]
        pick = [r for r, s in zip(rows, sources, strict=True) if s == "expert"]
        if not pick:
            returns = np.asarray(ds["episode_return"], np.float64)[rows]
            pick = [r for r, score in zip(rows, normalised(spec, returns) or [], strict=False) if score >= 0.8]
        if pick:
            return list(iter_episodes(ds.select(pick), specs))
    return []


def gato_prompt(args, tok: GeneralistTokenizer, model: GeneralistForCausalLM, spec: TaskSpec,
                seed: int) -> tuple[dict | None, str | None]:
    """A prompt drawn as in training from an expert episode of the task, or ``(None, None)``."""
    if not args.demos:
        return None, None
    episodes = expert_episodes(args.demos, spec)
    if not episodes:
        print(f"WARNING: no expert episode of {spec.name} in {args.demos}; Gato mode plays it unprompted")
        return None, None
    rng = np.random.default_rng([seed, 7])
    episode = episodes[int(rng.integers(len(episodes)))]
    prompt = demonstration_prompt(tok, episode, model.config.prompt_length, rng)
    return prompt, f"expert episode (return {float(np.sum(episode['rewards'])):.1f}), {len(prompt['input_ids'])} tokens"


def sweep_spearman(sweep: Sequence[dict], tasks: Sequence[str]) -> dict[str, float]:
    """Per task, Spearman ρ between the DT target and the achieved return averaged over checkpoints."""
    out = {}
    for t in tasks:
        targets = sorted({s["target_return"] for s in sweep if s["task"] == t})
        achieved = [np.mean([s["mean_return"] for s in sweep if s["task"] == t and s["target_return"] == x])
                    for x in targets]
        constant = len(set(targets)) < 2 or len(set(achieved)) < 2  # no rank correlation to speak of
        out[t] = math.nan if constant else float(spearmanr(targets, achieved).statistic)
    return out


def evaluate_task(args, tok, model, task: str, seed: int, video_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """Roll out ``args.episodes`` episodes of ``task`` (and the DT sweep); with ``video_dir`` also one more
    episode in a rendering env, saved as a video there."""
    spec = tok.task_specs.get(task)
    envs = make_envs(task, args.num_envs or args.episodes, spec, swap_mission=args.swap_mission,
                     blank_mission=args.blank_mission)
    if spec is None:
        print(f"WARNING: {task} is not one of the model's tasks {sorted(tok.task_specs)}; its spec is built from "
              "the environment, and the model never saw it in training")
        spec = TaskSpec.from_env(envs, name=task)
        tok.add_task_spec(spec)
    overrides = {k: v for k, v in (("beam_width", args.beam_width), ("horizon", args.horizon),
                                   ("beam_cache_dtype", args.beam_cache_dtype),
                                   ("distinct_actions", args.distinct_actions),
                                   ("cdf_density", args.cdf_density),
                                   ("policy_view", args.tt_policy_view), ("decoder", args.tt_decoder),
                                   ("compile", args.tt_compile)) if v is not None}
    if args.tt_preset is not None and args.tt_preset not in TT_PRESETS:
        raise ValueError(f"--tt_preset {args.tt_preset!r} is not one of {sorted(TT_PRESETS)}")
    preset = TT_PRESETS[args.tt_preset] if args.tt_preset else tt_preset(task)
    tt = TTConfig(**{**preset.__dict__, **overrides}) if overrides or args.tt_preset else None  # None: the task's
    agent = Agent(model, tok, args.mode, temperature=args.temperature, context_length=args.context_length,
                  expert_returns=args.expert_returns, context_steps=args.context_steps, tt_config=tt, seed=seed)
    prompt, origin = gato_prompt(args, tok, model, spec, seed) if args.mode == "gato" else (None, None)
    target = args.target_return
    if args.mode == "dt" and target is None and not args.expert_returns and spec.expert_return is None:
        raise ValueError(f"{task}: the task spec has no expert_return; pass --target_return")
    t0 = time.perf_counter()
    episodes = rollout(agent, envs, spec, args.episodes, seed, prompt, target, args.max_steps)
    seconds = time.perf_counter() - t0
    ok = [e["return"] for e in episodes if e["error"] is None]
    mean, se = mean_stderr(ok)
    norm = normalised(spec, ok)
    record = {"task": task, "mode": args.mode, "seed": seed, "episodes": len(ok), "mean_return": mean,
              "stderr_return": se, "returns": ok, "lengths": [e["length"] for e in episodes if e["error"] is None],
              "errors": [e["error"] for e in episodes if e["error"] is not None],
              "target_return": target if args.mode == "dt" else None, "seconds": seconds,
              "context_length": agent.context_length,
              **({"context_steps": agent.mode.context_steps} if args.mode == "dt" and agent.mode.context_steps else {})}
    if norm is not None:
        record["normalized_score"], record["stderr_normalized"] = mean_stderr(norm)
        record["normalized_scores"] = norm
    if (d4rl := d4rl_normalized_scores(task, ok)) is not None:  # beside ours: the published tables' scale
        record["d4rl_score"], record["stderr_d4rl"] = mean_stderr(d4rl)
    if successes := [e["success"] for e in episodes if e["error"] is None and e["success"] is not None]:
        record["success_rate"] = float(np.mean(successes))
    if any(e["mission"] for e in episodes):  # BabyAI: which instructions were met, episode by episode
        record["missions"] = [{"mission": e["mission"], "success": e["success"], "carrying": e["carrying"],
                               "decoy_first": e["decoy_first"],
                               **({"shown_mission": e["shown_mission"]} if e["shown_mission"] else {})}
                              for e in episodes if e["error"] is None]
        if met := [e["decoy_first"] for e in episodes if e["error"] is None and e["decoy_first"] is not None]:
            record["decoy_first_rate"], record["decoy_met"] = float(np.mean(met)), len(met)
    if args.swap_mission or args.blank_mission:
        changed = sum(bool(e["shown_mission"]) for e in episodes if e["error"] is None)
        record["blanked_missions" if args.blank_mission else "swapped_missions"] = changed
    if origin:
        record["prompt"] = origin
    if args.mode == "tt":  # the planner the task's preset and the flags resolved to
        record["tt_config"] = asdict(agent.mode.config)
    sweep = []
    if args.mode == "dt" and args.sweep and spec.expert_return is not None and spec.random_return is not None:
        for target in np.linspace(spec.random_return, spec.expert_return, args.sweep):
            eps = rollout(agent, envs, spec, args.episodes, seed + 1, None, float(target), args.max_steps)
            m, s = mean_stderr([e["return"] for e in eps if e["error"] is None])
            sweep.append({"task": task, "seed": seed, "target_return": float(target), "mean_return": m,
                          "stderr_return": s})
    envs.close()
    if video_dir is not None and (env := make_render_env(task, spec)) is not None:
        frames, total, steps = play_rendered(agent, env, spec, seed, args.max_steps, prompt, target)
        stem = f"{args.name or f'control_{args.mode}'}_{task.replace('/', '_')}"
        written = save_video(frames, video_dir / stem)
        record["video"] = [str(p.relative_to(video_dir.parent)) for p in written]
        record["video_return"] = total
        video_to_tensorboard(video_dir.parent / "tensorboard", f"videos/{stem}", written[0], frames[0])
    return record, sweep


def references(tok: GeneralistTokenizer, tasks: Sequence[str]) -> dict[str, dict]:
    """What each task's score is normalised by, and the environment's own bar of good play."""
    out = {}
    for task in tasks:
        spec = tok.task_specs.get(task)
        base = task.removesuffix("-pixels")
        threshold = gym.registry[base].reward_threshold if base in gym.registry else None
        out[task] = {"expert_return": getattr(spec, "expert_return", None),
                     "random_return": getattr(spec, "random_return", None),
                     "source": "the dataset's measured expert / random policies (task spec)",
                     "env_reward_threshold": threshold}
        if family := d4rl_family(task):
            out[task]["d4rl_random_expert"] = D4RL_REFERENCE_RETURNS[family]
    return out


def pooled_results(per_checkpoint: list[list[dict]], tasks: Sequence[str], mode: str) -> list[dict]:
    """Per task, every episode of every checkpoint: the rows of a result file's table."""
    pooled = []
    for task in tasks:  # per task, every episode of every checkpoint
        recs = [r for run in per_checkpoint for r in run if r["task"] == task]
        returns = [x for r in recs for x in r.get("returns", [])]
        norm = [x for r in recs for x in r.get("normalized_scores", [])]
        m, se = mean_stderr(returns)
        entry = {"task": task, "mode": mode, "episodes": len(returns), "checkpoints": len(recs),
                 "mean_return": m, "stderr_return": se}
        if norm:
            entry["normalized_score"], entry["stderr_normalized"] = mean_stderr(norm)
        if returns and (d4rl := d4rl_normalized_scores(task, returns)) is not None:
            entry["d4rl_score"], entry["stderr_d4rl"] = mean_stderr(d4rl)
        if rated := [r for r in recs if "success_rate" in r]:
            entry["success_rate"] = float(np.average([r["success_rate"] for r in rated],
                                                     weights=[r["episodes"] for r in rated]))
        if planners := [r["tt_config"] for r in recs if "tt_config" in r]:
            entry["tt_config"] = planners[0]
        for changed in MISSION_CHANGES:
            if any(changed in r for r in recs):
                entry[changed] = sum(r.get(changed, 0) for r in recs)
        if met := [r for r in recs if "decoy_first_rate" in r]:
            entry["decoy_met"] = sum(r["decoy_met"] for r in met)
            entry["decoy_first_rate"] = float(np.average([r["decoy_first_rate"] for r in met],
                                                         weights=[r["decoy_met"] for r in met]))
        pooled.append(entry)
    return pooled


def aggregate(per_checkpoint: list[dict], tasks: Sequence[str], reps: int = 2000) -> dict[str, Any]:
    """rliable IQM with a stratified-bootstrap 95 % CI over the (checkpoints × tasks) mean scores."""
    scored = [t for t in tasks if all(
        any(r["task"] == t and "normalized_score" in r for r in run) for run in per_checkpoint)]
    if not scored:
        return {}
    from rliable import library as rly
    from rliable import metrics

    matrix = np.array([[next(r["normalized_score"] for r in run if r["task"] == t) for t in scored]
                       for run in per_checkpoint])  # (checkpoints, tasks)
    point, ci = rly.get_interval_estimates({"m": matrix}, lambda x: np.array([metrics.aggregate_iqm(x),
                                                                               metrics.aggregate_mean(x)]),
                                           reps=reps)
    return {"tasks": list(scored), "checkpoints": len(per_checkpoint), "iqm": float(point["m"][0]),
            "iqm_ci95": [float(ci["m"][0, 0]), float(ci["m"][1, 0])], "mean": float(point["m"][1]),
            "mean_ci95": [float(ci["m"][0, 1]), float(ci["m"][1, 1])], "matrix": matrix.tolist(),
            "method": f"rliable aggregate_iqm, stratified bootstrap over checkpoints, {reps} reps"}


def plot_profiles(per_checkpoint: list[dict], tasks: Sequence[str], path: Path, label: str) -> Path | None:
    """rliable performance profile: the share of episodes (all checkpoints) scoring above τ."""
    from matplotlib.figure import Figure
    from rliable import library as rly
    from rliable import plot_utils

    from eval.plots import save_figure

    scores = [[s for run in per_checkpoint for r in run if r["task"] == t for s in r.get("normalized_scores", [])]
              for t in tasks]
    if not all(scores):
        return None
    n = min(len(s) for s in scores)
    matrix = np.array([s[:n] for s in scores]).T  # (episodes, tasks)
    taus = np.linspace(-0.25, 1.25, 61)
    profile, cis = rly.create_performance_profile({label: matrix}, taus)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    plot_utils.plot_performance_profiles(profile, taus, performance_profile_cis=cis, ax=ax,
                                         xlabel=r"expert-normalised score $\tau$")
    ax.legend([label])
    return save_figure(fig, path)


@dataclass
class Args:
    """Roll out checkpoints in gymnasium environments; expert-normalised scores with rliable IQMs."""

    model: tuple[str, ...]
    """checkpoint folders (model + tokenizer), run folders or 🤗 Hub repo ids; several = training seeds"""
    tasks: tuple[str, ...] | None = None
    """gymnasium env ids (default: the tokenizer's tasks)"""
    mode: Literal["gato", "dt", "tt"] = "dt"
    episodes: int = 20
    """episodes per task and checkpoint"""
    num_envs: int | None = None
    """environments stepped together (default: --episodes)"""
    target_return: float | None = None
    """DT target (default: the expert return)"""
    expert_returns: bool = False
    """DT: Multi-Game DT expert-return sampling"""
    sweep: int = 0
    """DT: also sweep this many targets from random to expert"""
    context_steps: int | None = None
    """DT: attend only to the step being decided and the K-1 before it (DTMode.context_steps; default: the windows
    the model was trained on, config.dt_context_steps, else the whole context); 1 acts from R_t and the state alone"""
    demos: tuple[str, ...] | None = None
    """Gato: built control datasets to draw the expert prompt from (pixel tasks: their own)"""
    temperature: float = 0.0
    context_length: int | None = None
    """default: the model's trained context"""
    tt_preset: str | None = None
    """TT: plan with this generalist.modes.TT_PRESETS entry (e.g. hopper-medium-v2, the reference's settings for
    that D4RL dataset) instead of the task's own"""
    beam_width: int | None = None
    """TT (default: the task's preset in generalist.modes.TT_PRESETS, else 128 as the reference planner)"""
    horizon: int | None = None
    """TT (default: the task's preset, else 15)"""
    beam_cache_dtype: Literal["auto", "bfloat16", "float32"] | None = None
    """TT: dtype of the beams' own cached tokens (default auto: a bfloat16 model's own, else bfloat16 on CUDA, float32
    on a CPU)"""
    distinct_actions: bool | None = None
    """TT: a beam's children take different discrete first actions (TTConfig.distinct_actions; default off, as
    the reference)"""
    cdf_density: bool | None = None
    """TT: the cdf filter ranks continuous bins by density (default, TTConfig.cdf_density) or, with False, by
    per-bin probability as before 2026-12-05"""
    tt_policy_view: bool | None = None
    """TT: read past actions as <hidden_action> where the model was trained with hidden actions (default,
    TTConfig.policy_view) or, with False, as themselves, as before 2026-12-05"""
    tt_decoder: Literal["auto", "static", "engine"] | None = None
    """TT: what runs the plan's forwards (TTConfig.decoder; default auto: the static-shape decoder when compiled, on a
    Llama backbone, else the engine)"""
    tt_compile: bool | None = None
    """TT: plan on the static decoder, its forward compiled ahead of time (TTConfig.compile; ~75 s on the first plan
    of a shape, kept on disk after; then 1.2x faster than the engine at this CLI's locomotion shapes on a 2-core
    CPU, 1.3-1.9x at the reference's hopper settings; default off)"""
    swap_mission: bool = False
    """BabyAI: show each episode a mission naming *another* object in the room, a decoy (the env still rewards
    its own target); compare decoy_first_rate and lengths with an unswapped run (MissionDecoy)"""
    blank_mission: bool = False
    """BabyAI: show each episode its mission without the object it names ("go to the object"): the episodes'
    lengths against an unchanged run show how much the agent uses what the mission names"""
    max_steps: int = 100_000
    """safety cap on vector-env steps per rollout"""
    seed: int = 0
    """environment and sampling seed (checkpoint k adds 1000 k; env i of a rollout starts from seed + i, so two
    evaluations share episodes unless their seeds lie at least --episodes apart)"""
    device: str = "cpu"
    """where the model runs (cpu, cuda, cuda:1, mps); environments and sampling stay on the CPU"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """weights and activations of the model: bfloat16 can be faster on a GPU or a CPU with AVX-512 BF16 / AMX (TT
    planning with a locomotion-sized model for 20 Hopper envs: 1.3x on an AVX-512 BF16 CPU, docs/speed.md), at
    bfloat16's precision (TT on hopper-medium-replay scored the same in both, docs/locomotion.md)"""
    threads: int | None = None
    out: str | None = None
    """results folder (default: RUN/eval of the first --model)"""
    name: str | None = None
    """results file stem (default: control_<mode>)"""
    video: bool = False
    """also play one episode per task (first checkpoint) in a rendering env and save it to OUT/videos/ as a
    GIF (and an MP4 where imageio has ffmpeg); the run report embeds them, OUT/tensorboard shows them"""
    update_card: bool = False
    """write each checkpoint's scores into its model card (README.md metadata and table); a Hub
    checkpoint's card is uploaded back to its repo"""
    hub_token: str | None = None
    """Hub token for --update_card of a Hub checkpoint (default: HF_TOKEN or the cached login)"""


def update_card(model_arg: str, folder: Path, results: list[dict], token: str | None) -> str:
    """Scores into the checkpoint's card: in place for a local folder; for a Hub repo, a copy of its card
    updated and uploaded back (the download cache is never written into). Returns where it went."""
    from eval.checkpoint import is_hub_id
    from generalist.hub import CARD_FILE, push_folder, update_card_results

    if not is_hub_id(model_arg):
        update_card_results(folder / CARD_FILE, results)
        return str(folder / CARD_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        card = Path(tmp) / CARD_FILE
        if (folder / CARD_FILE).is_file():
            shutil.copy(folder / CARD_FILE, card)
        update_card_results(card, results)
        ok = push_folder(tmp, model_arg, token=token, commit_message="eval.control: rollout scores in the model card")
    if not ok:
        raise SystemExit(f"--update_card: the card of {model_arg} could not be uploaded (see the warnings above)")
    return f"https://huggingface.co/{model_arg}"


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(Args, argv, description=__doc__)
    if args.swap_mission and args.blank_mission:
        raise SystemExit("--swap_mission and --blank_mission change the same mission: pick one")
    if args.threads:
        torch.set_num_threads(args.threads)
    from eval.checkpoint import default_out, load_checkpoint

    loaded = [load_checkpoint(m, args.device, args.dtype) for m in args.model]
    tok = loaded[0][1]
    tasks = args.tasks or sorted(tok.task_specs)
    unknown = [t for t in tasks if t not in tok.task_specs and t not in gym.registry and ":" not in t]
    if unknown:  # before any rollout: a typo should not cost the other tasks' evaluation time
        known = ", ".join(sorted(tok.task_specs)) or "none"
        print(f"error: --tasks {' '.join(unknown)}: neither a task of this model ({known}) nor a registered "
              "gymnasium environment", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out) if args.out else default_out(args.model[0])
    out.mkdir(parents=True, exist_ok=True)
    per_checkpoint, sweep = [], []
    for k, (model, tok, folder) in enumerate(loaded):
        run = []
        for task in tasks:
            try:
                record, task_sweep = evaluate_task(args, tok, model, task, args.seed + 1000 * k,
                                                   out / "videos" if args.video and k == 0 else None)
            except (gym.error.Error, ValueError) as e:  # an env id not registered / installed, no DT target
                record, task_sweep = {"task": task, "mode": args.mode, "episodes": 0, "errors": [str(e)]}, []
            record["checkpoint"] = str(folder)
            run.append(record)
            sweep += task_sweep
            score = f" normalised {record['normalized_score']:.3f}" if "normalized_score" in record else ""
            if "success_rate" in record:
                score += f", success {record['success_rate']:.2f}"
            if "decoy_first_rate" in record:
                score += f", decoy met first {record['decoy_first_rate']:.2f} of {record['decoy_met']}"
            print(f"[{k}] {task} [{args.mode}]: return {record.get('mean_return', math.nan):.2f} ± "
                  f"{record.get('stderr_return', math.nan):.2f} over {record['episodes']} episodes{score}"
                  + (f", {len(record['errors'])} errors" if record["errors"] else ""), flush=True)
        per_checkpoint.append(run)
    pooled = pooled_results(per_checkpoint, tasks, args.mode)
    command = "python -m eval.control " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command, "models": [str(f) for _, _, f in loaded], "dtype": args.dtype,
               "mode": args.mode, "episodes_per_checkpoint": args.episodes, "episodes_counted": EPISODES_COUNTED,
               "results": pooled, "iqm": aggregate(per_checkpoint, tasks), "references": references(tok, tasks),
               "per_checkpoint": per_checkpoint, "dt_sweep": sweep}
    stem = args.name or f"control_{args.mode}"
    if sweep:
        plot_dt_sweep(sweep, out / f"{stem}_dt_sweep.png")
        summary["dt_sweep_spearman"] = sweep_spearman(sweep, tasks)
    path = save_result(summary, out, stem)
    if args.update_card:
        summary["cards"] = [update_card(arg, folder, run, args.hub_token)
                            for arg, (_, _, folder), run in zip(args.model, loaded, per_checkpoint, strict=True)]
    report_saved(summary, path)
    return summary


def save_result(summary: dict, out: Path, stem: str) -> Path:
    """A result file: ``<out>/<stem>.json`` and its performance-profile plot (eval.control's and eval.pool's)."""
    tasks = [entry["task"] for entry in summary["results"]]
    if profile := plot_profiles(summary["per_checkpoint"], tasks, out / f"{stem}_profile.png", summary["mode"]):
        summary["profile_plot"] = profile.name
    path = out / f"{stem}.json"
    path.write_text(json.dumps(summary, indent=2, default=float))
    return path


def report_saved(summary: dict, path: Path) -> None:
    """Print a saved result file's IQM and where it went."""
    if agg := summary["iqm"]:
        print(f"IQM of expert-normalised scores over {len(agg['tasks'])} tasks x {agg['checkpoints']} checkpoints: "
              f"{agg['iqm']:.3f} (95% CI {agg['iqm_ci95'][0]:.3f}-{agg['iqm_ci95'][1]:.3f})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
