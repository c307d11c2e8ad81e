"""Train a MuJoCo locomotion expert with SAC, as D4RL's policies were made, and keep what the
D4RL-style datasets need, so that `python -m datasets_build locomotion` rebuilds them without training.

D4RL (Fu et al. 2020, §5 "Gym-MuJoCo"): `expert` is a fully trained SAC policy, `medium` a policy
trained "to approximately 1/3 the performance of the expert", `medium-replay` the replay buffer of
the run up to the medium policy, `medium-expert` medium + expert episodes. SAC here is sbx's (the JAX
sibling of stable-baselines3; about 2x its speed on a CPU), with rl-zoo's MuJoCo settings.

Written under `--out/<task>/` (committed, small):
  `expert.safetensors`      the best-evaluated policy of the last quarter of training
  `medium.safetensors`      the earliest snapshot within 15 % of a third of the expert's return
  `replay/step-<N>.safetensors`  float16 snapshots taken every `--eval_every` steps before the medium
                            one; the builder replays each for the steps it collected (the replay buffer
                            is 10-100 MB, the snapshots are ~150 KB each)
  `training.json`           command, seed, steps, wall time, the evaluation curve, the choices made
Full float32 snapshots and the real replay buffer go to `--run_dir` (not committed).

    pip install sbx-rl
    python -m datasets_build.experts.train_locomotion --task Hopper-v5 --steps 600000
    python -m datasets_build.experts.train_locomotion --plot docs/figures/locomotion_experts.png
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro
from safetensors.numpy import save_file
from tqdm import tqdm

MEDIUM_FRACTION = 1 / 3  # D4RL: "approximately 1/3 the performance of the expert"
MEDIUM_TOLERANCE = 0.15  # of the expert's return: how far from a third a medium snapshot may be
EXPERT_WINDOW = 0.25  # the expert is the best snapshot of this last fraction of training


@dataclass
class Args:
    task: str = "Hopper-v5"
    steps: int = 400_000
    """environment steps of SAC training"""
    seed: int = 0
    eval_every: int = 10_000
    """steps between evaluations (and snapshots)"""
    eval_episodes: int = 5
    """deterministic episodes per evaluation point"""
    final_eval_episodes: int = 20
    """episodes that measure the chosen expert and medium policies"""
    learning_starts: int = 10_000
    """uniform random steps before learning (rl-zoo's MuJoCo setting)"""
    train_freq: int = 4
    """env steps between updates, each doing as many gradient steps (sbx runs them in one jit)"""
    out: Path = Path(__file__).parent / "locomotion"
    run_dir: Path = Path("runs/experts")
    plot: Path | None = None
    """only redraw the evaluation curves of every task under --out into this image (no training)"""


def actor_arrays(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """The SAC actor's weights as flat arrays: `Dense_<i>.kernel` (in, out) / `.bias`; the last two
    Dense layers are the Gaussian's mean and log-std (sbx's SquashedGaussianActor)."""
    params = model.policy.actor_state.params["params"]
    return {f"{layer}.{name}": np.asarray(value, dtype=dtype) for layer, weights in params.items()
            for name, value in weights.items()}


def evaluate(model, task: str, episodes: int, seed: int) -> list[float]:
    env = gym.make(task)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def plot_training_curves(out: Path, path: Path) -> Path:
    """Return against training steps of every trained task, expert and medium choices marked."""
    from matplotlib.figure import Figure

    from eval.plots import save_figure

    records = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/training.json"))}
    fig = Figure(figsize=(4 * max(1, len(records)), 3.2))
    for ax, (task, record) in zip(fig.subplots(1, max(1, len(records)), squeeze=False)[0], records.items(),
                                  strict=False):
        steps = np.array([p["step"] for p in record["curve"]])
        mean, std = (np.array([p[k] for p in record["curve"]]) for k in ("mean", "std"))
        ax.plot(steps, mean, color="C0", label=f"deterministic return ({record['args']['eval_episodes']} ep)")
        ax.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.2)
        for kind, color in (("expert", "C2"), ("medium", "C1")):
            ax.plot(record[kind]["step"], record[kind]["mean"], "o", color=color,
                    label=f"{kind}: {record[kind]['mean']:.0f} ({len(record[kind]['returns'])} ep)")
        ax.set(title=f"{task}: SAC, {record['wall_s'] / 60:.0f} min", xlabel="environment steps", ylabel="return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def main(args: Args) -> None:
    if args.plot is not None:
        print(plot_training_curves(args.out, args.plot))
        return
    from sbx import SAC  # the `experts` extra; only this script trains

    run_dir = args.run_dir / f"{args.task}-seed{args.seed}"
    (run_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    out = args.out / args.task
    (out / "replay").mkdir(parents=True, exist_ok=True)
    env = gym.make(args.task)
    model = SAC("MlpPolicy", env, seed=args.seed, learning_starts=args.learning_starts,
                train_freq=args.train_freq, gradient_steps=args.train_freq, verbose=0)
    curve: list[dict] = []
    snapshots: dict[int, dict[str, np.ndarray]] = {}
    start = time.time()
    bar = tqdm(total=args.steps, desc=f"SAC {args.task}", unit="step")
    while model.num_timesteps < args.steps:
        model.learn(args.eval_every, reset_num_timesteps=False, progress_bar=False)
        step = model.num_timesteps
        returns = evaluate(model, args.task, args.eval_episodes, seed=10_000 + step)
        snapshots[step] = actor_arrays(model)
        save_file(snapshots[step], str(run_dir / "snapshots" / f"step-{step:07d}.safetensors"))
        curve.append({"step": step, "wall_s": round(time.time() - start, 1),
                      "mean": float(np.mean(returns)), "std": float(np.std(returns))})
        bar.update(step - bar.n)
        bar.set_postfix(ret=f"{np.mean(returns):.0f}")
    bar.close()
    wall = time.time() - start

    # the replay buffer as collected (sb3 ReplayBuffer, one env): kept for the record and the card
    buffer = model.replay_buffer
    n = buffer.buffer_size if buffer.full else buffer.pos
    np.savez_compressed(run_dir / "replay_buffer.npz", observations=buffer.observations[:n, 0],
                        actions=buffer.actions[:n, 0], rewards=buffer.rewards[:n, 0],
                        dones=buffer.dones[:n, 0], timeouts=buffer.timeouts[:n, 0])

    late = [point for point in curve if point["step"] > args.steps * (1 - EXPERT_WINDOW)]
    expert_step = max(late, key=lambda point: point["mean"])["step"]
    model.policy.actor_state = model.policy.actor_state.replace(params={"params": _unflatten(snapshots[expert_step])})
    expert_returns = evaluate(model, args.task, args.final_eval_episodes, seed=20_000)
    target = MEDIUM_FRACTION * float(np.mean(expert_returns))
    near = [p for p in curve if abs(p["mean"] - target) <= MEDIUM_TOLERANCE * np.mean(expert_returns)]
    medium_step = (near[0] if near else min(curve, key=lambda p: abs(p["mean"] - target)))["step"]
    model.policy.actor_state = model.policy.actor_state.replace(params={"params": _unflatten(snapshots[medium_step])})
    medium_returns = evaluate(model, args.task, args.final_eval_episodes, seed=20_000)

    save_file(snapshots[expert_step], str(out / "expert.safetensors"))
    save_file(snapshots[medium_step], str(out / "medium.safetensors"))
    for old in (out / "replay").glob("*.safetensors"):
        old.unlink()
    for step, arrays in snapshots.items():
        if step < medium_step:  # the policy that collected steps [step, step + eval_every)
            save_file({k: v.astype(np.float16) for k, v in arrays.items()},
                      str(out / "replay" / f"step-{step:07d}.safetensors"))
    import sbx

    record = {
        "command": "python -m datasets_build.experts.train_locomotion " + shlex.join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "algorithm": f"SAC (sbx {sbx.__version__}), MlpPolicy 256x256, rl-zoo MuJoCo settings",
        "machine": f"{platform.processor() or platform.machine()}, 1 thread",
        "wall_s": round(wall, 1),
        "steps_per_second": round(args.steps / wall, 1),
        "expert": {"step": expert_step, "returns": expert_returns, "mean": float(np.mean(expert_returns))},
        "medium": {"step": medium_step, "returns": medium_returns, "mean": float(np.mean(medium_returns)),
                   "target": target},
        "replay": {"learning_starts": args.learning_starts, "segment_steps": args.eval_every,
                   "segments": replay_segments(buffer.dones[:n, 0], args.learning_starts, args.eval_every,
                                               medium_step)},
        "curve": curve,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("wall_s", "expert", "medium")}, indent=1))


def replay_segments(dones: np.ndarray, learning_starts: int, segment: int, end: int) -> list[dict]:
    """Which policy collected the replay buffer's episodes before step ``end``, as the dataset builder's
    sources: ``random`` before ``learning_starts``, else ``policy-step<N>``, the snapshot taken at the
    start of the ``segment``-step stretch the episode began in. Counts whole episodes and their steps."""
    stops = np.flatnonzero(dones) + 1
    starts = np.concatenate([[0], stops[:-1]])
    segments: dict[str, dict] = {}
    for start, stop in zip(starts, stops, strict=True):
        if start >= end:
            break
        snapshot = max(segment, start // segment * segment)
        source = "random" if start < learning_starts else f"policy-step{snapshot}"
        entry = segments.setdefault(source, {"source": source, "episodes": 0, "steps": 0})
        entry["episodes"] += 1
        entry["steps"] += int(stop - start)
    return list(segments.values())


def _unflatten(arrays: dict[str, np.ndarray]) -> dict:
    params: dict = {}
    for key, value in arrays.items():
        layer, name = key.split(".")
        params.setdefault(layer, {})[name] = value
    return params


if __name__ == "__main__":
    main(tyro.cli(Args))
