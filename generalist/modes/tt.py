"""Trajectory Transformer mode (Janner et al. 2021): plan by beam search over imagined futures.

From a context ending in ``<sep>`` (the current observation), the planner rolls the model forward
``horizon`` steps for ``beam_width`` beams per environment. Each planning step (reference
``trajectory/search/core.py::beam_plan``):

1. every beam is expanded ``n_expand`` times and samples its action tokens (top-k ``k_act``,
   nucleus/cdf ``cdf_act``), constrained to the action space;
2. the reward token ``r_t`` and the next return-to-go ``R_{t+1}`` are predicted; their *expected*
   values under the predicted distribution (the reference's ``percentile='mean'``), unscaled by the
   task's reward/return scale, score the beam:
   ``score = Σ_{i≤t} γ^i r_i + γ^{t+1} R_{t+1}``;
3. the ``beam_width`` best candidates per environment survive (KV cache gathered with
   ``reorder_cache``: the shared context is never recomputed);
4. except at the last step, the next observation tokens are predicted (``k_obs`` / ``cdf_obs``).

The first action of the best beam is returned. All beams of all environments are one batch, so a
planning step costs ``A + 1`` forward passes at ``E·beam·n_expand`` rows plus ``O + 1`` at
``E·beam`` rows (A action, O observation tokens), each feeding one or two new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from generalist.engine import DecodeState, Engine, constrain, sample_next_token
from generalist.modes.control import continuous_values, observation_token_ranges
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer


@dataclass(frozen=True)
class TTConfig:
    """Planner settings; defaults are the reference's ``config/offline.py`` ``base['plan']``.

    Attributes:
        beam_width: beams kept per environment after each step (reference: 128).
        horizon: planning steps (reference: 15).
        n_expand: candidates sampled per beam before pruning (reference: 2).
        k_obs, k_act: top-k truncation of observation / action tokens (1 = greedy; None = off).
        cdf_obs, cdf_act: nucleus (cdf) truncation of observation / action tokens (reference: None, 0.6).
        k_reward: top-k for the reward and return tokens fed back (reference ``k_rew`` 1 = greedy).
        discount: γ of the score (reference: 0.99).
        value: ``"mean"`` scores with expected rewards/returns (reference ``percentile='mean'``);
            ``"sample"`` with the values of the fed tokens.
    """

    beam_width: int = 128
    horizon: int = 15
    n_expand: int = 2
    k_obs: int | None = 1
    k_act: int | None = None
    cdf_obs: float | None = None
    cdf_act: float | None = 0.6
    k_reward: int | None = 1
    discount: float = 0.99
    value: str = "mean"

    def __post_init__(self):
        for name in ("beam_width", "horizon", "n_expand"):
            if getattr(self, name) < 1:
                raise ValueError(f"TTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.value not in ("mean", "sample"):
            raise ValueError(f"TTConfig.value must be 'mean' or 'sample', got {self.value!r}")


# The reference's per-dataset overrides (config/offline.py): hopper/walker use the base settings;
# halfcheetah-medium/-medium-replay and ant plan 5 steps with 32 beams.
TT_PRESETS: dict[str, TTConfig] = {
    "reference": TTConfig(),
    "hopper": TTConfig(),
    "walker2d": TTConfig(),
    "halfcheetah": TTConfig(beam_width=32, horizon=5),
    "ant": TTConfig(beam_width=32, horizon=5),
}


@dataclass
class Plan:
    """Result of :func:`tt_plan` for E environments.

    Attributes:
        action_ids: (E, A) first action tokens of the best beam (what to do now).
        plan_ids: (E, H, A) the best beam's action tokens for the whole horizon.
        scores: (E,) the best beam's score.
    """

    action_ids: np.ndarray
    plan_ids: np.ndarray
    scores: np.ndarray


def _score_token(engine: Engine, state: DecodeState, cont: tuple[int, int], values: torch.Tensor,
                 config: TTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the reward / return token to feed and the value that scores it -> (ids (N,), values (N,))."""
    logits, offset = constrain(state.logits, cont, state.logits_offset)  # (N, 1024)
    index = sample_next_token(logits, engine.generator, 0.0 if config.k_reward == 1 else 1.0,
                              None if config.k_reward == 1 else config.k_reward)
    # expectation over bins (reference percentile='mean') or the value of the token fed
    value = logits.double().softmax(-1) @ values if config.value == "mean" else values[index]  # (N,)
    return index + offset, value


@torch.inference_mode()
def tt_plan(engine: Engine, state: DecodeState, tok: GeneralistTokenizer, spec: TaskSpec,
            config: TTConfig = TTConfig()) -> Plan:
    """Beam-search plan for every row (environment) of ``state`` (Janner et al. 2021, §3.2).

    ``state.logits`` must predict the first action token (the context ends with ``<sep>``). On
    return, ``state`` is exactly as it was (the imagined tokens are cropped off the cache).
    """
    e, length = state.batch_size, state.length
    saved_logits, saved_offset, saved_positions = state.logits.clone(), state.logits_offset, state.next_position.clone()
    beam, expand, horizon = config.beam_width, config.n_expand, config.horizon
    act_ranges = tok.action_token_ranges(spec)
    obs_ranges = observation_token_ranges(tok, spec)
    cont, centres = continuous_values(tok)
    reward_values, return_values = centres / spec.reward_scale, centres / spec.return_scale

    engine.share(state, beam)  # (E*beam): every beam continues the same context, stored once
    n = e * beam
    rewards = torch.zeros(n, horizon + 1, dtype=torch.float64)  # r_0..r_{H-1}, then R_H
    discounts = config.discount ** torch.arange(horizon + 1, dtype=torch.float64)
    plans = torch.zeros(n, horizon, len(act_ranges), dtype=torch.long)
    scores = torch.zeros(n, dtype=torch.float64)
    for t in range(horizon):
        engine.repeat(state, expand)  # (E*beam*expand), grouped per environment
        rewards, plans = rewards.repeat_interleave(expand, 0), plans.repeat_interleave(expand, 0)
        plans[:, t] = engine.generate(state, act_ranges, 1.0, config.k_act, config.cdf_act, feed_last=True,
                                      then=cont)
        r_ids, r_values = _score_token(engine, state, cont, reward_values, config)
        engine.feed(state, r_ids[:, None], cont)
        R_ids, R_values = _score_token(engine, state, cont, return_values, config)
        rewards[:, t], rewards[:, t + 1] = r_values, R_values
        values = (rewards * discounts).sum(-1).view(e, beam * expand)  # (E, beam*expand)
        scores, best = values.topk(beam, dim=1)  # (E, beam)
        rows = (best + torch.arange(e)[:, None] * beam * expand).flatten()  # (E*beam,)
        engine.select(state, rows)
        rewards, plans, R_ids, scores = rewards[rows], plans[rows], R_ids[rows], scores.flatten()
        if t < horizon - 1:  # imagine the next observation: R_{t+1} o_{t+1} <sep>
            engine.feed(state, R_ids[:, None], obs_ranges[0])
            obs = engine.generate(state, obs_ranges, 1.0, config.k_obs, config.cdf_obs, feed_last=False)
            engine.feed(state, torch.stack([obs[:, -1], torch.full_like(obs[:, -1], tok.sep_id)], 1), act_ranges[0])

    best = scores.view(e, beam).argmax(1)  # (E,)
    rows = best + torch.arange(e) * beam
    plan_ids = plans[rows].numpy()  # (E, H, A)
    # restore the caller's state: one row per environment, imagined tokens cropped off
    engine.select(state, torch.arange(e) * beam)
    engine.truncate(state, length)
    state.logits, state.logits_offset, state.next_position = saved_logits, saved_offset, saved_positions
    best_scores = scores.view(e, beam)[torch.arange(e), best].numpy()
    return Plan(action_ids=plan_ids[:, 0], plan_ids=plan_ids, scores=best_scores)
