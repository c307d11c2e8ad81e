"""`Agent`: the gymnasium-facing policy over the decoding modes (after lerobot's ``ACTPolicy``).

::

    env.reset() ─► obs ─► agent.act(obs) ─► actions ─► env.step(actions) ─► rewards, terminated, truncated
                   ▲                                                                    │
                   └──────────────────────── agent.observe(rewards, terminated, truncated)

Episode state (context tokens, returns-to-go, the KV cache) lives here and is cleared by
:meth:`Agent.reset`; the model stays stateless. One row of the engine per environment:

* each decision feeds the previous step's last action token and reward (or, at an episode start,
  the Gato prompt and ``<bos>``) with ``[R_t] [o_t] <sep>``, then samples the action tokens;
* an environment whose episode ends has its past masked out (:meth:`Engine.forget`) and starts
  again from its prompt; the other rows continue untouched;
* **sliding window**: when the cache would outgrow ``context_length`` tokens, every row is
  re-prefilled from its prompt plus its last whole steps (about ``window_keep`` of the window), so
  a re-prefill happens once every many steps rather than at every step.

Vector envs must reset a finished environment either in the same ``step`` (gymnasium's
``AutoresetMode.SAME_STEP``: the next observation is the new episode's first) or at the next one
(``NEXT_STEP``, gymnasium's default: the next observation is the final one and the action sent with
it is ignored); pass ``autoreset`` accordingly. Without a vector env, ``reset(spec)`` with
``num_envs=None`` takes and returns single observations and actions.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import numpy as np
import torch
from gymnasium.vector.utils import concatenate, create_empty_array

from generalist.engine import DecodeState, Engine
from generalist.modeling_generalist import GeneralistForCausalLM
from generalist.modes.control import (
    action_sample,
    decode_actions,
    reward_sample,
    sample_actions,
    step_prompts,
)
from generalist.modes.dt import initial_return, sample_expert_returns
from generalist.modes.tt import TTConfig, tt_plan
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer, Sample, concat_samples, empty_sample, token_sample
from generalist.vocab import Modality

Mode = Literal["gato", "dt", "tt"]


class Agent:
    """A batched policy for gymnasium environments over :class:`~generalist.GeneralistForCausalLM`.

    Args:
        model, tokenizer: the model and its tokenizer.
        mode: ``"gato"`` (prompted, no returns), ``"dt"`` (return-conditioned) or ``"tt"`` (planning).
        temperature, top_k, top_p: action sampling (``temperature=0``: greedy) in Gato and DT modes.
        context_length: most tokens a row may hold (default: the backbone's
            ``max_position_embeddings``).
        window_keep: fraction of ``context_length`` kept when the window slides.
        expert_returns: DT only: sample each ``R_t`` the Multi-Game DT way instead of ``R_{t+1} = R_t − r_t``.
        kappa: the inverse temperature κ of expert-return sampling (Lee et al. 2022 use 10).
        tt_config: Trajectory Transformer planner settings.
        tt_context_steps: TT only, without ``context_length``: the planner sees this many past steps
            (the reference planner's ``max_context_transitions`` = 5), so planning cost stays fixed.
        autoreset: ``"same_step"`` or ``"next_step"`` (see the module docstring).
        seed: seed of the engine's sampling generator.

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

    def __init__(self, model: GeneralistForCausalLM, tokenizer: GeneralistTokenizer, mode: Mode = "gato", *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 context_length: int | None = None, window_keep: float = 0.75, expert_returns: bool = False,
                 kappa: float = 10.0, tt_config: TTConfig | None = None, tt_context_steps: int = 5,
                 autoreset: Literal["same_step", "next_step"] = "same_step", seed: int = 0):
        if mode not in ("gato", "dt", "tt"):
            raise ValueError(f"mode must be 'gato', 'dt' or 'tt', got {mode!r}")
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
        self.engine = Engine(model, seed=seed)
        self.tok = tokenizer
        self.mode = mode
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.context_length = int(context_length or self.engine.max_length)
        self._fixed_context = context_length is not None
        self.tt_context_steps = tt_context_steps
        self.window_keep = window_keep
        self.expert_returns, self.kappa = expert_returns, kappa
        self.tt_config = tt_config or TTConfig()
        self.autoreset = autoreset
        self.rng = np.random.default_rng(seed)
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
        if self.mode == "dt" and not self.expert_returns:
            self.target_return = initial_return(self.spec, target_return)
        else:
            self.target_return = 0.0 if target_return is None else float(target_return)
        self.prompt = prompt if prompt is not None else empty_sample()
        if self.mode == "tt" and not self._fixed_context:
            # past steps + the current one + the imagined horizon, as the reference planner crops
            obs_tokens = sum(f.size for f in self.spec.observation_fields)
            step = obs_tokens + self.spec.action_size + 3  # R, <sep>, r
            self.context_length = min(self.engine.max_length, len(self.prompt["input_ids"]) + 1 + step * (
                self.tt_context_steps + 1 + self.tt_config.horizon))
        if len(self.prompt["input_ids"]) > self.context_length // 2:
            raise ValueError(f"the prompt has {len(self.prompt['input_ids'])} tokens, more than half the context "
                             f"({self.context_length}); shorten it (demonstration_prompt(max_tokens=...))")
        self.action_space = self.spec.action_space()
        n = self.num_envs
        self.state: DecodeState | None = None
        self.steps: list[deque[Sample]] = [deque() for _ in range(n)]  # complete [R o <sep> a r] steps
        self.started = [True] * n  # the episode's first step is still in ``steps``
        self.tails: list[Sample] = [empty_sample() for _ in range(n)]  # fed before the next step
        self.pending: list[Sample | None] = [None] * n  # current step, waiting for its reward
        self.last_action: np.ndarray | None = None
        self.returns_to_go = np.full(n, self.target_return, np.float64)
        self.new_episode = np.ones(n, bool)
        self.skip = np.zeros(n, bool)  # next_step autoreset: the next act/observe of this env is a dummy

    def _begin_episodes(self, rows: np.ndarray) -> None:
        bos = token_sample([self.tok.bos_id], Modality.SPECIAL)
        if self.state is not None:
            self.engine.forget(self.state, rows.tolist())
        for i in rows:
            self.steps[i].clear()
            self.started[i] = True
            self.tails[i] = concat_samples([self.prompt, bos])
            self.returns_to_go[i] = self.target_return
        self.new_episode[rows] = False

    def _context(self, i: int, budget: int) -> Sample:
        """Row i's re-prefill: prompt, then as many of its last whole steps as fit in ``budget`` tokens."""
        kept, used = [], len(self.prompt["input_ids"]) + 1
        for step in reversed(self.steps[i]):
            used += len(step["input_ids"])
            if used > budget:
                break
            kept.append(step)
        if len(kept) < len(self.steps[i]):
            self.started[i] = False
        head = [self.prompt] + ([token_sample([self.tok.bos_id], Modality.SPECIAL)] if self.started[i] else [])
        return concat_samples(head + kept[::-1])

    def _ensure_room(self, chunk_tokens: int) -> None:
        """Re-prefill every row from its last whole steps if the next decision would overflow the window.

        A row's re-prefilled context ends after its last complete step (reward included), so nothing
        is left to feed before the next step: every tail is emptied.
        """
        if self.state.length + chunk_tokens <= self.context_length:
            return
        budget = min(int(self.window_keep * self.context_length), self.context_length - chunk_tokens)
        self.state = self.engine.prefill([self._context(i, budget) for i in range(self.num_envs)])
        self.tails = [empty_sample() for _ in range(self.num_envs)]
        self.refills += 1

    # --- acting ---
    def act(self, observations: Any) -> Any:
        """Actions for a batch of observations (as the vector env returns them) -> batched actions."""
        if self.spec is None:
            raise RuntimeError("call reset(spec, num_envs) before act()")
        spec, tok = self.spec, self.tok
        if not self.batched:
            observations = _add_batch_axis(observations)
        new = np.flatnonzero(self.new_episode & ~self.skip)
        if len(new):
            self._begin_episodes(new)
        flat = spec.flatten_observation(observations)
        for name, values in flat.items():
            n = np.shape(values)[0] if np.ndim(values) else 0
            if n != self.num_envs:
                raise ValueError(f"observations[{name!r}]: a batch of {n}, but reset() set up {self.num_envs} "
                                 "environments")
        rtg = None if self.mode == "gato" else self.returns_to_go
        prompts = step_prompts(tok, spec, flat, rtg)  # [R_t] [o_t] <sep> per env
        step_len = max(len(p["input_ids"]) for p in prompts) + spec.action_size + 1
        tail_len = max(len(t["input_ids"]) for t in self.tails)
        plan_len = self.tt_config.horizon * step_len if self.mode == "tt" else 0
        if self.state is None:  # first decision: every row starts with the same prompt
            if len(self.prompt["input_ids"]):
                # prefill it once (batch 1) and copy its cache to every row
                self.state = self.engine.prefill(self.prompt, num_rows=self.num_envs)
                self.tails = [token_sample([tok.bos_id], Modality.SPECIAL) for _ in self.tails]
            else:
                self.state = self.engine.new_state(self.num_envs)
        self._ensure_room(tail_len + step_len + plan_len)
        if self.mode == "dt" and self.expert_returns:
            if any(len(t["input_ids"]) for t in self.tails):
                self.engine.feed(self.state, self.tails)
            self.tails = [empty_sample() for _ in self.tails]
            self.returns_to_go = sample_expert_returns(self.engine, self.state, tok, spec, self.kappa)
            prompts = step_prompts(tok, spec, flat, self.returns_to_go)
        chunk = [concat_samples([t, p]) for t, p in zip(self.tails, prompts, strict=True)]
        if self.mode == "tt":
            self.engine.feed(self.state, chunk)
            ids = tt_plan(self.engine, self.state, tok, spec, self.tt_config).action_ids  # (B, A)
            if ids.shape[1] > 1:
                self.engine.feed(self.state, _as_tensor(ids[:, :-1]))
        else:
            ids = sample_actions(self.engine, self.state, tok, spec, chunk, self.temperature, self.top_k, self.top_p)
        self.tails = [empty_sample() for _ in self.tails]
        self.pending = [concat_samples([p, action_sample(a)]) for p, a in zip(prompts, ids, strict=True)]
        self.last_action = ids
        actions = decode_actions(tok, spec, ids)
        for i in np.flatnonzero(self.skip):  # an env that resets now ignores its action
            actions[i] = self.action_space.sample()
        if not self.batched:
            return actions[0]
        return concatenate(self.action_space, actions, create_empty_array(self.action_space, self.num_envs))

    def observe(self, rewards: Any, terminated: Any, truncated: Any) -> None:
        """Close the step: append each ``r_t``, update returns-to-go, note finished episodes."""
        rewards = np.asarray(rewards, np.float64).reshape(-1)
        done = (np.asarray(terminated, bool) | np.asarray(truncated, bool)).reshape(-1)
        for i in range(self.num_envs):
            if self.skip[i]:  # the dummy step of a NEXT_STEP autoreset
                self.skip[i] = False
                self.new_episode[i] = True
                self.tails[i] = empty_sample()
                continue
            r = reward_sample(self.tok, self.spec, float(rewards[i]))
            self.steps[i].append(concat_samples([self.pending[i], r]))
            self.tails[i] = concat_samples([action_sample(self.last_action[i, -1:]), r])
            self._trim(i)
            if done[i]:
                if self.autoreset == "next_step":
                    self.skip[i] = True
                else:
                    self.new_episode[i] = True
        if self.mode == "dt" and not self.expert_returns:
            self.returns_to_go = self.returns_to_go - rewards  # R_{t+1} = R_t − r_t (Chen et al. 2021)

    def _trim(self, i: int) -> None:
        """Keep only the steps a window can hold (the rest can never be re-prefilled)."""
        total = sum(len(s["input_ids"]) for s in self.steps[i])
        while len(self.steps[i]) > 1 and total - len(self.steps[i][0]["input_ids"]) > self.context_length:
            total -= len(self.steps[i].popleft()["input_ids"])
            self.started[i] = False


def _add_batch_axis(observation: Any) -> Any:
    if isinstance(observation, dict):
        return {k: _add_batch_axis(v) for k, v in observation.items()}
    if isinstance(observation, tuple):
        return tuple(_add_batch_axis(v) for v in observation)
    if isinstance(observation, str):
        return [observation]
    return np.asarray(observation)[None]


def _as_tensor(ids: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(ids)).long()


__all__ = ["Agent"]
