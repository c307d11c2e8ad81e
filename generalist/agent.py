"""`Agent`: the gymnasium-facing policy over the control modes (after lerobot's ``ACTPolicy``).

::

    env.reset() ─► obs ─► agent.act(obs) ─► actions ─► env.step(actions) ─► rewards, terminated, truncated
                   ▲                                                                    │
                   └──────────────────────── agent.observe(rewards, terminated, truncated)

The Agent owns what every mode shares: one :class:`_Row` per environment (its live episode's
steps, what to feed next), the engine state (one row each), the sliding window and the vector-env
bookkeeping. What differs between Gato, Decision Transformer and Trajectory Transformer lives in
the mode (:class:`~generalist.modes.control.ControlMode`), which the Agent calls at fixed points:

* each decision feeds, per row, the previous step's last action token and reward (or, at an
  episode start, the Gato prompt and ``<bos>``), then ``[R_t] [o_t] <sep>`` with ``R_t`` from
  ``mode.returns``; ``mode.decide`` returns the action tokens;
* an environment whose episode ends has its past masked out (:meth:`Engine.forget`) and starts
  again from its prompt; the other rows continue untouched;
* **sliding window**: the context never exceeds the model's *trained* context
  (``model.config.context_length``; a mode may ask for less, as the planner does). When the next
  decision would outgrow it, every row is re-prefilled from its prompt plus its last whole steps
  (about ``window_keep`` of the window), so a re-prefill happens once every many steps.

Vector envs must reset a finished environment either in the same ``step`` (gymnasium's
``AutoresetMode.SAME_STEP``: the next observation is the new episode's first) or at the next one
(``NEXT_STEP``, gymnasium's default: the next observation is the final one and the action sent with
it is ignored); pass ``autoreset`` accordingly. Without a vector env, ``reset(spec)`` with
``num_envs=None`` takes and returns single observations and actions.

An environment whose episodes are no longer wanted (an evaluation that has its share of them) can be
**retired** (:meth:`Agent.retire`): its row leaves the batch, so nothing more is computed for it, and
its actions are drawn from the action space until the next ``reset``. A vector env steps every
environment, so the Agent still takes and returns the whole batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from gymnasium.vector.utils import concatenate, create_empty_array

from generalist.engine import DecodeState, Engine
from generalist.modeling_generalist import GeneralistForCausalLM
from generalist.modes.control import (
    ControlMode,
    ControlStep,
    action_sample,
    decode_actions,
    fed_action_ids,
    reward_sample,
    step_prompts,
)
from generalist.modes.dt import DTMode
from generalist.modes.gato import GatoMode
from generalist.modes.tt import TTConfig, TTMode
from generalist.packing import hide_actions
from generalist.task_spec import TaskSpec
from generalist.tokenizer import (
    GeneralistTokenizer,
    Sample,
    concat_samples,
    count_steps_within,
    empty_sample,
    token_sample,
)
from generalist.vocab import Modality

MODES = ("gato", "dt", "tt")  # the modes an Agent makes from a name


@dataclass
class _Row:
    """One environment's episode as the Agent tracks it."""

    steps: deque[Sample] = field(default_factory=deque)  # its complete [R o <sep> a r] steps, oldest first
    started: bool = True  # the episode's first step is still in ``steps`` (so a refill re-feeds <bos>)
    tail: Sample = field(default_factory=empty_sample)  # fed before the next step
    pending: Sample | None = None  # the current step, waiting for its reward
    new_episode: bool = True
    skip: bool = False  # next_step autoreset: the next act/observe of this env is a dummy


class Agent:
    """A batched policy for gymnasium environments over :class:`~generalist.GeneralistForCausalLM`.

    Args:
        model, tokenizer: the model and its tokenizer.
        mode: ``"gato"``, ``"dt"``, ``"tt"``, or a :class:`~generalist.modes.control.ControlMode`
            instance (e.g. ``DTMode(target_return=200, expert_returns=True)``).
        temperature, top_k, top_p: action sampling (``temperature=0``: greedy) of the Gato and DT modes
            made from a name.
        context_length: most tokens a row may hold (default: the context the model was trained on,
            ``model.config.context_length``).
        window_keep: fraction of the context kept when the window slides.
        expert_returns, kappa: DT made from a name: Multi-Game DT expert-return sampling.
        context_steps: DT made from a name: attend only to the step being decided and the
            ``context_steps - 1`` before it (:class:`~generalist.modes.DTMode`; default: the windows the model's
            return-conditioned sequences were trained on, ``model.config.dt_context_steps``, else the whole
            context).
        tt_config: TT made from a name: the planner's settings (default: each task's preset,
            :func:`generalist.modes.tt_preset`).
        autoreset: ``"same_step"`` or ``"next_step"`` (see the module docstring).
        seed: seed of the engine's sampling generator, and of the random actions of environments not decided for
            (retired, or resetting under ``next_step`` autoreset), drawn again from it at every ``reset``.

    Example::

        envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 8,
                                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        agent = Agent(model, tok, mode="dt")
        agent.reset(tok.get_task_spec("CartPole-v1"), num_envs=8, target_return=500)
        obs, _ = envs.reset(seed=0)
        for _ in range(100):
            obs, rewards, terminated, truncated, _ = envs.step(agent.act(obs))
            agent.observe(rewards, terminated, truncated)
    """

    def __init__(self, model: GeneralistForCausalLM, tokenizer: GeneralistTokenizer,
                 mode: Literal["gato", "dt", "tt"] | ControlMode = "gato", *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 context_length: int | None = None, window_keep: float = 0.75, expert_returns: bool = False,
                 kappa: float = 10.0, context_steps: int | None = None, tt_config: TTConfig | None = None,
                 autoreset: Literal["same_step", "next_step"] = "same_step", seed: int = 0):
        if mode == "gato":
            mode = GatoMode(temperature, top_k, top_p)
        elif mode == "dt":
            trained_steps = getattr(model.config, "dt_context_steps", None)
            mode = DTMode(expert_returns=expert_returns, kappa=kappa, temperature=temperature, top_k=top_k,
                          top_p=top_p, context_steps=trained_steps if context_steps is None else context_steps)
        elif mode == "tt":
            mode = TTMode(tt_config)
        elif isinstance(mode, str):
            raise ValueError(f"mode must be one of {list(MODES)} or a ControlMode, got {mode!r}")
        if context_steps is not None and not isinstance(mode, DTMode):
            raise ValueError(f"context_steps is a Decision Transformer setting; this agent's mode is {mode.name!r} "
                             "(TT: TTConfig.context_steps)")
        if autoreset not in ("same_step", "next_step"):
            raise ValueError(f"autoreset must be 'same_step' or 'next_step', got {autoreset!r}")
        if not 0 < window_keep <= 1:
            raise ValueError(f"window_keep must be in (0, 1], got {window_keep}")
        layout = getattr(model.config, "layout", None)
        if layout != tokenizer.layout:
            raise ValueError(
                f"the model's vocabulary ({model.config.vocab_size} ids, layout {layout}) does not match the "
                f"tokenizer's ({tokenizer.vocab_size} ids, layout {tokenizer.layout}); load both from the same "
                "checkpoint")
        trained = int(getattr(model.config, "context_length", None) or 0)
        if context_length is not None and trained and context_length > trained:
            raise ValueError(f"context_length={context_length} exceeds the {trained} tokens the model was trained "
                             "on; it would attend further back than it learned to")
        self.engine = Engine(model, seed=seed)
        self.seed = seed
        self.tok = tokenizer
        self.mode: ControlMode = mode
        self.hidden_action_id: int | None = None  # set by reset(): the policy view, where the mode reads it
        self.trained_context = trained or self.engine.max_length
        self.max_context = int(context_length or self.trained_context)
        self.window_keep = window_keep
        self.autoreset = autoreset
        self.spec: TaskSpec | None = None
        self.refills = 0  # how many times the window slid (for tests and logs)

    # --- episode state ---
    def reset(self, spec: TaskSpec | str, num_envs: int | None = 1, *, prompt: Sample | None = None,
              target_return: float | None = None) -> None:
        """Start fresh episodes in ``num_envs`` environments (``None``: one unbatched environment).

        ``prompt``: a Gato demonstration (:func:`generalist.modes.demonstration_prompt`), put before
        every episode; ``target_return``: the DT target (default: the spec's expert return).
        """
        self.spec = self.tok.get_task_spec(spec)
        self.batched = num_envs is not None
        self.num_envs = num_envs or 1
        if isinstance(self.mode, TTMode):
            self.mode.set_task(self.spec.name)  # the task's planner preset, unless one was given
        # the policy view (GeneralistConfig.hidden_action_prob): past actions are fed as <hidden_action>
        trained_hidden = getattr(self.engine.model.config, "hidden_action_prob", 0.0) > 0
        hidden = trained_hidden and getattr(self.mode, "policy_view", False)  # a mode without it: real actions
        self.hidden_action_id = self.tok.hidden_action_id if hidden else None
        if isinstance(self.mode, DTMode):
            self.mode.set_target(target_return)
        elif target_return is not None:
            raise ValueError(f"target_return is a Decision Transformer setting; this agent's mode is "
                             f"{self.mode.name!r}")
        self.prompt = prompt if prompt is not None else empty_sample()
        if self.hidden_action_id is not None and len(self.prompt["input_ids"]):
            self.prompt = hide_actions(self.prompt, self.tok)  # as the model saw demonstrations in training
        self.layout = self.tok.step_layout(self.spec)
        wanted = self.mode.context_tokens(self.layout, len(self.prompt["input_ids"]))
        self.context_length = min(self.max_context, wanted or self.max_context)
        if len(self.prompt["input_ids"]) > self.context_length // 2:
            raise ValueError(f"the prompt has {len(self.prompt['input_ids'])} tokens, more than half the context "
                             f"({self.context_length}); draw it with max_tokens=model.config.prompt_length")
        self.action_space = self.spec.action_space()
        self.action_space.seed(self.seed)  # the random actions of envs not decided for are reproducible
        self.rows = [_Row() for _ in range(self.num_envs)]
        self.active = np.arange(self.num_envs)  # the environment each row decides for (see retire)
        self.state: DecodeState | None = None
        self.last_action: np.ndarray | None = None

    def retire(self, envs: Sequence[int]) -> None:
        """Stop deciding for environments ``envs`` (indices in the vector env) until the next ``reset``.

        Their rows leave the batch (engine state and mode alike), so later decisions cost only the
        environments still played; ``act`` gives a retired environment a random action. An evaluation
        that has all the episodes it wants of an environment retires it: with episodes of unequal length,
        the batch otherwise keeps planning for environments whose play is thrown away. Call it between
        ``observe`` and the next ``act``.
        """
        envs = np.asarray(envs, int).reshape(-1)
        bad = envs[(envs < 0) | (envs >= self.num_envs)]
        if len(bad):
            raise ValueError(f"retire: environment {int(bad[0])} is not one of the {self.num_envs} set up by reset()")
        keep = np.flatnonzero(~np.isin(self.active, envs))  # rows that stay, in order
        if len(keep) == len(self.rows):
            return
        self.active = self.active[keep]
        self.rows = [self.rows[i] for i in keep]
        if self.last_action is not None:
            self.last_action = self.last_action[keep]
        if self.state is not None:
            with torch.inference_mode():  # as every decision: select writes into cache buffers those allocated
                self.state = self.engine.select(self.state, torch.from_numpy(keep)) if len(keep) else None
        self.mode.keep_rows(keep)

    def _begin_episodes(self, rows: np.ndarray) -> None:
        if self.state is not None:
            self.engine.forget(self.state, rows.tolist())
        start = concat_samples([self.prompt, token_sample([self.tok.bos_id], Modality.SPECIAL)])
        for i in rows:
            self.rows[i] = _Row(tail=start, new_episode=False)
        self.mode.begin_episode(rows, self.spec, len(self.rows))

    def _context(self, row: _Row, budget: int) -> Sample:
        """A row's re-prefill: prompt, then as many of its last whole steps as fit in ``budget`` tokens."""
        room = budget - len(self.prompt["input_ids"]) - 1
        n = count_steps_within([len(s["input_ids"]) for s in row.steps], room)
        row.started = row.started and n == len(row.steps)
        head = [self.prompt] + ([token_sample([self.tok.bos_id], Modality.SPECIAL)] if row.started else [])
        return concat_samples(head + list(row.steps)[len(row.steps) - n:])

    def _ensure_room(self, chunk_tokens: int) -> None:
        """Re-prefill every row from its last whole steps if the next decision would overflow the window.

        A row's re-prefilled context ends after its last complete step (reward included), so nothing
        is left to feed before the next step: every tail is emptied.
        """
        if self.state.length + chunk_tokens <= self.context_length:
            return
        budget = min(int(self.window_keep * self.context_length), self.context_length - chunk_tokens)
        self.state = self.engine.prefill([self._context(row, budget) for row in self.rows])
        for row in self.rows:
            row.tail = empty_sample()
        self.refills += 1

    def _flush(self) -> None:
        """Feed every row's tail now (before ``R_t``), for modes that read the prediction at ``R_t``."""
        if any(len(row.tail["input_ids"]) for row in self.rows):
            self.engine.feed(self.state, [row.tail for row in self.rows])
        for row in self.rows:
            row.tail = empty_sample()

    # --- acting ---
    def act(self, observations: Any) -> Any:
        """Actions for a batch of observations (as the vector env returns them) -> batched actions."""
        if self.spec is None:
            raise RuntimeError("call reset(spec, num_envs) before act()")
        if not self.batched:
            observations = _add_batch_axis(observations)
        flat = self.spec.flatten_observation(observations)
        for name, values in flat.items():
            n = np.shape(values)[0] if np.ndim(values) else 0
            if n != self.num_envs:
                raise ValueError(f"observations[{name!r}]: a batch of {n}, but reset() set up {self.num_envs} "
                                 "environments")
        actions: list[Any] = [None] * self.num_envs
        if self.rows:
            for i, action in zip(self.active, self._decide(flat), strict=True):
                actions[i] = action
        # a retired env, or one that resets now (NEXT_STEP autoreset ignores the action sent): a random action
        actions = [self.action_space.sample() if a is None else a for a in actions]
        if not self.batched:
            return actions[0]
        return concatenate(self.action_space, actions, create_empty_array(self.action_space, self.num_envs))

    def _decide(self, flat: dict[str, Any]) -> list[Any]:
        """The actions of the rows still played (``None`` where the env resets now), from the whole batch's flat
        observations."""
        spec, tok = self.spec, self.tok
        if len(self.active) < self.num_envs:
            flat = {k: [v[i] for i in self.active] if isinstance(v, list) else np.asarray(v)[self.active]
                    for k, v in flat.items()}
        new = np.flatnonzero([row.new_episode and not row.skip for row in self.rows])
        if len(new):
            self._begin_episodes(new)
        if self.state is None:  # first decision: every row starts with the same prompt
            if len(self.prompt["input_ids"]):  # prefill it once (batch 1) and copy its cache to every row
                self.state = self.engine.prefill(self.prompt, num_rows=len(self.rows))
                for row in self.rows:
                    row.tail = token_sample([tok.bos_id], Modality.SPECIAL)
            else:
                self.state = self.engine.new_state(len(self.rows))
        prompts = step_prompts(tok, spec, flat, None)  # [<no_return>] [o_t] <sep>
        step_len = max(len(p["input_ids"]) for p in prompts) + self.layout.closing_tokens
        tail_len = max(len(row.tail["input_ids"]) for row in self.rows)
        self._ensure_room(tail_len + step_len + self.mode.lookahead_tokens(self.layout))
        step = ControlStep(self.engine, self.state, tok, spec, self._flush, hidden_action_id=self.hidden_action_id)
        returns = self.mode.returns(step)  # R_t per row, or None: <no_return>
        if returns is not None:  # the same tokens with R_t in place of <no_return>
            prompts = tok.set_returns(spec, prompts, returns)
        step.chunks = [concat_samples([row.tail, p]) for row, p in zip(self.rows, prompts, strict=True)]
        ids = self.mode.decide(step)  # (B, A)
        for row, p, a in zip(self.rows, prompts, ids, strict=True):
            row.tail, row.pending = empty_sample(), concat_samples([p, self._action_sample(a)])
        self.last_action = ids
        actions = decode_actions(tok, spec, ids)
        return [None if row.skip else a for row, a in zip(self.rows, actions, strict=True)]  # a resetting env: none

    def observe(self, rewards: Any, terminated: Any, truncated: Any) -> None:
        """Close the step: append each ``r_t``, tell the mode, note finished episodes."""
        rewards = np.asarray(rewards, np.float64).reshape(-1)
        done = (np.asarray(terminated, bool) | np.asarray(truncated, bool)).reshape(-1)
        if len(rewards) != self.num_envs or len(done) != self.num_envs:
            raise ValueError(f"observe: {len(rewards)} rewards and {len(done)} episode ends, but reset() set up "
                             f"{self.num_envs} environments")
        rewards, done = rewards[self.active], done[self.active]  # the rows still played
        bad = np.flatnonzero(~np.isfinite(rewards))
        if len(bad):  # a broken environment: a return-to-go of inf would saturate silently
            raise ValueError(f"{self.spec.name}: non-finite reward {rewards[bad[0]]} from environment "
                             f"{int(self.active[bad[0]])} (environments {self.active[bad].tolist()}); rewards must "
                             "be finite numbers")
        for i, row in enumerate(self.rows):
            if row.skip:  # the dummy step of a NEXT_STEP autoreset
                row.skip, row.new_episode, row.tail = False, True, empty_sample()
                continue
            r = reward_sample(self.tok, self.spec, float(rewards[i]))
            row.steps.append(concat_samples([row.pending, r]))
            row.tail = concat_samples([self._action_sample(self.last_action[i, -1:]), r])
            self._trim(row)
            if done[i]:
                if self.autoreset == "next_step":
                    row.skip = True
                else:
                    row.new_episode = True
        self.mode.end_step(rewards)

    def _action_sample(self, ids: np.ndarray) -> Sample:
        """Action tokens as the model reads them: the ids, or ``<hidden_action>`` in the policy view."""
        return action_sample(fed_action_ids(ids, self.hidden_action_id))

    def _trim(self, row: _Row) -> None:
        """Keep only the steps a window can hold (the rest can never be re-prefilled)."""
        total = sum(len(s["input_ids"]) for s in row.steps)
        while len(row.steps) > 1 and total - len(row.steps[0]["input_ids"]) > self.context_length:
            total -= len(row.steps.popleft()["input_ids"])
            row.started = False


def _add_batch_axis(observation: Any) -> Any:
    if isinstance(observation, dict):
        return {k: _add_batch_axis(v) for k, v in observation.items()}
    if isinstance(observation, tuple):
        return tuple(_add_batch_axis(v) for v in observation)
    if isinstance(observation, str):
        return [observation]
    return np.asarray(observation)[None]


__all__ = ["MODES", "Agent"]
