"""What the control modes share: the :class:`ControlMode` protocol, per-step prompts, actions, rewards.

One control timestep is ``[R_t] [o_t] <sep> [a_t] [r_t]`` (docs/token_layout.md). A decision feeds
``[R_t] [o_t] <sep>`` for every environment (one row each), then samples the action tokens, each
restricted to the id range valid for its element of the action space
(:meth:`GeneralistTokenizer.action_token_ranges`), so a decoded action is always in the space.

A control mode is a small strategy the :class:`~generalist.Agent` calls at fixed points of an
episode; the Agent owns the environments' rows, the sliding window and the vector-env bookkeeping,
the mode only what differs between Gato, Decision Transformer and Trajectory Transformer::

    agent.act(obs)     ─► mode.begin_episode(rows)   rows whose episode starts now
                       ─► mode.returns(step)         R_t per row, or None for <no_return>
                       ─► mode.decide(step)          feed the step's tokens, return action ids (B, A)
    agent.observe(r)   ─► mode.end_step(rewards)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from generalist.engine import DecodeState, Engine
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer, Sample, StepLayout, concat_samples, token_sample
from generalist.vocab import Modality


@dataclass
class ControlStep:
    """What a mode sees of one decision: the engine and its state, the task, the step's tokens.

    Attributes:
        engine, state: the decoding engine and its rows (one per environment).
        tok, spec: the tokenizer and the task.
        chunks: per row, the tokens to feed before the action: the previous step's last action
            token and reward (or the prompt and ``<bos>`` at an episode start), then
            ``[R_t] [o_t] <sep>``. Filled in after :meth:`ControlMode.returns`.
        flush: feeds what is pending before ``R_t`` (the previous step's end), for modes that must
            read the model's prediction *at* ``R_t`` (Multi-Game DT's expert returns).
        hidden_action_id: set when the Agent feeds actions as ``<hidden_action>`` (the policy view,
            :attr:`ControlMode.policy_view`): a multi-token action's tokens are fed as it, too.
    """

    engine: Engine
    state: DecodeState
    tok: GeneralistTokenizer
    spec: TaskSpec
    flush: Callable[[], None]
    chunks: list[Sample] | None = None
    hidden_action_id: int | None = None


class ControlMode(Protocol):
    """A control decoding mode (Gato, DT, TT...): a strategy the Agent calls; see the module docstring."""

    name: str
    # True: fed past actions as <hidden_action> when the model was trained with hidden actions
    # (GeneralistConfig.hidden_action_prob), a policy from states (Gato, DT; TT by default, which still feeds the
    # actions it imagines as themselves); False: real actions. Read at every Agent.reset.
    policy_view: bool

    def begin_episode(self, rows: np.ndarray, spec: TaskSpec, num_envs: int) -> None:
        """Episodes start in these rows (indices among ``num_envs`` environments)."""

    def returns(self, step: ControlStep) -> np.ndarray | None:
        """``R_t`` of every row (task units), or ``None``: every ``R_t`` is ``<no_return>``."""

    def decide(self, step: ControlStep) -> np.ndarray:
        """Feed ``step.chunks``, then choose every row's action tokens -> ids (B, A).

        The last action token is *not* fed: the Agent feeds it with the reward and the next step.
        """

    def end_step(self, rewards: np.ndarray) -> None:
        """The step's rewards (B,) are known."""

    def keep_rows(self, rows: np.ndarray) -> None:
        """The batch shrinks to these rows, in this order (:meth:`Agent.retire`): per-row state follows."""

    def context_tokens(self, layout: StepLayout, prompt_tokens: int) -> int | None:
        """The most context the mode wants (``None``: the model's trained context)."""

    def lookahead_tokens(self, layout: StepLayout) -> int:
        """Tokens the mode appends beyond the step while deciding (a planner's imagined future)."""


class Sampler:
    """Gato and DT decide alike: feed the step, sample the action tokens (greedy at ``temperature=0``)."""

    policy_view = True

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def begin_episode(self, rows: np.ndarray, spec: TaskSpec, num_envs: int) -> None:
        pass

    def decide(self, step: ControlStep) -> np.ndarray:
        return sample_actions(step.engine, step.state, step.tok, step.spec, step.chunks, self.temperature,
                              self.top_k, self.top_p, feed_as=step.hidden_action_id)

    def end_step(self, rewards: np.ndarray) -> None:
        pass

    def keep_rows(self, rows: np.ndarray) -> None:
        pass

    def context_tokens(self, layout: StepLayout, prompt_tokens: int) -> int | None:
        return None

    def lookahead_tokens(self, layout: StepLayout) -> int:
        return 0


def attend_to_last_steps(engine: Engine, state: DecodeState, step_start: int, layout: StepLayout, steps: int) -> None:
    """Let every row attend only to the step starting at cache position ``step_start`` and the
    ``steps - 1`` whole steps before it (:meth:`Engine.attend_from`): TT's crop and DT's ``context_steps``.

    The reference planner crops every input, imagined ones included, to its last
    ``max_context_transitions`` transitions (``max_block = max_context_transitions * transition_dim - 1``
    tokens, cut at transition boundaries: ``trajectory/search/sampling.py::forward``), so the model
    never reads more than ~5 transitions however far the plan runs. Steps have ``layout.tokens`` tokens
    (exact for numeric observations, which every task TT plans on has).
    """
    start = step_start - (steps - 1) * layout.tokens
    engine.attend_from(state, start if start > 0 else None)


def attend_to_this_step_and(step: ControlStep, past_steps: int) -> None:
    """Before a decision feeds ``step.chunks``: let every row attend only to the step it is about to
    decide and the ``past_steps`` whole steps before it (:func:`attend_to_last_steps`)."""
    fed = max(len(chunk["input_ids"]) for chunk in step.chunks)  # left-padded to the longest
    layout = step.tok.step_layout(step.spec)
    attend_to_last_steps(step.engine, step.state, step.state.length + fed - layout.prompt_tokens, layout,
                         past_steps + 1)


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


def fed_action_ids(action_ids: np.ndarray, hidden_action_id: int | None) -> np.ndarray:
    """Action tokens as the model reads them: the ids themselves, or ``<hidden_action>`` in their place in the
    policy view (:attr:`ControlStep.hidden_action_id`)."""
    return action_ids if hidden_action_id is None else np.full_like(action_ids, hidden_action_id)


def continuous_range(tok: GeneralistTokenizer, allowed: tuple[int, int]) -> bool:
    cont = tok.layout.ranges["continuous"]
    return cont.start <= allowed[0] and allowed[1] <= cont.stop


def continuous_flags(tok: GeneralistTokenizer, ranges: Sequence[tuple[int, int]]) -> list[bool]:
    """Which of these token ranges are bins of a continuous value (greedy = the predicted median)."""
    return [continuous_range(tok, r) for r in ranges]


def sample_actions(engine: Engine, state: DecodeState, tok: GeneralistTokenizer, spec: TaskSpec,
                   prompts: Sequence[Sample], temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, feed_as: int | None = None) -> np.ndarray:
    """Feed the step prompts, then choose every row's action tokens -> ids (B, A).

    Greedy (``temperature=0``): argmax for discrete elements, the predicted median for continuous
    ones. The last action token is *not* fed: the caller feeds it with the reward and the next step.
    ``feed_as``: the id fed in place of each sampled token; then one forward predicts every action
    token (:meth:`Engine.generate_blind`), as the token-by-token loop would.
    """
    ranges = tok.action_token_ranges(spec)
    median = continuous_flags(tok, ranges)
    if feed_as is not None:
        return engine.generate_blind(state, prompts, ranges, feed_as, temperature, top_k, top_p,
                                     median=median).numpy()  # (B, A)
    engine.feed(state, prompts, ranges[0] if ranges else None)
    return engine.generate(state, ranges, temperature, top_k, top_p, feed_last=False, median=median).numpy()


def decode_actions(tok: GeneralistTokenizer, spec: TaskSpec, ids: np.ndarray) -> list[Any]:
    """Action ids (B, A) -> one gymnasium action per row."""
    return [tok.decode_action(spec, row) for row in ids]


def continuous_values(tok: GeneralistTokenizer) -> tuple[tuple[int, int], torch.Tensor]:
    """The continuous id range and the value (bin centre, unscaled) of each id in it (1024,)."""
    r = tok.layout.ranges["continuous"]
    centres = torch.from_numpy(tok.decode_continuous(np.arange(r.start, r.stop))).double()
    return (r.start, r.stop), centres


def bin_log_widths(tok: GeneralistTokenizer) -> torch.Tensor:
    """Log of each id's bin width on its value's axis (vocabulary,): the continuous bins' mu-law widths
    (the 1,024 uniform bins of the companded axis mapped back), 0 for every other id (equal widths)."""
    from generalist.tokenizer import mu_law_decode

    r = tok.layout.ranges["continuous"]
    edges = mu_law_decode(np.linspace(-1.0, 1.0, r.stop - r.start + 1))  # (1025,)
    out = torch.zeros(tok.vocab_size, dtype=torch.float32)
    out[r.start: r.stop] = torch.from_numpy(np.log(np.diff(edges))).float()
    return out


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
    "ControlMode",
    "ControlStep",
    "Sampler",
    "action_sample",
    "concat_samples",
    "continuous_values",
    "continuous_flags",
    "decode_actions",
    "observation_token_ranges",
    "reward_sample",
    "sample_actions",
    "step_prompts",
    "token_sample",
]
