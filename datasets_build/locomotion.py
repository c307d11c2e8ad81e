"""D4RL-style MuJoCo locomotion datasets, rebuilt from the SAC policies committed in ``experts/locomotion/``.

D4RL (Fu et al. 2020) made its Gym-MuJoCo datasets from one SAC run per task; we do the same with
the policies ``experts/train_locomotion.py`` trained here, and the same four kinds per task:

    expert          episodes of the fully trained policy
    medium          episodes of the snapshot at about a third of the expert's return
    medium-replay   the run's real replay buffer up to the medium snapshot (committed as D4RL arrays,
                    ``medium_replay.npz``: random play first, then every policy SAC went through)
    medium-expert   medium + expert episodes (the same episodes as those two datasets: episode seeds
                    derive from the build seed, task, source and index only)

Actions are sampled from the stochastic policy, as D4RL's were. Terminals (the body fell) and
timeouts (1,000 steps) are kept apart (``terminated`` / ``truncated`` per episode; the D4RL export
writes them as ``terminals`` / ``timeouts``). Sizes are chosen for a 2-core CPU: 100 expert and 200
medium episodes (D4RL: 1 M steps each); a Hopper or Walker2d medium episode ends when the body falls.

Our envs are gymnasium's ``-v5``, not D4RL's ``-v2`` (mujoco-py): the same tasks, but v5 changed
details (Walker2d's two feet now have the same friction; Hopper and Walker2d pay the healthy reward
only while healthy; a newer simulator), so D4RL's published scores compare in spirit, not to the decimal.

Reference returns in the task spec: ``expert_return`` is the deterministic expert's mean return over
20 episodes measured when it was chosen (``training.json``), ``random_return`` the mean of
``RANDOM_EPISODES`` uniformly random episodes measured at build time. D4RL's own references (for
the D4RL-normalised score) are in ``generalist.task_spec.D4RL_REFERENCE_RETURNS``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path

import gymnasium as gym
import numpy as np

from datasets_build.base import BuildOptions, prepare_folder
from datasets_build.collector import EXPERT, POLICY_PREFIX, ControlTask, random_action, task_spec
from datasets_build.common import is_built
from datasets_build.control import BUILD_CONFIG, ControlDatasetBuilder
from datasets_build.episodes import SHARDS_DIR
from datasets_build.experts.mujoco import (
    MEDIUM,
    MEDIUM_REPLAY_FILE,
    WEIGHTS_DIR,
    SACPolicies,
    play,
    training_record,
)
from datasets_build.offline import d4rl_rows, read_d4rl_arrays, write_imported
from generalist.integrity import atomic_folder

LOCOMOTION_TASKS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
KINDS = ("expert", "medium", "medium-replay", "medium-expert")
DEFAULT_EPISODES = {"expert": 100, "medium": 200}  # per policy; ~100k steps of a 1,000-step expert
RANDOM_EPISODES = 20
RANDOM_SEED = 12_345


def _expert(num_envs: int, task: str) -> SACPolicies:
    env = gym.make(task)
    env.close()
    return SACPolicies(num_envs, task, env.action_space)


def locomotion_task(task: str) -> ControlTask:
    record = training_record(task)
    notes = (f"{record['algorithm']}, trained {record['args']['steps']:,} steps in {record['wall_s'] / 60:.0f} min "
             f"(`{record['command']}`); expert = step {record['expert']['step']:,}, deterministic return "
             f"{record['expert']['mean']:.0f} ± {np.std(record['expert']['returns']):.0f} "
             f"({len(record['expert']['returns'])} episodes; sampled actions {record['expert']['sampled_mean']:.0f}); "
             f"medium = step {record['medium']['step']:,}, {record['medium']['mean']:.0f} ± "
             f"{np.std(record['medium']['returns']):.0f} (sampled {record['medium']['sampled_mean']:.0f})")
    return ControlTask(task, partial(gym.make, task), partial(_expert, task=task), notes)


@cache
def random_return(task: str, episodes: int = RANDOM_EPISODES, seed: int = RANDOM_SEED) -> float:
    """Mean return of uniformly random play (the random reference of the expert-normalised score)."""
    env, rng = gym.make(task), np.random.default_rng(seed)
    try:
        return float(np.mean([play(env, lambda _: random_action(env.action_space, rng), seed + i)
                              for i in range(episodes)]))
    finally:
        env.close()


@dataclass
class LocomotionDatasetBuilder(ControlDatasetBuilder):
    """One D4RL-style dataset: one task, one kind (``expert``, ``medium``, ``medium-replay``, ``medium-expert``)."""

    task: str = "Hopper-v5"
    dataset_kind: str = "medium"
    expert_actions: bool = False  # D4RL data has the taken action only
    sources_note: str = (f"`{EXPERT}`: the trained SAC policy; `{POLICY_PREFIX}{MEDIUM}`: its snapshot at about "
                         "a third of the expert's return. Actions are sampled from the stochastic policy.")
    source_mix: dict[str, float] = field(default_factory=dict)

    def episode_counts(self, options: BuildOptions) -> dict[str, int]:
        expert = options.episodes or DEFAULT_EPISODES["expert"]
        medium = options.episodes or DEFAULT_EPISODES["medium"]
        return {"expert": {EXPERT: expert}, "medium": {f"{POLICY_PREFIX}{MEDIUM}": medium},
                "medium-expert": {f"{POLICY_PREFIX}{MEDIUM}": medium, EXPERT: expert}}[self.dataset_kind]

    def build(self, root: Path, options: BuildOptions) -> Path:
        if self.dataset_kind == "medium-replay":
            return self._import_replay(root, options)
        if self.dataset_kind == "medium-expert":
            folder, done = prepare_folder(root, self.name, options)
            if not done:
                self._reuse_shards(Path(root), folder, options)
            options = replace(options, overwrite=False)  # prepared above
        return super().build(root, options)

    def _reuse_shards(self, root: Path, folder: Path, options: BuildOptions) -> None:
        """medium-expert is medium + expert episode for episode (episode seeds derive from the build seed,
        task, source and index only): copy the shards of those datasets when they are built beside it with
        the same settings, and the collector has nothing left to collect."""
        counts, task_dir = self.episode_counts(options), self.task.replace("/", "_")
        for sibling in (self.name.replace("-medium-expert", "-medium"), self.name.replace("-medium-expert", "-expert")):
            other = root / sibling
            if not is_built(other):
                continue
            config = json.loads((other / BUILD_CONFIG).read_text())
            if (config["seed"], config["episodes_per_shard"]) != (options.seed, options.episodes_per_shard):
                continue
            for source, episodes in config["episodes_per_source"].items():
                if counts.get(source) != episodes:
                    continue
                for shard in sorted((other / SHARDS_DIR / task_dir).glob(f"{source}-*")):
                    target = folder / SHARDS_DIR / task_dir / shard.name
                    if not target.exists():
                        with atomic_folder(target, manifest=False) as tmp:
                            shutil.copytree(shard, tmp, dirs_exist_ok=True)

    def _import_replay(self, root: Path, options: BuildOptions) -> Path:
        """medium-replay is data, not a policy: the committed buffer, imported as D4RL arrays are."""
        folder, done = prepare_folder(root, self.name, options)
        if done:
            return folder
        task = locomotion_task(self.task)
        expert_return, random_return_ = self.reference_returns(task)
        spec = replace(task_spec(task), expert_return=expert_return, random_return=random_return_)
        path = WEIGHTS_DIR / self.task / MEDIUM_REPLAY_FILE
        rows, dropped = d4rl_rows(spec, read_d4rl_arrays(path), "replay")
        return write_imported(folder, spec, rows, title=self.name, options=options,
                              description=f"{self.description}\n\nThe SAC run's replay buffer up to the medium "
                                          f"snapshot (random play, then every policy it went through). {task.notes}.",
                              extra={"source_file": _shown(path),
                                     "dropped_trailing_steps": dropped})

    def reference_returns(self, task: ControlTask, sources: np.ndarray | None = None,
                          returns: np.ndarray | None = None) -> tuple[float, float]:
        """The committed expert's measured return and random play's, whatever episodes the dataset holds."""
        return float(training_record(task.name)["expert"]["mean"]), random_return(task.name)


def _shown(path: Path) -> str:
    """A committed file's path from the repository root (absolute when it lies elsewhere)."""
    root = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def locomotion_builders() -> dict[str, LocomotionDatasetBuilder]:
    """The twelve datasets, named as D4RL's (``hopper-medium-replay``; our envs are -v5)."""
    builders = {}
    for short, task in LOCOMOTION_TASKS.items():
        for kind in KINDS:
            name = f"{short}-{kind}"
            builders[name] = LocomotionDatasetBuilder(
                name, partial(_tasks, task), default_episodes=0, task=task, dataset_kind=kind,
                description=f"D4RL-style {task} `{kind}` data from the SAC policies trained here "
                            "(`datasets_build/experts/locomotion/`). Needs the `mujoco` extra.")
    return builders


def _tasks(task: str) -> tuple[ControlTask, ...]:
    return (locomotion_task(task),)
