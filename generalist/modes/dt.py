"""Decision Transformer mode (Chen et al. 2021), with Multi-Game DT's expert-return sampling (Lee et al. 2022).

Each step is conditioned on ``R_t``: the target return at the episode start, then
``R_{t+1} = R_t − r_t`` (Chen et al. 2021, Algorithm 1). With ``expert_returns``, ``R_t`` is
instead sampled from the model's own return distribution tilted toward high returns,
``P(R) ∝ P_θ(R | context) · exp(κ · clip((R − R_low) / (R_high − R_low), 0, 1))`` (Lee et al. 2022,
§3.4). The clip is ours: MGDT's return bins span only plausible returns, while our mu-law bins reach
far past any task's returns, and an unclipped tilt would pick the largest representable return
however unlikely the model finds it.
"""

from __future__ import annotations

import numpy as np

from generalist.engine import DecodeState, Engine, constrain, sample_next_token
from generalist.modes.control import ControlStep, Sampler, attend_to_this_step_and, continuous_values
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer, StepLayout


def initial_return(spec: TaskSpec, target_return: float | None = None) -> float:
    """``R_0``: ``target_return`` or, by default, the task's expert return."""
    if target_return is not None:
        return float(target_return)
    if spec.expert_return is None:
        raise ValueError(f"{spec.name}: no target return given and the task spec has no expert_return")
    return float(spec.expert_return)


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


class DTMode(Sampler):
    """Decision Transformer control through :class:`~generalist.Agent`.

    Args:
        target_return: ``R_0`` (default: the task spec's expert return).
        expert_returns: sample each ``R_t`` the Multi-Game DT way instead of decrementing it.
        kappa: the inverse temperature κ of expert-return sampling (Lee et al. use 10).
        temperature, top_k, top_p: action sampling (``temperature=0``: greedy).
        context_steps: attend only to the step being decided and the ``context_steps - 1`` before it
            (``None``: the whole context). DT's own context length K (Chen et al. 2021 train and act with
            K = 20 or 30 steps); with few steps the history can say little about which of the data's
            policies is playing, so the action must come from ``R_t`` and the state, as in return-conditioned
            policies without history (RvS, Emmons et al. 2022). Training windows start at step
            boundaries, so a window of any length is one the model was trained on. The window slides over
            the KV cache (as TT's): the keys of its earlier steps were computed under the window of their
            own time, so in an L-layer model up to L·(K − 1) steps back can still reach the decision; K = 1
            is exact.
    """

    name = "dt"

    def __init__(self, target_return: float | None = None, *, expert_returns: bool = False, kappa: float = 10.0,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 context_steps: int | None = None):
        super().__init__(temperature, top_k, top_p)
        if context_steps is not None and context_steps < 1:
            raise ValueError(f"context_steps must be at least 1 (the step being decided), got {context_steps}")
        self.target_return, self.expert_returns, self.kappa = target_return, expert_returns, kappa
        self.context_steps = context_steps
        self.episode_target = target_return  # R_0 of the episodes from now on (see set_target)
        self.returns_to_go = np.zeros(0)

    def set_target(self, target_return: float | None) -> None:
        """``R_0`` for the episodes that follow; ``None``: the mode's own ``target_return`` (or the
        task's expert return). Called by :meth:`Agent.reset`, so a target lasts one reset."""
        self.episode_target = self.target_return if target_return is None else float(target_return)

    def begin_episode(self, rows: np.ndarray, spec: TaskSpec, num_envs: int) -> None:
        if self.expert_returns:
            return
        if len(self.returns_to_go) != num_envs:
            self.returns_to_go = np.zeros(num_envs)
        self.returns_to_go[rows] = initial_return(spec, self.episode_target)

    def returns(self, step: ControlStep) -> np.ndarray:
        if self.expert_returns:
            step.flush()  # the model must have read the previous step before predicting R_t
            self.returns_to_go = sample_expert_returns(step.engine, step.state, step.tok, step.spec, self.kappa)
        return self.returns_to_go.copy()

    def decide(self, step: ControlStep) -> np.ndarray:
        if self.context_steps is not None:
            attend_to_this_step_and(step, self.context_steps - 1)
        return super().decide(step)

    def keep_rows(self, rows: np.ndarray) -> None:
        if len(self.returns_to_go):
            self.returns_to_go = self.returns_to_go[rows]

    def context_tokens(self, layout: StepLayout, prompt_tokens: int) -> int | None:
        if self.context_steps is None:
            return None
        # the window and one step of room for what is fed before the current step (as TT keeps)
        return prompt_tokens + 1 + layout.tokens * (self.context_steps + 1)

    def end_step(self, rewards: np.ndarray) -> None:
        if not self.expert_returns:
            self.returns_to_go = self.returns_to_go - rewards  # R_{t+1} = R_t − r_t (Chen et al. 2021)


__all__ = ["DTMode", "initial_return", "sample_expert_returns"]
