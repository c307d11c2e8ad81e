"""Agent: acts in real gymnasium vector envs, handles resets, slides its context window, and each
control mode does what its paper says when driven through it (what users run)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from generalist import GeneralistConfig, GeneralistForCausalLM, TaskSpec
from generalist.agent import Agent
from generalist.modes import DTMode, TTConfig, demonstration_prompt
from generalist.vocab import Modality
from tests.conftest import TINY_LLAMA


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)).eval()


def _envs(task: str, n: int, mode=gym.vector.AutoresetMode.SAME_STEP) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda: gym.make(task)] * n, autoreset_mode=mode)


@pytest.mark.parametrize("mode", ["gato", "dt", "tt"])
@pytest.mark.parametrize("task", ["CartPole-v1", "Pendulum-v1"])
def test_agent_acts_in_a_vector_env(model, tok, task, mode, rollout):
    envs = _envs(task, 3)
    spec = TaskSpec.from_env(envs, name=task, expert_return=100.0, random_return=0.0)
    tok.add_task_spec(spec)
    prompt = None
    if mode == "gato":
        rng = np.random.default_rng(0)
        shape = envs.single_observation_space.shape
        demo = {"task": task, "observations": {"observation": rng.normal(size=(4, *shape))},
                "actions": {"action": np.stack([envs.single_action_space.sample() for _ in range(4)])},
                "rewards": np.ones(4)}
        prompt = demonstration_prompt(tok, demo, max_tokens=model.config.prompt_length)
    agent = Agent(model, tok, mode, temperature=1.0, tt_config=TTConfig(beam_width=4, horizon=2))
    agent.reset(spec, num_envs=3, prompt=prompt)
    rollout(agent, envs, 6)


@pytest.mark.parametrize("beam_cache", ["auto", "float32", "bfloat16"])
def test_a_bfloat16_model_plans_in_tt_mode(model, tok, beam_cache, rollout):
    """A model loaded in bfloat16 (what a CPU with AVX-512 BF16 or a GPU runs) plans with every beam cache dtype.

    It did not: on a CPU without AMX ``auto`` stored the beams' own keys in float32, the shared-prefix attention
    returned float32 for a bfloat16 query, and the next linear layer raised a dtype mismatch.
    """
    import copy

    envs = _envs("Pendulum-v1", 2)
    spec = TaskSpec.from_env(envs, name="Pendulum-v1", expert_return=-150.0, random_return=-1200.0)
    tok.add_task_spec(spec)
    half = copy.deepcopy(model).to(torch.bfloat16)
    agent = Agent(half, tok, "tt", tt_config=TTConfig(beam_width=3, horizon=2, beam_cache_dtype=beam_cache))
    agent.reset(spec, num_envs=2)
    rollout(agent, envs, 3)


def test_sliding_window_and_resets_past_the_context_length(model, tok, rollout):
    envs = _envs("CartPole-v1", 4)  # random play ends CartPole episodes within ~10-40 steps
    spec = TaskSpec.from_env(envs, expert_return=500.0, random_return=20.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "dt", temperature=1.0, context_length=64)
    agent.reset(spec, num_envs=4)
    finished = rollout(agent, envs, 60)
    assert agent.refills > 5 and finished > 0  # 60 steps x 8 tokens is far past 64 tokens


def test_window_keeps_the_last_whole_steps_of_each_row(model, tok):
    """After the window slides, each row's cache holds its prompt and last whole steps, nothing more."""
    envs = _envs("Pendulum-v1", 2)
    spec = TaskSpec.from_env(envs, expert_return=0.0, random_return=-1200.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "gato", context_length=48, window_keep=0.5)
    agent.reset(spec, num_envs=2)
    obs, _ = envs.reset(seed=0)
    for _ in range(12):
        obs, rewards, terminated, truncated, _ = envs.step(agent.act(obs))
        agent.observe(rewards, terminated, truncated)
    assert agent.refills >= 1
    step = agent.layout.tokens  # 7 tokens: R, 3 obs, <sep>, action, r
    for i, row in enumerate(agent.rows):  # a refill now keeps whole steps within window_keep * 48 tokens
        ctx = agent._context(row, 24)
        assert len(ctx["input_ids"]) <= 24 and len(ctx["input_ids"]) % step == 0  # no <bos>: the start is gone
        assert agent.state.attention_mask[i].sum() <= 48


def test_context_defaults_to_the_trained_context(tok, rollout):
    torch.manual_seed(0)
    trained = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA,
                                                     context_length=64)).eval()
    envs = _envs("CartPole-v1", 2)
    spec = TaskSpec.from_env(envs, expert_return=500.0, random_return=20.0)
    tok.add_task_spec(spec)
    agent = Agent(trained, tok, "gato", temperature=1.0)
    agent.reset(spec, num_envs=2)
    assert agent.context_length == 64  # not the backbone's 1024 positions
    rollout(agent, envs, 30)  # 30 steps x 8 tokens: the window must slide to stay within 64
    assert agent.refills > 0
    with pytest.raises(ValueError, match="trained"):
        Agent(trained, tok, "gato", context_length=128)


def test_next_step_autoreset_and_unbatched_use(model, tok, rollout):
    envs = _envs("CartPole-v1", 2, gym.vector.AutoresetMode.NEXT_STEP)
    spec = TaskSpec.from_env(envs, expert_return=500.0, random_return=20.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "dt", temperature=1.0, autoreset="next_step", context_length=128)
    agent.reset(spec, num_envs=2)
    assert rollout(agent, envs, 50) > 0

    env = gym.make("Pendulum-v1")
    single = TaskSpec.from_env(env, expert_return=0.0, random_return=-1200.0)
    tok.add_task_spec(single)
    agent = Agent(model, tok, "dt", expert_returns=True)
    agent.reset(single, num_envs=None)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        action = agent.act(obs)
        assert env.action_space.contains(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        agent.observe(reward, terminated, truncated)


# --- each mode through the Agent -------------------------------------------------------------------


class OneStepEnv(gym.Env):
    """The dt_model's task as a real env: reward = action (0 or 1), then the episode ends."""

    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), float(action), True, False, {}


class ChunkSpy:
    """Wraps a mode's ``decide`` to keep the tokens the Agent fed at every decision."""

    def __init__(self, mode):
        self.chunks, self._decide = [], mode.decide
        mode.decide = self

    def __call__(self, step):
        self.chunks.append(step.chunks)
        return self._decide(step)


def _one_step_rollout(agent, n: int = 4) -> np.ndarray:
    envs = gym.vector.SyncVectorEnv([OneStepEnv] * n, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=0)
    actions = agent.act(obs)
    obs, rewards, terminated, truncated, _ = envs.step(actions)
    agent.observe(rewards, terminated, truncated)
    return np.asarray(actions)


def _fed_returns(tok, spec, chunk) -> list[float]:
    """The return-to-go values fed in one row's chunk (task units)."""
    ids = chunk["input_ids"][chunk["modality_ids"] == Modality.RETURN]
    return (tok.decode_continuous(ids) / spec.return_scale).tolist()


@pytest.mark.parametrize("target, action", [(1.0, 1), (0.0, 0)])
def test_dt_agent_follows_its_target_return(dt_model, tok, target, action):
    model, spec = dt_model
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "dt")
    agent.reset(spec, num_envs=4, target_return=target)
    assert _one_step_rollout(agent).tolist() == [action] * 4  # a DT that ignores its target fails one case


def test_dt_agent_decrements_the_target_by_each_reward(tok):
    envs = _envs("CartPole-v1", 2)  # reward 1 per step
    spec = TaskSpec.from_env(envs, expert_return=500.0, random_return=20.0, return_scale=0.02)
    tok.add_task_spec(spec)
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)).eval()
    agent = Agent(model, tok, "dt")
    spy = ChunkSpy(agent.mode)
    agent.reset(spec, num_envs=2, target_return=100.0)
    obs, _ = envs.reset(seed=0)
    for _ in range(3):  # no episode of CartPole ends in 3 steps
        obs, rewards, terminated, truncated, _ = envs.step(agent.act(obs))
        agent.observe(rewards, terminated, truncated)
    fed = [[_fed_returns(tok, spec, c) for c in chunks] for chunks in spy.chunks]
    binned = lambda x: float(tok.decode_continuous(tok.encode_continuous(np.array([x * 0.02])))[0] / 0.02)
    assert fed == [[[binned(100.0)]] * 2, [[binned(99.0)]] * 2, [[binned(98.0)]] * 2]  # R_{t+1} = R_t − r_t


def test_expert_return_sampling_through_the_agent_picks_high_returns(dt_model, tok):
    model, spec = dt_model
    tok.add_task_spec(spec)
    agent = Agent(model, tok, DTMode(expert_returns=True, kappa=10.0))
    spy = ChunkSpy(agent.mode)
    agent.reset(spec, num_envs=8)
    assert _one_step_rollout(agent, 8).tolist() == [1] * 8
    assert all(_fed_returns(tok, spec, c)[0] > 0.5 for c in spy.chunks[0])


def test_tt_agent_never_feeds_a_return_and_crops_its_context(model, tok):
    envs = _envs("Pendulum-v1", 2)
    spec = TaskSpec.from_env(envs, expert_return=-150.0, random_return=-1200.0)
    tok.add_task_spec(spec)
    config = TTConfig(beam_width=3, horizon=2, context_steps=2)
    agent = Agent(model, tok, "tt", tt_config=config)
    spy = ChunkSpy(agent.mode)
    agent.reset(spec, num_envs=2)
    assert agent.context_length == 1 + agent.layout.tokens * (2 + 2 + 2)  # past steps + now + tail + horizon
    obs, _ = envs.reset(seed=0)
    for t in range(12):
        obs, rewards, terminated, truncated, _ = envs.step(agent.act(obs))
        agent.observe(rewards, terminated, truncated)
        # what the planner saw: the current step and at least context_steps past ones (as the reference crops)
        assert agent.state.attention_mask.sum(1).min() >= agent.layout.tokens * min(t, 2) + agent.layout.prompt_tokens
    assert agent.refills > 0
    for chunks in spy.chunks:
        for chunk in chunks:
            assert not (chunk["modality_ids"] == Modality.RETURN).any()  # the value is predicted, never fed
            assert tok.no_return_id in chunk["input_ids"]


def test_a_dt_target_lasts_one_reset(dt_model, tok):
    model, spec = dt_model
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "dt")
    agent.reset(spec, num_envs=4, target_return=0.0)
    assert _one_step_rollout(agent).tolist() == [0] * 4
    agent.reset(spec, num_envs=4)  # no target: back to the task's expert return (1)
    assert _one_step_rollout(agent).tolist() == [1] * 4


class TwoTorqueEnv(gym.Env):
    """Three observed values, a two-element continuous action (so an action is more than one token)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), float(np.sum(action)), False, self.t >= 5, {}


@pytest.mark.parametrize("mode", ["gato", "dt", "tt", "tt_real_actions"])
def test_policy_view_hides_every_action_taken_and_tt_imagines_real_ones(tok, mode):
    """A model trained with hidden actions is fed ``<hidden_action>`` for every action Gato, DT and TT take
    (past steps, the demonstration prompt, and a multi-token action's own tokens); the actions TT *imagines* while
    planning are fed as themselves (its world model needs them), and with ``TTConfig(policy_view=False)`` every
    action is real."""
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA,
                                                   hidden_action_prob=0.5)).eval()
    envs = gym.vector.SyncVectorEnv([TwoTorqueEnv] * 2)
    spec = TaskSpec.from_spaces("TwoTorque-v0", envs.single_observation_space, envs.single_action_space,
                                expert_return=10.0, random_return=0.0)
    tok.add_task_spec(spec)
    demo = {"task": spec.name, "observations": {"observation": np.zeros((3, 3))},
            "actions": {"action": np.full((3, 2), 1.5)}, "rewards": np.ones(3)}
    prompt = demonstration_prompt(tok, demo, max_tokens=model.config.prompt_length) if mode == "gato" else None
    real = mode == "tt_real_actions"
    # TT on the engine, whose forwards the spy sees (the static decoder plans alike: tests/test_static_beams.py)
    agent = Agent(model, tok, "tt" if real else mode,
                  tt_config=TTConfig(beam_width=2, horizon=2, policy_view=not real, decoder="engine"))
    fed = []  # (ids, modality ids or None) of every forward, the prefills included
    forward = agent.engine._feed  # every forward goes through it (feed, generate_blind)

    def spy(state, chunk, *args, **kwargs):
        if isinstance(chunk, torch.Tensor):
            fed.append((chunk.reshape(-1).tolist(), None))
        elif isinstance(chunk, list):
            fed.extend((list(s["input_ids"]), list(s["modality_ids"])) for s in chunk)
        return forward(state, chunk, *args, **kwargs)

    agent.engine._feed = spy
    agent.reset(spec, num_envs=2, prompt=prompt)
    obs, _ = envs.reset(seed=0)
    for _ in range(4):
        obs, rewards, terminated, truncated, _ = envs.step(agent.act(obs))
        agent.observe(rewards, terminated, truncated)
    actions_fed = [i for ids, mods in fed if mods is not None for i, m in zip(ids, mods, strict=True)
                   if m == Modality.ACTION]
    steps = [s for row in agent.rows for s in row.steps]
    kept = [i for s in steps for i, m in zip(s["input_ids"], s["modality_ids"], strict=True) if m == Modality.ACTION]
    within_step = [i for ids, mods in fed if mods is None for i in ids]  # TT: the plan's tokens, an action's first
    assert actions_fed and kept and len(kept) == 2 * len(steps)
    if real:
        assert tok.hidden_action_id not in actions_fed + kept + within_step
    elif mode == "tt":
        assert set(actions_fed) == set(kept) == {tok.hidden_action_id}
        imagined = set(within_step) & set(range(*tok.action_token_ranges(spec)[0]))
        assert tok.hidden_action_id in within_step and imagined  # an action's first token hidden, the plan's real
    else:
        assert set(actions_fed) == set(kept) == {tok.hidden_action_id}
        assert not within_step  # the action's own first token goes in with its step (Engine.generate_blind)
        if mode == "gato":
            assert tok.hidden_action_id in agent.prompt["input_ids"]
            assert not np.isin(agent.prompt["input_ids"][agent.prompt["modality_ids"] == Modality.ACTION],
                               tok.encode_continuous(np.array([1.5]))).any()


class DivergingEnv(gym.Env):
    """Observations that differ from env to env (``offset``) for three steps, then are the same; reward 1."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)

    def __init__(self, offset: float = 0.0):
        self.offset = offset

    def _obs(self):
        return np.full(3, self.offset if self.t < 3 else 0.25, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, False, False, {}


@pytest.mark.parametrize(("context_steps", "trained_steps"), [(None, None), (1, None), (2, None), (None, 1)])
def test_dt_context_steps_decides_from_the_last_steps_only(tok, context_steps, trained_steps):
    """DT with ``context_steps=K`` reads the step it decides and the K-1 before it: two envs whose histories differ,
    then whose last steps agree (same observations, same R_t), get the same action distribution; with the whole
    context (None) they do not. (A window over the KV cache: its earlier steps' keys carry what their own window
    read, so in this 2-layer model K = 2 needs the last 3 steps alike; K = 1 is exact.) A model trained on K-step
    windows (``config.dt_context_steps``) acts with them unless told otherwise."""
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA,
                                                   hidden_action_prob=0.5, dt_context_steps=trained_steps)).eval()
    envs = gym.vector.SyncVectorEnv([lambda: DivergingEnv(-0.9), lambda: DivergingEnv(0.9)])
    spec = TaskSpec.from_spaces("Diverging-v0", envs.single_observation_space, envs.single_action_space,
                                expert_return=10.0, random_return=0.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "dt", context_steps=context_steps)
    agent.reset(spec, num_envs=2)
    obs, _ = envs.reset(seed=0)
    for _ in range(5):  # decisions at t = 0..4; at t = 3 and 4 the observations agree
        obs, rewards, terminated, truncated, _ = envs.step(agent.act(obs))
        agent.observe(rewards, terminated, truncated)
    agent.act(obs)  # t = 5: the last three steps agree, the three before differ
    same = torch.allclose(agent.state.logits[0], agent.state.logits[1], atol=1e-5)
    assert same == (context_steps is not None or trained_steps is not None)
    with pytest.raises(ValueError, match="context_steps"):
        Agent(model, tok, "gato", context_steps=2)


@pytest.mark.parametrize("mode", ["dt", "tt"])
def test_a_retired_env_leaves_the_batch_and_the_others_play_on_unchanged(model, tok, mode):
    """``retire`` drops an env's row from the engine and the mode (DT's returns-to-go, TT's plans): the rows kept
    are fed and act as they would have, the retired env gets random actions, and the batch the model runs shrinks.
    Pendulum: every env's rewards differ, so a row given another's returns-to-go or plan shows."""
    spec = TaskSpec.from_env(_envs("Pendulum-v1", 1), name="Pendulum-v1", expert_return=-150.0,
                             random_return=-1200.0)
    tok.add_task_spec(spec)
    # TT follows one plan for 3 steps (plans at 0, 3, ..., 18): retire at 19 and 20, mid-plan, after the caches have
    # grown (an index_select into a recycled inference-mode buffer failed outside inference mode)
    tt = TTConfig(beam_width=3, horizon=3, plan_freq=3)
    played, fed = [], []
    for retire in (False, True):
        envs = _envs("Pendulum-v1", 3)
        agent = Agent(model, tok, mode, tt_config=tt if mode == "tt" else None, seed=0)
        spy = ChunkSpy(agent.mode)
        agent.reset(spec, num_envs=3)
        obs, _ = envs.reset(seed=0)
        actions = []
        for t in range(21):
            if retire and t in (19, 20):  # env 1, then env 2 (the second select reuses the first's buffers)
                agent.retire([t - 18])
                assert agent.state.batch_size == 21 - t
            actions.append(np.asarray(agent.act(obs)))
            obs, rewards, terminated, truncated, _ = envs.step(actions[-1])
            agent.observe(rewards, terminated, truncated)
        played.append(np.stack(actions))  # (21 steps, 3 envs, 1)
        fed.append([[c["input_ids"].tolist() for c in chunks] for chunks in spy.chunks])
    assert np.array_equal(played[0][:, 0], played[1][:, 0])  # env 0 as if no env had been retired
    assert np.array_equal(played[0][:20, 2], played[1][:20, 2])  # env 2 too, until it is retired
    assert not np.array_equal(played[0][:, 0], played[0][:, 2])  # (the rows do differ)
    # DT: each row kept is fed its own R_t
    assert [[fed[0][19][0], fed[0][19][2]], [fed[0][20][0]]] == fed[1][19:]
    with pytest.raises(ValueError, match="environment 3 is not one of the 3"):
        agent.retire([3])
    # a retired env's random actions come from the agent's seed: the same again after every reset
    random_actions = []
    for _ in range(2):
        agent.reset(spec, num_envs=3)
        agent.retire([0, 1, 2])
        random_actions.append(np.stack([agent.act(obs) for _ in range(3)]))
    assert np.array_equal(*random_actions) and len(np.unique(random_actions[0])) == 9
