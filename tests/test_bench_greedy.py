"""bench/greedy_decoding.py runs its three readings through the Agent (tiny model, real Pendulum)."""

from __future__ import annotations

import gymnasium as gym
import torch

from generalist import GeneralistConfig, GeneralistForCausalLM, TaskSpec
from tests.conftest import TINY_LLAMA, with_task_spec


def test_each_reading_rule_plays_whole_episodes(tok):
    from bench import greedy_decoding as bench

    local = with_task_spec(tok, TaskSpec.from_env(gym.make("Pendulum-v1")))
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA,
                                                   context_length=64)).eval()
    for rule in ("argmax", "median", "sample"):
        mean, share = bench.play(model, local, "Pendulum-v1", rule, episodes=2, seed=0)
        assert mean < 0 and 0.0 <= share <= 1.0  # Pendulum's rewards are negative; 200 steps were played
