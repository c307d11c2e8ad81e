"""Shared fixtures: the default tokenizer, tiny model configs and the list of spaces every
encode/decode round trip runs over."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT / "tokenizers_cfg" / "default"

TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 1024}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 1024}

# (observation space, action space) pairs every round trip runs over.
SPACES: dict[str, tuple[spaces.Space, spaces.Space]] = {
    "box-discrete": (spaces.Box(-5, 5, (4,), np.float32), spaces.Discrete(2)),
    "box-box": (spaces.Box(-np.inf, np.inf, (3,), np.float32), spaces.Box(-2, 2, (1,), np.float32)),
    "unbounded-multidiscrete": (spaces.Box(-1e3, 1e3, (2, 3), np.float64), spaces.MultiDiscrete([3, 5, 7])),
    "multibinary-discrete-start": (spaces.MultiBinary(5), spaces.Discrete(4, start=-2)),
    "babyai-like-dict": (
        spaces.Dict({"direction": spaces.Discrete(4), "image": spaces.Box(0, 10, (7, 7, 3), np.uint8),
                     "mission": spaces.Text(64)}),
        spaces.Discrete(7)),
    "pixels-tuple": (
        spaces.Tuple((spaces.Box(0, 255, (40, 24, 3), np.uint8), spaces.Box(-1, 1, (2,), np.float32))),
        spaces.Tuple((spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32)))),
}


@pytest.fixture(scope="session")
def tok() -> GeneralistTokenizer:
    return GeneralistTokenizer.from_pretrained(DEFAULT_TOKENIZER)


@pytest.fixture
def tiny_config(tok) -> GeneralistConfig:
    return GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=dict(TINY_LLAMA))


@pytest.fixture
def tiny_gpt2_config(tok) -> GeneralistConfig:
    return GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=dict(TINY_GPT2))


@pytest.fixture(scope="module")
def tiny_llama_model(tok) -> GeneralistForCausalLM:
    """A seeded tiny Llama model in eval mode, one per test module (a test may switch its attention)."""
    return _seeded_model(tok, TINY_LLAMA)


@pytest.fixture(scope="module")
def tiny_gpt2_model(tok) -> GeneralistForCausalLM:
    """A seeded tiny GPT-2 model in eval mode, one per test module."""
    return _seeded_model(tok, TINY_GPT2)


def _seeded_model(tok, text_config: dict) -> GeneralistForCausalLM:
    torch.manual_seed(0)
    config = GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=dict(text_config))
    return GeneralistForCausalLM(config).eval()


def random_episode(spec, obs_space: spaces.Space, act_space: spaces.Space, steps: int, seed: int = 0) -> dict:
    """An episode of ``steps`` random (in-space) observations, actions and rewards."""
    obs_space.seed(seed)
    act_space.seed(seed + 1)
    obs = [spec.flatten_observation(obs_space.sample()) for _ in range(steps)]
    act = [spec.flatten_action(act_space.sample()) for _ in range(steps)]
    stack = lambda rows, name: [r[name] for r in rows] if isinstance(rows[0][name], str) else np.stack(
        [np.asarray(r[name]) for r in rows])
    return {
        "task": spec.name,
        "observations": {f.name: stack(obs, f.name) for f in spec.observation_fields},
        "actions": {f.name: stack(act, f.name) for f in spec.action_fields},
        "rewards": np.random.default_rng(seed).normal(size=steps).astype(np.float32),
    }
