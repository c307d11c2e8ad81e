"""Shared fixtures: the default tokenizer, tiny model configs and the list of spaces every
encode/decode round trip runs over."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer
from generalist.tokenizer import DEFAULT_TOKENIZER_DIR

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = DEFAULT_TOKENIZER_DIR

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


@pytest.fixture(scope="session")
def dt_model(tok):
    """A tiny model trained a few seconds on a 1-step task where the action decides the return:
    action 0 -> reward 0, action 1 -> reward 1 (every episode ends after its one step).

    Returns ``(model, spec)``. Sequences are return-conditioned, so the model can only pick the
    action from ``R_0``: a Decision Transformer that ignores its target cannot pass tests on it.
    """
    from generalist import TaskSpec

    spec = TaskSpec.from_spaces("one-step", spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(2),
                                expert_return=1.0, random_return=0.0)
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=dict(TINY_LLAMA)))
    rng = np.random.default_rng(0)

    def batch():
        return tok.collate([tok.encode_episode(spec, {"observation": rng.uniform(-1, 1, (1, 2))},
                                               {"action": np.array([a])}, np.array([float(a)]))
                            for a in rng.integers(0, 2, 16)])

    train_briefly(model, batch, 150)
    return model, spec


def with_task_spec(tok: GeneralistTokenizer, spec) -> GeneralistTokenizer:
    """A copy of ``tok`` that also knows ``spec``; the session tokenizer (and its task specs) stay untouched."""
    local = copy.copy(tok)
    local.task_specs = {**tok.task_specs}
    local.add_task_spec(spec)
    return local


def train_briefly(model: GeneralistForCausalLM, batch, steps: int, lr: float = 3e-3) -> GeneralistForCausalLM:
    """``steps`` AdamW steps on ``batch()`` (a fresh collated batch each call), then eval mode: a tiny model
    trained for seconds, on one thread (a 64-wide model trains faster on one thread, and on a busy machine)."""
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = model(**batch()).loss
            optim.zero_grad()
            loss.backward()
            optim.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


# --- training runs: synthetic datasets, tiny-model flags, in-process runs (test_train, test_reliability,
# test_hub, test_eval_run) -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A text, a caption and two control datasets (``datasets_build.synthetic``), written once per session."""
    from datasets_build import synthetic

    root = tmp_path_factory.mktemp("data")
    synthetic.write_datasets(root)
    return root


TINY_TRAINING = {"mixture": "tiny_text=1,tiny_captions=1,tiny_box=1,tiny_disc=1", "hidden_size": 32,
                 "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "seq_len": 64, "batch_size": 4,
                 "total_steps": 12, "warmup_steps": 2, "log_every": 1, "eval_every": 6, "eval_batches": 2,
                 "save_every": 4, "num_workers": 0, "lr": 3e-3}


@pytest.fixture
def tiny_flags(data_root):
    """``tiny_flags(out, **overrides)``: train.py flags for a 2-layer, 32-wide model on the synthetic
    datasets, writing under ``out`` (each run stays well under a minute on 2 CPU cores)."""

    def flags(out: Path, **overrides) -> list[str]:
        args = []
        for k, v in {**TINY_TRAINING, "data_root": data_root, "output_dir": out, **overrides}.items():
            args += ([f"--{k}" if v else f"--no_{k}"] if isinstance(v, bool) else [f"--{k}", str(v)])
        return args

    return flags


@pytest.fixture
def train_in_process():
    """``train_in_process(*flags)``: ``train.main`` in this process on one thread (as the subprocess tests
    run it: a tiny model gains nothing from threads), accelerate's global state reset afterwards."""
    import torch
    from accelerate.state import AcceleratorState

    import train

    def run(*flags: str) -> dict:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return train.main(train.parse_args(list(flags)))
        finally:
            torch.set_num_threads(threads)
            AcceleratorState._reset_state(reset_partial_state=True)

    return run


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """The environment the CLI tests run ``train.py`` and ``python -m ...`` in."""
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def rollout():
    """``rollout(agent, envs, steps, seed=0)``: step a vector env with an agent, asserting every action is
    inside the action space and the context within the agent's window; returns the number of
    finished episodes."""

    def run(agent, envs, steps: int, seed: int = 0) -> int:
        obs, _ = envs.reset(seed=seed)
        finished = 0
        for _ in range(steps):
            actions = agent.act(obs)
            assert envs.action_space.contains(actions)
            obs, rewards, terminated, truncated, _ = envs.step(actions)
            agent.observe(rewards, terminated, truncated)
            finished += int((terminated | truncated).sum())
            assert agent.state.length <= agent.context_length
        return finished

    return run


# --- Gato's mu-law bins, written out from the paper rather than imported: the tests check the library
# against them (test_tokenizer, test_tokenizer_properties) -------------------------------------------

MU, M, BINS = 100.0, 256.0, 1024


def reference_bin_edges_in_x(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x-space edges of mu-law bin k, straight from Gato's formula (independent of the library)."""
    y_lo, y_hi = -1 + 2 * k / BINS, -1 + 2 * (k + 1) / BINS
    inv = lambda y: np.sign(y) * ((M * MU + 1) ** np.abs(y) - 1) / MU
    return inv(y_lo), inv(y_hi)
