"""Engine: sampling primitives, constraints, and cached == uncached decoding (greedy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generalist import GeneralistConfig, GeneralistForCausalLM
from generalist.engine import Chunk, Engine, constrain, sample_next_token
from tests.conftest import TINY_GPT2, TINY_LLAMA


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)).eval()


def test_sample_next_token_greedy_topk_topp():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 5.0]])
    assert sample_next_token(logits, g, temperature=0).tolist() == [1, 3]
    assert sample_next_token(logits, g, temperature=1.0, top_k=1).tolist() == [1, 3]
    assert sample_next_token(logits, g, temperature=1.0, top_p=1e-3).tolist() == [1, 3]
    draws = torch.stack([sample_next_token(logits, g, 1.0, top_k=2) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {0, 3}
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, g, temperature=-1)


def test_sampling_is_seeded():
    logits = torch.randn(8, 50)
    a = sample_next_token(logits, torch.Generator().manual_seed(3), 1.0)
    b = sample_next_token(logits, torch.Generator().manual_seed(3), 1.0)
    assert torch.equal(a, b)


def test_constrain_range_and_mask():
    logits = torch.randn(3, 10)
    sub, off = constrain(logits, (4, 7))
    assert sub.shape == (3, 3) and off == 4
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 9]] = True
    masked, off = constrain(logits, mask)
    assert off == 0 and set(masked.argmax(-1).tolist()) <= {2, 9}
    with pytest.raises(ValueError, match="range"):
        constrain(logits, (5, 20))
    with pytest.raises(ValueError, match="no token"):
        constrain(logits, torch.zeros(10, dtype=torch.bool))


def _drive(engine: Engine, tok) -> list[list[int]]:
    """A scripted session touching every engine path: ragged prefill with images, feeds, forget,
    repeat/select (beams), truncate, generate and generate_until."""
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    samples = [tok.encode_image_caption(image), tok.encode_text_sample("short"),
               tok.encode_text_sample("a somewhat longer text sample here")]
    state = engine.prefill(samples)
    out = [engine.generate(state, [(0, 500)] * 4).flatten().tolist()]
    engine.forget(state, [1])
    engine.feed(state, [tok.encode_text_sample("x"), tok.encode_text_sample("yy zz"), tok.encode_text_sample("w")])
    engine.repeat(state, 2)
    engine.select(state, torch.tensor([5, 0, 2, 2]))
    length = state.length
    out.append(engine.generate(state, [None] * 3).flatten().tolist())
    engine.truncate(state, length)
    engine.feed(state, torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]]))
    out += engine.generate_until(state, stop_id=tok.eos_id, max_new_tokens=6, allowed=(0, tok.layout.text_size + 1))
    return out


def test_cached_and_uncached_decoding_give_identical_tokens(model, tok):
    cached = _drive(Engine(model, seed=0, use_cache=True), tok)
    uncached = _drive(Engine(model, seed=0, use_cache=False), tok)
    assert cached == uncached


def test_left_padded_rows_match_rows_decoded_alone(model, tok):
    engine = Engine(model)
    a, b = tok.encode_text_sample("one two three four five"), tok.encode_text_sample("six")
    together = engine.prefill([a, b])
    alone = [engine.prefill([s]) for s in (a, b)]
    torch.testing.assert_close(together.logits[0], alone[0].logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together.logits[1], alone[1].logits[0], atol=1e-4, rtol=1e-4)


def test_batch1_prefill_is_copied_to_rows(model, tok):
    engine = Engine(model)
    state = engine.prefill(tok.encode_text_sample("shared prompt"), num_rows=5)
    assert state.batch_size == 5 and state.cache.get_seq_length() == state.length
    assert torch.allclose(state.logits, state.logits[:1].expand(5, -1))


def test_forget_restarts_a_row(model, tok):
    engine = Engine(model)
    state = engine.prefill([tok.encode_text_sample("old context"), tok.encode_text_sample("other")])
    engine.forget(state, [0])
    engine.feed(state, Chunk.from_ids(torch.tensor([[7], [8]])))
    fresh = engine.prefill([{**tok.encode_text_sample(""), "input_ids": np.array([7]),
                             "modality_ids": np.array([2]), "local_positions": np.array([0])}])
    torch.testing.assert_close(state.logits[0], fresh.logits[0], atol=1e-4, rtol=1e-4)


def test_constrain_on_logits_of_an_id_range():
    logits = torch.randn(3, 10)  # ids 20..29
    sub, off = constrain(logits, (22, 25), offset=20)
    assert torch.equal(sub, logits[:, 2:5]) and off == 22
    assert constrain(logits, None, offset=20) == (logits, 20)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[[21, 27]] = True
    masked, off = constrain(logits, mask, offset=20)
    assert off == 20 and set(masked.argmax(-1).tolist()) <= {1, 7}
    with pytest.raises(ValueError, match="computed logits"):
        constrain(logits, (15, 25), offset=20)
    mask[3] = True
    with pytest.raises(ValueError, match="outside the computed"):
        constrain(logits, mask, offset=20)


@pytest.mark.parametrize("use_cache", [True, False])
def test_feed_next_allowed_computes_only_that_range(model, tok, use_cache):
    """``feed(next_allowed=(lo, hi))`` gives the sliced logits and the same tokens as full logits."""
    prompt = tok.encode_text_sample("a prompt")
    full, part = Engine(model, seed=0, use_cache=use_cache), Engine(model, seed=0, use_cache=use_cache)
    a, b = full.prefill(prompt, num_rows=3), part.prefill(prompt, num_rows=3)
    ranges = [(2100, 2300), (10, 900), (2048, 3072)]
    ids = torch.tensor([[5], [6], [7]])
    full.feed(a, ids)
    part.feed(b, ids, next_allowed=ranges[0])
    assert b.logits.shape == (3, 200) and b.logits_offset == 2100
    torch.testing.assert_close(b.logits, a.logits[:, 2100:2300], rtol=1e-5, atol=1e-5)
    assert torch.equal(full.generate(a, ranges, 1.0), part.generate(b, ranges, 1.0))


@pytest.fixture(scope="module")
def gpt2_model(tok):
    torch.manual_seed(0)
    return GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_GPT2)).eval()


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
@pytest.mark.parametrize("ragged", [False, True])
def test_shared_prefix_equals_copied_rows(model, gpt2_model, tok, ragged, backbone):
    """``share`` (context stored once per group) gives the logits of ``repeat`` (context copied),
    through expansion, selection and truncation, with one or two (left-padded) contexts."""
    texts = ["a shared context of some length", "short"] if ragged else ["a shared context of some length"] * 2
    samples = [tok.encode_text_sample(t) for t in texts]
    m = model if backbone == "llama" else gpt2_model
    a_eng, b_eng = Engine(m, seed=0), Engine(m, seed=0)
    a, b = a_eng.prefill(samples), b_eng.prefill(samples)
    length = a.length
    a_eng.repeat(a, 3)
    b_eng.share(b, 3)
    assert b.prefix is not None and b.batch_size == 6
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a_eng.repeat(a, 2)
        b_eng.repeat(b, 2)
        ids = torch.randint(0, 2000, (12, 2), generator=gen)
        for chunk in (ids[:, :1], ids):  # one token, then two at once (causal among them)
            a_eng.feed(a, chunk)
            b_eng.feed(b, chunk, next_allowed=(0, tok.vocab_size))
            torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        rows = torch.tensor([1, 0, 0, 5, 4, 4, 6, 6, 9, 9, 11, 10])[::2]  # keep 3 per context, in-group
        a_eng.select(a, rows)
        b_eng.select(b, rows)
    with pytest.raises(ValueError, match="group"):
        b_eng.select(b, torch.tensor([3, 0, 1, 2, 4, 5]))
    b_eng.select(b, torch.tensor([0, 3]))
    a_eng.select(a, torch.tensor([0, 3]))
    b_eng.truncate(b, length)
    a_eng.truncate(a, length)
    assert b.prefix is None and b.length == a.length == length
    for eng, st in ((a_eng, a), (b_eng, b)):
        eng.feed(st, torch.tensor([[7], [8]]))
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
