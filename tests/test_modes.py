"""Decoding modes: constrained actions, TT beam search on a hand-built model, DT conditioning."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gymnasium import spaces

from generalist import GeneralistConfig, GeneralistForCausalLM, TaskSpec
from generalist.engine import Engine
from generalist.modes import (
    TTConfig,
    caption,
    decode_actions,
    demonstration_prompt,
    dt_act,
    gato_act,
    generate_text,
    sample_expert_returns,
    tt_plan,
)
from tests.conftest import TINY_LLAMA

ACTION_SPACES = {
    "box": spaces.Box(np.array([-2.0, 0.0, -0.01]), np.array([2.0, 1.0, 0.01]), dtype=np.float32),
    "discrete": spaces.Discrete(5, start=-2),
    "multidiscrete": spaces.MultiDiscrete([3, 2, 7]),
    "dict": spaces.Dict({"move": spaces.Discrete(3), "force": spaces.Box(-1, 1, (2,), np.float32)}),
}


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)).eval()


@pytest.mark.parametrize("name", list(ACTION_SPACES))
def test_constrained_decoding_never_yields_an_invalid_action(model, tok, name):
    spec = TaskSpec.from_spaces(f"constrained-{name}", spaces.Box(-1, 1, (4,), np.float32), ACTION_SPACES[name])
    engine, rng = Engine(model, seed=1), np.random.default_rng(0)
    state = engine.new_state(16)
    space = spec.action_space()
    for _ in range(12):  # a random model, hot sampling: only the constraint keeps actions valid
        obs = {"observation": rng.normal(size=(16, 4)).astype(np.float32)}
        ids = gato_act(engine, state, tok, spec, obs, temperature=2.0)
        for action in decode_actions(tok, spec, ids):
            assert space.contains(action), action
        engine.feed(state, torch.from_numpy(ids[:, -1:]))


# --- Trajectory Transformer on a hand-built model whose scores are known ---------------------------


class HistoryCache:
    """A stand-in KV cache that stores each row's token history (same methods as transformers' Cache)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids  # (B, L)

    def get_seq_length(self) -> int:
        return self.ids.shape[1]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.ids = self.ids[beam_idx]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.ids = self.ids.repeat_interleave(repeats, 0)

    def crop(self, tokens_to_remove: int) -> None:
        self.ids = self.ids[:, : self.ids.shape[1] + tokens_to_remove]


class ScriptedModel(torch.nn.Module):
    """Logits from rules over each row's history, for a task with one Discrete(3) action and one
    continuous observation. After ``<sep>``: uniform over the 3 actions. Then the reward r and the
    return-to-go R: the first planned action 0 earns nothing now but 3 at the next step (R = 3), action
    1 earns 1 now and nothing later (a myopic planner's choice), action 2 earns 0.5. Observations: 0."""

    def __init__(self, tok, reward_of):
        super().__init__()
        self.config = GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)
        self.tok, self.reward_of = tok, reward_of

    def forward(self, input_ids, cache=None, **_):
        ids = input_ids if not isinstance(cache, HistoryCache) else torch.cat([cache.ids, input_ids], 1)
        tok, v = self.tok, self.tok.vocab_size
        base = tok.layout.discrete_offset
        logits = torch.full((ids.shape[0], 1, v), -1e4)
        for i, row in enumerate(ids.tolist()):
            since_sep = len(row) - 1 - max(j for j, t in enumerate(row) if t == tok.sep_id)
            actions = [t - base for t in row if base <= t < base + 3]
            if since_sep == 0:
                logits[i, 0, base: base + 3] = 0.0
            elif since_sep in (1, 2):  # reward of this step, then the return-to-go after it
                r, future = self.reward_of(actions)
                logits[i, 0, int(tok.encode_continuous(np.array([r if since_sep == 1 else future]))[0])] = 0.0
            elif since_sep == 3:
                logits[i, 0, int(tok.encode_continuous(np.array([0.0]))[0])] = 0.0
            else:
                logits[i, 0, tok.sep_id] = 0.0
        return SimpleNamespace(logits=logits, cache=HistoryCache(ids))


def _rewards(actions: list[int]) -> tuple[float, float]:
    """(reward of the latest step, return-to-go after it) given the plan's actions so far."""
    first, step = actions[0], len(actions) - 1
    if step == 0:
        return {0: (0.0, 3.0), 1: (1.0, 0.0), 2: (0.5, 0.0)}[first]
    return (3.0 if first == 0 and step == 1 else 0.0), 0.0


def test_tt_beam_search_returns_the_highest_scoring_sequence(tok):
    spec = TaskSpec.from_spaces("tt-scripted", spaces.Box(-1, 1, (1,), np.float32), spaces.Discrete(3))
    engine = Engine(ScriptedModel(tok, _rewards), seed=0)
    context = tok.encode_steps(spec, {"observation": np.zeros((1, 1), np.float32)}, returns_to_go=np.zeros(1))[0]
    state = engine.prefill([context, context])  # two environments, batched
    length = state.length
    config = TTConfig(beam_width=6, horizon=3, n_expand=4, cdf_act=None)
    plan = tt_plan(engine, state, tok, spec, config)
    assert plan.action_ids.tolist() == [[tok.layout.discrete_offset]] * 2  # action 0, not the myopic 1
    value = lambda x: float(tok.decode_continuous(tok.encode_continuous(np.array([x])))[0])  # bin centre
    expected = value(0.0) + 0.99 * value(3.0) + 0.99**2 * value(0.0) + 0.99**3 * value(0.0)
    np.testing.assert_allclose(plan.scores, expected, rtol=1e-5)
    assert state.length == length and state.batch_size == 2  # imagined tokens cropped off


def test_tt_plan_runs_on_a_real_model_and_restores_state(model, tok):
    spec = TaskSpec.from_spaces("tt-real", spaces.Box(-1, 1, (3,), np.float32), ACTION_SPACES["box"])
    engine = Engine(model, seed=0)
    context = tok.encode_steps(spec, {"observation": np.zeros((2, 3), np.float32)}, returns_to_go=np.zeros(2))
    state = engine.prefill(context)
    before = state.logits.clone()
    plan = tt_plan(engine, state, tok, spec, TTConfig(beam_width=4, horizon=2))
    assert plan.plan_ids.shape == (2, 2, 3)
    for ids in plan.action_ids:
        assert spec.action_space().contains(tok.decode_action(spec, ids))
    assert torch.equal(state.logits, before)
    # the cache was cropped back: feeding continues exactly like a fresh prefill
    engine.feed(state, torch.from_numpy(plan.action_ids[:, :1]))
    fresh = engine.prefill(context)
    engine.feed(fresh, torch.from_numpy(plan.action_ids[:, :1]))
    torch.testing.assert_close(state.logits, fresh.logits, atol=1e-4, rtol=1e-4)


# --- Decision Transformer: conditioning changes behaviour -----------------------------------------


@pytest.fixture(scope="module")
def dt_model(tok):
    """A tiny model trained a few seconds on a 1-step task where the action decides the return:
    action 0 -> reward 0, action 1 -> reward 1."""
    spec = TaskSpec.from_spaces("one-step", spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(2),
                                expert_return=1.0, random_return=0.0)
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    rng = np.random.default_rng(0)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model trains faster on one thread (and on a busy machine)
    try:
        _train(model, optim, tok, spec, rng)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), spec


def _train(model, optim, tok, spec, rng) -> None:
    for _ in range(150):
        actions = rng.integers(0, 2, 16)
        batch = tok.collate([tok.encode_episode(spec, {"observation": rng.uniform(-1, 1, (1, 2))},
                                                {"action": np.array([a])}, np.array([float(a)])) for a in actions])
        loss = model(**batch).loss
        optim.zero_grad()
        loss.backward()
        optim.step()


def test_dt_target_return_decides_the_action(dt_model, tok):
    model, spec = dt_model
    engine = Engine(model)
    obs = {"observation": np.zeros((2, 2), np.float32)}
    state = engine.prefill(_bos(tok), num_rows=2)
    ids = dt_act(engine, state, tok, spec, obs, returns_to_go=np.array([1.0, 0.0]))
    assert [tok.decode_action(spec, row) for row in ids] == [1, 0]


def test_expert_return_sampling_picks_high_returns(dt_model, tok):
    model, spec = dt_model
    engine = Engine(model, seed=0)
    state = engine.prefill(_bos(tok), num_rows=8)
    returns = sample_expert_returns(engine, state, tok, spec, kappa=10.0)
    assert (returns > 0.5).all(), returns
    ids = dt_act(engine, state, tok, spec, {"observation": np.zeros((8, 2), np.float32)}, returns)
    assert all(tok.decode_action(spec, row) == 1 for row in ids)


def _bos(tok) -> dict:
    s = tok.encode_text_sample("")
    return {k: v[:1] for k, v in s.items() if k in ("input_ids", "modality_ids", "local_positions")} | {
        "patches": s["patches"], "patch_positions": s["patch_positions"]}


# --- Gato prompt, captioning, text ----------------------------------------------------------------


def test_demonstration_prompt_keeps_the_last_whole_steps(tok):
    spec = TaskSpec.from_spaces("demo", spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2))
    episode = {"observations": {"observation": np.zeros((10, 3), np.float32)},
               "actions": {"action": np.arange(10) % 2}, "rewards": np.ones(10)}
    full = demonstration_prompt(tok, spec, episode)
    assert full["input_ids"][0] == tok.bos_id and full["input_ids"][-1] == tok.eos_id
    assert len(full["input_ids"]) == 2 + 10 * 7 and tok.no_return_id in full["input_ids"]
    short = demonstration_prompt(tok, spec, episode, max_tokens=30)
    assert len(short["input_ids"]) == 2 + 4 * 7
    np.testing.assert_array_equal(short["input_ids"][1:-1], full["input_ids"][-29:-1])


def test_caption_and_text_stop_and_decode(model, tok):
    images = [np.zeros((64, 64, 3), np.uint8), np.full((40, 30, 3), 200, np.uint8)]
    greedy = caption(Engine(model), tok, images, max_new_tokens=5)
    beams = caption(Engine(model), tok, images, max_new_tokens=5, beam_width=3)
    assert len(greedy) == len(beams) == 2 and all(isinstance(c, str) for c in greedy + beams)
    texts = generate_text(Engine(model, seed=0), tok, ["hello", "the cat"], max_new_tokens=6, temperature=1.0, top_k=20)
    assert len(texts) == 2
