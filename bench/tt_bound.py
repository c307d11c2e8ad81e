"""How fast a TT plan's forwards could run in PyTorch on this machine: an idealised decode step, eager and compiled.

    python bench/tt_bound.py                       # the reference's hopper settings, 2 threads, ~3 min
    python bench/tt_bound.py --dtypes bfloat16 --no_eager

``bench/decode.py`` times the real plan through the Agent and prints its *floor* (its FLOPs at this CPU's matrix
rate plus its cache reads at its read rate). Between the two is everything a forward costs beyond arithmetic:
Python, operator dispatch, small kernels. This script measures how much of that a different *implementation*
could remove: one decode forward of the reference's 4 x 128 model over a batch of beams, written as few operators
as it can be (q/k/v and gate/up each one matrix product, the logits only over the 1,024 continuous bins the planner
samples from), with every shape static (a fixed block of shared context keys, a fixed block of each beam's own
keys, the new key written into a fixed slot) and none of the engine's bookkeeping: no cache levels, no beam
gathers, no sampling. Those shapes let ``torch.compile`` turn the whole forward into one generated C++ function.

A plan at beam B, expansion X, horizon H, for an A-dimensional action and an O-dimensional observation runs
``H (A + 1)`` forwards over ``B X`` rows (the action tokens and the reward) and ``(H - 1)(O + 1)`` over ``B``
rows (the value position and the observation): for hopper at the reference's settings 60 at 256 rows and 168 at
128 (``generalist.modes.tt.tt_plan``). The printed plan time is those counts times the medians measured here:
what the forwards alone would cost written this way, keys fixed at a typical window (the real window grows and
slides); the real planner also samples, scores and gathers its beams, which this leaves out.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.append(str(Path(__file__).resolve().parent))
import decode  # noqa: E402  (bench/ is a folder of scripts, not a package)

from generalist.modes.tt import TTConfig  # noqa: E402
from generalist.static_beams import rms_norm, rotate  # noqa: E402  (the static TT decoder's: the same Llama maths)
from generalist.training.settings import parse  # noqa: E402
from generalist.vocab import NUM_CONTINUOUS_BINS  # noqa: E402

EPS = 1e-6  # Llama's default RMSNorm epsilon (LlamaConfig.rms_norm_eps)


@dataclass
class Args:
    threads: int = 2
    """torch threads (bench/decode.py's figures use 2)"""
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """weight, activation and cache dtypes to time, in turn"""
    eager: bool = True
    """time the eager forward"""
    compiled: bool = True
    """time the forward compiled by torch.compile (needs a C++ compiler; the first call compiles, ~30 s)"""
    shared_keys: int = 48
    """keys of the context every beam shares (the 5-step window holds ~80 keys, shared and own together; the shared
    part shrinks as the plan moves past the real context)"""
    own_keys: int = 48
    """keys of each beam's own imagined tokens inside the window"""
    obs_dim: int = 11
    """observation dimensions (hopper)"""
    act_dim: int = 3
    """action dimensions (hopper)"""
    trials: int = 5
    """timed trials per setting, each the mean of ``calls`` forwards; the median is reported"""
    calls: int = 20
    """forwards per trial"""
    reference_s: float | None = None
    """the original planner's seconds per decision from bench/decode.py's run on this machine: prints the speed-up
    this bound would give"""


def decode_forward(x, layers, head, final_norm, cos, sin, shared_k, shared_v, own_k, own_v, own_mask, slot):
    """One token per beam through the model: x (R, D) -> logits over the continuous bins (R, V).

    ``shared_k``/``shared_v``: per layer (H, S, d), the context all beams read; ``own_k``/``own_v``: per layer
    (R, H, T, d), each beam's own keys, the new one written at ``slot``; ``own_mask`` (T,) additive.
    """
    rows, width = x.shape
    heads, dim = shared_k[0].shape[0], shared_k[0].shape[-1]
    shared = shared_k[0].shape[1]
    for i, w in enumerate(layers):
        q, k, v = F.linear(rms_norm(x, w["norm1"], EPS), w["qkv"]).view(rows, 3, heads, dim).unbind(1)  # (R, H, d) each
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        own_k[i].index_copy_(2, slot, k[:, :, None])  # (R, H, T, d)
        own_v[i].index_copy_(2, slot, v[:, :, None])
        scores = torch.cat([torch.einsum("rhd,hsd->rhs", q, shared_k[i]),  # one product for all beams
                            (q[:, :, None] * own_k[i]).sum(-1) + own_mask], -1)  # (R, H, S + T)
        p = (scores * dim ** -0.5).softmax(-1)
        out = torch.einsum("rhs,hsd->rhd", p[..., :shared], shared_v[i]) + (p[..., shared:, None] * own_v[i]).sum(2)
        x = x + F.linear(out.reshape(rows, width), w["o"])
        gate, up = F.linear(rms_norm(x, w["norm2"], EPS), w["gate_up"]).chunk(2, -1)
        x = x + F.linear(F.silu(gate) * up, w["down"])
    return F.linear(rms_norm(x, final_norm, EPS), head)  # (R, V)


def llama_weights(model) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """``decode_forward``'s weights from a 🤗 ``LlamaForCausalLM`` (q/k/v and gate/up stacked): the layers, the head
    and the final norm. ``tests/test_bench_decode.py`` checks that the two compute the same logits."""
    text = model.config
    if text.num_key_value_heads != text.num_attention_heads:
        raise ValueError(f"decode_forward has no grouped-query attention: {text.num_key_value_heads} key/value heads "
                         f"for {text.num_attention_heads} query heads")
    layers = [dict(norm1=layer.input_layernorm.weight, norm2=layer.post_attention_layernorm.weight,
                   qkv=torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                  layer.self_attn.v_proj.weight]),
                   o=layer.self_attn.o_proj.weight, down=layer.mlp.down_proj.weight,
                   gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
              for layer in model.model.layers]
    return layers, model.lm_head.weight, model.model.norm.weight


def time_forward(fn: Callable, rows: int, dtype: torch.dtype, args: Args) -> float:
    """Median seconds of one forward over ``rows`` beams, with a randomly initialised Llama of the reference's TT
    shape (its head over the continuous bins only)."""
    config = LlamaConfig(**decode.TT_BACKBONE, vocab_size=NUM_CONTINUOUS_BINS)
    layers, head, norm = llama_weights(LlamaForCausalLM(config).requires_grad_(False).to(dtype))
    heads, n = config.num_attention_heads, config.num_hidden_layers
    dim = config.hidden_size // heads
    g = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).to(dtype)

    inputs = (rand(rows, config.hidden_size), layers, head, norm, rand(dim), rand(dim),
              [rand(heads, args.shared_keys, dim) for _ in range(n)],
              [rand(heads, args.shared_keys, dim) for _ in range(n)],
              [rand(rows, heads, args.own_keys, dim) for _ in range(n)],
              [rand(rows, heads, args.own_keys, dim) for _ in range(n)],
              torch.zeros(args.own_keys, dtype=dtype), torch.tensor([args.own_keys // 2]))
    with torch.inference_mode():
        for _ in range(3):  # warm-up (and, compiled, the compile itself)
            fn(*inputs)
        trials = []
        for _ in range(args.trials):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn(*inputs)
            trials.append((time.perf_counter() - t0) / args.calls)
    return statistics.median(trials)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = TTConfig()
    wide, narrow = config.beam_width * config.n_expand, config.beam_width
    n_wide = config.horizon * (args.act_dim + 1)
    n_narrow = (config.horizon - 1) * (args.obs_dim + 1)
    cpu = platform.processor() or platform.machine()
    print(f"threads={args.threads} torch={torch.__version__} {cpu}; TT plan at beam "
          f"{config.beam_width}, expand {config.n_expand}, horizon {config.horizon}: {n_wide} forwards at {wide} rows, "
          f"{n_narrow} at {narrow}; keys: {args.shared_keys} shared + {args.own_keys} per beam", flush=True)
    forwards = ((("eager", decode_forward),) if args.eager else ()) + (
        (("compiled", torch.compile(decode_forward, dynamic=False)),) if args.compiled else ())
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for name, fn in forwards:
            t_wide, t_narrow = time_forward(fn, wide, dtype, args), time_forward(fn, narrow, dtype, args)
            plan = n_wide * t_wide + n_narrow * t_narrow
            versus = f", {args.reference_s / plan:.1f}x the original planner" if args.reference_s else ""
            print(f"{dtype_name} {name}: {t_wide * 1e3:.2f} ms at {wide} rows, {t_narrow * 1e3:.2f} ms at {narrow} "
                  f"-> tt_forwards_bound_s[{dtype_name},{name}]={plan:.2f}{versus}", flush=True)


if __name__ == "__main__":
    main(parse(Args, description=__doc__))
