"""The README's Python example runs verbatim (on a tiny checkpoint that knows CartPole)."""

from __future__ import annotations

import re

import gymnasium as gym
import torch

from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer, TaskSpec
from tests.conftest import ROOT, TINY_LLAMA


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_use_a_trained_model_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    tok = GeneralistTokenizer.default()
    tok.add_task_spec(TaskSpec.from_env(gym.make("CartPole-v1"), expert_return=500.0, random_return=20.0))
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setenv("GENERALIST_CHECKPOINT", str(tmp_path / "ckpt"))
    code = readme_block("Use a trained model")
    assert "GENERALIST_CHECKPOINT" in code and "agent.act(obs)" in code and "caption(" in code
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("[") and printed.endswith("]")  # one caption (a tiny random model's words)
