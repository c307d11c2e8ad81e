"""Decision Transformer mode (Chen et al. 2021): condition actions on a target return-to-go.

``R_0`` is the target return (the task's expert return by default) and ``R_{t+1} = R_t - r_t``
as the episode runs (Chen et al. 2021, §3, Algorithm 1). Optionally, Multi-Game Decision
Transformer's expert-action inference (Lee et al. 2022, §3.4) *samples* each ``R_t`` from the
model's own return distribution tilted toward high returns:

    P(R_t | expert, ...) ∝ P(R_t | ...) · exp(κ · clip((R_t − R_low) / (R_high − R_low), 0, 1))

so no target has to be chosen by hand. The clip is ours: MGDT's return bins span only plausible
returns, while our mu-law bins reach far past any task's returns, and an unclipped tilt would pick
the largest representable return however unlikely the model finds it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from generalist.engine import DecodeState, Engine, constrain, sample_next_token
from generalist.modes.control import continuous_values, sample_actions, step_prompts
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer, Sample, concat_samples


def initial_return(spec: TaskSpec, target_return: float | None = None) -> float:
    """The DT target: ``target_return`` or, by default, the task's expert return."""
    if target_return is not None:
        return float(target_return)
    if spec.expert_return is None:
        raise ValueError(f"{spec.name}: no target return given and the task spec has no expert_return")
    return float(spec.expert_return)


def next_returns_to_go(returns_to_go: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """``R_{t+1} = R_t − r_t`` (Chen et al. 2021, Algorithm 1)."""
    return np.asarray(returns_to_go, np.float64) - np.asarray(rewards, np.float64)


def dt_act(engine: Engine, state: DecodeState, tok: GeneralistTokenizer, spec: TaskSpec,
           observations: dict[str, Any], returns_to_go: np.ndarray, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None,
           prefixes: list[Sample] | None = None) -> np.ndarray:
    """One return-conditioned decision for a batch of environments -> action ids (B, A).

    ``returns_to_go`` (B,) are in the task's own units (the tokenizer applies the return scale).
    ``prefixes`` as in :func:`generalist.modes.gato.gato_act`.
    """
    prompts = step_prompts(tok, spec, observations, np.asarray(returns_to_go, np.float64))
    if prefixes is not None:
        prompts = [concat_samples([p, s]) for p, s in zip(prefixes, prompts, strict=True)]
    return sample_actions(engine, state, tok, spec, prompts, temperature, top_k, top_p)


def sample_expert_returns(engine: Engine, state: DecodeState, tok: GeneralistTokenizer, spec: TaskSpec,
                          kappa: float = 10.0, return_low: float | None = None, return_high: float | None = None,
                          temperature: float = 1.0) -> np.ndarray:
    """Multi-Game DT expert-return sampling (Lee et al. 2022, §3.4) -> returns-to-go (B,).

    ``state.logits`` must predict ``R_t`` (the context ends with the previous reward or ``<bos>``).
    ``return_low``/``return_high`` normalise returns (default: the task's random / expert returns);
    κ = 10 is the paper's value.
    """
    low = spec.random_return if return_low is None else return_low
    high = spec.expert_return if return_high is None else return_high
    if low is None or high is None or high <= low:
        raise ValueError(f"{spec.name}: expert-return sampling needs return_low < return_high "
                         f"(got {low}, {high}); set them or the spec's random_return/expert_return")
    (lo, hi), centres = continuous_values(tok)
    returns = centres / spec.return_scale  # (1024,) return of each bin, in task units
    logits, _ = constrain(state.logits.double(), (lo, hi), state.logits_offset)  # (B, 1024)
    tilt = ((returns - low) / (high - low)).clamp(0.0, 1.0)  # (1024,)
    tilted = logits.log_softmax(-1) + kappa * tilt[None]
    index = sample_next_token(tilted, engine.generator, temperature)  # (B,)
    return returns[index].numpy()


__all__ = ["dt_act", "initial_return", "next_returns_to_go", "sample_expert_returns"]
