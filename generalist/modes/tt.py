"""Trajectory Transformer mode (Janner et al. 2021): plan by beam search over imagined futures.

The context is the one Gato mode reads: every ``R_t`` is ``<no_return>``, so no return is ever an
input. In training the label at each ``<no_return>`` position is the discounted return-to-go
``V_t = Σ_k γ^k r_{t+k}`` (or ``<eos>`` after a terminated episode, see
:meth:`GeneralistTokenizer.end_of_episode`); the planner reads that *prediction*.

From a context ending in ``<sep>`` (the current observation), the planner rolls the model forward
``horizon`` steps for ``beam_width`` beams per environment. Each planning step (reference
``trajectory/search/core.py::beam_plan``):

1. every beam is expanded ``n_expand`` times (:meth:`Engine.branch`: what the beam imagined so far is
   stored once for its children, not copied) and samples its action tokens (the reference's cdf
   filter ``cdf_act``, which drops the least likely ``cdf_act`` of the mass — on our mu-law bins ranked
   by density, ``TTConfig.cdf_density`` — then top-k ``k_act``, in the reference's order), constrained
   to the action space. On a *discrete* action the filter
   keeps only the likeliest value whenever it holds over 40 % of the mass (always, on two actions),
   so every beam takes the policy's greedy action and the "plan" is the greedy policy's.
   ``TTConfig.distinct_actions`` (not the reference's, which has no discrete actions) makes a
   beam's children take ``n_expand`` *different* first action tokens instead, drawn without
   replacement in proportion to the model's probabilities and without the cdf filter, so the
   planner compares the alternatives by their predicted rewards and values — which only helps where
   those predictions are good (docs/control.md, "Trajectory Transformer on discrete actions");
2. the reward token ``r_t`` is predicted and fed (greedy, reference ``k_rew=1``); then the next
   ``R`` position is read: its distribution over value bins and ``<eos>`` gives the expected value
   ``V_{t+1}`` (the reference's ``percentile='mean'``) and the probability that the episode ended,
   which discounts everything after it. A beam scores

   ``score = Σ_{i≤t} γ^i a_i r_i + γ^{t+1} a_{t+1} V_{t+1}``,  ``a_{i+1} = a_i (1 − P(<eos>)_{i+1})``;

3. the ``beam_width`` best candidates per environment survive (the cache is gathered, the shared
   context never recomputed);
4. except at the last step, ``<no_return>`` is fed (as in training) and the next observation's
   tokens are predicted (``k_obs`` / ``cdf_obs``; ``k_obs=1`` reads each continuous value as the
   predicted median, the bin-width-free greedy choice: the reference's quantile bins make its argmax
   unbiased, our mu-law bins do not), then ``<sep>``.

The first action of the best beam is returned. All beams of all environments are one batch.

Every forward (the decision's own feed and every planning step) attends only to the current step
and the ``context_steps - 1`` before it (:func:`attend_to_last_steps`): the reference crops each
input to ``max_context_transitions`` transitions, so its world model never reads its whole plan.

The loop drives a decoder through the engine's methods (``feed``, ``branch``, ``select``, ``generate``...): on a
Llama backbone with ``TTConfig(compile=True)`` :class:`~generalist.static_beams.StaticBeams`, whose fixed shapes
AOTInductor compiles into one program per forward (``TTConfig.decoder``), else the
:class:`~generalist.engine.Engine` itself; both plan the same beams from the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from generalist.decode_state import Chunk
from generalist.engine import DecodeState, Engine, as_range, constrain, sample_distinct
from generalist.modes.control import (
    ControlStep,
    attend_to_last_steps,
    attend_to_this_step_and,
    bin_log_widths,
    continuous_flags,
    continuous_values,
    fed_action_ids,
    observation_token_ranges,
)
from generalist.static_beams import StaticBeams, unsupported
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer, StepLayout


@dataclass(frozen=True)
class TTConfig:
    """Planner settings; defaults are the reference's ``config/offline.py`` ``base['plan']`` (``cdf_density``
    and ``distinct_actions`` are ours).

    Attributes:
        beam_width: beams kept per environment after each step (reference: 128).
        horizon: planning steps (reference: 15).
        n_expand: candidates sampled per beam before pruning (reference: 2).
        distinct_actions: where the first action token is a discrete value, a beam's ``n_expand``
            children take different ones (see the module's step 1; not the reference's).
        k_obs, k_act: top-k truncation of observation / action tokens (1 = greedy; None = off).
        cdf_obs, cdf_act: the reference's ``filter_cdf``: drop the least likely ``cdf`` of the
            probability mass (reference: None, 0.6).
        cdf_density: rank continuous bins by probability *density* in that filter, not per-bin
            probability (the same filter on bins of equal width, as the reference's uniform discretiser;
            not the reference's literal code, whose quantile bins each hold about equal data mass): our mu-law
            bins are ~100x wider at ±1 than at 0 over an action's range, so ranking by per-bin probability
            keeps the wide outer bins and pushes the planner's actions to the extremes
            (:func:`~generalist.sampling.filter_cdf`; docs/locomotion.md: hopper-medium-expert).
        k_reward: top-k of the reward token fed back (reference ``k_rew`` 1 = greedy).
        discount: γ of the score (reference: 0.99); ``None``: the task spec's ``discount``, the γ of
            the value targets the model was trained on.
        context_steps: steps every forward of the planner reads, the current one included
            (reference ``max_context_transitions`` = 5): the window slides along the imagined steps
            as the reference crops them (:func:`attend_to_last_steps`).
        plan_freq: plan every this many steps and follow the plan's actions in between
            (reference: 1).
        policy_view: where the model was trained with hidden actions (``GeneralistConfig.hidden_action_prob``), read
            the *past* steps' actions as ``<hidden_action>``, as Gato and DT modes read them, while the planner's
            imagined actions are fed as themselves (its world model needs them to predict rewards, values and the
            next observation). Ours, not the reference's, whose model always reads real actions: a model that sees
            its own past actions learns to repeat them (the copycat problem of cloning with action histories), and
            the planner draws its candidate actions from that model. On ``control-lowq`` (2 seeds x 20 episodes),
            TT's expert-normalised IQM over the five tasks went from 0.43 reading real past actions to 0.75 reading
            them hidden; Acrobot returns -459 / -441 to -175 / -401 (docs/control.md, "TT's proposals in the
            policy view").
        beam_cache_dtype: dtype the beams' own imagined tokens are cached in ("bfloat16": half the
            bytes to read, which is what a planning step's time goes to; "float32": a float32 model's own
            precision; "auto": the model's dtype when it is narrower than float32, else bfloat16 on a CUDA
            device and float32 on a CPU, where a bfloat16 beam cache made a float32 model's plan slower with or
            without AMX tiles, see :func:`beam_cache_dtype`).
            The shared context always keeps the model's dtype. The static decoder keeps everything in the model's
            dtype.
        decoder: what runs the plan's forwards: ``"static"``, :class:`~generalist.static_beams.StaticBeams` (fixed
            buffers, the same computation, less overhead per forward); ``"engine"``, the general
            :class:`~generalist.engine.Engine`; ``"auto"``: static when ``compile`` is on and it supports the model
            and the state (:func:`~generalist.static_beams.unsupported`), else the engine. Eager, the static
            decoder is no faster than the engine at every shape (hopper, 1 env x 128 beams: 1.06-1.26x faster;
            halfcheetah, 10 envs x 32 beams, horizon 5, bfloat16: 2.54 vs 2.41 s, slower); compiled, it is
            1.2-1.9x faster at both (docs/speed.md).
        compile: with the static decoder, run its forward as a program compiled ahead of time (``torch.export`` and
            AOTInductor, :func:`~generalist.static_beams.compiled_forward`): each plan shape (task, number of
            environments, beams, dtype) has five, compiled on its first plan (~15 s each on a 2-core CPU) and kept
            on disk (``$GENERALIST_CACHE/aoti``, the most recently used 512 MB: ``GENERALIST_AOTI_CACHE_MB``,
            :func:`~generalist.static_beams.prune_cache`), so a later process loads them in a second. Eager where
            compiling fails (a warning says why).
    """

    beam_width: int = 128
    horizon: int = 15
    n_expand: int = 2
    k_obs: int | None = 1
    k_act: int | None = None
    cdf_obs: float | None = None
    cdf_act: float | None = 0.6
    k_reward: int | None = 1
    discount: float | None = None
    context_steps: int = 5
    plan_freq: int = 1
    beam_cache_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    distinct_actions: bool = False
    cdf_density: bool = True
    policy_view: bool = True
    decoder: Literal["auto", "static", "engine"] = "auto"
    compile: bool = False

    def __post_init__(self):
        for name in ("beam_width", "horizon", "n_expand", "context_steps", "plan_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"TTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cdf_obs", "cdf_act"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"TTConfig.{name} must be in [0, 1), got {value}")
        if self.plan_freq > self.horizon:
            raise ValueError(f"TTConfig.plan_freq ({self.plan_freq}) cannot exceed the horizon ({self.horizon})")


# The reference's per-dataset overrides of base['plan'] (jannerm/trajectory-transformer
# config/offline.py at its last commit, 558b0af "config", the `plans/defaults/` its README's results use):
# halfcheetah medium / medium-replay plan with horizon 5 and 32 beams, halfcheetah-medium-expert with 32
# beams; walker2d-medium-expert with horizon 5; walker2d-medium-replay with horizon 20, 32 beams and top-40
# actions instead of the cdf filter; ant medium / medium-replay / random with horizon 5; every other
# dataset keeps the base settings. (The commit before, 106b3b5, had hopper-medium replan every 5 steps.)
TT_PRESETS: dict[str, TTConfig] = {
    "reference": TTConfig(),
    **{f"halfcheetah-{d}-v2": TTConfig(horizon=5, beam_width=32) for d in ("medium", "medium-replay")},
    "halfcheetah-medium-expert-v2": TTConfig(beam_width=32),
    **{f"ant-{d}-v2": TTConfig(horizon=5) for d in ("medium", "medium-replay", "random")},
    **{f"{d}-v2": TTConfig() for d in ("hopper-medium", "hopper-medium-replay", "hopper-medium-expert",
                                         "walker2d-medium", "ant-medium-expert")},
    "walker2d-medium-expert-v2": TTConfig(horizon=5),
    "walker2d-medium-replay-v2": TTConfig(horizon=20, beam_width=32, k_act=40, cdf_act=None),
    # Ours, not the reference's: the classic control tasks need no 15-step horizon (a CartPole or
    # Pendulum step is 0.02-0.05 s) and a 2-core CPU cannot afford 128 beams for 2 x 20 episodes of
    # 200-1,000 steps; these are the settings the TT figures of docs/control.md were measured with
    # (16 beams where the action is discrete, 32 where it is continuous).
    **{task: TTConfig(beam_width=16, horizon=5) for task in ("CartPole-v1", "Acrobot-v1", "MountainCar-v0")},
    **{task: TTConfig(beam_width=32, horizon=5) for task in ("Pendulum-v1", "MountainCarContinuous-v0")},
}


def beam_cache_dtype(name: str, device: torch.device, model_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """``TTConfig.beam_cache_dtype`` for a model of ``model_dtype`` on ``device``; ``"auto"`` picks by hardware,
    and never a dtype wider than the model computes in (a bfloat16 model caches its beams in bfloat16).

    Measured on one TT plan of a float32 model at the reference's hopper settings (beam 128, horizon 15,
    ``bench/decode.py``, which times both): an AMD EPYC with AVX-512-BF16 but no AMX, 1 thread, 8.0 s with a
    bfloat16 beam cache and 6.1 s in float32; an Intel Xeon with AMX tiles, 2 threads, 3.13 vs 2.35 s and 3.06 vs
    2.88 s in two runs (docs/bench/decode_tt_2026-12-07.log) — where an earlier engine on a Sapphire Rapids had
    planned faster in bfloat16 (6.4 vs 7.3 s, 1 thread), which is why ``auto`` once picked it on AMX.
    """
    if name != "auto":
        return getattr(torch, name)
    if model_dtype != torch.float32:
        return model_dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def tt_preset(task: str) -> TTConfig:
    """The planner a task plans with unless told otherwise: its entry in ``TT_PRESETS``, else the reference's."""
    return TT_PRESETS.get(task, TT_PRESETS["reference"])


@dataclass
class Plan:
    """Result of :func:`tt_plan` for E environments.

    Attributes:
        action_ids: (E, A) first action tokens of the best beam (what to do now).
        plan_ids: (E, H, A) the best beam's action tokens for the whole horizon.
        scores: (E,) the best beam's score.
        values: (E, H) the best beam's predicted value after each planned step.
        rewards: (E, H) the best beam's predicted (expected) reward of each planned step.
        observation_ids: (E, H - 1, O) the observation tokens the best beam imagined after each planned
            step but the last (``tok.decode_continuous`` / ``decode_discrete`` read them).
    """

    action_ids: np.ndarray
    plan_ids: np.ndarray
    scores: np.ndarray
    values: np.ndarray
    rewards: np.ndarray
    observation_ids: np.ndarray


def expected(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of the predicted distribution over bins (N, 1024) with bin ``values`` (1024,) -> (N,): what the
    planner reads as a step's reward (``eval.values`` reads the same); in float32, returned as float64
    (:func:`read_value`)."""
    return (logits.float().softmax(-1) @ values.to(torch.float32)).double()


def read_value(logits: torch.Tensor, eos_col: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the planner reads at an ``R`` position: ``E[V | not ended]`` (N,) and ``P(<eos>)`` (N,).

    ``logits`` (N, eos_col + 1) are over the ids from the first continuous bin to ``<eos>`` (column
    ``eos_col``); ``values`` (1024,) are the value of each bin in task units. The distribution is
    renormalised over the value bins and ``<eos>`` (the reference's ``percentile='mean'``, plus the
    probability that the episode has ended, which discounts what follows). ``eval.values`` reads the same.
    In float32 (the reference planner's precision; float64 took ~5 % of a plan with the reward's :func:`expected`),
    returned as float64: ``E[V | not ended]`` is the mean over the value bins alone, and ``P(<eos>)`` =
    sigmoid(eos logit - logsumexp of the bins' logits), both exact however close ``P(<eos>)`` is to 1.
    """
    bins = logits[:, : len(values)].float()  # (N, 1024)
    total = bins.logsumexp(-1)  # (N,)
    p_end = torch.sigmoid(logits[:, eos_col].float() - total)  # (N,)
    p = (bins - total[:, None]).exp().nan_to_num(0.0)  # (N, 1024) P(bin | not ended); 0 where no bin can come
    return (p @ values.to(p.dtype)).double(), p_end.double()


@torch.inference_mode()
def tt_plan(engine: Engine, state: DecodeState, tok: GeneralistTokenizer, spec: TaskSpec,
            config: TTConfig = TTConfig()) -> Plan:
    """Beam-search plan for every row (environment) of ``state`` (Janner et al. 2021, §3.2).

    ``state.logits`` must predict the first action token (the context ends with ``<sep>``). On
    return, ``state`` is exactly as it was (:meth:`Engine.restore`).
    """
    e = state.batch_size
    beam, expand, horizon = config.beam_width, config.n_expand, config.horizon
    gamma = spec.discount if config.discount is None else config.discount
    act_ranges = tok.action_token_ranges(spec)
    obs_ranges = observation_token_ranges(tok, spec)
    obs_median = continuous_flags(tok, obs_ranges)
    cont, centres = continuous_values(tok)
    reward_values, value_values = centres / spec.reward_scale, centres / spec.return_scale
    after_reward = (cont[0], tok.eos_id + 1)  # the next R position: value bins ... <eos>
    eos_col = tok.eos_id - cont[0]
    no_return = torch.full((1,), tok.no_return_id)
    obs_local = range(1, len(obs_ranges) + 1)
    log_width = bin_log_widths(tok) if config.cdf_density else None  # (vocabulary,)
    enumerate_first = config.distinct_actions and expand > 1 and not continuous_flags(tok, act_ranges[:1])[0]

    layout = tok.step_layout(spec)
    now = state.length - layout.prompt_tokens  # cache position where the current step starts (its R)
    ranges = [as_range(r) for r in (*act_ranges, *obs_ranges, cont, after_reward)]
    why_not = ("the engine was asked for" if config.decoder == "engine" else
               "auto without compile: the engine is as fast" if config.decoder == "auto" and not config.compile else
               "a token is constrained by a mask, not an id range" if None in ranges else unsupported(engine, state))
    if config.decoder == "static" and why_not is not None:
        raise ValueError(f"TTConfig.decoder='static' cannot plan here: {why_not}")
    if why_not is None:  # the engine's state is only read; the beams live in their own buffers
        decoder = StaticBeams(engine, state, beam, window=config.context_steps * layout.tokens,
                              shared=(config.context_steps - 1) * layout.tokens + layout.prompt_tokens,
                              wide=len(act_ranges) + 1, columns=horizon * layout.tokens,
                              vocab_range=(min(r[0] for r in ranges), max(r[1] for r in ranges)),
                              median_range=as_range(cont), compile=config.compile)
        beams = decoder.state
        attend_to_last_steps(decoder, beams, now, layout, config.context_steps)
    else:
        decoder, beams, snapshot = engine, state, engine.snapshot(state)
        attend_to_last_steps(engine, state, now, layout, config.context_steps)
        # (E*beam): every beam continues the same context, stored once; its own tokens in beam_cache_dtype
        engine.share(state, beam, beam_cache_dtype(config.beam_cache_dtype, engine.device, engine.dtype))
    n = e * beam
    rewards = torch.zeros(n, horizon, dtype=torch.float64)  # expected r_t of each planned step
    alive = torch.ones(n, horizon + 1, dtype=torch.float64)  # P(episode still running) before step t
    values = torch.zeros(n, horizon, dtype=torch.float64)  # expected V_{t+1} after step t
    discounts = gamma ** torch.arange(horizon + 1, dtype=torch.float64)
    plans = torch.zeros(n, horizon, len(act_ranges), dtype=torch.long)
    imagined = torch.zeros(n, horizon - 1, len(obs_ranges), dtype=torch.long)  # o_{t+1} after each step but the last
    scores = torch.zeros(n, dtype=torch.float64)
    for t in range(horizon):
        decoder.branch(beams, expand)  # (E*beam*expand) grouped per environment; a beam's tokens shared by its children
        rewards, alive, values, plans, imagined = (x.repeat_interleave(expand, 0)
                                                   for x in (rewards, alive, values, plans, imagined))
        # the first action token: a beam's children share their logits, so its filters run once per beam
        if enumerate_first:  # a beam's children try different actions, however sure the model is
            parents, lo = constrain(beams.logits[::expand], act_ranges[0], beams.logits_offset)  # (E*beam, n)
            first = (sample_distinct(parents, expand, decoder.generator) + lo).flatten()  # (E*beam*expand,)
        else:
            first = decoder.sample(beams, act_ranges[0], 1.0, config.k_act, cdf=config.cdf_act,
                                   cdf_log_width=log_width, runs=expand)  # (E*beam*expand,)
        decoder.feed(beams, first[:, None], act_ranges[1] if len(act_ranges) > 1 else cont)
        rest = decoder.generate(beams, act_ranges[1:], 1.0, config.k_act, feed_last=True, then=cont,
                                cdf=config.cdf_act, cdf_log_width=log_width)
        plans[:, t] = torch.cat([first[:, None], rest], 1)
        r_logits, r_offset = constrain(beams.logits, cont, beams.logits_offset)  # (N, 1024)
        rewards[:, t] = expected(r_logits, reward_values)
        greedy = config.k_reward == 1
        r_ids = decoder.sample(beams, cont, 0.0 if greedy else 1.0, None if greedy else config.k_reward)
        decoder.feed(beams, r_ids[:, None], after_reward)
        v_logits, _ = constrain(beams.logits, after_reward, beams.logits_offset)  # (N, eos - lo + 1)
        values[:, t], p_end = read_value(v_logits, eos_col, value_values)  # E[V | not ended], P(<eos>)
        alive[:, t + 1] = alive[:, t] * (1.0 - p_end)
        ret = (rewards[:, : t + 1] * alive[:, : t + 1] * discounts[: t + 1]).sum(-1)
        total = ret + discounts[t + 1] * alive[:, t + 1] * values[:, t]  # (E*beam*expand,)
        scores, best = total.view(e, beam * expand).topk(beam, dim=1)  # (E, beam)
        rows = (best + torch.arange(e)[:, None] * beam * expand).flatten()  # (E*beam,)
        if t < horizon - 1:  # the window slides first, so that select leaves out what it has passed
            attend_to_last_steps(decoder, beams, now + (t + 1) * layout.tokens, layout, config.context_steps)
        decoder.select(beams, rows)
        rewards, alive, values, plans, imagined = (x[rows] for x in (rewards, alive, values, plans, imagined))
        scores = scores.flatten()
        if t < horizon - 1:  # imagine the next observation: <no_return> o_{t+1} <sep>
            decoder.feed(beams, no_return.expand(beams.batch_size)[:, None], obs_ranges[0])
            # each imagined token at its place in the observation (1..n), as the tokenizer lays observations out
            obs = decoder.generate(beams, obs_ranges, 1.0, config.k_obs, feed_last=False, cdf=config.cdf_obs,
                                   cdf_log_width=log_width, median=obs_median,
                                   local_positions=obs_local)  # k_obs = 1: predicted medians
            last = torch.stack([obs[:, -1], torch.full_like(obs[:, -1], tok.sep_id)], 1)
            decoder.feed(beams, Chunk.from_ids(last, local_positions=(len(obs_ranges), 0)), act_ranges[0])
            imagined[:, t] = obs

    best = scores.view(e, beam).argmax(1)  # (E,)
    rows = best + torch.arange(e) * beam
    if decoder is engine:
        engine.restore(snapshot)
    return Plan(action_ids=plans[rows, 0].numpy(), plan_ids=plans[rows].numpy(),
                scores=scores.view(e, beam)[torch.arange(e), best].numpy(), values=values[rows].numpy(),
                rewards=rewards[rows].numpy(), observation_ids=imagined[rows].numpy())


class TTMode:
    """Trajectory Transformer control through :class:`~generalist.Agent`: no returns fed, plan, act.

    Past actions are read as ``<hidden_action>`` when the model was trained with them (``TTConfig.policy_view``);
    the actions the planner imagines are always fed as themselves. The context is cropped to the last
    ``config.context_steps`` steps (the reference planner's ``max_context_transitions``), so each decision costs
    the same however long the episode runs.
    """

    name = "tt"

    def __init__(self, config: TTConfig | None = None):
        """``config``: the planner; ``None``: each task's preset (:func:`tt_preset`), chosen at ``set_task``."""
        self.explicit = config
        self.config = config or TTConfig()
        self.plan: np.ndarray | None = None  # (B, H, A) the last plan, followed for plan_freq steps
        self.age = 0  # steps since the last plan

    @property
    def policy_view(self) -> bool:
        """Whether the Agent feeds past actions as ``<hidden_action>`` (read at every ``Agent.reset``)."""
        return self.config.policy_view

    def set_task(self, task: str) -> None:
        if self.explicit is None:
            self.config = tt_preset(task)

    def begin_episode(self, rows: np.ndarray, spec: TaskSpec, num_envs: int) -> None:
        self.plan = None  # a new episode in any row: plan again for all

    def returns(self, step: ControlStep) -> None:
        return None  # <no_return>: the value is predicted, never given

    def context_tokens(self, layout: StepLayout, prompt_tokens: int) -> int | None:
        # past steps + the current one + the imagined horizon, as the reference planner crops, and one
        # step of room for what is fed before the current step, so that a refill keeps all past steps
        return prompt_tokens + 1 + layout.tokens * (self.config.context_steps + 2 + self.config.horizon)

    def lookahead_tokens(self, layout: StepLayout) -> int:
        return self.config.horizon * layout.tokens

    def decide(self, step: ControlStep) -> np.ndarray:
        attend_to_this_step_and(step, self.config.context_steps - 1)
        step.engine.feed(step.state, step.chunks)
        if self.plan is None or self.age >= self.config.plan_freq:
            self.plan, self.age = tt_plan(step.engine, step.state, step.tok, step.spec, self.config).plan_ids, 0
        ids = self.plan[:, self.age]  # (B, A)
        self.age += 1
        if ids.shape[1] > 1:  # the last action token is fed with the reward, like every mode's
            fed = np.ascontiguousarray(fed_action_ids(ids[:, :-1], step.hidden_action_id))
            step.engine.feed(step.state, torch.from_numpy(fed).long())
        return ids

    def end_step(self, rewards: np.ndarray) -> None:
        pass

    def keep_rows(self, rows: np.ndarray) -> None:
        if self.plan is not None:  # the rows kept follow their plans
            self.plan = self.plan[rows]


__all__ = ["TT_PRESETS", "Plan", "TTConfig", "TTMode", "attend_to_last_steps", "beam_cache_dtype", "expected",
           "read_value", "tt_plan", "tt_preset"]
