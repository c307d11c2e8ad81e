"""Image–caption data built here: procedural scenes and captioned environment frames (64x64 RGB).

Scenes. 1–3 objects (4 shapes x 7 colours x 2 sizes) on one of a few backgrounds, drawn with PIL
at 4x resolution and downsampled (anti-aliased edges), captioned by a small grammar::

    one object     "a small red circle in the top left"
    two objects    "a small red circle left of a large blue square"   (left of / right of /
                   above / below, and the layout is sampled so that the relation is unambiguous)
    three objects  "from left to right: a small red circle, a large blue square and a green ..."

Held-out compositions (the ``test`` split). Some colour–shape pairs (:data:`HELD_OUT_PAIRS`) never
appear in ``train``; every ``test`` scene contains at least one of them, so captioning them
measures composition rather than memory. Likewise a cart pole *on the right leaning left* appears
only in ``test``.

Environment frames. States of CartPole and Pendulum set directly and rendered, captioned from the
state ("a cart pole leaning left, the cart on the right of the track", "a pendulum pointing up and
to the left"), so captions connect to what the control datasets show.
"""

from __future__ import annotations

import itertools
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import gymnasium as gym
import numpy as np
from PIL import Image, ImageDraw

from datasets_build.base import BuildOptions, DatasetKind, prepare_folder
from datasets_build.common import (
    derive_seed,
    now_iso,
    package_versions,
    quiet_datasets,
    write_card,
)
from datasets_build.episodes import png_bytes
from datasets_build.wrappers import offscreen_rendering, resize_frame
from generalist.integrity import atomic_folder
from generalist.vocab import DEFAULT_IMAGE_SIZE

IMAGE_SIZE = DEFAULT_IMAGE_SIZE
SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges at 64x64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 6.0, "large": 11.0}  # radius in 64-pixel units
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((20, 20, 20), (70, 70, 70), (120, 110, 100), (30, 40, 70))
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "diamond"),
    ("purple", "circle"), ("orange", "square"),
})
MARGIN = 2.0  # pixels kept free between objects and from the border
RELATION_SLACK = 4.0  # an axis relation needs |d_axis| > |d_other_axis| + this
MAX_PLACEMENT_TRIES = 200
HELD_OUT_CARTPOLE = ("right", "left")  # (cart position, lean) only in test

DEFAULT_TRAIN_SCENES = 4000
TEST_FRACTION = 0.15
DEFAULT_FRAMES = 600  # environment frames (half CartPole, half Pendulum)
CARTPOLE_X_RANGE = 2.0
CARTPOLE_THETA_RANGE = 0.2
CARTPOLE_UPRIGHT = 0.04  # |theta| below this reads as upright
CARTPOLE_CENTRE = 0.6  # |x| below this reads as "in the middle"
PENDULUM_DIRECTIONS = ("up", "up and to the left", "to the left", "down and to the left", "down",
                       "down and to the right", "to the right", "up and to the right")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def draw_scene(objects: list[SceneObject], background: tuple[int, int, int]) -> np.ndarray:
    canvas = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x, y, r = obj.x * SUPERSAMPLE, obj.y * SUPERSAMPLE, obj.radius * SUPERSAMPLE
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj.shape == "square":
            side = r * 0.9
            draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def _region(obj: SceneObject) -> str:
    third = IMAGE_SIZE / 3
    rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
    row, col = rows[min(int(obj.y // third), 2)], cols[min(int(obj.x // third), 2)]
    if (row, col) == ("middle", "centre"):
        return "in the centre"
    return f"in the {row} {col}" if row != "middle" else f"in the middle {col}"


def _relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where ``a`` is relative to ``b``, or None if not clear (image y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy) + RELATION_SLACK:
        return "left of" if dx < 0 else "right of"
    if abs(dy) > abs(dx) + RELATION_SLACK:
        return "above" if dy < 0 else "below"
    return None


def caption_scene(objects: list[SceneObject]) -> str | None:
    if len(objects) == 1:
        return f"{objects[0].phrase()} {_region(objects[0])}"
    if len(objects) == 2:
        relation = _relation(objects[0], objects[1])
        return None if relation is None else f"{objects[0].phrase()} {relation} {objects[1].phrase()}"
    ordered = sorted(objects, key=lambda o: o.x)
    if any(b.x - a.x < RELATION_SLACK for a, b in itertools.pairwise(ordered)):
        return None  # left-to-right order not clear
    phrases = [o.phrase() for o in ordered]
    return f"from left to right: {', '.join(phrases[:-1])} and {phrases[-1]}"


def sample_scene(rng: np.random.Generator, held_out: bool) -> tuple[np.ndarray, str]:
    """A random scene and its caption. ``held_out`` scenes contain >= 1 held-out colour–shape pair;
    the others contain none."""
    allowed = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT_PAIRS) == held_out]
    free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]
    for _ in range(MAX_PLACEMENT_TRIES):
        count = int(rng.integers(1, 4))
        pairs = [allowed[rng.integers(len(allowed))]]
        pairs += [(free + allowed if held_out else free)[i]
                  for i in rng.integers(len(free + allowed) if held_out else len(free), size=count - 1)]
        rng.shuffle(pairs)
        objects: list[SceneObject] = []
        for colour, shape in pairs:
            size = list(SIZES)[rng.integers(len(SIZES))]
            r = SIZES[size] + MARGIN
            x, y = rng.uniform(r, IMAGE_SIZE - r, size=2)
            if any(np.hypot(x - o.x, y - o.y) < r + o.radius + MARGIN for o in objects):
                break
            objects.append(SceneObject(shape, colour, size, float(x), float(y)))
        if len(objects) != count:
            continue
        caption = caption_scene(objects)
        if caption is not None:
            background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            return draw_scene(objects, background), caption
    raise RuntimeError("could not place a captionable scene; check SIZES / IMAGE_SIZE")


_PAIR_PATTERN = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def caption_compositions(caption: str) -> set[tuple[str, str]]:
    """The colour–shape pairs a scene caption mentions (used to check the held-out split)."""
    return set(_PAIR_PATTERN.findall(caption))


# --- environment frames ---


def cartpole_frame(env: gym.Env, rng: np.random.Generator, held_out: bool) -> tuple[np.ndarray, str]:
    while True:
        x = rng.uniform(-CARTPOLE_X_RANGE, CARTPOLE_X_RANGE)
        theta = rng.uniform(-CARTPOLE_THETA_RANGE, CARTPOLE_THETA_RANGE)
        position = "in the middle" if abs(x) < CARTPOLE_CENTRE else ("right" if x > 0 else "left")
        lean = "upright" if abs(theta) < CARTPOLE_UPRIGHT else ("right" if theta > 0 else "left")
        if ((position, lean) == HELD_OUT_CARTPOLE) == held_out:
            break
    env.unwrapped.state = np.array([x, 0.0, theta, 0.0])
    where = "in the middle of the track" if position == "in the middle" else f"on the {position} of the track"
    pose = "standing upright" if lean == "upright" else f"leaning {lean}"
    return resize_frame(env.render()), f"a cart pole {pose}, the cart {where}"


def pendulum_frame(env: gym.Env, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    theta = rng.uniform(-np.pi, np.pi)  # 0 = up, counter-clockwise positive (tip at (-sin, cos))
    env.unwrapped.state = np.array([theta, 0.0])
    env.unwrapped.last_u = None  # no torque arrow
    sector = int(np.round(theta / (np.pi / 4))) % len(PENDULUM_DIRECTIONS)
    return resize_frame(env.render()), f"a pendulum pointing {PENDULUM_DIRECTIONS[sector]}"


# --- the builder ---


@dataclass
class CaptionDatasetBuilder:
    name: str = "captions"
    description: str = (
        "Procedurally rendered 64x64 scenes (1-3 coloured shapes, sizes, spatial relations) and "
        "rendered CartPole / Pendulum frames, each with a caption from a small grammar. The `test` "
        "split holds compositions never seen in `train` (held-out colour-shape pairs; a cart pole on "
        "the right leaning left)."
    )
    kind: DatasetKind = "captions"

    def build(self, root: Path, options: BuildOptions) -> Path:
        folder, done = prepare_folder(root, self.name, options)
        if done:
            return folder
        start = time.perf_counter()
        train_scenes = options.samples or DEFAULT_TRAIN_SCENES
        test_scenes = max(1, int(round(train_scenes * TEST_FRACTION)))
        frames = max(4, train_scenes * DEFAULT_FRAMES // DEFAULT_TRAIN_SCENES)
        splits = {"train": self._rows(train_scenes, frames, options.seed, held_out=False),
                  "test": self._rows(test_scenes, max(2, int(frames * TEST_FRACTION)), options.seed, True)}
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        data = datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in splits.items()})
        with atomic_folder(folder / "data") as tmp, quiet_datasets():
            data.save_to_disk(str(tmp))
        seconds = time.perf_counter() - start
        test_pairs = sorted(" ".join(p) for p in HELD_OUT_PAIRS)
        record = {
            "name": self.name, "builder": "datasets_build.captions.CaptionDatasetBuilder",
            "command": options.command, "seed": options.seed, "build_date": now_iso(),
            "build_time_s": round(seconds, 2), "rows": {k: len(v["caption"]) for k, v in splits.items()},
            "held_out_pairs": test_pairs, "held_out_cartpole": list(HELD_OUT_CARTPOLE),
            "distinct_captions": {k: len(set(v["caption"])) for k, v in splits.items()},
            "versions": package_versions(),
        }
        examples = "\n".join(f"- {c}" for c in splits["train"]["caption"][:6] + splits["test"]["caption"][:3])
        write_card(folder, self.name, self.description, record, {
            "Held out (test only)": "Colour-shape pairs: " + ", ".join(test_pairs)
                                    + ". Cart pole on the right leaning left.",
            "Example captions (train, then test)": examples,
            "Format": "`DatasetDict` under `data/` with splits `train` / `test`; columns `image` "
                      "(`datasets.Image`, 64x64 RGB) and `caption` (str). Load with "
                      "`datasets_build.registry.load_dataset('captions', root)`.",
        })
        return folder

    def _rows(self, scenes: int, frames: int, seed: int, held_out: bool) -> dict[str, list]:
        split = "test" if held_out else "train"
        rng = np.random.default_rng(derive_seed(seed, self.name, split))
        images, captions = [], []
        for _ in range(scenes):
            image, caption = sample_scene(rng, held_out)
            images.append(image)
            captions.append(caption)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            offscreen_rendering()
            cartpole = gym.make("CartPole-v1", render_mode="rgb_array")
            pendulum = gym.make("Pendulum-v1", render_mode="rgb_array")
            cartpole.reset(seed=0)
            pendulum.reset(seed=0)
            for i in range(frames):
                if held_out or i % 2 == 0:
                    image, caption = cartpole_frame(cartpole, rng, held_out)
                else:
                    image, caption = pendulum_frame(pendulum, rng)
                images.append(image)
                captions.append(caption)
            cartpole.close()
            pendulum.close()
        return {"image": [{"bytes": png_bytes(im), "path": None} for im in images], "caption": captions}
