"""Named datasets and the mixtures that training samples from.

``DATASETS`` maps a name to its builder; ``MIXTURES`` maps a mixture name to ``{dataset: weight}``,
where a weight is the probability that a training sample is drawn from that dataset (weights of
a mixture sum to 1). ``ensure_built`` builds whatever a mixture still lacks; the loaders open a
built dataset whatever its kind.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from datasets_build.base import Builder, BuildOptions
from datasets_build.captions import CaptionDatasetBuilder
from datasets_build.collector import BURST_PREFIX, DETOUR_PREFIX, EXPERT, LAG_PREFIX, NOISY_PREFIX, RANDOM
from datasets_build.common import is_built
from datasets_build.control import (
    CORE_TASKS,
    PIXEL_TASKS,
    ControlDatasetBuilder,
    babyai_tasks,
    metaworld_tasks,
)
from datasets_build.episodes import load_episodes
from datasets_build.locomotion import locomotion_builders
from datasets_build.text import TextDatasetBuilder
from generalist.task_spec import TaskSpec

LOCOMOTION: dict[str, Builder] = locomotion_builders()  # D4RL's names; gymnasium -v5 envs

DATASETS: dict[str, Builder] = {
    "control-core": ControlDatasetBuilder(
        "control-core", lambda: CORE_TASKS, default_episodes=200,
        description="Classic control (CartPole, Acrobot, MountainCar, MountainCarContinuous, Pendulum) "
                    "with scripted experts, noisy experts and random play."),
    "control-lowq": ControlDatasetBuilder(
        "control-lowq", lambda: CORE_TASKS, default_episodes=400,
        source_mix={EXPERT: 0.05, f"{LAG_PREFIX}4": 0.25, f"{LAG_PREFIX}8": 0.25, f"{NOISY_PREFIX}0.6": 0.15,
                    RANDOM: 0.3},
        description="The core classic-control tasks as low-quality data (as D4RL's medium-replay is): 5 % "
                    "expert episodes; the rest late experts (acting on the observation of 4 or 8 steps before: "
                    "consistently wrong, as a replay buffer's early policies are), a heavily noisy expert and "
                    "random play. Return conditioning and planning exist for data like this."),
    "control-pixels": ControlDatasetBuilder(
        "control-pixels", lambda: PIXEL_TASKS, default_episodes=10,
        description="Pendulum and CartPole whose observation is a 64x64 rendered frame plus the state "
                    "(Dict observation), so images and control meet in one sequence."),
    "babyai": ControlDatasetBuilder(
        "babyai", babyai_tasks, default_episodes=1000,
        source_mix={EXPERT: 0.3, f"{NOISY_PREFIX}0.1": 0.1, f"{NOISY_PREFIX}0.3": 0.1, f"{NOISY_PREFIX}0.6": 0.05,
                    f"{BURST_PREFIX}0.05": 0.1, f"{DETOUR_PREFIX}0.1": 0.25, RANDOM: 0.1},
        sources_note=("`noisy-e`: epsilon-random actions with probability e; `burst-p`: a random action held for "
                      "10 steps, started with probability p per step; `detour-p`: with probability p per step, "
                      "a second bot walks up to an object the mission does not name (and picks it up half the "
                      "time) while BabyAIBot labels every step (datasets_build/experts/babyai.py)."),
        description="BabyAI levels (minigrid): text mission + 7x7 egocentric grid (one id per cell: object, colour, "
                    "state) + direction, discrete actions; expert: minigrid's BabyAIBot. Needs the `babyai` extra."),
    "metaworld": ControlDatasetBuilder(
        "metaworld", metaworld_tasks, default_episodes=20,
        description="Meta-World v3 manipulation tasks with metaworld's scripted policies (39-d state, "
                    "4-d continuous action). Needs the `metaworld` extra."),
    "captions": CaptionDatasetBuilder(),
    "text": TextDatasetBuilder(),
    **LOCOMOTION,
}

MIXTURES: dict[str, dict[str, float]] = {
    # builds in well under 3 minutes on 2 CPU cores
    "demo": {"control-core": 0.5, "control-pixels": 0.15, "captions": 0.2, "text": 0.15},
    # the `control` training preset: the core tasks and their pixel variants
    "control": {"control-core": 0.85, "control-pixels": 0.15},
    "control-lowq": {"control-lowq": 1.0},
    "babyai": {"babyai": 1.0},
    # `python -m datasets_build locomotion` builds the twelve; a model per dataset is D4RL's protocol
    "locomotion": {name: 1.0 / len(LOCOMOTION) for name in LOCOMOTION},
    "full": {"control-core": 0.25, "control-pixels": 0.1, "babyai": 0.15, "metaworld": 0.15,
             "captions": 0.2, "text": 0.15},
}


def resolve(name: str) -> dict[str, float]:
    """A dataset, mixture or ``all`` -> ``{dataset: weight}``."""
    if name in MIXTURES:
        return MIXTURES[name]
    if name == "all":
        return {n: 1.0 / len(DATASETS) for n in DATASETS}
    if name in DATASETS:
        return {name: 1.0}
    raise KeyError(f"unknown dataset or mixture {name!r}; datasets: {sorted(DATASETS)}, "
                   f"mixtures: {sorted(MIXTURES)} or 'all'")


def ensure_built(mixture: str, root: str | Path = "data", options: BuildOptions | None = None) -> dict[str, Path]:
    """Build the datasets of ``mixture`` that are missing (or unfinished) under ``root``."""
    options = options or BuildOptions()
    return {name: DATASETS[name].build(Path(root), options) for name in resolve(mixture)}


def load_control(name: str, root: str | Path = "data") -> tuple[datasets.Dataset, dict[str, TaskSpec]]:
    """Episodes and task specs of a built control dataset (see ``datasets_build.episodes``)."""
    return load_episodes(name, root)


def load_split_dataset(name: str, root: str | Path = "data") -> datasets.DatasetDict:
    """The ``DatasetDict`` of a built caption or text dataset."""
    folder = Path(root) / name
    if not is_built(folder):
        raise FileNotFoundError(f"{folder} is not built; run `python -m datasets_build {name} --out {root}`")
    return datasets.load_from_disk(str(folder / "data"))


def load_dataset(name: str, root: str | Path = "data"):
    """Open a built dataset by name: ``(Dataset, specs)`` for control, ``DatasetDict`` otherwise."""
    if DATASETS[name].kind == "control":
        return load_control(name, root)
    return load_split_dataset(name, root)
