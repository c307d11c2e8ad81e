"""`TaskSpec`: what the tokenizer needs to know about a task, built from gymnasium spaces.

A task's (possibly nested) observation and action spaces are flattened into an ordered tuple of
leaf :class:`FieldSpec` s, one per ``Box`` / ``Discrete`` / ``MultiDiscrete`` / ``MultiBinary`` /
``Text`` leaf, named by their path (``observation``, ``observation.image``, ``action.0``).
Each leaf has a *kind* that decides how it is tokenized:

=============  ==============================================================================
kind           which spaces
=============  ==============================================================================
continuous     float ``Box`` -> one mu-law bin token per element
discrete       ``Discrete``, ``MultiDiscrete``, ``MultiBinary``, integer ``Box`` (values shifted
               by their start / low so they begin at 0; at most 1024 values per element)
image          ``Box(uint8)`` of shape (H, W, C), C in {1, 3, 4} and H, W >= 16 -> 16x16 patches
               (a smaller uint8 box, e.g. MiniGrid's 7x7x3 symbolic grid, is discrete values)
text           ``Text`` (and minigrid's ``MissionSpace``) -> BPE tokens
=============  ==============================================================================

The dispatch follows gymnasium's ``spaces.utils``: one ``singledispatch`` function with one
registered implementation per space type; the base case raises naming the unsupported space.
The spec is plain data (JSON round trip) so that it travels with tokenizers, datasets and
checkpoints without gymnasium objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from functools import singledispatch
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from generalist.vocab import NUM_DISCRETE_VALUES, PATCH_SIZE

# D4RL's reference returns (random, expert) of its Gym-MuJoCo tasks (d4rl/infos.py), by env family:
# the published DT / TT tables are ``100 * (R - random) / (expert - random)`` with these. Our envs are
# gymnasium's -v5, D4RL's were -v2 (mujoco-py): the same tasks, with v5's changes (e.g. Walker2d's feet
# share one friction, the healthy reward is paid only while healthy), so the scale is D4RL's, the
# numbers compare in spirit.
D4RL_REFERENCE_RETURNS: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
_D4RL_TASK = re.compile(r"(hopper|halfcheetah|walker2d)(-v\d+|(-random|-medium|-medium-replay|-medium-expert|-expert)"
                        r"(-v\d+)?)")


def d4rl_family(task: str) -> str | None:
    """``hopper`` for Hopper-v5 or hopper-medium-replay(-v2); None for any other task (pixel variants included)."""
    match = _D4RL_TASK.fullmatch(task.lower())
    return match.group(1) if match else None


def d4rl_normalized_scores(task: str, returns) -> np.ndarray | None:
    """D4RL-normalised scores (0 = random, 100 = D4RL's expert) of a locomotion task's returns, else None."""
    family = d4rl_family(task)
    if family is None:
        return None
    random, expert = D4RL_REFERENCE_RETURNS[family]
    return 100.0 * (np.asarray(returns, np.float64) - random) / (expert - random)

FieldKind = Literal["continuous", "discrete", "image", "text"]


class UnsupportedSpaceError(TypeError):
    """A gymnasium space that the tokenizer has no encoding for."""


@dataclass(frozen=True)
class FieldSpec:
    """One leaf of a task's observation or action.

    Attributes:
        name: path of the leaf, e.g. ``"observation.image"``.
        kind: how the leaf is tokenized (see module docstring).
        space_type: the gymnasium space class name it came from, to rebuild it exactly.
        shape: per-step shape of the value (``()`` for ``Discrete``).
        low, high: flat per-element bounds of a ``Box`` (``None`` otherwise).
        n, start: flat per-element number of values and first value of discrete leaves.
        dtype: numpy dtype name of the value.
        max_length: maximum characters of a ``Text`` leaf.
    """

    name: str
    kind: FieldKind
    space_type: str
    shape: tuple[int, ...]
    dtype: str
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    n: tuple[int, ...] | None = None
    start: tuple[int, ...] | None = None
    max_length: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def size(self) -> int:
        """Number of scalar values (continuous/discrete) in one step of this leaf."""
        return int(np.prod(self.shape, dtype=np.int64))

    def to_space(self) -> spaces.Space:
        """The gymnasium space this leaf was built from."""
        if self.space_type == "Box":
            # image leaves store one scalar bound (0, 255) for every pixel
            low = np.broadcast_to(np.asarray(self.low, dtype=self.dtype), (self.size,)).reshape(self.shape)
            high = np.broadcast_to(np.asarray(self.high, dtype=self.dtype), (self.size,)).reshape(self.shape)
            return spaces.Box(low, high, shape=self.shape, dtype=np.dtype(self.dtype))
        if self.space_type == "Discrete":
            return spaces.Discrete(self.n[0], start=self.start[0])
        if self.space_type == "MultiDiscrete":
            nvec = np.asarray(self.n, dtype=np.int64).reshape(self.shape)
            return spaces.MultiDiscrete(nvec, start=np.asarray(self.start).reshape(self.shape))
        if self.space_type == "MultiBinary":
            return spaces.MultiBinary(self.shape)
        if self.space_type == "Text":
            return spaces.Text(max_length=self.max_length or 1024)
        raise UnsupportedSpaceError(f"field {self.name!r}: cannot rebuild space type {self.space_type!r}")

    @classmethod
    def from_dict(cls, d: dict) -> FieldSpec:
        d = dict(d)
        for key in ("shape", "low", "high", "n", "start"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


# --- space -> leaves, one registered function per space type (gymnasium spaces/utils.py style) ---


@singledispatch
def space_leaves(space: spaces.Space, name: str) -> tuple[list[FieldSpec], Any]:
    """Return the leaves of ``space`` and a JSON structure tree used to (un)flatten values."""
    if any(c.__name__ == "MissionSpace" for c in type(space).__mro__):  # minigrid/BabyAI missions
        return [FieldSpec(name, "text", "Text", (), "str", max_length=1024)], name
    raise UnsupportedSpaceError(
        f"{name}: space {space!r} of type {type(space).__name__} is not supported; supported: "
        "Box, Discrete, MultiDiscrete, MultiBinary, Text, Dict, Tuple (and minigrid MissionSpace)"
    )


def _discrete_leaf(name: str, space_type: str, shape, n, start) -> FieldSpec:
    n = np.asarray(n, dtype=np.int64).reshape(-1)
    if n.size and n.max() > NUM_DISCRETE_VALUES:
        raise UnsupportedSpaceError(
            f"{name}: {space_type} with {int(n.max())} values; at most {NUM_DISCRETE_VALUES} "
            "discrete values per element are supported"
        )
    start = np.asarray(start, dtype=np.int64).reshape(-1)
    return FieldSpec(name, "discrete", space_type, tuple(shape), "int64", n=tuple(map(int, n)),
                     start=tuple(map(int, start)))


@space_leaves.register(spaces.Box)
def _(space: spaces.Box, name: str):
    shape = tuple(space.shape)
    if _is_image_box(space):
        return [FieldSpec(name, "image", "Box", shape, "uint8", low=(0.0,), high=(255.0,))], name
    if np.issubdtype(space.dtype, np.integer) or np.issubdtype(space.dtype, np.bool_):
        low, high = space.low.reshape(-1).astype(np.int64), space.high.reshape(-1).astype(np.int64)
        leaf = _discrete_leaf(name, "Box", shape, high - low + 1, low)
        return [replace(leaf, dtype=space.dtype.name, low=tuple(map(float, low)),
                        high=tuple(map(float, high)))], name
    low = tuple(map(float, space.low.reshape(-1)))
    high = tuple(map(float, space.high.reshape(-1)))
    return [FieldSpec(name, "continuous", "Box", shape, space.dtype.name, low=low, high=high)], name


def _is_image_box(space: spaces.Box) -> bool:
    """The documented image rule: uint8 (H, W, C) with C in {1, 3, 4} and H, W >= one patch."""
    s = space.shape
    return (space.dtype == np.uint8 and len(s) == 3 and s[2] in (1, 3, 4)
            and s[0] >= PATCH_SIZE and s[1] >= PATCH_SIZE)


@space_leaves.register(spaces.Discrete)
def _(space: spaces.Discrete, name: str):
    return [_discrete_leaf(name, "Discrete", (), [space.n], [space.start])], name


@space_leaves.register(spaces.MultiDiscrete)
def _(space: spaces.MultiDiscrete, name: str):
    return [_discrete_leaf(name, "MultiDiscrete", space.shape, space.nvec, space.start)], name


@space_leaves.register(spaces.MultiBinary)
def _(space: spaces.MultiBinary, name: str):
    shape = tuple(np.atleast_1d(space.shape))
    size = int(np.prod(shape))
    return [_discrete_leaf(name, "MultiBinary", shape, [2] * size, [0] * size)], name


@space_leaves.register(spaces.Text)
def _(space: spaces.Text, name: str):
    return [FieldSpec(name, "text", "Text", (), "str", max_length=int(space.max_length))], name


@space_leaves.register(spaces.Dict)
def _(space: spaces.Dict, name: str):
    leaves, tree = [], {}
    for key, sub in space.spaces.items():
        sub_leaves, sub_tree = space_leaves(sub, f"{name}.{key}")
        leaves += sub_leaves
        tree[key] = sub_tree
    return leaves, {"dict": tree}


@space_leaves.register(spaces.Tuple)
def _(space: spaces.Tuple, name: str):
    leaves, tree = [], []
    for i, sub in enumerate(space.spaces):
        sub_leaves, sub_tree = space_leaves(sub, f"{name}.{i}")
        leaves += sub_leaves
        tree.append(sub_tree)
    return leaves, {"tuple": tree}


def _flatten(tree, value, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(tree, str):
        out[tree] = value
    elif "dict" in tree:
        for key, sub in tree["dict"].items():
            _flatten(sub, value[key], out)
    else:
        for sub, v in zip(tree["tuple"], value, strict=True):
            _flatten(sub, v, out)
    return out


def _unflatten(tree, leaves: dict[str, Any]):
    if isinstance(tree, str):
        return leaves[tree]
    if "dict" in tree:
        return {key: _unflatten(sub, leaves) for key, sub in tree["dict"].items()}
    return tuple(_unflatten(sub, leaves) for sub in tree["tuple"])


@dataclass
class TaskSpec:
    """Everything the tokenizer needs about one task; plain data, JSON-serialisable.

    Attributes:
        name: task id, e.g. ``"Pendulum-v1"`` (the env id by default).
        observation_fields, action_fields: ordered leaves (the token order inside a step).
        observation_tree, action_tree: nesting of Dict/Tuple spaces, to (un)flatten values.
        return_scale, reward_scale: returns-to-go and rewards are multiplied by these before being
            binned, so that a task's typical returns fall where the mu-law bins are fine.
        expert_return, random_return: mean episode returns of the expert / random policy, used for
            expert-normalised scores and as the default Decision Transformer target.
        discount: γ of the value targets (discounted returns-to-go) the model learns to predict at
            ``<no_return>`` positions and the Trajectory Transformer planner scores with
            (Janner et al. 2021 use 0.99).
    """

    name: str
    observation_fields: tuple[FieldSpec, ...]
    action_fields: tuple[FieldSpec, ...]
    observation_tree: Any = "observation"
    action_tree: Any = "action"
    return_scale: float = 1.0
    reward_scale: float = 1.0
    expert_return: float | None = None
    random_return: float | None = None
    discount: float = 0.99
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_spaces(cls, name: str, observation_space: spaces.Space, action_space: spaces.Space,
                    **kwargs) -> TaskSpec:
        obs_leaves, obs_tree = space_leaves(observation_space, "observation")
        act_leaves, act_tree = space_leaves(action_space, "action")
        if any(leaf.kind in ("image", "text") for leaf in act_leaves):
            raise UnsupportedSpaceError(f"{name}: image or text actions are not supported")
        return cls(name, tuple(obs_leaves), tuple(act_leaves), obs_tree, act_tree, **kwargs)

    @classmethod
    def from_env(cls, env: gym.Env, name: str | None = None, **kwargs) -> TaskSpec:
        """Build the spec of a (single, not vectorised) gymnasium env."""
        if name is None:
            name = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
        obs_space = getattr(env, "single_observation_space", env.observation_space)
        act_space = getattr(env, "single_action_space", env.action_space)
        return cls.from_spaces(name, obs_space, act_space, **kwargs)

    # --- values ---
    def flatten_observation(self, observation) -> dict[str, Any]:
        """Nested observation (as the env returns it) -> ``{field name: value}``."""
        return _flatten(self.observation_tree, observation, {})

    def flatten_action(self, action) -> dict[str, Any]:
        return _flatten(self.action_tree, action, {})

    def unflatten_action(self, leaves: dict[str, Any]):
        """``{field name: value}`` -> the action as the env expects it (Dict/Tuple rebuilt)."""
        return _unflatten(self.action_tree, leaves)

    def observation_space(self) -> spaces.Space:
        return _rebuild(self.observation_tree, {f.name: f for f in self.observation_fields})

    def action_space(self) -> spaces.Space:
        return _rebuild(self.action_tree, {f.name: f for f in self.action_fields})

    def normalized_returns(self, returns) -> np.ndarray | None:
        """Expert-normalised scores ``(R − R_random) / (R_expert − R_random)`` of these returns, or ``None``
        without two distinct references (the one formula of evaluation and of Gato's data filter)."""
        if self.expert_return is None or self.random_return is None or self.expert_return == self.random_return:
            return None
        return (np.asarray(returns, np.float64) - self.random_return) / (self.expert_return - self.random_return)

    @property
    def action_size(self) -> int:
        """Number of action tokens per step."""
        return sum(f.size for f in self.action_fields)

    # --- serialisation ---
    def to_dict(self) -> dict:
        d = asdict(self)
        d["observation_fields"] = [asdict(f) for f in self.observation_fields]
        d["action_fields"] = [asdict(f) for f in self.action_fields]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        d = dict(d)
        d["observation_fields"] = tuple(FieldSpec.from_dict(f) for f in d["observation_fields"])
        d["action_fields"] = tuple(FieldSpec.from_dict(f) for f in d["action_fields"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> TaskSpec:
        return cls.from_dict(json.loads(s))


def _rebuild(tree, fields: dict[str, FieldSpec]) -> spaces.Space:
    if isinstance(tree, str):
        return fields[tree].to_space()
    if "dict" in tree:
        return spaces.Dict({k: _rebuild(sub, fields) for k, sub in tree["dict"].items()})
    return spaces.Tuple(tuple(_rebuild(sub, fields) for sub in tree["tuple"]))
