"""Tiny synthetic data in every format training consumes, for tests and benchmarks.

Text: ``{"text"}`` rows; captions: ``{"image", "caption"}``; control: episodes as
``datasets_build.iter_episodes`` yields them, for a continuous task and a discrete-action task.
:func:`write_datasets` saves one dataset of each kind the way the builders do, in seconds, so that
``train.py`` can run end to end without building the real datasets; actions follow observations so
that there is something to learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
from gymnasium import spaces
from PIL import Image

from datasets_build.common import TASK_SPECS
from datasets_build.episodes import SHARDS_DIR, episode_features
from generalist.task_spec import TaskSpec

WORDS = ["the", "a", "red", "green", "blue", "small", "large", "square", "circle", "robot", "moves",
         "left", "right", "up", "down", "on", "of"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def texts(n: int = 40, seed: int = 0) -> list[str]:
    """Documents of 5-60 random words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for _ in range(n)]


def captions(n: int = 24, seed: int = 0) -> list[dict]:
    """A coloured square on black, captioned with its colour."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        name = str(rng.choice(list(COLORS)))
        img = np.zeros((48, 40, 3), np.uint8)
        img[8:32, 8:30] = COLORS[name]
        items.append({"image": Image.fromarray(img), "caption": f"a {name} square"})
    return items


def task_specs() -> dict[str, TaskSpec]:
    """A continuous-action and a discrete-action task."""
    box = TaskSpec.from_spaces("Box-v0", spaces.Box(-8.0, 8.0, (3,), np.float32),
                               spaces.Box(-2.0, 2.0, (1,), np.float32), return_scale=0.01)
    disc = TaskSpec.from_spaces("Disc-v0", spaces.Box(-5.0, 5.0, (4,), np.float32), spaces.Discrete(2),
                                return_scale=0.01)
    return {box.name: box, disc.name: disc}


def episodes(n: int = 12, seed: int = 0, length: tuple[int, int] = (20, 90)) -> list[dict]:
    """Episodes whose actions follow the observations (so that there is something to learn)."""
    rng = np.random.default_rng(seed)
    specs, out = task_specs(), []
    for i in range(n):
        task = "Box-v0" if i % 2 == 0 else "Disc-v0"
        t = int(rng.integers(*length))
        obs = rng.uniform(-1, 1, (t, 3 if task == "Box-v0" else 4)).astype(np.float32)
        act = np.clip(obs[:, :1], -2, 2).astype(np.float32) if task == "Box-v0" else (obs[:, 0] > 0).astype(np.int64)
        out.append({"task": specs[task].name, "source": "fixture",
                    "observations": {"observation": obs}, "actions": {"action": act},
                    "rewards": rng.uniform(0, 1, t).astype(np.float32),
                    "terminated": True, "truncated": False})
    return out


def write_datasets(root: Path) -> dict[str, float]:
    """Write a text, a caption and two control datasets under ``root``; returns their mixture."""
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts(40)}),
        "validation": datasets.Dataset.from_dict({"text": texts(8, seed=1)}),
    }).save_to_disk(str(root / "tiny_text"))
    cap = captions(24)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"image": [c["image"] for c in items],
                                           "caption": [c["caption"] for c in items]}, features=features)
        for split, items in (("train", cap[:20]), ("test", cap[20:]))
    }).save_to_disk(str(root / "tiny_captions"))
    # one task per control dataset (tasks with different leaves cannot share arrow columns)
    for dataset, (name, spec) in zip(("tiny_box", "tiny_disc"), task_specs().items(), strict=True):
        folder = root / dataset
        eps = [e for e in episodes(12) if e["task"] == name]
        rows = {"task": [e["task"] for e in eps], "source": [e["source"] for e in eps],
                "seed": list(range(len(eps))), "rewards": [e["rewards"] for e in eps],
                "terminated": [True] * len(eps), "truncated": [False] * len(eps),
                "episode_return": [float(e["rewards"].sum()) for e in eps],
                "observation": [e["observations"]["observation"] for e in eps],
                "action": [e["actions"]["action"] for e in eps]}
        datasets.Dataset.from_dict(rows, features=episode_features(spec)).save_to_disk(
            str(folder / SHARDS_DIR / "00000"))
        (folder / TASK_SPECS).write_text(json.dumps({name: spec.to_dict()}))
    return {"tiny_text": 1.0, "tiny_captions": 1.0, "tiny_box": 1.0, "tiny_disc": 1.0}
