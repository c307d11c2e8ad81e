"""The Trajectory Transformer's static-shape decoder (generalist.static_beams) plans what the engine plans."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
import torch
from gymnasium import spaces

from generalist import Agent, GeneralistConfig, GeneralistForCausalLM, TaskSpec, static_beams
from generalist.engine import Engine
from generalist.modes import TTConfig, tt_plan
from generalist.modes.control import step_prompts
from generalist.tokenizer import concat_samples
from tests.conftest import TINY_GPT2, TINY_LLAMA


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)).eval()


@pytest.fixture(scope="module")
def spec(tok):
    spec = TaskSpec.from_spaces("tt-static", spaces.Box(-1, 1, (3,), np.float32), spaces.Box(-1, 1, (2,), np.float32))
    tok.add_task_spec(spec)
    return spec


def _contexts(tok, spec) -> list[dict]:
    """Three environments at different points: 8 steps played, 2 played, none (rows of different lengths, so
    left padding and positions that differ per row)."""
    rng = np.random.default_rng(0)

    def played(n: int) -> dict:
        now = step_prompts(tok, spec, {"observation": rng.uniform(-1, 1, (1, 3))})[0]
        if not n:
            return now
        past = tok.encode_episode(spec, {"observation": rng.uniform(-1, 1, (n, 3))},
                                  {"action": rng.uniform(-1, 1, (n, 2))}, rng.uniform(0, 1, n),
                                  condition_on_return=False, end=False)
        return concat_samples([past, now])

    return [played(8), played(2), played(0)]


def _plans(model, tok, spec, contexts, forget=(), compile=False, **config):
    out = {}
    for decoder in ("engine", "static"):
        engine = Engine(model, seed=0)
        state = engine.prefill(contexts)
        if forget:  # an episode restarted in these rows: their past is masked out, their positions restart
            engine.forget(state, forget)
            engine.feed(state, [step_prompts(tok, spec, {"observation": np.full((1, 3), 0.5)})[0]] * len(contexts))
        before = (state.length, state.logits.clone())
        out[decoder] = tt_plan(engine, state, tok, spec, TTConfig(decoder=decoder, beam_cache_dtype="float32",
                                                                  compile=compile and decoder == "static", **config))
        assert state.length == before[0] and torch.equal(state.logits, before[1])  # the engine's state unchanged
    return out["engine"], out["static"]


@pytest.mark.parametrize("config", [dict(), dict(k_act=1, cdf_act=None), dict(n_expand=3, context_steps=2)],
                         ids=["sampled", "greedy", "narrow-window"])
def test_the_static_decoder_plans_what_the_engine_plans(model, tok, spec, config):
    """Same beams, same draws from the same generator, same scores: the windows slide through the context
    and along the plan (context_steps < the steps played), rows differ in length, one row's past is forgotten."""
    for forget in ((), (0,)):
        engine, static = _plans(model, tok, spec, _contexts(tok, spec), forget=forget,
                                **{"beam_width": 3, "horizon": 4, "context_steps": 3} | config)
        assert np.array_equal(engine.plan_ids, static.plan_ids)
        assert np.array_equal(engine.observation_ids, static.observation_ids)
        np.testing.assert_allclose(static.scores, engine.scores, rtol=1e-5, atol=1e-6)
        # values are read in float32, sums over 1,024 bins: the two decoders' logits (equal to rounding) agree to ~1e-6
        np.testing.assert_allclose(static.values, engine.values, rtol=1e-5, atol=1e-5)


def test_the_static_decoder_plans_what_the_engine_plans_with_grouped_query_attention(tok, spec):
    """Four query heads reading two key/value heads (the ring keeps the two): the same plan as the engine's."""
    torch.manual_seed(1)
    text = TINY_LLAMA | {"num_attention_heads": 4, "num_key_value_heads": 2}
    gqa = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=text)).eval()
    engine, static = _plans(gqa, tok, spec, _contexts(tok, spec), beam_width=3, horizon=4, context_steps=3)
    assert np.array_equal(engine.plan_ids, static.plan_ids)
    assert np.array_equal(engine.observation_ids, static.observation_ids)
    np.testing.assert_allclose(static.scores, engine.scores, rtol=1e-5, atol=1e-6)


def test_a_forward_computes_the_logits_of_the_next_tokens_ids_only(model, tok, spec):
    """``feed(..., next_allowed=(a, b))``: the logits of ids a..b-1 alone, the same values as those columns of the
    whole range's; ids outside the decoder's range are refused by name."""
    vocab = (tok.layout.continuous_offset, tok.eos_id + 1)
    logits = {}
    for allowed in (None, (vocab[0] + 10, vocab[0] + 30)):
        engine = Engine(model, seed=0)
        state = engine.prefill(_contexts(tok, spec))
        beams = static_beams.StaticBeams(engine, state, 2, window=state.length + 4, shared=state.length, wide=2,
                                         columns=4, vocab_range=vocab)
        out = beams.feed(beams.state, torch.full((6,), vocab[0] + 5), allowed)
        logits[allowed] = (out.logits, out.logits_offset)
    (whole, lo), (part, offset) = logits[None], logits[(vocab[0] + 10, vocab[0] + 30)]
    assert lo == vocab[0] and offset == vocab[0] + 10 and part.shape == (6, 20)
    torch.testing.assert_close(part, whole[:, 10:30], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside the vocab_range"):
        beams.feed(beams.state, torch.full((6,), vocab[0] + 5), (0, 5))


@pytest.mark.parametrize("distinct", [False, True])
def test_the_agent_acts_the_same_on_either_decoder(model, tok, distinct):
    """Through the Agent in a real vector env whose episodes end at different steps (CartPole played by a random
    model): rows restart, the window re-prefills, and every action matches (with ``distinct_actions`` too, whose
    children's first tokens are drawn apart from the decoder's feeds)."""
    import gymnasium as gym

    actions = {}
    for decoder in ("engine", "static"):
        envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 3)
        spec = TaskSpec.from_env(envs, name="CartPole-v1", expert_return=500.0, random_return=20.0)
        tok.add_task_spec(spec)
        config = TTConfig(beam_width=4, horizon=3, decoder=decoder, distinct_actions=distinct)
        agent = Agent(model, tok, "tt", tt_config=config, context_length=160)
        agent.reset(spec, num_envs=3)
        obs, _ = envs.reset(seed=0)
        taken, finished = [], 0
        for _ in range(30):
            taken.append(agent.act(obs))
            obs, rewards, terminated, truncated, _ = envs.step(taken[-1])
            agent.observe(rewards, terminated, truncated)
            finished += int((terminated | truncated).sum())
        actions[decoder] = np.stack(taken)
        assert finished > 0  # some rows restarted mid-run
    assert np.array_equal(actions["engine"], actions["static"])


def test_the_planner_falls_back_to_the_engine_where_the_static_decoder_cannot_go(tok, spec):
    """A GPT-2 backbone: ``auto`` plans on the engine; asking for the static decoder names why it cannot."""
    gpt2 = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_GPT2)).eval()
    engine = Engine(gpt2, seed=0)
    state = engine.prefill(_contexts(tok, spec))
    plan = tt_plan(engine, state, tok, spec, TTConfig(beam_width=2, horizon=2))
    assert plan.plan_ids.shape == (3, 2, 2)
    with pytest.raises(ValueError, match="gpt2"):
        tt_plan(engine, state, tok, spec, TTConfig(beam_width=2, horizon=2, decoder="static"))


@pytest.mark.slow
def test_the_compiled_static_decoder_plans_the_same(model, tok, spec, tmp_path, monkeypatch):
    """``TTConfig(compile=True)``: the five forwards compiled ahead of time (AOTInductor, ~50 s on 2 cores): children
    fed an action token whose next is an action's / the reward's bins, children fed the reward (next: the value's),
    beams fed one token (next: an observation's), beams fed two (next: an action's);
    the same plan as the engine's; compiling must work here (a failure would fall back to eager with a warning).
    Then, as in a new process, the programs come from the disk cache: nothing compiles again."""
    monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path))
    monkeypatch.setattr(static_beams, "_programs", {})
    run = dict(compile=True, beam_width=3, horizon=3, context_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        engine, static = _plans(model, tok, spec, _contexts(tok, spec), **run)
    assert np.array_equal(engine.plan_ids, static.plan_ids)
    np.testing.assert_allclose(static.scores, engine.scores, rtol=1e-4, atol=1e-5)
    packages = sorted((tmp_path / "aoti").glob("*.pt2"))
    assert len(packages) == 5
    for path in packages:  # as if last used a day ago
        os.utime(path, (time.time() - 86400,) * 2)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(static_beams, "_programs", {})
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiling)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, again = _plans(model, tok, spec, _contexts(tok, spec), **run)
    assert np.array_equal(again.plan_ids, static.plan_ids)
    assert all(time.time() - path.stat().st_mtime < 600 for path in packages)  # loading marked each one used

    # the cache bounded to nothing but the newest package: the programs loaded go on planning without their files
    assert len(static_beams.prune_cache(max_bytes=0)) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, third = _plans(model, tok, spec, _contexts(tok, spec), **run)
    assert np.array_equal(third.plan_ids, static.plan_ids)


def test_the_compiled_forwards_cache_keeps_the_most_recently_used_within_its_bound(tmp_path, monkeypatch):
    """``prune_cache``: packages by last use, newest first, kept while their sizes fit the bound (the newest always);
    a partial package (a compile that died) goes once old; other files stay."""
    monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path))
    folder, now = tmp_path / "aoti", time.time()
    folder.mkdir()

    def write(name: str, size: int, age_s: float):
        path = folder / name
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age_s,) * 2)
        return path

    packages = [write(f"beam_forward-{i:032x}.pt2", 1000, age_s=100 * i) for i in range(5)]  # [0]: newest
    dead = write(f"beam_forward-{9:032x}-1234.pt2", 10, age_s=7200)
    busy = write(f"beam_forward-{8:032x}-1235.pt2", 10, age_s=5)
    other = write("notes.txt", 10**6, age_s=10**6)
    assert static_beams.prune_cache(max_bytes=10**6) == [dead]
    assert sorted(static_beams.prune_cache(max_bytes=2500)) == sorted(packages[2:])
    assert [p.exists() for p in packages] == [True, True, False, False, False] and busy.exists() and other.exists()
    monkeypatch.setenv("GENERALIST_AOTI_CACHE_MB", "0")
    assert static_beams.prune_cache() == [packages[1]]
    assert packages[0].exists()
    monkeypatch.setenv("GENERALIST_AOTI_CACHE_MB", "half a gig")
    with pytest.raises(ValueError, match="GENERALIST_AOTI_CACHE_MB must be a number of megabytes, got 'half a gig'"):
        static_beams.prune_cache()


def test_where_compiling_fails_the_static_decoder_warns_and_plans_eagerly(model, tok, spec, tmp_path, monkeypatch):
    """No C++ compiler, an export torch cannot do...: one warning that says why, then the same plan, eagerly."""
    def failing(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setenv("GENERALIST_CACHE", str(tmp_path))
    monkeypatch.setattr(static_beams, "_programs", {})
    monkeypatch.setattr(static_beams, "_failed", set())
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", failing)
    with pytest.warns(RuntimeWarning, match=r"compiling the forward failed \(RuntimeError: no C\+\+ compiler here\)"):
        engine, static = _plans(model, tok, spec, _contexts(tok, spec), compile=True, beam_width=3, horizon=2)
    assert np.array_equal(engine.plan_ids, static.plan_ids)
    assert not list(tmp_path.rglob("*.pt2"))
