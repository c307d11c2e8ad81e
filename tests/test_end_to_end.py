"""The whole product once, small: real builders -> train.py -> act in a real env -> caption an image.

Each stage is what a user runs (the CLIs as subprocesses, the library from Python); sizes are tiny so
it takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
from PIL import Image

from generalist import Agent, GeneralistForCausalLM, GeneralistTokenizer
from generalist.engine import Engine
from generalist.modes import caption

ROOT = Path(__file__).resolve().parents[1]


def test_build_train_act_caption(tmp_path, subprocess_env, rollout):
    def run(*args: str, timeout: float = 240) -> None:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    data, runs = tmp_path / "data", tmp_path / "runs"
    for name, size in (("control-core", ["--episodes", "5"]), ("captions", ["--samples", "40"]), ("text", [])):
        run("-m", "datasets_build", name, "--out", str(data), "--no_progress", *size)
    run("train.py", "--mixture", "control-core=0.5,captions=0.3,text=0.2", "--data_root", str(data),
        "--output_dir", str(runs), "--run_name", "e2e", "--hidden_size", "32", "--num_layers", "2",
        "--num_heads", "2", "--intermediate_size", "64", "--seq_len", "128", "--batch_size", "4",
        "--total_steps", "6", "--warmup_steps", "1", "--eval_every", "0", "--save_every", "0",
        "--num_workers", "0", "--no_run_eval")

    folder = runs / "e2e" / "model"
    model = GeneralistForCausalLM.from_pretrained(folder).eval()
    tok = GeneralistTokenizer.from_pretrained(folder)
    assert {"CartPole-v1", "Pendulum-v1"} <= set(tok.task_specs)

    # act: a real vector env, DT mode, every action inside the space
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("Pendulum-v1")] * 2,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    agent = Agent(model, tok, mode="dt")
    agent.reset("Pendulum-v1", num_envs=2)
    rollout(agent, envs, steps=10)  # asserts every action is inside the action space

    # caption: an image in, text out
    image = Image.fromarray(np.full((64, 64, 3), (200, 30, 30), np.uint8))
    (text,) = caption(Engine(model), tok, [image], max_new_tokens=12)
    assert isinstance(text, str)
