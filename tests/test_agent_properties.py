"""Property-based tests (hypothesis) through the Agent, what users run: random space combinations.

For any supported observation and action space, any number of environments, Gato or DT mode and a
window short enough to slide: ``act`` returns actions the vector env's action space contains,
``observe`` takes finite rewards and episode ends, and the only errors are the documented ones
(``TokenizationError`` for a value the space does not allow; here, NaN in a float observation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector.utils import batch_space
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from generalist import Agent, GeneralistConfig, GeneralistForCausalLM, TaskSpec, TokenizationError
from tests.conftest import TINY_LLAMA, with_task_spec
from tests.test_tokenizer_properties import leaf_spaces, obs_spaces


@pytest.fixture(scope="module")
def context_model(tok):
    torch.manual_seed(0)
    return GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA,
                                                  context_length=128)).eval()


def _with_nan(observations, rng):
    """The batch with one float element set to NaN, or None when it has no float array."""
    leaves = []

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, tuple) and not (x and isinstance(x[0], str)):
            return tuple(walk(v) for v in x)
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
            x = x.copy()
            leaves.append(x)
        return x

    out = walk(observations)
    if not leaves:
        return None
    leaf = leaves[int(rng.integers(len(leaves)))]
    leaf.reshape(-1)[int(rng.integers(leaf.size))] = np.nan
    return out


# derandomize: the same 1,000 cases every run, so that CI cannot fail on a case no earlier run drew; add a
# case that one did find as an @example (the one below: a window that keeps no whole 61-token step, no prompt)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@example(obs_space=spaces.Tuple((spaces.Box(-np.inf, np.inf, (4, 4), np.float32),
                                 spaces.Box(-np.inf, np.inf, (4, 4), np.float32),
                                 spaces.Tuple((spaces.Box(-np.inf, np.inf, (3, 4), np.float32),
                                               spaces.Box(0.0, 1.0, (4, 4), np.float64))))),
         act_space=spaces.MultiBinary(1), num_envs=1, mode="gato", steps=2, seed=0, break_one=False)
@given(obs_space=obs_spaces, act_space=leaf_spaces, num_envs=st.integers(1, 3), mode=st.sampled_from(["gato", "dt"]),
       steps=st.integers(1, 8), seed=st.integers(0, 2**16), break_one=st.booleans())
def test_random_spaces_through_the_agent(tok, context_model, obs_space, act_space, num_envs, mode, steps, seed,
                                         break_one):
    spec = TaskSpec.from_spaces("random", obs_space, act_space, expert_return=1.0, random_return=0.0)
    local = with_task_spec(tok, spec)
    obs_batch, act_batch = batch_space(obs_space, num_envs), batch_space(act_space, num_envs)
    obs_batch.seed(seed)
    rng = np.random.default_rng(seed)
    agent = Agent(context_model, local, mode, seed=seed)
    agent.reset(spec, num_envs=num_envs)
    for t in range(steps):
        observations = obs_batch.sample()
        broken = _with_nan(observations, rng) if break_one and t == steps - 1 else None
        if broken is not None:  # the one documented failure: a value the tokenizer cannot take
            event("a NaN observation")
            with pytest.raises(TokenizationError):
                agent.act(broken)
            return
        actions = agent.act(observations)
        assert act_batch.contains(actions), (actions, act_batch)
        ends = rng.random(num_envs) < 0.3
        agent.observe(rng.normal(size=num_envs), ends & (rng.random(num_envs) < 0.5), ends)
    event(f"window slid: {agent.refills > 0}")
