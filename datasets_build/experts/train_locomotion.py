"""Train a MuJoCo locomotion expert with SAC, as D4RL's policies were made, and keep what the
D4RL-style datasets need, so that `python -m datasets_build locomotion` rebuilds them without training.

D4RL (Fu et al. 2020, §5 "Gym-MuJoCo"): `expert` is a fully trained SAC policy, `medium` a policy
trained "to approximately 1/3 the performance of the expert" (training stopped early), `medium-replay`
"all samples in the replay buffer observed during training until the policy reaches the medium
level", `medium-expert` medium + expert data. SAC here is sbx's (the JAX sibling of
stable-baselines3, about 2x its speed on this CPU): 256x256 MLPs, rl-zoo's 10,000 random steps
first, then 4 environment steps and 4 gradient steps in turn (one update per step, as rl-zoo's 1/1,
with less Python between updates).

Two phases. Training writes to `--run_dir/<task>-seed<seed>/`: a float32 actor snapshot at every
evaluation (`snapshots/`), the evaluation curve (`training.json`) and the whole replay buffer
(`replay_buffer.npz`). Finalising (also alone: `--finalize_only`, to choose again from a finished
run) picks the policies with the NumPy actor the dataset builder runs and writes, committed, to
`--out/<task>/`:
  `expert.safetensors`   the best-evaluated snapshot of the last quarter of training
  `medium.safetensors`   of the snapshots whose curve point lies near a third of the expert's return, the
                         one whose mean over `--final_eval_episodes` comes closest (within 10 % of the
                         expert's return)
  `medium_replay.npz`    the real replay buffer up to the medium snapshot, as D4RL arrays
                         (observations / actions in float16 to keep the repository small: 3 significant
                         digits, finer than the tokenizer's 1024 bins; terminals and timeouts apart)
  `training.json`        command, seed, steps, wall time, the curve, the choices and their returns
                         (deterministic, and sampled as the datasets are)

    pip install -e ".[experts]"
    python -m datasets_build.experts.train_locomotion --task Hopper-v5 --steps 600000
    python -m datasets_build.experts.train_locomotion --plot docs/figures/locomotion_experts.png
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro
from safetensors.numpy import save_file
from tqdm import tqdm

from datasets_build.experts.mujoco import MEDIUM_REPLAY_FILE, SACActor, play

MEDIUM_FRACTION = 1 / 3  # D4RL: "approximately 1/3 the performance of the expert"
MEDIUM_TOLERANCE = 0.10  # of the expert's return: how far from a third a medium snapshot may be
EXPERT_WINDOW = 0.25  # the expert is the best snapshot of this last fraction of training
FINAL_EVAL_SEED = 1_000_000  # the chosen policies' episodes; the curve's are 10_000 + step + i


@dataclass
class Args:
    task: str = "Hopper-v5"
    steps: int = 600_000
    """environment steps of SAC training"""
    seed: int = 0
    eval_every: int = 10_000
    """steps between evaluations (and snapshots)"""
    eval_episodes: int = 5
    """deterministic episodes per evaluation point"""
    final_eval_episodes: int = 20
    """episodes that measure the expert and each medium candidate"""
    learning_starts: int = 10_000
    """uniform random steps before learning (rl-zoo's MuJoCo setting)"""
    train_freq: int = 4
    """env steps between updates, each doing as many gradient steps (sbx runs them in one jit)"""
    out: Path = Path(__file__).parent / "locomotion"
    run_dir: Path = Path("runs/experts")
    finalize_only: bool = False
    """choose the expert and medium policies again from a finished run in --run_dir (no training)"""
    plot: Path | None = None
    """only redraw the evaluation curves of every task under --out into this image (no training)"""


def actor_arrays(model) -> dict[str, np.ndarray]:
    """The SAC actor's weights as flat arrays: `Dense_<i>.kernel` (in, out) / `.bias`; the last two
    Dense layers are the Gaussian's mean and log-std (sbx's SquashedGaussianActor)."""
    params = model.policy.actor_state.params["params"]
    return {f"{layer}.{name}": np.asarray(value, dtype=np.float32) for layer, weights in params.items()
            for name, value in weights.items()}


def returns_of(task: str, policy, episodes: int, seed: int) -> list[float]:
    env = gym.make(task)
    try:
        return [play(env, policy, seed + i) for i in range(episodes)]
    finally:
        env.close()


def measure(task: str, actor: SACActor, episodes: int) -> dict:
    """Deterministic (the mode) and sampled (as the datasets are collected) returns of one policy."""
    rng = np.random.default_rng(FINAL_EVAL_SEED)
    deterministic = returns_of(task, lambda obs: actor(obs[None])[0], episodes, FINAL_EVAL_SEED)
    sampled = returns_of(task, lambda obs: actor(obs[None], rng.standard_normal((1, actor.action_dim)))[0],
                         episodes, FINAL_EVAL_SEED)
    return {"returns": deterministic, "mean": float(np.mean(deterministic)), "sampled_returns": sampled,
            "sampled_mean": float(np.mean(sampled))}


def train(args: Args, run_dir: Path) -> None:
    from sbx import SAC  # the `experts` extra; only this phase needs it

    (run_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    env = gym.make(args.task)
    model = SAC("MlpPolicy", env, seed=args.seed, learning_starts=args.learning_starts,
                train_freq=args.train_freq, gradient_steps=args.train_freq, verbose=0)
    if args.eval_every % args.train_freq or args.steps > model.replay_buffer.buffer_size:
        raise ValueError("--eval_every must be a multiple of --train_freq (snapshots at exact steps) and --steps "
                         f"at most the replay buffer's {model.replay_buffer.buffer_size:,} (it must not wrap)")
    curve: list[dict] = []
    start = time.time()
    bar = tqdm(total=args.steps, desc=f"SAC {args.task}", unit="step")
    while model.num_timesteps < args.steps:
        model.learn(args.eval_every, reset_num_timesteps=False, progress_bar=False)
        step = model.num_timesteps
        returns = returns_of(args.task, lambda obs: model.predict(obs, deterministic=True)[0],
                             args.eval_episodes, seed=10_000 + step)
        save_file(actor_arrays(model), str(run_dir / "snapshots" / f"step-{step:07d}.safetensors"))
        curve.append({"step": step, "wall_s": round(time.time() - start, 1),
                      "mean": float(np.mean(returns)), "std": float(np.std(returns))})
        bar.update(step - bar.n)
        bar.set_postfix(ret=f"{np.mean(returns):.0f}")
    bar.close()
    wall = time.time() - start
    buffer, n = model.replay_buffer, model.replay_buffer.pos  # sb3: dones = terminated or truncated
    np.savez_compressed(run_dir / "replay_buffer.npz", observations=buffer.observations[:n, 0],
                        actions=buffer.actions[:n, 0], rewards=buffer.rewards[:n, 0],
                        dones=buffer.dones[:n, 0], timeouts=buffer.timeouts[:n, 0])
    import sbx

    record = {
        "command": "python -m datasets_build.experts.train_locomotion " + shlex.join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "algorithm": f"SAC (sbx {sbx.__version__}), MlpPolicy 256x256, learning_starts {args.learning_starts:,}, "
                     f"{args.train_freq} env steps / {args.train_freq} gradient steps",
        "machine": f"{platform.processor() or platform.machine()}, 1 thread",
        "wall_s": round(wall, 1),
        "steps_per_second": round(args.steps / wall, 1),
        "curve": curve,
    }
    (run_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def replay_arrays(buffer: dict[str, np.ndarray], end: int) -> dict[str, np.ndarray]:
    """The first ``end`` steps of an sb3 replay buffer as D4RL arrays (a trailing partial episode is
    left for the importer to drop). sb3 stores ``dones`` = terminated or truncated and ``timeouts`` =
    truncated by the time limit; D4RL keeps ``terminals`` (terminated) and ``timeouts`` apart."""
    timeouts = buffer["timeouts"][:end].astype(bool)
    return {"observations": buffer["observations"][:end].astype(np.float16),
            "actions": buffer["actions"][:end].astype(np.float16),
            "rewards": buffer["rewards"][:end].astype(np.float32),
            "terminals": buffer["dones"][:end].astype(bool) & ~timeouts, "timeouts": timeouts}


def finalize(args: Args, run_dir: Path) -> dict:
    record = json.loads((run_dir / "training.json").read_text())
    curve = record["curve"]

    def snapshot(step: int) -> Path:
        return run_dir / "snapshots" / f"step-{step:07d}.safetensors"

    late = [p for p in curve if p["step"] > curve[-1]["step"] * (1 - EXPERT_WINDOW)]
    expert_step = max(late, key=lambda p: p["mean"])["step"]
    expert = {"step": expert_step, **measure(args.task, SACActor(snapshot(expert_step)), args.final_eval_episodes)}
    target, tolerance = MEDIUM_FRACTION * expert["mean"], MEDIUM_TOLERANCE * expert["mean"]
    # candidates: curve points near a third (5 episodes each, noisy), each measured again; the closest wins
    candidates = [p for p in curve if abs(p["mean"] - target) <= 2 * tolerance and p["step"] < expert_step]
    measured = [{"step": p["step"], **measure(args.task, SACActor(snapshot(p["step"])), args.final_eval_episodes)}
                for p in tqdm(candidates, desc="medium candidates", leave=False)]
    tried = [{"step": m["step"], "mean": m["mean"]} for m in measured]
    medium = min(measured, key=lambda m: (abs(m["mean"] - target), m["step"]), default=None)
    if medium is None or abs(medium["mean"] - target) > tolerance:
        raise SystemExit(f"{args.task}: no snapshot within {MEDIUM_TOLERANCE:.0%} of the expert's return of a third "
                         f"of it ({target:.0f}); tried {tried}")
    out = args.out / args.task
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(snapshot(expert_step), out / "expert.safetensors")
    shutil.copyfile(snapshot(medium["step"]), out / "medium.safetensors")
    with np.load(run_dir / "replay_buffer.npz") as buffer:
        arrays = replay_arrays(dict(buffer), medium["step"])
    np.savez_compressed(out / MEDIUM_REPLAY_FILE, **arrays)
    record.update(expert=expert, medium={**medium, "target": target, "candidates": tried},
                  medium_replay={"steps": int(len(arrays["rewards"])), "episodes_ended":
                                 int((arrays["terminals"] | arrays["timeouts"]).sum())})
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


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
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e3:.0f}k")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def main(args: Args) -> None:
    if args.plot is not None:
        print(plot_training_curves(args.out, args.plot))
        return
    run_dir = args.run_dir / f"{args.task}-seed{args.seed}"
    if not args.finalize_only:
        train(args, run_dir)
    record = finalize(args, run_dir)
    print(json.dumps({k: record[k] for k in ("wall_s", "expert", "medium", "medium_replay")}, indent=1))


if __name__ == "__main__":
    main(tyro.cli(Args))
