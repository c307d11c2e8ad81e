"""Control-decoding benchmark through :class:`generalist.Agent` in a gymnasium vector env.

(Over 400 lines: four benchmarks that must run through the same Agent in one process, so that
their ratios come from one run, plus the hook that runs the reference harnesses beside them.)

Prints measured ratios from one run (not a pass/fail test): the "Measured" figures of docs/speed.md for
decoding. Every decision is timed where users spend it, ``agent.act(obs)`` + ``agent.observe(...)``
on a ``gym.vector.SyncVectorEnv``, so that a regression anywhere on that path (the Agent's
bookkeeping, a mode, the engine, the tokenizer) shows in the figures, and a refactor of internal
helpers cannot leave the benchmark timing code that users no longer run.

The targets, on CPU with ``torch.set_num_threads(2)``:

* **decision time is flat in context length with the KV cache**: at ~1000 tokens of context ≤ 1.5 ×
  at ~100 (Decision Transformer mode, default tiny Llama, 1 env). The same decisions without a
  cache are timed next to it: the Agent is given an ``Engine(use_cache=False)`` (its ``engine``
  attribute is replaced before ``reset``; the Agent has no constructor argument for it), so the
  uncached figure runs the same Agent code, recomputing the whole sequence for every token;
* **batching**: 32 environments give ≥ 10 × the decisions/s of one, at ~100 and ~1000 tokens;
* **agent throughput at JAT's size** (Llama-style 12 × 768, 12 heads, MLP 2048: 85 M parameters in
  the layers, as the 86 M JAT reads per decision; 32 envs; a 256-token context, JAT's eval window):
  ≥ 1.5 × JAT's decisions/s. JAT's figure is never a built-in constant: it is either measured in
  this run by ``../shared/reference_bench/jat_reference.py`` (``--with_references DIR``) or given
  as ``--jat_ms MS`` (that script's last line, measured on the same machine); without it no ratio
  is printed;
* **Trajectory Transformer planning** at the published planner's hopper settings (11 obs / 3
  action dims, beam 128, horizon 15, n_expand 2, 5 context transitions, the reference's 4 × 128
  backbone), timed through the Agent in TT mode, is at most 1/50 of the original planner's time and
  1/20 of Faster-TT's (``--with_references``), on each decoder of ``--tt_decoders``: the static-shape
  one compiled (``TTConfig(decoder="static", compile=True)``, the first, whose figure the ratios are
  for), eager, and the engine with the beams' own cache as the default (``auto``: bfloat16 on CUDA,
  float32 on a CPU) and the other dtype (``--tt_beam_cache_dtypes``). With
  ``--tt_uncached`` the same planner is also timed by :func:`generalist.modes.tt_plan` on an
  ``Engine(use_cache=False)`` (recomputing every sequence for every token, as the reference
  planner does; minutes at the reference settings, too slow to pre-run an Agent with), next to a
  cached ``tt_plan`` on the same context. ``--with_references DIR`` also runs the reference
  planners' harnesses (``tt_reference.py``, ``faster_tt_reference.py``) at the same settings, in rounds
  between our decisions (``compare_tt_references``: this machine's speed drifts over minutes, and a
  reference decision takes a minute).

**Environment.** ``Hopper-v5`` (MuJoCo, 11-d observation, 3-d action, the task JAT's figure and
the TT references use) with ``terminate_when_unhealthy=False``, so that no episode ends while a
context is being built up (an ending episode would restart its row's context); a run checks that
none did. Without MuJoCo (the ``[mujoco]`` extra) a stand-in gymnasium env with the same spaces
and trivial dynamics is used, and the run says so. ``env.step`` is not part of a decision's time
(it is the environment's cost, not the agent's); its median is printed beside the figures.

**How a context of a given length is reached.** The simplest honest way: play it. Each *trial*
resets the agent and the envs, plays untimed steps until the context is just short of the target
length, then times ``timed_steps`` consecutive decisions (17 tokens per Hopper step, so the
context grows by 17 per timed decision; the target is the mean over them). The *context* of a
decision is the number of tokens in the agent's cache when it starts (``agent.state.length``;
the previous step's last action token and reward are fed with the decision), printed as measured.
In the DT figures the agent's window (the model's trained context, 2048) never slides while timing
(checked), so no re-prefill is hidden in, or missing from, them. TT mode crops its window to the
planner's 5 context steps, as the reference does, so its steady state re-prefills that window
(under 100 tokens) at most decisions: that is included, and counted in the output. Figures are
medians over all timed decisions of all trials; ratios are between settings of this one run.

A *decision* in DT mode: feed the previous step's last action token and reward, then
``[R_t] [o_t] <sep>``, then sample the 3 action tokens; for all envs at once. In TT mode the same
plus a beam search over ``horizon`` imagined steps.

    python bench/decode.py                          # everything (minutes on 2 cores)
    python bench/decode.py --skip_tt --trials 3     # the decision and JAT-size figures only
    python bench/decode.py --skip_jat_size --skip_tt --decision_dtypes float32 bfloat16   # decisions, both dtypes
    python bench/decode.py --skip_decisions --skip_jat_size   # the TT figures only
    python bench/decode.py --quick                  # a seconds-long smoke run (tiny sizes; not the figures)
    python bench/decode.py --jat_ms 57.3            # JAT measured separately, same machine
    python bench/decode.py --with_references ../shared/reference_bench --reference_python $VENV/bin/python
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from generalist import Agent, Engine, GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer, TaskSpec
from generalist.modes import TTConfig, step_prompts, tt_plan
from generalist.modes.tt import beam_cache_dtype
from generalist.shared_prefix import window_cuts
from generalist.tokenizer import concat_samples
from generalist.training.settings import parse

sys.path.append(str(Path(__file__).resolve().parent))  # appended: bench/train.py must not shadow train.py
from roofline import count_flops, gemm_rate, read_rate  # noqa: E402  (bench/ is a folder of scripts, not a package)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    contexts: tuple[int, int] = (100, 1000)
    """the short and long context (tokens) of the decision-time and batching figures"""
    num_envs: int = 32
    """environments of the batched figures (against 1)"""
    trials: int = 5
    """fresh episodes per setting; each plays up to the context, then times timed_steps decisions"""
    timed_steps: int = 4
    """consecutive decisions timed per trial (the median is over trials x timed_steps)"""
    uncached: bool = True
    """also time the decisions on an Engine(use_cache=False)"""
    hidden_action_prob: float = 0.5
    """the models' GeneralistConfig.hidden_action_prob, train.py's default: above 0 the Agent acts in the policy
    view, where one forward predicts every action token (Engine.generate_blind); 0: a model trained without
    hidden actions, one forward per action token"""
    skip_decisions: bool = False
    """skip the decision-time and batching figures (DT mode, the default tiny model)"""
    decision_dtypes: tuple[str, ...] = ("float32",)
    """weight dtypes (and so KV cache dtypes) of the decision-time and batching figures, each timed in turn;
    bfloat16 halves the cache bytes that bound 32 envs at a long context"""
    skip_jat_size: bool = False
    """skip the agent-throughput figure at JAT's size"""
    jat_layers: int = 12
    """layers of the JAT-size backbone"""
    jat_width: int = 768
    """hidden size of the JAT-size backbone (heads of 64, Llama MLP 8/3 as wide: 2048 at 768)"""
    jat_context: int = 256
    """context (tokens) of the JAT-size figure: JAT's eval window"""
    jat_trials: int = 2
    """trials of the JAT-size figure (a 32-env decision there takes about a second)"""
    jat_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """weight dtypes of the JAT-size model to time, the first one for the ratio to JAT (whose harness runs in
    float32); bfloat16 is what a user of a CPU with AVX-512 BF16 or AMX would run"""
    jat_ms: float | None = None
    """JAT's ms per decision measured on this machine by reference_bench/jat_reference.py (its last
    line); used for the ratio instead of running that harness"""
    skip_tt: bool = False
    """skip the Trajectory Transformer figures"""
    beam_width: int = 128
    """TT beam width (reference: 128)"""
    horizon: int = 15
    """TT planning horizon (reference: 15)"""
    n_expand: int = 2
    """TT candidates per beam (reference: 2)"""
    tt_repeats: int = 2
    """timed TT decisions (after the 5 context steps, played with the same planner)"""
    tt_envs: int = 1
    """environments planned for together (eval.control plans for its 20 episodes' envs at once); the references
    plan for one, so their ratios are printed only with 1"""
    tt_backbone: Literal["reference", "default"] = "reference"
    """the TT model: the reference GPT's 4 x 128 layers, or the default tiny Llama (4 x 192, the shape the
    control and locomotion presets train)"""
    tt_decoders: tuple[Literal["static+compile", "static", "engine"], ...] = ("static+compile", "static", "engine")
    """TT decoders to time (TTConfig.decoder, with compile for "static+compile"), the first one for the ratios to
    the references. The compiled one compiles during the played steps before the timed ones (~75 s the first time on
    a machine, then loaded from the disk cache, TTConfig.compile)"""
    tt_beam_cache_dtypes: tuple[str, ...] = ("auto", "bfloat16", "float32")
    """TTConfig.beam_cache_dtype values to time on the engine (a dtype that an earlier entry's ``auto`` already
    timed is skipped, and so is one wider than the model's); the static decoder keeps the model's dtype"""
    tt_model_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """weight dtypes of the TT model to time, the first one for the ratios to the references (which plan in
    float32); every one also gets its own ratios. bfloat16 is what a user of a CPU with AVX-512 BF16 or AMX
    would run"""
    tt_uncached: bool = False
    """also time tt_plan on an Engine(use_cache=False) (minutes at the reference settings)"""
    with_references: Path | None = None
    """a reference_bench folder: run its jat harness first and its tt / faster-tt harnesses in rounds between our TT
    decisions (:func:`compare_tt_references`), at these settings"""
    reference_python: Path | None = None
    """interpreter of the reference harnesses (default: this one; JAT's needs transformers==4.36.1)"""
    reference_repeats: int = 3
    """timed decisions per reference harness (JAT: in one run; TT: one per round, each between our decisions)"""
    env: str = "Hopper-v5"
    """the env ("Hopper-v5", or "hopper-like": the stand-in with its spaces, used without MuJoCo)"""
    threads: int = 2
    """torch.set_num_threads"""
    device: str = "cpu"
    """where the models run (cpu, cuda, cuda:1); envs, sampling and the Agent's bookkeeping stay on the CPU. The
    floors are measured on this device; the reference harnesses always run on the CPU"""
    quick: bool = False
    """smoke run: replace every size by a tiny one (seconds; the figures mean nothing)"""


# What --quick replaces: everything that makes the run long, nothing that changes what runs.
QUICK = dict(contexts=(20, 60), num_envs=4, trials=1, timed_steps=2, jat_layers=1, jat_width=64, jat_context=40,
             jat_trials=1, beam_width=4, horizon=2, tt_repeats=1, reference_repeats=1)

# The reference TT GPT's shape (4 layers, 4 heads, 128 wide; Janner et al. 2021, config/offline.py). Its MLP
# has 2 matrices of 128 x 512; a Llama MLP has 3, so 341 wide reads (and multiplies by) as many weights.
TT_BACKBONE = {"hidden_size": 128, "intermediate_size": 341, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def jat_backbone(layers: int, width: int) -> dict:
    """JAT's size (GPT-Neo 12 x 768, MLP 3072) as a Llama: its MLP has 3 matrices, so 8/3 x 768 = 2048
    wide reads as many weights as GPT-Neo's 2 x 3072."""
    heads = max(1, width // 64)
    return {"hidden_size": width, "intermediate_size": width * 8 // 3, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 2048,
            "tie_word_embeddings": False}


class HopperLike(gym.Env):
    """Hopper-v5's spaces with trivial dynamics: the stand-in when MuJoCo is not installed (decoding
    cost depends on the spaces only)."""

    observation_space = spaces.Box(-np.inf, np.inf, (11,), np.float64)
    action_space = spaces.Box(-1.0, 1.0, (3,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._obs = self.np_random.normal(size=11)
        return self._obs, {}

    def step(self, action):
        self._obs = 0.9 * self._obs + 0.1 * self.np_random.normal(size=11)
        return self._obs, float(1.0 + action.sum() * 0.01), False, False, {}


def env_factory(name: str):
    """A maker of one env; Hopper-v5 never terminates (its 1000-step limit is never reached here)."""
    if name == "hopper-like":
        return lambda: gym.wrappers.TimeLimit(HopperLike(), 1000)
    if name != "Hopper-v5":
        raise ValueError(f"env must be 'Hopper-v5' or 'hopper-like', got {name!r}")
    return lambda: gym.make(name, terminate_when_unhealthy=False)


def pick_env(name: str) -> str:
    if name == "Hopper-v5":
        try:
            env_factory(name)().close()
        except gym.error.DependencyNotInstalled:
            print("note: MuJoCo is not installed ([mujoco] extra): using the hopper-like stand-in env")
            return "hopper-like"
    return name


def vector_env(name: str, n: int) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([env_factory(name)] * n, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def hopper_spec(name: str) -> TaskSpec:
    env = env_factory(name)()
    spec = TaskSpec.from_env(env, name=name, expert_return=3000.0, random_return=0.0, return_scale=0.01)
    env.close()
    return spec


def seeded_model(tok: GeneralistTokenizer, text_config: dict | None = None, device: str = "cpu",
                 hidden_action_prob: float = 0.0) -> GeneralistForCausalLM:
    torch.manual_seed(0)
    kwargs = {} if text_config is None else {"text_config": dict(text_config)}
    config = GeneralistConfig(vocab_layout=tok.layout.to_dict(), hidden_action_prob=hidden_action_prob, **kwargs)
    return GeneralistForCausalLM(config).eval().to(device)


# --- timing through the Agent ---
@dataclass
class Timing:
    """Timed decisions of one setting: agent seconds per env-step, env.step seconds, contexts."""

    num_envs: int
    seconds: list[float] = field(default_factory=list)
    env_seconds: list[float] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)
    refills: int = 0  # window slides during the timed decisions
    flops: int | None = None  # of one more (untimed) decision after the timed ones, when counted
    kv_bytes: int | None = None  # KV cache bytes its forwards attended to (read once each)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_s(self) -> float:
        """Decisions per second (one per env per env-step)."""
        return self.num_envs / self.median

    @property
    def context(self) -> int:
        return round(statistics.mean(self.contexts))


def steps_before(context: int, timed_steps: int, step_tokens: int) -> int:
    """Untimed steps to play so that the timed decisions' contexts average ``context`` tokens.

    After ``k`` steps the cache holds ``k * step_tokens - 1`` tokens (``<bos>`` and k steps, less
    the last action token and reward, which the next decision feeds).
    """
    return max(1, round((context + 1) / step_tokens - (timed_steps - 1) / 2))


def timed_step(agent: Agent, envs: gym.vector.VectorEnv, obs: Any) -> tuple[Any, Any, Any, Any, float, float]:
    """One vector-env step through the Agent, timed where users spend it: ``(obs, rewards, terminated,
    truncated, agent seconds, env.step seconds)``; the agent's are ``act`` + ``observe``."""
    t0 = time.perf_counter()
    actions = agent.act(obs)
    t1 = time.perf_counter()
    obs, rewards, terminated, truncated, _ = envs.step(actions)
    t2 = time.perf_counter()
    agent.observe(rewards, terminated, truncated)
    return obs, rewards, terminated, truncated, t1 - t0 + time.perf_counter() - t2, t2 - t1


def time_agent(agent: Agent, envs: gym.vector.VectorEnv, spec: TaskSpec, trials: int, pre_steps: int,
               timed_steps: int, allow_refills: bool = False, flops: bool = False) -> Timing:
    """Play ``trials`` fresh episodes of ``pre_steps`` untimed then ``timed_steps`` timed decisions.

    ``flops``: then count the FLOPs and KV bytes of one more decision (untimed: the counters slow it).

    Raises if an episode ends (its row's context would restart) or, unless ``allow_refills``, the
    window slides while timing: either would make the figure a different one than it says.
    """
    out = Timing(envs.num_envs)
    for trial in range(trials):
        agent.reset(spec, num_envs=envs.num_envs)
        obs, _ = envs.reset(seed=trial)
        for k in range(pre_steps + timed_steps):
            context, refills = 0 if agent.state is None else agent.state.length, agent.refills
            obs, _, terminated, truncated, agent_s, env_s = timed_step(agent, envs, obs)
            if np.any(terminated | truncated):
                raise RuntimeError(f"an episode ended at step {k}; the timed contexts would restart")
            if k >= pre_steps:
                out.seconds.append(agent_s)
                out.env_seconds.append(env_s)
                out.contexts.append(context)
                out.refills += agent.refills - refills
    if flops:
        def counted_decision() -> None:  # one decision under both counters
            out.kv_bytes = count_kv_reads(agent.engine, lambda: timed_step(agent, envs, obs))

        out.flops = count_flops(counted_decision)
    if out.refills and not allow_refills:
        raise RuntimeError(f"the agent's window slid {out.refills} times while timing (context_length "
                           f"{agent.context_length}); the figures would include re-prefills")
    return out


def cache_bytes(state) -> int:
    """Bytes of keys and values a forward on ``state`` attends to: the shared levels (``Engine.share``'s
    prefix, ``Engine.branch``'s), each read once, then its rows' cache, from ``state.window_start`` on
    (``Engine.attend_from``: the keys before the window are not read)."""
    read, skip = window_cuts([level for level in (state.prefix, state.branch) if level is not None],
                             state.window_start)  # the attention's own rule
    total = sum(2 * k.numel() * k.element_size()
                for level, cut in read for k in (level.layer(i, cut)[0] for i in range(len(level.cache.layers))))
    layers = [layer for layer in getattr(state.cache, "layers", []) if getattr(layer, "keys", None) is not None]
    if layers:
        cut = min(skip, layers[0].keys.shape[2])
        total += sum(2 * layer.keys[:, :, cut:].numel() * layer.keys.element_size() for layer in layers)
    return total


def count_kv_reads(engine: Engine, fn) -> int:
    """KV bytes read by the forwards of ``fn()``: the cache as each of the engine's forwards (``Engine._feed``,
    which ``feed`` and ``generate_blind`` call) leaves it (its attention read all of it). A timing aid: the
    method is wrapped for the call only."""
    forward, total = engine._feed, 0

    def counting(state, *args, **kwargs):
        nonlocal total
        out = forward(state, *args, **kwargs)
        total += cache_bytes(state)
        return out

    engine._feed = counting
    try:
        fn()
    finally:
        del engine._feed  # the class's method again
    return total


def dt_agent(model, tok, use_cache: bool = True) -> Agent:
    agent = Agent(model, tok, "dt")
    if not use_cache:  # the Agent takes no engine argument; the same Agent code drives an uncached one
        agent.engine = Engine(model, seed=0, use_cache=False)
    return agent


# --- the figures ---
def bench_decisions(args: Args, tok, spec, model) -> dict[tuple[int, int, bool], Timing]:
    """(envs, target context, cache) -> Timing, DT mode, at both contexts."""
    step = tok.step_layout(spec).tokens
    envs = {n: vector_env(args.env, n) for n in (1, args.num_envs)}
    settings = [(1, True)] + ([(1, False)] if args.uncached else []) + [(args.num_envs, True)]
    out = {}
    for context in args.contexts:
        pre = steps_before(context, args.timed_steps, step)
        for n, cache in settings:
            out[(n, context, cache)] = time_agent(dt_agent(model, tok, cache), envs[n], spec, args.trials, pre,
                                                  args.timed_steps, flops=cache)
    return out


def report_decisions(args: Args, d: dict, dtype: str = "float32") -> None:
    short, long_ = args.contexts
    n = args.num_envs
    c_short, c_long = d[(1, short, True)].context, d[(1, long_, True)].context
    tag = "" if dtype == "float32" else f"[{dtype}]"  # float32's figures keep the names eval.headline reads
    print("\n== control decisions through Agent (DT), median ms per env-step (act + observe) ==")
    print(f"{'':14}{'ctx ' + str(c_short):>12}{'ctx ' + str(c_long):>12}{'ratio':>8}")
    rows = [("KV cache", (1, True))] + ([("no cache", (1, False))] if args.uncached else []) + [
        (f"{n} envs KV", (n, True))]
    for label, (envs, cache) in rows:
        a, b = d[(envs, short, cache)].median, d[(envs, long_, cache)].median
        print(f"{label:14}{a * 1e3:12.1f}{b * 1e3:12.1f}{b / a:8.2f}x")
    print(f"flat_in_context_ratio{tag}={d[(1, long_, True)].median / d[(1, short, True)].median:.2f} "
          "(target <= 1.5)")
    if args.uncached:
        print(f"cache_speedup_at_{c_long}{tag}={d[(1, long_, False)].median / d[(1, long_, True)].median:.1f}x")
    for context in (short, long_):
        one, many = d[(1, context, True)], d[(n, context, True)]
        print(f"ctx {one.context}: decisions/s 1 env {one.per_s:.1f}, {n} envs {many.per_s:.1f} -> "
              f"batched_speedup{tag}={many.per_s / one.per_s:.1f}x (target >= 10)")
    env_ms = statistics.median(d[(n, long_, True)].env_seconds) * 1e3
    print(f"(not included: env.step of the {n} envs, median {env_ms:.2f} ms per env-step)")
    if dtype != "float32":  # the floors below are float32 matmul rates
        return
    rate, shape = decision_gemm_rate(args)
    bandwidth = read_rate(device=args.device)
    print(f"floors (bench/roofline.py): FLOPs / this {device_name(args.device)}'s float32 matmul rate, "
          f"{rate / 1e9:.0f} GFLOP/s at {shape} (the MLP over {n} envs' fed tokens), + KV bytes read / its read rate, "
          f"{bandwidth / 1e9:.1f} GB/s")
    for context in (short, long_):
        one, many = d[(1, context, True)], d[(n, context, True)]
        compute, reads = many.flops / rate, many.kv_bytes / bandwidth
        floor = compute + reads
        print(f"ctx {many.context}: {n} envs {many.flops / 1e6:.0f} MFLOP + {many.kv_bytes / 1e6:.0f} MB of KV per "
              f"env-step -> floor {compute * 1e3:.1f} + {reads * 1e3:.1f} = {floor * 1e3:.1f} ms (measured "
              f"{many.median * 1e3:.1f}); with 1 env as measured ({one.median * 1e3:.1f} ms): "
              f"batched_speedup_ceiling={n * one.median / floor:.1f}x")


def decision_gemm_rate(args: Args) -> tuple[float, str]:
    """The matmul rate of the tiny Llama's MLP over the tokens ``num_envs`` envs feed per decision."""
    config = GeneralistConfig().text_config
    rows = args.num_envs * 16
    return gemm_rate(rows, config.hidden_size, config.intermediate_size, device=args.device), \
        f"({rows}, {config.hidden_size}) @ ({config.hidden_size}, {config.intermediate_size})"


def bench_jat_size(args: Args, tok, spec, jat_ms: float | None) -> dict[tuple[str, int], Timing]:
    """Ours at JAT's size through the Agent, 1 and ``num_envs`` envs per dtype. Where JAT is measured in this run
    (``--with_references``), it runs before ours and again after, and the ratio is to the faster of the two (the
    lower ratio): this machine's speed drifts by up to 1.5x within minutes."""
    model = seeded_model(tok, jat_backbone(args.jat_layers, args.jat_width), args.device, args.hidden_action_prob)
    layer_params = sum(p.numel() for p in model.backbone.model.layers.parameters())
    pre = steps_before(args.jat_context, args.timed_steps, tok.step_layout(spec).tokens)
    out = {(dtype, n): time_agent(dt_agent(model.to(getattr(torch, dtype)), tok), vector_env(args.env, n), spec,
                                  args.jat_trials, pre, args.timed_steps)
           for dtype in args.jat_dtypes for n in (1, args.num_envs)}
    print("\n== agent throughput at JAT's size (DT through Agent) ==")
    print(f"model {args.jat_layers}x{args.jat_width} Llama, {layer_params / 1e6:.1f}M params in the layers, "
          f"context {out[args.jat_dtypes[0], 1].context} tokens (target {args.jat_context}), 17 tokens fed per "
          "decision")
    for (dtype, n), t in out.items():
        print(f"{dtype:>8} {n:>2} env(s): {t.median * 1e3:.1f} ms per env-step, {t.median / n * 1e3:.1f} ms per "
              f"decision, {t.per_s:.1f} decisions/s")
    if jat_ms is not None and args.jat_ms is None:  # measured before ours in this run: again after
        after = run_jat_reference(args)
        if after is not None:
            fast, slow = sorted((jat_ms, after))
            print(f"JAT before ours {jat_ms:.1f} ms, after {after:.1f} ms per decision: the ratios below are to the "
                  f"faster ({fast:.1f} ms); to the slower they would be {slow / fast:.2f}x higher")
            jat_ms = fast
    for dtype in args.jat_dtypes:
        many = out[dtype, args.num_envs].per_s
        if jat_ms is None:
            print(f"jat_size_{args.num_envs}env_decisions_per_s[{dtype}]={many:.1f}; JAT not measured in this run: "
                  "pass --jat_ms MS (reference_bench/jat_reference.py, this machine) or --with_references DIR")
        else:
            print(f"jat_size_{args.num_envs}env_decisions_per_s[{dtype}]={many:.1f} vs JAT (float32) "
                  f"{1e3 / jat_ms:.1f}/s ({jat_ms:.1f} ms per decision) -> vs_jat={many * jat_ms / 1e3:.2f}x "
                  "(target >= 1.5)")
    return out


def bench_tt(args: Args, tok, spec, config: TTConfig) -> dict:
    backbone = TT_BACKBONE if args.tt_backbone == "reference" else None
    print(f"\n== Trajectory Transformer planning through Agent (beam {config.beam_width}, horizon "
          f"{config.horizon}, expand {config.n_expand}, {config.context_steps} context steps, {args.tt_envs} env(s) "
          f"planned for together, seconds per env-step) ==")
    out, flop_counts, agents = {}, {}, {}
    for model_dtype in (getattr(torch, name) for name in args.tt_model_dtypes):
        model = seeded_model(tok, backbone, args.device).to(model_dtype)  # its own copy: kept for the rounds below
        for decoder in args.tt_decoders:
            timed = set()
            for dtype in args.tt_beam_cache_dtypes if decoder == "engine" else ("auto",):
                resolved = beam_cache_dtype(dtype, next(model.parameters()).device, model_dtype)
                if decoder == "engine" and (resolved in timed or resolved.itemsize > model_dtype.itemsize):
                    continue
                timed.add(resolved)
                cfg = dataclasses.replace(config, beam_cache_dtype=dtype, decoder=decoder.removesuffix("+compile"),
                                          compile=decoder == "static+compile")
                agent = Agent(model, tok, "tt", tt_config=cfg)
                # the work of a plan (FLOPs, KV bytes) is counted on the engine, whose forwards the counters see
                t = time_agent(agent, vector_env(args.env, args.tt_envs), spec, 1, cfg.context_steps, args.tt_repeats,
                               allow_refills=True, flops=decoder == "engine")
                label = (decoder if decoder != "engine" else
                         f"engine, beams' own cache {dtype if dtype != 'auto' else f'auto = {_name(resolved)}'}")
                key = (_name(model_dtype), label)
                out[key] = t.median
                agents[key] = agent
                if decoder == "engine":
                    flop_counts.setdefault(key[0], (t.flops, t.kv_bytes))
                print(f"{key[0]} model, {label}: {len(t.seconds)} timed decision(s) after {cfg.context_steps} played, "
                      f"context {t.context} tokens, window re-prefilled in {t.refills} (included): {t.median:.2f} s",
                      flush=True)
    params = sum(p.numel() for p in model.parameters())  # every dtype's model has the same shape
    layers = model.backbone.model.layers
    layer_params = sum(p.numel() for p in layers.parameters())
    width, mlp = model.config.text_config.hidden_size, model.config.text_config.intermediate_size
    print(f"model {params / 1e6:.2f}M params ({layer_params / 1e6:.2f}M in the {len(layers)}x{width} layers; the "
          f"rest is the {tok.vocab_size}-token embedding and head)")
    first = next(iter(out))
    ours = out[first]
    print(f"tt_agent_s_per_decision={ours:.2f} ({first[0]} model, {first[1]})")
    if len(out) > 1:
        print("  " + ", ".join(f"{m} model / {d}: {v / ours:.2f}x its time" for (m, d), v in out.items()))
    if first[0] not in flop_counts:  # no engine run of this model dtype: no floor
        print("tt_floor_s: not measured (the floor counts the work on the engine: add it to --tt_decoders)")
        floor = None
    else:
        flops, kv_bytes = flop_counts[first[0]]
        rows = config.beam_width * config.n_expand * args.tt_envs
        rate = gemm_rate(rows, width, mlp, device=args.device)
        bandwidth = read_rate(device=args.device)
        floor = flops / rate + kv_bytes / bandwidth
        print(f"one plan: {flops / 1e9:.1f} GFLOP / this {device_name(args.device)}'s float32 matmul rate "
              f"{rate / 1e9:.0f} GFLOP/s at ({rows}, {width}) @ ({width}, {mlp}) + "
              f"{kv_bytes / 1e9:.1f} GB of KV / its read rate {bandwidth / 1e9:.1f} GB/s -> tt_floor_s={floor:.2f} "
              f"(measured {ours:.2f}: {ours / floor:.1f}x the floor)")
    if args.with_references is not None and args.tt_envs == 1:
        compare_tt_references(args, config, spec, agents, out, floor)
    if args.tt_uncached:
        out |= bench_tt_plan_uncached(model.to(getattr(torch, args.tt_model_dtypes[0])), tok, spec, config)
    return out


def compare_tt_references(args: Args, config: TTConfig, spec, agents: dict, out: dict, floor: float | None) -> None:
    """Ratios to the reference planners, each of whose decisions is timed *between* two of ours.

    This machine's speed drifts by up to ~1.5x over minutes (other tenants of its host: the same plan took 1.0 s and
    1.7 s ten minutes apart on 2026-12-07). A reference decision takes a minute and ours a second, so timing the
    references first and ours after compared two different machines. Here each round runs every reference harness
    for one decision and, after each, ``tt_repeats`` of our decisions on every model dtype's fastest decoder; the
    ratios are between the medians over all rounds.
    """
    fastest = {}  # model dtype -> its fastest decoder in the table above
    for (m, d), v in out.items():
        if m not in fastest or v < out[m, fastest[m]]:
            fastest[m] = d
    plan = ["--dataset", "hopper-medium-v2", "--beam-width", str(config.beam_width), "--horizon", str(config.horizon)]
    references = (("tt_reference", "tt_reference.py", "--n-expand"),
                  ("faster_tt_reference", "faster_tt_reference.py", "--sample-expand"))
    theirs: dict[str, list[float]] = {name: [] for name, *_ in references}
    ours: dict[str, list[float]] = {m: [] for m in fastest}
    print(f"\n== the reference planners, interleaved with ours ({args.reference_repeats} round(s): one reference "
          f"decision, then {args.tt_repeats} of ours per model dtype, in turn) ==", flush=True)
    for _ in range(args.reference_repeats):
        for name, script, expand in references:
            ms = run_reference(args, script, [*plan, expand, str(config.n_expand), "--repeats", "1"])
            if ms is not None:
                theirs[name].append(ms / 1e3)
            for m, d in fastest.items():
                t = time_agent(agents[m, d], vector_env(args.env, 1), spec, 1, config.context_steps, args.tt_repeats,
                               allow_refills=True)
                ours[m] += t.seconds
    mine = {m: statistics.median(s) for m, s in ours.items()}
    for m, s in ours.items():
        print(f"ours, {m} model, {fastest[m]}: median {mine[m]:.2f} s over {len(s)} decisions "
              f"(range {min(s):.2f}-{max(s):.2f} s)")
    targets = {"tt_reference": 50, "faster_tt_reference": 20}
    first = next(iter(mine))
    for name, samples in theirs.items():
        if not samples:
            continue
        ref = statistics.median(samples)
        at_floor = f"; at the floor: {ref / floor:.1f}x" if floor else ""
        print(f"{name}: {len(samples)} decision(s) {', '.join(f'{x:.2f}' for x in samples)} s")
        print(f"{name}_s_per_decision={ref:.2f} -> speedup={ref / mine[first]:.1f}x "
              f"(target >= {targets[name]}x{at_floor})")
        for m, v in mine.items():
            print(f"  {name} speedup[{m} model, its fastest decoder ({fastest[m]}) {v:.2f} s]={ref / v:.1f}x")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bench_tt_plan_uncached(model, tok, spec, config: TTConfig) -> dict[str, float]:
    """``tt_plan`` cached and uncached from the same steady-state context (5 played steps + the
    current observation, random values): the uncached planner is too slow to play steps with."""
    rng = np.random.default_rng(0)
    obs_dim, act_dim = spec.observation_fields[0].size, spec.action_size
    past = tok.encode_episode(spec, {"observation": rng.normal(size=(config.context_steps, obs_dim))},
                              {"action": rng.uniform(-1, 1, (config.context_steps, act_dim))},
                              rng.uniform(0, 3, config.context_steps), condition_on_return=False, end=False)
    now = step_prompts(tok, spec, {"observation": rng.normal(size=(1, obs_dim))})[0]
    context = concat_samples([past, now])
    out = {}
    for use_cache in (True, False):
        engine = Engine(model, seed=0, use_cache=use_cache)
        for _ in range(2 if use_cache else 1):  # cached: one warm-up
            state = engine.prefill(context)
            t0 = time.perf_counter()
            tt_plan(engine, state, tok, spec, config)
            out["tt_plan_cached" if use_cache else "tt_plan_uncached"] = time.perf_counter() - t0
    print(f"tt_plan on the engine, {len(context['input_ids'])}-token context: cached {out['tt_plan_cached']:.2f} s, "
          f"tt_uncached_s_per_decision={out['tt_plan_uncached']:.2f} -> "
          f"speedup={out['tt_plan_uncached'] / out['tt_plan_cached']:.1f}x")
    return out


# --- the reference harnesses ---
def run_reference(args: Args, script: str, argv: list[str]) -> float | None:
    """Run one reference_bench harness; its last ``<name>_ms_per_decision=`` line, or None if it failed."""
    path = args.with_references / script
    key = f"{Path(script).stem}_ms_per_decision"
    if not path.exists():
        print(f"{script}: not found in {args.with_references}")
        return None
    python = str(args.reference_python or sys.executable)
    print(f"running {script} {' '.join(argv)}", flush=True)
    proc = subprocess.run([python, str(path), *argv], capture_output=True, text=True)
    found = re.findall(rf"^{key}=([0-9.]+)\s*$", proc.stdout, re.MULTILINE)
    if proc.returncode or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"{script} failed (exit {proc.returncode}): {' | '.join(tail)}")
        return None
    print(f"{key}={found[-1]}")
    return float(found[-1])


def run_jat_reference(args: Args) -> float | None:
    """JAT's ms per decision (unless given as --jat_ms), measured now (the TT references are timed by
    :func:`compare_tt_references`, interleaved with ours)."""
    jat_ms = args.jat_ms
    if args.with_references is None:
        return jat_ms
    if jat_ms is None and not args.skip_jat_size:
        print("== JAT's harness (same machine, same run) ==")
        repeats = ["--repeats", str(args.reference_repeats)]
        # 2 tokens per JAT timestep: this many steps fill its window, as in its eval loop's steady state
        jat_ms = run_reference(args, "jat_reference.py", [
            "--task", "hopper", "--context-window", str(args.jat_context), "--context-steps",
            str(args.jat_context // 2 + 2), "--n-envs", "1", "--no-batched-forward", *repeats])
    return jat_ms


def device_name(device: str) -> str:
    """The card's name on CUDA (figures are quoted with it), else the device string."""
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else device


def main(args: Args) -> None:
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    args = dataclasses.replace(args, env=pick_env(args.env))
    torch.set_num_threads(args.threads)
    tok = GeneralistTokenizer.default()
    spec = hopper_spec(args.env)
    tok.add_task_spec(spec)
    config = TTConfig(beam_width=args.beam_width, horizon=args.horizon, n_expand=args.n_expand)
    jat_ms = run_jat_reference(args)

    model = seeded_model(tok, device=args.device, hidden_action_prob=args.hidden_action_prob)  # the default tiny Llama
    params = sum(p.numel() for p in model.parameters())
    view = (f"DT decisions in the policy view (hidden_action_prob {args.hidden_action_prob}, as train.py trains): one "
            "forward per decision" if args.hidden_action_prob else "DT decisions without hidden actions: one forward "
            "per action token")
    print(f"{'QUICK SMOKE RUN (tiny sizes, figures mean nothing): ' if args.quick else ''}threads={args.threads} "
          f"torch={torch.__version__} device={device_name(args.device)} "
          f"model=default tiny Llama ({params / 1e6:.2f}M params), env {args.env} "
          f"({spec.observation_fields[0].size} obs / {spec.action_size} action dims), "
          f"{args.trials} trial(s) x {args.timed_steps} timed decisions per setting; {view}", flush=True)
    if not args.skip_decisions:
        for dtype in args.decision_dtypes:
            print(f"\n-- decision figures with {dtype} weights and KV cache --")
            report_decisions(args, bench_decisions(args, tok, spec, model.to(getattr(torch, dtype))), dtype)
        model = model.float()
    if not args.skip_jat_size:
        bench_jat_size(args, tok, spec, jat_ms)
    if not args.skip_tt:
        bench_tt(args, tok, spec, config)


if __name__ == "__main__":
    main(parse(Args, description=__doc__))
