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

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from scipy.stats import spearmanr

from eval.plots import plot_dt_sweep
from generalist import GeneralistForCausalLM, GeneralistTokenizer, TaskSpec
from generalist.agent import Agent
from generalist.modes import TT_PRESETS, TTConfig, demonstration_prompt


class ErrorAsTermination(gym.Wrapper):
    """Turns an exception in ``step`` into the end of the episode, remembering the error."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.error: str | None = None
        self._last_obs = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._last_obs = obs
        return obs, info

    def step(self, action):
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as e:  # noqa: BLE001 - any env failure ends only this episode
            self.error = f"{type(e).__name__}: {e}"
            return self._last_obs, 0.0, True, False, {}
        self._last_obs = obs
        return obs, reward, terminated, truncated, info


def make_env(task: str) -> gym.Env:
    """The env of a task: datasets_build's catalogue knows the pixel, BabyAI and Meta-World variants
    the data was collected in; without it, any registered gymnasium id."""
    try:
        from datasets_build.control import make_task_env
    except ImportError:
        return gym.make(task)
    return make_task_env(task)


def make_envs(task: str, num_envs: int) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda: ErrorAsTermination(make_env(task))] * num_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def rollout(agent: Agent, envs: gym.vector.SyncVectorEnv, spec: TaskSpec, episodes: int, seed: int,
            prompt=None, target_return: float | None = None, max_steps: int = 100_000,
            record: bool = False) -> list[dict[str, Any]]:
    """Run until ``episodes`` episodes have finished; one record per episode (return, length, error).

    With ``record`` each record also holds the episode's observations, actions and rewards.
    """
    n = envs.num_envs
    agent.reset(spec, num_envs=n, prompt=prompt, target_return=target_return)
    obs, _ = envs.reset(seed=seed)
    returns, lengths = np.zeros(n), np.zeros(n, int)
    traces: list[dict[str, list]] = [{"obs": [], "act": [], "rew": []} for _ in range(n)]
    done_eps: list[dict[str, Any]] = []
    for _ in range(max_steps):
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
        for i in np.flatnonzero(terminated | truncated):
            error = envs.envs[i].error
            envs.envs[i].error = None
            episode = {"return": float(returns[i]), "length": int(lengths[i]), "error": error}
            if record:
                episode["trace"] = traces[i]
            done_eps.append(episode)
            returns[i], lengths[i] = 0.0, 0
            traces[i] = {"obs": [], "act": [], "rew": []}
        if len(done_eps) >= episodes:
            break
    return done_eps[:episodes]


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


def evaluate_task(args, tok, model, task: str, seed: int) -> tuple[dict, list[dict]]:
    envs = make_envs(task, args.num_envs or args.episodes)
    spec = tok.task_specs.get(task)
    if spec is None:
        print(f"WARNING: {task} is not one of the model's tasks {sorted(tok.task_specs)}; its spec is built from "
              "the environment, and the model never saw it in training")
        spec = TaskSpec.from_env(envs, name=task)
        tok.add_task_spec(spec)
    tt = TTConfig(**{**TT_PRESETS["reference"].__dict__, **{k: v for k, v in
                                                            (("beam_width", args.beam_width),
                                                             ("horizon", args.horizon),
                                                             ("beam_cache_dtype", args.beam_cache_dtype))
                                                            if v is not None}})
    agent = Agent(model, tok, args.mode, temperature=args.temperature, context_length=args.context_length,
                  expert_returns=args.expert_returns, tt_config=tt, seed=seed)
    prompt, origin = gato_prompt(args, tok, model, spec, seed) if args.mode == "gato" else (None, None)
    target = args.target_return
    if args.mode == "dt" and target is None and not args.expert_returns and spec.expert_return is None:
        raise ValueError(f"{task}: the task spec has no expert_return; pass --target-return")
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
              "context_length": agent.context_length}
    if norm is not None:
        record["normalized_score"], record["stderr_normalized"] = mean_stderr(norm)
        record["normalized_scores"] = norm
    if origin:
        record["prompt"] = origin
    sweep = []
    if args.mode == "dt" and args.sweep and spec.expert_return is not None and spec.random_return is not None:
        for target in np.linspace(spec.random_return, spec.expert_return, args.sweep):
            eps = rollout(agent, envs, spec, args.episodes, seed + 1, None, float(target), args.max_steps)
            m, s = mean_stderr([e["return"] for e in eps if e["error"] is None])
            sweep.append({"task": task, "seed": seed, "target_return": float(target), "mean_return": m,
                          "stderr_return": s})
    envs.close()
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
    return out


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


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+",
                   help="checkpoint folders (model + tokenizer) or run folders; several = training seeds")
    p.add_argument("--tasks", nargs="+", default=None, help="gymnasium env ids (default: the tokenizer's tasks)")
    p.add_argument("--mode", choices=("gato", "dt", "tt"), default="dt")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task and checkpoint")
    p.add_argument("--num-envs", type=int, default=None, help="environments stepped together (default: --episodes)")
    p.add_argument("--target-return", type=float, default=None, help="DT target (default: the expert return)")
    p.add_argument("--expert-returns", action="store_true", help="DT: Multi-Game DT expert-return sampling")
    p.add_argument("--sweep", type=int, default=0, help="DT: also sweep this many targets from random to expert")
    p.add_argument("--demos", nargs="+", default=None,
                   help="Gato: built control datasets to draw the expert prompt from (pixel tasks: their own)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--context-length", type=int, default=None, help="default: the model's trained context")
    p.add_argument("--beam-width", type=int, default=None, help="TT (default 128, the reference planner's)")
    p.add_argument("--horizon", type=int, default=None, help="TT (default 15)")
    p.add_argument("--beam-cache-dtype", choices=["bfloat16", "float32"], default=None,
                   help="TT: dtype of the beams' own cached tokens (default bfloat16)")
    p.add_argument("--max-steps", type=int, default=100_000, help="safety cap on vector-env steps per rollout")
    p.add_argument("--seed", type=int, default=0, help="environment and sampling seed (checkpoint k adds 1000 k)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="results folder (default: RUN/eval of the first --model)")
    p.add_argument("--name", default=None, help="results file stem (default: control_<mode>)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from eval.checkpoint import default_out, load_checkpoint

    loaded = [load_checkpoint(m) for m in args.model]
    tok = loaded[0][1]
    tasks = args.tasks or sorted(tok.task_specs)
    unknown = [t for t in tasks if t not in tok.task_specs and t not in gym.registry and ":" not in t]
    if unknown:  # before any rollout: a typo should not cost the other tasks' evaluation time
        p.error(f"--tasks {' '.join(unknown)}: neither a task of this model "
                f"({', '.join(sorted(tok.task_specs)) or 'none'}) nor a registered gymnasium environment")
    out = Path(args.out) if args.out else default_out(args.model[0])
    out.mkdir(parents=True, exist_ok=True)
    per_checkpoint, sweep = [], []
    for k, (model, tok, folder) in enumerate(loaded):
        run = []
        for task in tasks:
            try:
                record, task_sweep = evaluate_task(args, tok, model, task, args.seed + 1000 * k)
            except (gym.error.Error, ValueError) as e:  # an env id not registered / installed, no DT target
                record, task_sweep = {"task": task, "mode": args.mode, "episodes": 0, "errors": [str(e)]}, []
            record["checkpoint"] = str(folder)
            run.append(record)
            sweep += task_sweep
            score = f" normalised {record['normalized_score']:.3f}" if "normalized_score" in record else ""
            print(f"[{k}] {task} [{args.mode}]: return {record.get('mean_return', math.nan):.2f} ± "
                  f"{record.get('stderr_return', math.nan):.2f} over {record['episodes']} episodes{score}"
                  + (f", {len(record['errors'])} errors" if record["errors"] else ""), flush=True)
        per_checkpoint.append(run)
    pooled = []
    for task in tasks:  # per task, every episode of every checkpoint
        recs = [r for run in per_checkpoint for r in run if r["task"] == task]
        returns = [x for r in recs for x in r.get("returns", [])]
        norm = [x for r in recs for x in r.get("normalized_scores", [])]
        m, se = mean_stderr(returns)
        entry = {"task": task, "mode": args.mode, "episodes": len(returns), "checkpoints": len(recs),
                 "mean_return": m, "stderr_return": se}
        if norm:
            entry["normalized_score"], entry["stderr_normalized"] = mean_stderr(norm)
        pooled.append(entry)
    command = "python -m eval.control " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command,
               "models": [str(f) for _, _, f in loaded], "mode": args.mode, "episodes_per_checkpoint": args.episodes,
               "results": pooled, "iqm": aggregate(per_checkpoint, tasks), "references": references(tok, tasks),
               "per_checkpoint": per_checkpoint, "dt_sweep": sweep}
    stem = args.name or f"control_{args.mode}"
    if sweep:
        plot_dt_sweep(sweep, out / f"{stem}_dt_sweep.png")
        summary["dt_sweep_spearman"] = sweep_spearman(sweep, tasks)
    profile = plot_profiles(per_checkpoint, tasks, out / f"{stem}_profile.png", args.mode)
    if profile:
        summary["profile_plot"] = profile.name
    path = out / f"{stem}.json"
    path.write_text(json.dumps(summary, indent=2, default=float))
    if summary["iqm"]:
        agg = summary["iqm"]
        print(f"IQM of expert-normalised scores over {len(agg['tasks'])} tasks x {agg['checkpoints']} checkpoints: "
              f"{agg['iqm']:.3f} (95% CI {agg['iqm_ci95'][0]:.3f}-{agg['iqm_ci95'][1]:.3f})")
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
