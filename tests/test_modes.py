"""Decoding modes: constrained actions, TT beam search on a hand-built model, DT conditioning."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gymnasium import spaces

from generalist import GeneralistConfig, GeneralistForCausalLM, TaskSpec, kv_cache
from generalist.engine import Engine
from generalist.modes import (
    TTConfig,
    caption,
    decode_actions,
    demonstration_prompt,
    generate_text,
    sample_expert_returns,
    tt_plan,
)
from generalist.modes.control import sample_actions, step_prompts
from generalist.modes.tt import expected, read_value
from tests.conftest import TINY_LLAMA, with_task_spec

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
        ids = sample_actions(engine, state, tok, spec, step_prompts(tok, spec, obs), temperature=2.0)
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
    continuous observation. After ``<sep>``: uniform over the 3 actions. Then the reward ``r``; then,
    at the next ``R`` position, the *value* ``V`` of the state reached (or ``<eos>``: the episode
    ended), as ``reward_of(actions) -> (r, V or None)`` says. It refuses a return fed as an input:
    the token after a reward must be ``<no_return>`` (the value is a prediction, never an input)."""

    def __init__(self, tok, reward_of, prior=(0.0, 0.0, 0.0)):
        super().__init__()
        self.config = GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)
        self.tok, self.reward_of, self.prior = tok, reward_of, torch.tensor(prior)  # action logits after <sep>

    def forward(self, input_ids, cache=None, **_):
        ids = input_ids if not isinstance(cache, HistoryCache) else torch.cat([cache.ids, input_ids], 1)
        tok, v = self.tok, self.tok.vocab_size
        base = tok.layout.discrete_offset
        logits = torch.full((ids.shape[0], 1, v), -1e4)
        for i, row in enumerate(ids.tolist()):
            seps = [j for j, t in enumerate(row) if t == tok.sep_id]
            for j in seps[:-1]:  # every R position inside the plan: <sep> a r R
                if j + 3 < len(row) and row[j + 3] != tok.no_return_id:
                    raise AssertionError(f"a return was fed to the planner: id {row[j + 3]} at an R position")
            since_sep = len(row) - 1 - seps[-1]
            actions = [t - base for t in row if base <= t < base + 3]
            if since_sep == 0:
                logits[i, 0, base: base + 3] = self.prior
            elif since_sep == 1:  # the reward of this step
                r, _ = self.reward_of(actions)
                logits[i, 0, int(tok.encode_continuous(np.array([r]))[0])] = 0.0
            elif since_sep == 2:  # the next R position: the value of the state reached, or <eos>
                _, value = self.reward_of(actions)
                logits[i, 0, tok.eos_id if value is None else int(tok.encode_continuous(np.array([value]))[0])] = 0.0
            elif since_sep == 3:
                logits[i, 0, int(tok.encode_continuous(np.array([0.0]))[0])] = 0.0
            else:
                logits[i, 0, tok.sep_id] = 0.0
        return SimpleNamespace(logits=logits, cache=HistoryCache(ids))


def _delayed(actions: list[int]) -> tuple[float, float | None]:
    """Action 0 earns nothing now but reaches a state worth 3; action 1 earns 1 now and a state worth 0
    (a myopic planner's choice); action 2 earns 0.5. Later steps: nothing."""
    first, step = actions[0], len(actions) - 1
    if step == 0:
        return {0: (0.0, 3.0), 1: (1.0, 0.0), 2: (0.5, 0.0)}[first]
    return (3.0 if first == 0 and step == 1 else 0.0), 0.0


def _terminal(actions: list[int]) -> tuple[float, float | None]:
    """Action 1 earns 1 and ends the episode (the model predicts <eos>: nothing more, whatever it
    imagines after); action 0 earns 0.5 and keeps going, each later step earning 0.5 too."""
    if actions[0] == 1:
        return (1.0, None) if len(actions) == 1 else (5.0, None)  # imagined past the end: must not count
    return 0.5, 1.0


def _plan(tok, reward_of, config, prior=(0.0, 0.0, 0.0)) -> tuple:
    spec = TaskSpec.from_spaces("tt-scripted", spaces.Box(-1, 1, (1,), np.float32), spaces.Discrete(3),
                                discount=0.99)
    engine = Engine(ScriptedModel(tok, reward_of, prior), seed=0)
    context = tok.encode_steps(spec, {"observation": np.zeros((1, 1), np.float32)})[0]  # <no_return> o <sep>
    state = engine.prefill([context, context])  # two environments, batched
    length = state.length
    plan = tt_plan(engine, state, tok, spec, config)
    assert state.length == length and state.batch_size == 2  # imagined tokens cropped off
    return plan


def test_tt_scores_predicted_values_and_beats_a_myopic_planner(tok):
    plan = _plan(tok, _delayed, TTConfig(beam_width=6, horizon=3, n_expand=4, cdf_act=None))
    assert plan.action_ids.tolist() == [[tok.layout.discrete_offset]] * 2  # action 0, not the myopic 1
    value = lambda x: float(tok.decode_continuous(tok.encode_continuous(np.array([x])))[0])  # bin centre
    # Σ γ^i r_i over the plan + γ^H V_H: r = 0, 3, 0 and the final predicted value 0
    expected = value(0.0) + 0.99 * value(3.0) + 0.99**2 * value(0.0) + 0.99**3 * value(0.0)
    np.testing.assert_allclose(plan.scores, expected, rtol=1e-5)
    # horizon 1: only the predicted value can tell action 0 (V = 3) from action 1 (r = 1, V = 0)
    short = _plan(tok, _delayed, TTConfig(beam_width=6, horizon=1, n_expand=4, cdf_act=None))
    assert short.action_ids.tolist() == [[tok.layout.discrete_offset]] * 2
    np.testing.assert_allclose(short.scores, value(0.0) + 0.99 * value(3.0), rtol=1e-5)


def test_tt_reads_values_as_the_mean_over_value_bins_and_the_end_apart():
    """``read_value``: E[V | not ended] over the value bins, P(<eos>) beside it (float32, within float rounding of
    the float64 renormalisation over bins and <eos>), finite however sure the model is that the episode ended."""
    torch.manual_seed(0)
    logits, values = torch.randn(16, 1025) * 3, torch.randn(1024, dtype=torch.float64) * 100
    p = logits.double().softmax(-1)
    value, p_end = read_value(logits, 1024, values)
    np.testing.assert_allclose(p_end, p[:, -1], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(value, (p[:, :-1] @ values) / (1 - p[:, -1]), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(expected(logits[:, :1024], values), logits[:, :1024].double().softmax(-1) @ values,
                               rtol=1e-5, atol=1e-4)
    logits[0, 1024], logits[1, :1024] = 200.0, float("-inf")  # <eos> certain: by its logit, and with no bin possible
    value, p_end = read_value(logits, 1024, values)
    assert p_end[:2].tolist() == [1.0, 1.0] and torch.isfinite(value).all() and value[1] == 0.0
    np.testing.assert_allclose(value[0], logits[0, :1024].double().softmax(-1) @ values, rtol=1e-5)


def test_tt_compares_discrete_actions_the_model_thinks_unlikely_when_asked(tok):
    # the model is 99.7 % sure of the myopic action 1 (imitation would take it). The reference's cdf
    # filter (drop the least likely 60 % of the mass) leaves only that action to every child: the plan is
    # the greedy policy's. With distinct_actions a beam's children try different actions and the planner
    # finds action 0's delayed reward.
    sure = (-3.0, 3.0, -3.0)
    greedy = _plan(tok, _delayed, TTConfig(beam_width=6, horizon=2, n_expand=3), prior=sure)
    assert greedy.action_ids.tolist() == [[tok.layout.discrete_offset + 1]] * 2
    for seed_beams in (1, 6):
        plan = _plan(tok, _delayed, TTConfig(beam_width=seed_beams, horizon=2, n_expand=3, distinct_actions=True),
                     prior=sure)
        assert plan.action_ids.tolist() == [[tok.layout.discrete_offset]] * 2, seed_beams


def test_tt_counts_nothing_after_a_predicted_end_of_episode(tok):
    plan = _plan(tok, _terminal, TTConfig(beam_width=6, horizon=3, n_expand=4, cdf_act=None))
    # ending now earns 1 (and the imagined 5s after <eos> are worth nothing); going on earns 0.5 a step
    # plus the value: 0.5 + 0.99·0.5 + 0.99²·0.5 + 0.99³·1 > 1 (actions 0 and 2 are alike)
    chosen = plan.action_ids[:, 0] - tok.layout.discrete_offset
    assert set(chosen.tolist()) <= {0, 2}, chosen


def test_tt_plan_runs_on_a_real_model_and_restores_state(model, tok, monkeypatch):
    """... and the next plan reuses the KV storage this one freed (``Engine`` keeps it per layer): it allocates
    none, and plans the same. A fresh buffer costs a page fault per page written: ~1 GB per decision for 20
    walker envs at 32 beams, before."""
    fresh = []  # every KV storage allocation, small ones included
    allocate = kv_cache._empty
    monkeypatch.setattr(kv_cache, "_empty", lambda like, n: fresh.append(n) or allocate(like, n))
    monkeypatch.setattr(kv_cache.AppendLayer, "min_spare_bytes", 0)
    spec = TaskSpec.from_spaces("tt-real", spaces.Box(-1, 1, (3,), np.float32), ACTION_SPACES["box"])
    engine = Engine(model, seed=0)
    context = tok.encode_steps(spec, {"observation": np.zeros((2, 3), np.float32)})
    state = engine.prefill(context)
    before = state.logits.clone()
    plans, allocations = [], []
    for _ in range(2):
        engine.seed(0)
        fresh.clear()
        plans.append(tt_plan(engine, state, tok, spec, TTConfig(beam_width=4, horizon=3, decoder="engine")))
        allocations.append(len(fresh))
    assert allocations[0] > 0 and allocations[1] == 0, allocations
    assert np.array_equal(plans[0].plan_ids, plans[1].plan_ids) and np.allclose(plans[0].scores, plans[1].scores)
    plan = plans[0]
    assert plan.plan_ids.shape == (2, 3, 3) and plan.values.shape == (2, 3)
    for ids in plan.action_ids:
        assert spec.action_space().contains(tok.decode_action(spec, ids))
    assert torch.equal(state.logits, before)
    # the cache was cropped back: feeding continues exactly like a fresh prefill
    engine.feed(state, torch.from_numpy(plan.action_ids[:, :1]))
    again = engine.prefill(context)
    engine.feed(again, torch.from_numpy(plan.action_ids[:, :1]))
    torch.testing.assert_close(state.logits, again.logits, atol=1e-4, rtol=1e-4)


def test_the_planner_imagines_observations_as_the_tokenizer_lays_them_out(model, tok):
    """What the planner imagines is scored as the model scores the same step encoded by the tokenizer, in
    training's layout. Its imagined observation tokens were fed without their places in the observation
    (the local positions 1..n every observation carries), so the world model read its own predictions
    as something else: on CartPole the second imagined state and every value after it were noise
    (V = 244 where no return exceeds 100), and the beam search picked exactly those."""
    from generalist.modes.control import continuous_values

    spec = TaskSpec.from_spaces("tt-layout", spaces.Box(-1, 1, (3,), np.float32), spaces.Box(-1, 1, (1,), np.float32))
    engine = Engine(model, seed=0)
    context = tok.encode_steps(spec, {"observation": np.full((1, 3), 0.3, np.float32)})[0]  # <no_return> o <sep>
    plan = tt_plan(engine, engine.prefill(context), tok, spec,
                   TTConfig(beam_width=1, n_expand=1, horizon=2, k_act=1, cdf_act=None, beam_cache_dtype="float32"))
    cont, centres = continuous_values(tok)

    def reward_then_value(state) -> tuple[float, float]:  # as the planner reads them
        reward = state.logits[0, cont[0]: cont[1]].double().softmax(-1) @ (centres / spec.reward_scale)
        engine.feed(state, torch.tensor([[int(state.logits[0, cont[0]: cont[1]].argmax()) + cont[0]]]))
        value = state.logits[0, cont[0]: cont[1]].double().softmax(-1) @ (centres / spec.return_scale)
        return float(reward), float(value)

    state = engine.prefill(context)  # replay the best beam, each step as the tokenizer encodes it
    engine.feed(state, torch.from_numpy(plan.plan_ids[:, 0]))
    first = reward_then_value(state)
    imagined = tok.decode_continuous(plan.observation_ids[0, 0])
    step = tok.encode_steps(spec, {"observation": imagined[None].astype(np.float32)})[0]
    assert step["input_ids"][1:4].tolist() == plan.observation_ids[0, 0].tolist()
    assert step["local_positions"].tolist() == [0, 1, 2, 3, 0]  # <no_return> o o o <sep>
    engine.feed(state, [step])
    engine.feed(state, torch.from_numpy(plan.plan_ids[:, 1]))
    second = reward_then_value(state)
    np.testing.assert_allclose(plan.rewards[0], [first[0], second[0]], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(plan.values[0], [first[1], second[1]], rtol=1e-4, atol=1e-5)


def test_every_forward_of_the_planner_reads_only_the_last_context_steps(model, tok):
    """The reference crops every input of its planner, imagined steps included, to the last
    ``max_context_transitions`` transitions (79 tokens of hopper's 16: the current transition and 4
    before). Ours: every forward of ``tt_plan`` attends to the current step and ``context_steps - 1``
    whole steps before it, however long the context and however far the plan has run. (On the engine, whose feeds
    a spy can count; the static decoder plans the same: tests/test_static_beams.py.)"""
    from generalist.tokenizer import concat_samples

    spec = TaskSpec.from_spaces("tt-window", spaces.Box(-1, 1, (3,), np.float32), spaces.Box(-1, 1, (2,), np.float32))
    tok.add_task_spec(spec)
    layout, rng = tok.step_layout(spec), np.random.default_rng(0)
    past = tok.encode_episode(spec, {"observation": rng.uniform(-1, 1, (8, 3))}, {"action": rng.uniform(-1, 1, (8, 2))},
                              rng.uniform(0, 1, 8), condition_on_return=False, end=False)
    context = concat_samples([past, step_prompts(tok, spec, {"observation": rng.uniform(-1, 1, (1, 3))})[0]])
    reads = []

    class Spy(Engine):
        def feed(self, state, chunk, next_allowed=None):
            super().feed(state, chunk, next_allowed)
            reads.append(state.length - (state.window_start or 0))  # positions the forward could attend to
            return state

    engine = Spy(model, seed=0)
    for steps in (2, 3):
        state = engine.prefill(context)
        reads.clear()
        tt_plan(engine, state, tok, spec, TTConfig(beam_width=3, horizon=4, context_steps=steps, decoder="engine"))
        assert state.window_start is None  # restored
        assert max(reads) == steps * layout.tokens and min(reads) > (steps - 1) * layout.tokens, (steps, reads)
        # every forward of the plan was seen: per step its action tokens and reward, then (but the last
        # step) <no_return>, the observation's first tokens one by one and its last with <sep>
        assert len(reads) == 4 * (layout.action_tokens + 1) + 3 * (layout.observation_tokens + 1)


def test_tt_presets_match_the_reference_config():
    from generalist.modes import TT_PRESETS

    base = TT_PRESETS["reference"]
    assert (base.beam_width, base.horizon, base.n_expand, base.k_obs, base.k_act, base.cdf_obs, base.cdf_act,
            base.context_steps, base.plan_freq) == (128, 15, 2, 1, None, None, 0.6, 5, 1)
    assert TT_PRESETS["ant-medium-v2"] == TTConfig(horizon=5)  # ant overrides only the horizon
    assert TT_PRESETS["halfcheetah-medium-v2"] == TTConfig(horizon=5, beam_width=32)
    assert TT_PRESETS["halfcheetah-medium-expert-v2"] == TTConfig(beam_width=32)
    assert TT_PRESETS["hopper-medium-v2"] == base
    assert TT_PRESETS["walker2d-medium-replay-v2"] == TTConfig(horizon=20, beam_width=32, k_act=40, cdf_act=None)


def test_the_agent_plans_with_the_tasks_tt_preset_unless_given_one(model, tok):
    """The default planner is per task (CartPole: 16 beams, horizon 5), else the reference's; a given
    ``tt_config`` wins everywhere."""
    import gymnasium as gym

    from generalist import Agent
    from generalist.modes import TT_PRESETS

    local = with_task_spec(tok, TaskSpec.from_env(gym.make("CartPole-v1")))
    local = with_task_spec(local, TaskSpec.from_env(gym.make("FrozenLake-v1")))
    agent = Agent(model, local, "tt")
    agent.reset("CartPole-v1")
    assert agent.mode.config == TT_PRESETS["CartPole-v1"] == TTConfig(beam_width=16, horizon=5)
    agent.reset("FrozenLake-v1")  # no preset of its own
    assert agent.mode.config == TT_PRESETS["reference"]
    mine = TTConfig(beam_width=4, horizon=2)
    agent = Agent(model, local, "tt", tt_config=mine)
    agent.reset("CartPole-v1")
    assert agent.mode.config is mine


# --- Decision Transformer: conditioning changes behaviour -----------------------------------------


def test_dt_target_return_decides_the_action(dt_model, tok):
    model, spec = dt_model
    engine = Engine(model)
    obs = {"observation": np.zeros((2, 2), np.float32)}
    state = engine.prefill(_bos(tok), num_rows=2)
    ids = sample_actions(engine, state, tok, spec, step_prompts(tok, spec, obs, np.array([1.0, 0.0])))
    assert [tok.decode_action(spec, row) for row in ids] == [1, 0]


def test_expert_return_sampling_picks_high_returns(dt_model, tok):
    model, spec = dt_model
    engine = Engine(model, seed=0)
    state = engine.prefill(_bos(tok), num_rows=8)
    returns = sample_expert_returns(engine, state, tok, spec, kappa=10.0)
    assert (returns > 0.5).all(), returns
    ids = sample_actions(engine, state, tok, spec,
                         step_prompts(tok, spec, {"observation": np.zeros((8, 2), np.float32)}, returns))
    assert all(tok.decode_action(spec, row) == 1 for row in ids)


def _bos(tok) -> dict:
    s = tok.encode_text_sample("")
    return {k: v[:1] for k, v in s.items() if k in ("input_ids", "modality_ids", "local_positions")} | {
        "patches": s["patches"], "patch_positions": s["patch_positions"]}


# --- Gato prompt, captioning, text ----------------------------------------------------------------


def test_demonstration_prompt_is_drawn_as_in_training(tok):
    spec = TaskSpec.from_spaces("demo", spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2))
    tok = with_task_spec(tok, spec)
    episode = {"task": "demo", "observations": {"observation": np.arange(30, dtype=np.float32).reshape(10, 3) / 30},
               "actions": {"action": np.arange(10) % 2}, "rewards": np.ones(10), "terminated": True}
    full = demonstration_prompt(tok, episode, max_tokens=1000, end=True)
    assert full["input_ids"][0] == tok.bos_id and full["input_ids"][-1] == tok.eos_id
    assert len(full["input_ids"]) == 2 + 10 * 7 and tok.no_return_id in full["input_ids"]
    end = demonstration_prompt(tok, episode, max_tokens=30, end=True)  # the last whole steps, then <eos>
    assert len(end["input_ids"]) == 4 * 7 + 1
    np.testing.assert_array_equal(end["input_ids"], full["input_ids"][-29:])
    starts = set()
    for seed in range(20):  # a uniformly placed window of whole steps
        window = demonstration_prompt(tok, episode, max_tokens=30, rng=seed, end=False)
        assert len(window["input_ids"]) <= 30
        ids = window["input_ids"][window["input_ids"] != tok.bos_id]
        at = [i for i in range(1, len(full["input_ids"]) - len(ids) + 1)
              if np.array_equal(full["input_ids"][i: i + len(ids)], ids)]
        assert at and (at[0] - 1) % 7 == 0  # it starts at a step boundary of the episode
        starts.add(at[0])
    assert len(starts) > 3


def test_caption_and_text_stop_and_decode(model, tok):
    images = [np.zeros((64, 64, 3), np.uint8), np.full((40, 30, 3), 200, np.uint8)]
    greedy = caption(Engine(model), tok, images, max_new_tokens=5)
    beams = caption(Engine(model), tok, images, max_new_tokens=5, beam_width=3)
    assert len(greedy) == len(beams) == 2 and all(isinstance(c, str) for c in greedy + beams)
    texts = generate_text(Engine(model, seed=0), tok, ["hello", "the cat"], max_new_tokens=6, temperature=1.0, top_k=20)
    assert len(texts) == 2


def test_the_beam_cache_dtype_follows_the_hardware_unless_named(monkeypatch):
    from generalist.modes.tt import beam_cache_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert beam_cache_dtype("float32", cuda) == torch.float32 and beam_cache_dtype("bfloat16", cpu) == torch.bfloat16
    assert beam_cache_dtype("auto", cuda) == torch.bfloat16
    for amx in (True, False):  # measured slower in bfloat16 on CPUs with and without AMX tiles
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        assert beam_cache_dtype("auto", cpu) == torch.float32
    assert beam_cache_dtype("auto", cpu, torch.bfloat16) == torch.bfloat16  # never wider than the model
