"""What the control modes share: per-step prompts, constrained action tokens, rewards.

One control timestep is ``[R_t] [o_t] <sep> [a_t] [r_t]`` (DESIGN.md). A decision feeds
``[R_t] [o_t] <sep>`` for every environment (one row each), then samples the action tokens, each
restricted to the id range valid for its element of the action space
(:meth:`GeneralistTokenizer.action_token_ranges`), so a decoded action is always in the space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from generalist.engine import DecodeState, Engine
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer, Sample, concat_samples, token_sample
from generalist.vocab import Modality


def step_prompts(tok: GeneralistTokenizer, spec: TaskSpec, observations: dict[str, Any],
                 returns_to_go: np.ndarray | None = None) -> list[Sample]:
    """``[R_t] [o_t] <sep>`` for a batch of environments -> one sample per environment.

    ``observations`` maps each observation field to a batch (B, ...) (what
    ``spec.flatten_observation`` gives for a vector env's observation); ``returns_to_go`` (B,) or
    ``None`` for ``<no_return>`` (Gato mode). The tokenizer encodes the B environments as if they
    were B timesteps, in one vectorised call.
    """
    return tok.encode_steps(spec, observations, None, None, returns_to_go)


def reward_sample(tok: GeneralistTokenizer, spec: TaskSpec, reward: float) -> Sample:
    """The ``r_t`` token that closes a step (scaled by the task's reward scale, then binned)."""
    ids = tok.encode_continuous(np.array([reward * spec.reward_scale]), "reward")
    return token_sample(ids, Modality.REWARD)


def action_sample(action_ids: np.ndarray) -> Sample:
    return token_sample(action_ids, Modality.ACTION)


def sample_actions(engine: Engine, state: DecodeState, tok: GeneralistTokenizer, spec: TaskSpec,
                   prompts: Sequence[Sample], temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None) -> np.ndarray:
    """Feed the step prompts, then sample every row's action tokens -> ids (B, A).

    The last action token is *not* fed: the caller feeds it with the reward and the next step.
    """
    ranges = tok.action_token_ranges(spec)
    engine.feed(state, prompts, ranges[0] if ranges else None)
    ids = engine.generate(state, ranges, temperature, top_k, top_p, feed_last=False)  # (B, A)
    return ids.numpy()


def decode_actions(tok: GeneralistTokenizer, spec: TaskSpec, ids: np.ndarray) -> list[Any]:
    """Action ids (B, A) -> one gymnasium action per row."""
    return [tok.decode_action(spec, row) for row in ids]


def continuous_values(tok: GeneralistTokenizer) -> tuple[tuple[int, int], torch.Tensor]:
    """The continuous id range and the value (bin centre, unscaled) of each id in it (1024,)."""
    r = tok.layout.ranges["continuous"]
    centres = torch.from_numpy(tok.decode_continuous(np.arange(r.start, r.stop))).double()
    return (r.start, r.stop), centres


def observation_token_ranges(tok: GeneralistTokenizer, spec: TaskSpec) -> list[tuple[int, int]]:
    """Allowed id range of each observation token (continuous and discrete fields only)."""
    out = []
    cont = tok.layout.ranges["continuous"]
    for fld in spec.observation_fields:
        if fld.kind == "continuous":
            out += [(cont.start, cont.stop)] * fld.size
        elif fld.kind == "discrete":
            base = tok.layout.discrete_offset
            out += [(base, base + n) for n in fld.n]
        else:
            raise ValueError(f"{spec.name}: observation field {fld.name!r} is {fld.kind}; predicting it "
                             "(Trajectory Transformer planning) needs continuous or discrete fields")
    return out


__all__ = [
    "action_sample",
    "concat_samples",
    "continuous_values",
    "decode_actions",
    "observation_token_ranges",
    "reward_sample",
    "sample_actions",
    "step_prompts",
    "token_sample",
]
