"""Control-decoding benchmark: prints measured ratios from one run (not a pass/fail test).

DESIGN.md targets, all measured here on CPU with ``torch.set_num_threads(2)``:

* decision time with KV cache is flat in context length: 1000-token context ≤ 1.5 × a 100-token one
  (the same decisions without a cache are timed next to it);
* 32 environments batched give ≥ 10 × the decisions/s of one;
* a Trajectory Transformer planning decision at the published planner's hopper settings
  (11 obs / 3 action dims, beam 128, horizon 15, n_expand 2, 5 context transitions, a 4 × 128
  backbone) takes about 1.5 s or less; a straightforward uncached beam search of the same model
  (the same planner on ``Engine(use_cache=False)``, recomputing every sequence for every token, as
  the reference planner does) is timed next to it;
* agent throughput at JAT's size: 32 batched environments give ≥ 1.5 × the decisions/s of JAT
  (GPT-Neo 12 × 768 picks one action in ~57 ms per environment, one at a time, measured by
  ``../shared/reference_bench/jat_reference.py`` on this VM), i.e. ≥ 26 decisions/s. Timed with a
  Llama-style 12 × 768 backbone (12 heads, MLP 2048, so 85 M parameters in the layers, as the 86 M
  JAT reads per decision), random weights, hopper-like 11/3 (JAT's reference task), a 256-token
  context (JAT's eval window).

A *decision* is what :class:`generalist.Agent` does per step in DT mode: feed the previous step's
last action token and reward with ``[R_t] [o_t] <sep>``, then sample the 3 action tokens. The
context is restored after each timed decision (``Engine.snapshot`` / ``Engine.restore``) so it stays at
its length.

    python bench/decode.py                 # everything (the uncached TT search takes minutes)
    python bench/decode.py --skip-uncached-tt --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces

from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer, TaskSpec
from generalist.engine import DecodeState, Engine
from generalist.modes import TTConfig, dt_act, tt_plan
from generalist.modes.control import action_sample, reward_sample
from generalist.tokenizer import Sample, concat_samples

ROOT = Path(__file__).resolve().parents[1]
# The reference TT GPT's shape (4 layers, 4 heads, 128 wide; Janner et al. 2021, config/offline.py).
# JAT's size (GPT-Neo 12 x 768): the Llama MLP has 3 matrices, so 2048 wide matches GPT-Neo's 2 x 3072.
JAT_BACKBONE = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
                "num_key_value_heads": 12, "max_position_embeddings": 2048, "tie_word_embeddings": False}
JAT_MS_PER_DECISION = 57.0  # reference_bench/README.md, hopper, 1 env (32 envs in a loop: 53-60 ms each)
TT_BACKBONE = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def hopper_spec() -> TaskSpec:
    return TaskSpec.from_spaces("hopper-like", spaces.Box(-np.inf, np.inf, (11,), np.float32),
                                spaces.Box(-1, 1, (3,), np.float32), expert_return=3000.0, random_return=0.0,
                                return_scale=0.01)


def context(tok: GeneralistTokenizer, spec: TaskSpec, steps: int, rng: np.random.Generator) -> Sample:
    """``<bos>`` + ``steps`` random whole steps (17 tokens each for hopper)."""
    episode = {"observations": {"observation": rng.normal(size=(steps, 11))},
               "actions": {"action": rng.uniform(-1, 1, (steps, 3))}, "rewards": rng.uniform(0, 3, steps)}
    return tok.encode_episode(spec, **episode, end=False)


def timed_decisions(engine: Engine, state: DecodeState, tok, spec, num_envs: int, repeats: int) -> list[float]:
    """Seconds per decision step (all rows at once), context restored after each."""
    rng = np.random.default_rng(1)
    start = engine.snapshot(state)
    tail = concat_samples([action_sample([tok.encode_continuous(np.array([0.1]))[0]]), reward_sample(tok, spec, 1.0)])
    times = []
    for _ in range(repeats + 1):  # one warm-up
        obs = {"observation": rng.normal(size=(num_envs, 11))}
        t0 = time.perf_counter()
        dt_act(engine, state, tok, spec, obs, np.full(num_envs, 1000.0), prefixes=[tail] * num_envs)
        times.append(time.perf_counter() - t0)
        engine.restore(start)
    return times[1:]


def bench_decisions(model, tok, spec, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for steps in (6, 59):  # 1 + 6*17 = 103 and 1 + 59*17 = 1004 tokens
        ctx = context(tok, spec, steps, rng)
        n_tokens = len(ctx["input_ids"])
        for use_cache in (True, False):
            engine = Engine(model, seed=0, use_cache=use_cache)
            state = engine.prefill(ctx, num_rows=1)
            times = timed_decisions(engine, state, tok, spec, 1, repeats)
            out[("1 env", n_tokens, use_cache)] = statistics.median(times)
        engine = Engine(model, seed=0)
        state = engine.prefill(ctx, num_rows=32)
        out[("32 envs", n_tokens, True)] = statistics.median(timed_decisions(engine, state, tok, spec, 32, repeats))
    return out


def bench_jat_size(tok, spec, repeats: int, report=print) -> dict:
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=JAT_BACKBONE))
    layer_params = sum(p.numel() for p in model.backbone.model.layers.parameters())
    ctx = context(tok, spec, 15, np.random.default_rng(0))  # 1 + 15 * 17 = 256 tokens, JAT's eval window
    report(f"model 12x768 Llama, {layer_params / 1e6:.1f}M params in the layers, context {len(ctx['input_ids'])} "
           f"tokens, 17 tokens fed per decision")
    out = {}
    for n in (1, 32):
        engine = Engine(model, seed=0)
        state = engine.prefill(ctx, num_rows=n)
        out[n] = statistics.median(timed_decisions(engine, state, tok, spec, n, repeats))
        report(f"{n:>2} env(s): {out[n] * 1e3:.1f} ms per env-step, {out[n] / n * 1e3:.1f} ms per decision, "
               f"{n / out[n]:.1f} decisions/s")
    ratio = (32 / out[32]) / (1e3 / JAT_MS_PER_DECISION)
    report(f"jat_size_32env_decisions_per_s={32 / out[32]:.1f} -> vs_jat={ratio:.2f}x (target >= 1.5, i.e. >= "
           f"{1.5e3 / JAT_MS_PER_DECISION:.0f}/s)")
    return out


def bench_tt(tok, spec, config: TTConfig, uncached: bool, report=print) -> dict:
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TT_BACKBONE))
    params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.backbone.model.layers.parameters())
    rng = np.random.default_rng(0)
    # steady state of the reference planner: 5 past transitions + the current observation
    past = context(tok, spec, 5, rng)
    now = tok.encode_steps(spec, {"observation": rng.normal(size=(1, 11))}, returns_to_go=np.array([1000.0]))[0]
    ctx = concat_samples([past, now])
    out = {"params": params, "layer_params": layer_params, "context_tokens": len(ctx["input_ids"])}
    report(f"model {params / 1e6:.2f}M params ({layer_params / 1e6:.2f}M in the 4x128 layers; the rest is "
           f"the {tok.vocab_size}-token embedding and head), context {out['context_tokens']} tokens")
    for use_cache in (True, False) if uncached else (True,):
        engine = Engine(model, seed=0, use_cache=use_cache)
        times = []
        for _ in range(2 if use_cache else 1):  # cached: one warm-up
            state = engine.prefill(ctx)
            t0 = time.perf_counter()
            tt_plan(engine, state, tok, spec, config)
            times.append(time.perf_counter() - t0)
        out["cached" if use_cache else "uncached"] = times[-1]
        if use_cache:
            report(f"tt_cached_s_per_decision={times[-1]:.2f} (target about 1.5)")
        else:
            report(f"tt_uncached_s_per_decision={times[-1]:.2f} -> speedup={times[-1] / out['cached']:.1f}x")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="timed decisions per setting (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-uncached-tt", action="store_true", help="skip the (minutes-long) uncached TT search")
    p.add_argument("--skip-tt", action="store_true", help="skip the Trajectory Transformer figures")
    p.add_argument("--skip-jat-size", action="store_true", help="skip the agent-throughput figure at JAT's size")
    p.add_argument("--beam-width", type=int, default=128)
    p.add_argument("--horizon", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = GeneralistTokenizer.from_pretrained(ROOT / "tokenizers_cfg" / "default")
    spec = hopper_spec()
    tok.add_task_spec(spec)
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict()))  # the default tiny Llama
    print(f"threads={args.threads} torch={torch.__version__} model=default tiny Llama "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), task hopper-like 11/3")

    d = bench_decisions(model, tok, spec, args.repeats)
    (short, long_) = sorted({k[1] for k in d})
    print("\n== control decisions (median ms per decision step) ==")
    print(f"{'':12}{'ctx ' + str(short):>12}{'ctx ' + str(long_):>12}{'ratio':>8}")
    rows = (("KV cache", ("1 env", True)), ("no cache", ("1 env", False)), ("32 envs KV", ("32 envs", True)))
    for label, key in rows:
        a, b = d[(key[0], short, key[1])], d[(key[0], long_, key[1])]
        print(f"{label:12}{a * 1e3:12.1f}{b * 1e3:12.1f}{b / a:8.2f}x")
    print(f"flat_in_context_ratio={d[('1 env', long_, True)] / d[('1 env', short, True)]:.2f} (target <= 1.5)")
    print(f"cache_speedup_at_{long_}={d[('1 env', long_, False)] / d[('1 env', long_, True)]:.1f}x")
    for n in (short, long_):
        one = 1 / d[("1 env", n, True)]
        many = 32 / d[("32 envs", n, True)]
        print(f"ctx {n}: decisions/s 1 env {one:.1f}, 32 envs {many:.1f} -> batched_speedup={many / one:.1f}x "
              "(target >= 10)")

    if not args.skip_jat_size:
        print("\n== agent throughput at JAT's size ==")
        bench_jat_size(tok, spec, max(3, args.repeats // 4), report=lambda line: print(line, flush=True))

    if args.skip_tt:
        return
    config = TTConfig(beam_width=args.beam_width, horizon=args.horizon)
    print(f"\n== Trajectory Transformer planning ({config}) ==")
    bench_tt(tok, spec, config, uncached=not args.skip_uncached_tt, report=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
