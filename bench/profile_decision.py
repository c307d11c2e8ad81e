"""Where a decision's time goes, per weight dtype: ``torch.profiler`` over decisions through the Agent.

    python bench/profile_decision.py --device cuda           # DT at JAT's size (12 x 768), 1 Hopper env
    python bench/profile_decision.py --layers 1 --width 64   # a seconds-long run on the CPU
    python bench/profile_decision.py --mode tt --dtypes float32 --steps_before 5 --timed 3 --profiled 1
                                                             # a TT plan at the reference's hopper settings
                                                             # (on the compiled static decoder; --tt_compile False:
                                                             # the engine)

``bench/decode.py`` says how long a decision takes; this says which operators take it. It was written when the
JAT-size agent ran 4.8x slower in bfloat16 than in float32 on an H200 (``docs/bench/decode_h200_2026-12-04.log``):
the trace showed cuDNN attention building a graph for every new key length, which ``Engine.feed`` now excludes
(``generalist.engine.DECODE_ATTENTION``). For each dtype the model plays ``steps_before`` untimed steps (the
context grows by 17 tokens per Hopper step), times ``timed`` more, then profiles ``profiled`` more and prints
the operators by their own CPU time, and on CUDA also by their own GPU time.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.profiler import ProfilerActivity, profile

from generalist import static_beams

sys.path.append(str(Path(__file__).resolve().parent))  # appended: bench/train.py must not shadow train.py
import decode  # noqa: E402  (bench/ is a folder of scripts, not a package)

from generalist.training.settings import parse  # noqa: E402


@dataclass
class Args:
    mode: Literal["dt", "tt"] = "dt"
    """dt: the Decision Transformer at --layers x --width; tt: the Trajectory Transformer planner at the reference's
    hopper settings (beam 128, horizon 15, the reference's 4 x 128 GPT shape, bench/decode.py's TT figure)"""
    device: str = "cpu"
    """where the model runs (cpu, cuda); the env and the Agent's bookkeeping stay on the CPU"""
    layers: int = 12
    """backbone layers (JAT's size: 12)"""
    width: int = 768
    """backbone width (JAT's size: 768)"""
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    """weight dtypes to profile, in turn"""
    steps_before: int = 10
    """untimed steps before the timed ones (a warm-up that also builds up the context)"""
    timed: int = 5
    """decisions timed without the profiler"""
    profiled: int = 3
    """decisions under the profiler"""
    tt_compile: bool = True
    """TT: compile the static decoder (TTConfig.compile, as bench/decode.py's first TT figure); its generated
    kernels are then named in the profile"""
    rows: int = 14
    """operators printed per table"""
    hidden_action_prob: float = 0.5
    """as bench/decode.py's: train.py's default, the policy view (one forward per DT decision); 0: one forward per
    action token"""


def main(args: Args) -> None:
    tok = decode.GeneralistTokenizer.default()
    spec = decode.hopper_spec("Hopper-v5")
    tok.add_task_spec(spec)
    tt = args.mode == "tt"
    if tt and args.tt_compile:  # each generated C++ kernel a named entry of the profile, not one opaque call
        static_beams.CPU_COMPILE_OPTIONS = {**static_beams.CPU_COMPILE_OPTIONS, "cpp.enable_kernel_profile": True}
    backbone = decode.TT_BACKBONE if tt else decode.jat_backbone(args.layers, args.width)
    model = decode.seeded_model(tok, backbone, args.device, 0.0 if tt else args.hidden_action_prob)
    cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    text = model.config.text_config
    print(f"device {decode.device_name(args.device)}, torch {torch.__version__}, {args.mode} mode, "
          f"{text.num_hidden_layers} x {text.hidden_size}")
    for dtype in args.dtypes:
        model = model.to(getattr(torch, dtype))
        agent = (decode.Agent(model, tok, "tt", tt_config=decode.TTConfig(compile=args.tt_compile)) if tt
                 else decode.dt_agent(model, tok))
        envs = decode.vector_env("Hopper-v5", 1)
        agent.reset(spec, num_envs=1)
        obs, _ = envs.reset(seed=0)
        for _ in range(args.steps_before):
            obs, *_ = decode.timed_step(agent, envs, obs)
        t0 = time.perf_counter()
        for _ in range(args.timed):
            obs, *_ = decode.timed_step(agent, envs, obs)
        print(f"\n== {dtype}: {(time.perf_counter() - t0) / args.timed * 1e3:.1f} ms per step (act + env + observe), "
              f"context {agent.state.length} tokens", flush=True)
        with profile(activities=activities) as prof:
            for _ in range(args.profiled):
                obs, *_ = decode.timed_step(agent, envs, obs)
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        if cuda:
            print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows // 2, max_name_column_width=60))


if __name__ == "__main__":
    main(parse(Args, description=__doc__))
