"""Vectorised rollouts of a checkpoint in real gymnasium environments.

    python -m eval.control --model RUN --tasks CartPole-v1 Pendulum-v1 --mode dt --episodes 10 --num-envs 5
    python -m eval.control --model RUN --tasks CartPole-v1 --mode gato --demos data/tiny_disc
    python -m eval.control --model RUN --tasks Pendulum-v1 --mode dt --sweep 5     # return-conditioning sweep

Per task: raw episode returns (mean ± standard error) and expert-normalised scores
``(R − R_random) / (R_expert − R_random)`` from the task spec; across tasks the interquartile mean
(IQM, Agarwal et al. 2021) of all normalised episode scores. With ``--mode dt --sweep K`` the agent
is also conditioned on K target returns between the random and the expert return, and achieved
against target return is plotted (``dt_sweep.png``). Results go to ``OUT/control.json`` (the layout
``eval.report`` reads: ``{"results": [{task, mode, mean_return, normalized_score, ...}],
"dt_sweep": [{task, target_return, mean_return}]}``).

An environment that raises during a rollout ends that episode with a recorded error; the others go on.
Gato mode prompts with a demonstration: the best episode of the task in ``--demos`` (a dataset built
by ``datasets_build``) or, without one, an episode the model plays itself unprompted.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

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
    if spec.expert_return is None or spec.random_return is None or spec.expert_return == spec.random_return:
        return None
    return [(r - spec.random_return) / (spec.expert_return - spec.random_return) for r in returns]


def mean_stderr(x: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def iqm(x: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50 % (Agarwal et al. 2021, rliable)."""
    x = np.sort(np.asarray(x, np.float64))
    if len(x) == 0:
        return math.nan
    lo, hi = int(math.floor(0.25 * len(x))), int(math.ceil(0.75 * len(x)))
    return float(x[lo:hi].mean()) if hi > lo else float(x.mean())


@functools.cache
def load_demos(path: str) -> tuple[Any, dict[str, TaskSpec]]:
    from datasets_build import load_episodes  # lazy: eval.control works without it

    return load_episodes(path)


def demonstration(args, tok: GeneralistTokenizer, model: GeneralistForCausalLM, spec: TaskSpec) -> dict:
    """The Gato prompt's episode: the best one of the task in --demos, else one the model plays itself."""
    if args.demos:
        from datasets_build import iter_episodes

        ds, specs = load_demos(args.demos)
        best = None
        for ep in iter_episodes(ds, specs):
            if ep["task"] == spec.name and (best is None or ep["rewards"].sum() > best["rewards"].sum()):
                best = ep
        if best is not None:
            return {**best, "origin": f"{args.demos} (return {float(best['rewards'].sum()):.1f})"}
    agent = Agent(model, tok, "gato", temperature=args.temperature, seed=args.seed)
    envs = make_envs(spec.name, 1)
    ep = rollout(agent, envs, spec, 1, args.seed + 10_000, record=True, max_steps=args.max_steps)[0]
    envs.close()
    trace = ep["trace"]
    stack = lambda rows: {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return {"observations": stack(trace["obs"]), "actions": stack(trace["act"]),
            "rewards": np.asarray(trace["rew"], np.float32), "origin": f"self-played (return {ep['return']:.1f})"}


def evaluate_task(args, tok, model, task: str) -> tuple[dict, list[dict]]:
    envs = make_envs(task, args.num_envs)
    demo_specs = load_demos(args.demos)[1] if args.demos else {}
    spec = tok.task_specs.get(task) or demo_specs.get(task)
    if spec is None:
        print(f"WARNING: {task} is not one of the model's tasks {sorted(tok.task_specs)}; its spec is built from "
              "the environment, and the model never saw it in training")
        spec = TaskSpec.from_env(envs, name=task)
    tok.add_task_spec(spec)
    tt = TTConfig(**{**TT_PRESETS["reference"].__dict__, **{k: v for k, v in
                                                            (("beam_width", args.beam_width),
                                                             ("horizon", args.horizon)) if v is not None}})
    agent = Agent(model, tok, args.mode, temperature=args.temperature, context_length=args.context_length,
                  expert_returns=args.expert_returns, tt_config=tt, seed=args.seed)
    prompt, origin = None, None
    if args.mode == "gato":
        demo = demonstration(args, tok, model, spec)
        origin = demo.pop("origin")
        prompt = demonstration_prompt(tok, spec, demo, max_tokens=agent.context_length // 2)
    target = args.target_return
    if args.mode == "dt" and target is None and not args.expert_returns and spec.expert_return is None:
        raise ValueError(f"{task}: the task spec has no expert_return; pass --target-return")
    t0 = time.perf_counter()
    episodes = rollout(agent, envs, spec, args.episodes, args.seed, prompt, target, args.max_steps)
    seconds = time.perf_counter() - t0
    ok = [e["return"] for e in episodes if e["error"] is None]
    mean, se = mean_stderr(ok)
    norm = normalised(spec, ok)
    record = {"task": task, "mode": args.mode, "episodes": len(ok), "mean_return": mean, "stderr_return": se,
              "returns": ok, "lengths": [e["length"] for e in episodes if e["error"] is None],
              "errors": [e["error"] for e in episodes if e["error"] is not None],
              "expert_return": spec.expert_return, "random_return": spec.random_return,
              "target_return": target if args.mode == "dt" else None, "seconds": seconds}
    if norm is not None:
        record["normalized_score"], record["stderr_normalized"] = mean_stderr(norm)
        record["normalized_scores"] = norm
    if origin:
        record["prompt"] = origin
    sweep = []
    if args.mode == "dt" and args.sweep and spec.expert_return is not None and spec.random_return is not None:
        for target in np.linspace(spec.random_return, spec.expert_return, args.sweep):
            eps = rollout(agent, envs, spec, args.episodes, args.seed + 1, None, float(target), args.max_steps)
            m, s = mean_stderr([e["return"] for e in eps if e["error"] is None])
            sweep.append({"task": task, "target_return": float(target), "mean_return": m, "stderr_return": s})
    envs.close()
    return record, sweep


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (model + tokenizer) or run folder")
    p.add_argument("--tasks", nargs="+", default=None, help="gymnasium env ids (default: the tokenizer's tasks)")
    p.add_argument("--mode", choices=("gato", "dt", "tt"), default="dt")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--num-envs", type=int, default=5, help="environments stepped together (batched decoding)")
    p.add_argument("--target-return", type=float, default=None, help="DT target (default: the expert return)")
    p.add_argument("--expert-returns", action="store_true", help="DT: Multi-Game DT expert-return sampling")
    p.add_argument("--sweep", type=int, default=0, help="DT: also sweep this many targets from random to expert")
    p.add_argument("--demos", default=None, help="Gato: a built control dataset to take the prompt from")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--beam-width", type=int, default=None, help="TT (default 128, the reference planner's)")
    p.add_argument("--horizon", type=int, default=None, help="TT (default 15)")
    p.add_argument("--max-steps", type=int, default=100_000, help="safety cap on vector-env steps per rollout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="results folder (default: RUN/eval)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from eval.checkpoint import default_out, load_checkpoint

    model, tok, folder = load_checkpoint(args.model)
    tasks = args.tasks or sorted(tok.task_specs)
    known = set(tok.task_specs) | set(load_demos(args.demos)[1] if args.demos else ())
    unknown = [t for t in tasks if t not in known and t not in gym.registry and ":" not in t]
    if unknown:  # before any rollout: a typo should not cost the other tasks' evaluation time
        p.error(f"--tasks {' '.join(unknown)}: neither a task of this model ({', '.join(sorted(known)) or 'none'}) "
                "nor a registered gymnasium environment")
    out = Path(args.out) if args.out else default_out(args.model)
    out.mkdir(parents=True, exist_ok=True)
    results, sweep = [], []
    for task in tasks:
        try:
            record, task_sweep = evaluate_task(args, tok, model, task)
        except (gym.error.Error, ValueError) as e:  # an env id not registered / installed, no DT target
            record, task_sweep = {"task": task, "mode": args.mode, "episodes": 0, "errors": [str(e)]}, []
        results.append(record)
        sweep += task_sweep
        score = f" normalised {record['normalized_score']:.3f}" if "normalized_score" in record else ""
        print(f"{task} [{args.mode}]: return {record.get('mean_return', math.nan):.2f} ± "
              f"{record.get('stderr_return', math.nan):.2f} over {record['episodes']} episodes{score}"
              + (f", {len(record['errors'])} errors" if record["errors"] else ""))
    pooled = [s for r in results for s in r.get("normalized_scores", [])]
    summary = {"model": str(folder), "mode": args.mode, "num_envs": args.num_envs, "results": results,
               "iqm_normalized_score": iqm(pooled) if pooled else None, "dt_sweep": sweep}
    if sweep:
        plot_dt_sweep(sweep, out / "dt_sweep.png")
    path = out / ("control.json" if args.mode == "dt" else f"control_{args.mode}.json")
    path.write_text(json.dumps(summary, indent=2, default=float))
    if pooled:
        print(f"IQM of expert-normalised scores over {len(tasks)} tasks: {summary['iqm_normalized_score']:.3f}")
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
