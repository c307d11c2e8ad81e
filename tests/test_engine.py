"""Engine: cached decoding against a plain forward of the whole sequence and against the uncached
engine, rows (padding, forget, beams, shared prefix), snapshots, and the KV cache's contract with
transformers. Sampling functions are tested in ``test_sampling.py``."""

from __future__ import annotations

import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache

from generalist import kv_cache
from generalist.engine import Chunk, Engine
from generalist.kv_cache import AppendLayer, layer_contract_problems
from generalist.tokenizer import DEFAULT_TOKENIZER_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_llama_model):
    return tiny_llama_model


@pytest.fixture(scope="module")
def gpt2_model(tiny_gpt2_model):
    return tiny_gpt2_model


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


@pytest.mark.parametrize("huge_pages", [False, True])
def test_cached_and_uncached_decoding_give_identical_tokens(model, tok, huge_pages, monkeypatch):
    if huge_pages:  # every cache buffer from the huge-page mapping (kv_cache._empty), however small
        monkeypatch.setattr(kv_cache, "HUGE_PAGES_FROM", 0)
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


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_blind_is_the_token_by_token_loop_in_one_forward(model, tok, use_cache, temperature):
    """Tokens fed as ``feed_as`` whatever was sampled (the policy view): one forward gives the same tokens from the
    same draws, the same state afterwards, and the logits the loop leaves for the token after."""
    hidden = 7
    prompts = [tok.encode_text_sample("first row"), tok.encode_text_sample("a longer second row")]
    ranges = [(2100, 2300), (2150, 2200), (2048, 3072)]
    loop, blind = Engine(model, seed=3, use_cache=use_cache), Engine(model, seed=3, use_cache=use_cache)
    a, b = loop.prefill(prompts), blind.prefill(prompts)
    steps = [tok.encode_text_sample("one"), tok.encode_text_sample("two three")]
    forwards = []
    forward = blind._feed
    blind._feed = lambda *args, **kwargs: forwards.append(1) or forward(*args, **kwargs)
    loop.feed(a, steps, ranges[0])
    expected = loop.generate(a, ranges, temperature, feed_last=False, feed_as=hidden, median=[False, True, False])
    got = blind.generate_blind(b, steps, ranges, hidden, temperature, median=[False, True, False])
    assert len(forwards) == 1 and torch.equal(got, expected)
    assert b.length == a.length and torch.equal(b.attention_mask, a.attention_mask)
    assert b.logits_offset == 2048 and a.logits_offset == 2048
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    last = torch.tensor([[2100], [2101]])  # then both go on alike
    loop.feed(a, last)
    blind.feed(b, last)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("expand", ["repeat", "branch"])
@pytest.mark.parametrize("own_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
@pytest.mark.parametrize("ragged", [False, True])
def test_shared_prefix_equals_copied_rows(model, gpt2_model, tok, ragged, backbone, own_dtype, expand):
    """``share`` (context stored once per group) gives the logits of ``repeat`` (context copied),
    through expansion (copied, or ``branch``: each beam's tokens shared by its children until the
    next ``select``), selection and truncation, with one or two (left-padded) contexts; with the
    beams' own tokens cached in bfloat16, the same logits to bfloat16's precision."""
    texts = ["a shared context of some length", "short"] if ragged else ["a shared context of some length"] * 2
    samples = [tok.encode_text_sample(t) for t in texts]
    m = model if backbone == "llama" else gpt2_model
    a_eng, b_eng = Engine(m, seed=0), Engine(m, seed=0)
    a, b = a_eng.prefill(samples), b_eng.prefill(samples)
    length = a.length
    a_eng.repeat(a, 3)
    b_eng.share(b, 3, own_dtype)
    assert b.prefix is not None and b.batch_size == 6
    tol = 1e-4 if own_dtype is None else 3e-2
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        a_eng.repeat(a, 2)
        getattr(b_eng, expand)(b, 2)
        assert (b.branch is not None) == (expand == "branch" and step > 0)  # step 0: nothing to share yet
        ids = torch.randint(0, 2000, (12, 2), generator=gen)
        for chunk in (ids[:, :1], ids):  # one token, then two at once (causal among them)
            a_eng.feed(a, chunk)
            b_eng.feed(b, chunk, next_allowed=(0, tok.vocab_size))
            torch.testing.assert_close(b.logits, a.logits, atol=tol, rtol=tol)
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


# --- against a plain forward of the whole sequence ---------------------------------------------------


@torch.inference_mode()
def _plain_next_logits(model, sample, extra: list[int]) -> torch.Tensor:
    """Next-token logits (V,) of one ``model(input_ids)`` over the whole sequence: ``sample`` then
    the plain tokens ``extra``, no cache, no padding, default positions."""
    ids = torch.tensor([*sample["input_ids"].tolist(), *extra])[None]  # (1, T)
    local = torch.tensor([*sample["local_positions"].tolist(), *[0] * len(extra)])[None]  # (1, T)
    has_patches = len(sample["patches"]) > 0
    out = model(input_ids=ids, local_positions=local,
                patches=torch.from_numpy(sample["patches"]) if has_patches else None,
                patch_positions=torch.from_numpy(sample["patch_positions"]).long() if has_patches else None)
    return out.logits[0, -1].float()


def _assert_rows_match_plain_forward(model, state, samples, rows: list[tuple[int, list[int]]]) -> None:
    """Row r of ``state`` holds ``samples[rows[r][0]]`` followed by the tokens ``rows[r][1]``."""
    for r, (i, extra) in enumerate(rows):
        torch.testing.assert_close(state.logits[r], _plain_next_logits(model, samples[i], extra),
                                   atol=1e-4, rtol=1e-4, msg=lambda m, r=r: f"row {r}: {m}")


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_cached_decoding_matches_a_plain_forward(model, gpt2_model, tok, backbone):
    """Left-padded rows (one with an image), sampled tokens fed back, beams expanded and selected,
    two tokens fed at once: every row's next-token logits equal a plain forward of its sequence."""
    m = model if backbone == "llama" else gpt2_model
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    samples = [tok.encode_image_caption(image), tok.encode_text_sample("short"),
               tok.encode_text_sample("a somewhat longer text sample here")]
    engine = Engine(m, seed=0)
    state = engine.prefill(samples)  # (3, L) left-padded
    rows = [(i, []) for i in range(3)]
    _assert_rows_match_plain_forward(m, state, samples, rows)
    ids = engine.generate(state, [None] * 3, temperature=1.0)  # (3, 3), each fed back
    rows = [(i, extra + ids[r].tolist()) for r, (i, extra) in enumerate(rows)]
    _assert_rows_match_plain_forward(m, state, samples, rows)
    engine.repeat(state, 2)  # (6)
    ids = engine.generate(state, [(0, 500)] * 2, temperature=1.0)  # beams of a row now differ
    rows = [(rows[r // 2][0], rows[r // 2][1] + ids[r].tolist()) for r in range(6)]
    keep = [5, 0, 3, 3]
    engine.select(state, torch.tensor(keep))
    new = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]])
    engine.feed(state, new)
    rows = [(rows[k][0], rows[k][1] + new[r].tolist()) for r, k in enumerate(keep)]
    _assert_rows_match_plain_forward(m, state, samples, rows)


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_shared_prefix_decoding_matches_a_plain_forward(model, gpt2_model, tok, backbone):
    m = model if backbone == "llama" else gpt2_model
    samples = [tok.encode_text_sample("a shared context of some length"), tok.encode_text_sample("short")]
    engine = Engine(m, seed=0)
    state = engine.prefill(samples)
    engine.share(state, 3)  # (6), each context stored once
    assert state.prefix is not None
    rows = [(r // 3, []) for r in range(6)]
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2):  # one token, then two at once (causal among them)
        ids = torch.randint(0, 2000, (6, n), generator=gen)
        engine.feed(state, ids)
        rows = [(i, extra + ids[r].tolist()) for r, (i, extra) in enumerate(rows)]
        _assert_rows_match_plain_forward(m, state, samples, rows)
    keep = [2, 2, 0, 4, 3, 3]  # in-group
    engine.select(state, torch.tensor(keep))
    engine.feed(state, torch.tensor([[1], [2], [3], [4], [5], [6]]))
    rows = [(rows[k][0], rows[k][1] + [r + 1]) for r, k in enumerate(keep)]
    _assert_rows_match_plain_forward(m, state, samples, rows)


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_attend_from_is_one_sliding_window_in_every_path(model, gpt2_model, tok, backbone):
    """``attend_from`` (the TT planner's crop) gives the same logits whether the window is a mask
    (copied rows) or slices the shared levels and own keys off unread (share, branch), as it slides
    from the shared context into the beams' own tokens. The uncached engine recomputes the window
    alone (the reference planner's crop): there the tokens before it have no say at all, and those
    inside it do."""
    m = model if backbone == "llama" else gpt2_model
    samples = [tok.encode_text_sample("a shared context of some length"), tok.encode_text_sample("short")]
    engines = {"copied": Engine(m, seed=0, shared_prefix=False), "shared": Engine(m, seed=0)}
    states = {name: eng.prefill(samples) for name, eng in engines.items()}
    base = states["shared"].length
    gen = torch.Generator().manual_seed(0)
    for step, start in enumerate((3, base - 2, base + 3, base + 7)):  # in the context, then in the beams' tokens
        for name, eng in engines.items():
            eng.share(states[name], 2) if step == 0 else eng.branch(states[name], 2)
            eng.attend_from(states[name], start)
        ids = torch.randint(0, 2000, (8 if step else 4, 3), generator=gen)
        for name, eng in engines.items():
            eng.feed(states[name], ids)
        assert states["shared"].prefix is not None and states["copied"].prefix is None
        torch.testing.assert_close(states["copied"].logits, states["shared"].logits, atol=1e-4, rtol=1e-4)
        keep = torch.tensor([1, 2, 4, 7]) if step else torch.arange(4)  # 2 survivors per context, in-group
        for name, eng in engines.items():
            eng.select(states[name], keep)
    # recomputed over a window of the last 2 positions: what came before has no say; over 4, it has
    eng = Engine(m, seed=0, use_cache=False)
    for window, same in ((2, True), (4, False)):
        b = eng.new_state(2)
        eng.feed(b, torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 9, 10]]))  # the last two tokens alike
        eng.attend_from(b, b.length - window)
        eng.feed(b, torch.tensor([[7, 8], [7, 8]]))
        assert torch.allclose(b.logits[0], b.logits[1], atol=1e-5) == same, window
    with pytest.raises(ValueError, match="attend_from"):
        eng.attend_from(b, -1)
    eng.attend_from(b, b.length + 2)  # a window that begins in the tokens the next feed appends
    with pytest.raises(ValueError, match="attend_from"):
        eng.feed(b, torch.tensor([[7, 8], [7, 8]]))  # ... but this one would hold none of them
    eng.feed(b, torch.tensor([[7, 8, 9], [1, 2, 9]]))  # the window holds the last one alone: the rows agree
    assert torch.allclose(b.logits[0], b.logits[1], atol=1e-5)
    with pytest.raises(ValueError, match="attend_from"):  # shared levels: only positions already cached
        engines["shared"].attend_from(states["shared"], states["shared"].length + 1)


def test_select_stores_each_survivors_window_as_one_block(model, tok):
    """After a branch, ``select`` gathers each survivor's keys from the window's start on into one
    contiguous block (what makes the planner's attention fast); the positions left out can never be
    attended again (a window before them is refused), and restoring a snapshot from before the
    branch brings the state back whole."""
    eng = Engine(model, seed=0)
    state = eng.prefill(tok.encode_text_sample("a shared context of some length"))
    base, logits = state.length, state.logits.clone()
    snap = eng.snapshot(state)
    eng.share(state, 2)
    eng.feed(state, torch.tensor([[5, 6, 7], [8, 9, 10]]))
    for _ in range(2):
        eng.branch(state, 2)
        eng.feed(state, torch.randint(0, 2000, (4, 2)))
        eng.attend_from(state, state.length - 4)
        eng.select(state, torch.tensor([0, 3]))
    level = state.branch
    assert level.start == state.length - 4 - base and level.length == state.length - base
    assert all(layer.keys.is_contiguous() and layer.keys.shape[2] == 4 for layer in level.cache.layers)
    with pytest.raises(ValueError, match="hold no keys"):
        eng.attend_from(state, state.length - 6)
    eng.restore(snap)
    assert state.length == base and state.prefix is None and state.discarded is None
    torch.testing.assert_close(state.logits, logits)
    eng.attend_from(state, 2)  # the context is whole


def test_restore_to_before_a_shared_prefix(model, tok):
    """A snapshot taken before tokens that beams later shared comes back whole: the beams' branch is dropped,
    their rows selected, and the cut goes into the shared prefix (one cache per row again)."""
    eng = Engine(model, seed=0)
    state = eng.prefill(tok.encode_text_sample("a shared context of some length"))
    base, logits = state.length, state.logits.clone()
    snap = eng.snapshot(state)
    eng.feed(state, torch.tensor([[5, 6]]))
    eng.share(state, 4)
    eng.feed(state, torch.randint(0, 2000, (4, 2)))
    eng.branch(state, 2)
    eng.feed(state, torch.randint(0, 2000, (8, 1)))
    eng.restore(snap)
    assert state.length == base and state.prefix is None and state.branch is None and state.batch_size == 1
    torch.testing.assert_close(state.logits, logits)
    fresh = eng.prefill(tok.encode_text_sample("a shared context of some length"))
    eng.feed(state, torch.tensor([[5, 6]]))
    eng.feed(fresh, torch.tensor([[5, 6]]))
    torch.testing.assert_close(state.logits, fresh.logits)


def test_keys_left_out_by_select_are_never_read(model, tok):
    """What ``select`` leaves out behind the window is never read: the logits equal those of the same
    calls with the window moved after ``select`` (nothing left out) after a truncation that keeps the
    window, and after restoring a snapshot taken before (whose keys ``select`` keeps); a truncation
    that would end the window over them is refused; a shared prefix of one row truncates within its
    rows' tokens."""
    def run(slide_first: bool, finish, snapshot: bool) -> torch.Tensor:
        eng = Engine(model, seed=0)
        state = eng.prefill(tok.encode_text_sample("a shared context of some length"))
        eng.share(state, 2)
        eng.feed(state, torch.tensor([[5, 6, 7], [8, 9, 10]]))
        snap = eng.snapshot(state) if snapshot else None
        eng.branch(state, 2)
        eng.feed(state, torch.tensor([[11, 12], [13, 14], [15, 16], [17, 18]]))
        if slide_first:
            eng.attend_from(state, state.length - 2)
        eng.select(state, torch.tensor([0, 3]))
        if not slide_first:
            eng.attend_from(state, state.length - 2)
        assert (state.discarded is not None) == (slide_first and not snapshot)
        finish(eng, state, snap)
        eng.feed(state, torch.tensor([[20], [21]]))
        return state.logits

    for finish, snapshot in ((lambda eng, state, snap: eng.truncate(state, state.length - 1), False),
                             (lambda eng, state, snap: eng.restore(snap), True)):
        torch.testing.assert_close(run(True, finish, snapshot), run(False, finish, snapshot))
    with pytest.raises(ValueError, match="hold no keys"):  # the window would end over keys that are gone
        run(True, lambda eng, state, snap: eng.truncate(state, state.length - 2), False)
    eng = Engine(model, seed=0)
    state = eng.prefill(tok.encode_text_sample("a shared context of some length"))
    eng.share(state, 2)
    eng.feed(state, torch.tensor([[5, 6], [8, 9]]))
    eng.select(state, torch.tensor([0]))
    eng.truncate(state, state.length - 1)
    assert state.prefix is not None and state.batch_size == 1


OPT_IN_SCRIPT = """
import torch
from transformers import AttentionInterface

import generalist.engine, generalist.modes, generalist.agent  # everything the package has
from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer
from generalist.engine import SHARED_PREFIX_ATTENTION, Engine

assert SHARED_PREFIX_ATTENTION not in AttentionInterface(), "registered at import"
tok = GeneralistTokenizer.from_pretrained({tokenizer!r})
torch.manual_seed(0)
tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=tiny))
text = model.config.text_config
ids = torch.tensor([[5, 6, 7, 8]])
with torch.inference_mode():
    before = model(input_ids=ids).logits
engine = Engine(model)
state = engine.prefill(tok.encode_text_sample("a context"), num_rows=2)
engine.generate(state, [None] * 2)
engine.repeat(state, 2)
assert text._attn_implementation == "sdpa" and SHARED_PREFIX_ATTENTION not in AttentionInterface()
copied = Engine(model, shared_prefix=False).prefill(tok.encode_text_sample("a context"))
Engine(model, shared_prefix=False).share(copied, 2)
assert copied.prefix is None and text._attn_implementation == "sdpa", "opted out, yet switched"
engine.share(state, 2)
assert state.prefix is not None and text._attn_implementation == SHARED_PREFIX_ATTENTION
with torch.inference_mode():
    after = model(input_ids=ids).logits
assert torch.equal(before, after), "without a prefix the shared-prefix attention must be sdpa"
print("ok")
"""


def test_shared_prefix_attention_is_opt_in():
    """Nothing registered at import; only an engine's first ``share`` switches the model, once, and
    the model then computes exactly what it did (a fresh interpreter: other tests switch models)."""
    script = OPT_IN_SCRIPT.format(tokenizer=str(DEFAULT_TOKENIZER_DIR))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# --- snapshots --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_snapshot_restore_returns_to_the_same_logits(model, tok, use_cache):
    """A TT-like look-ahead (share, expand, sample, prune, feed) then ``restore``: the same rows,
    length and next-token logits as before, again and again; decoding then goes on as if nothing
    had been imagined."""
    engine = Engine(model, seed=0, use_cache=use_cache)
    samples = [tok.encode_text_sample("a context of some length"), tok.encode_text_sample("short")]
    state = engine.prefill(samples)
    before, length = state.logits.clone(), state.length
    snap = engine.snapshot(state)
    for _ in range(2):
        engine.share(state, 3)  # (6); copied rows without a cache
        engine.repeat(state, 2)  # (12)
        engine.generate(state, [(0, 500)] * 2, temperature=1.0, cdf=0.5)
        engine.select(state, torch.tensor([1, 0, 4, 6, 9, 11]))  # 3 per context, in-group
        engine.feed(state, torch.randint(0, 500, (6, 2)))
        assert engine.restore(snap) is state
        assert state.batch_size == 2 and state.length == length and state.prefix is None
        assert torch.equal(state.logits, before)
    engine.feed(state, torch.tensor([[7], [8]]))
    fresh = engine.prefill(samples)
    engine.feed(fresh, torch.tensor([[7], [8]]))
    torch.testing.assert_close(state.logits, fresh.logits, atol=1e-4, rtol=1e-4)


def test_snapshots_nest_and_become_invalid(model, tok):
    engine = Engine(model, seed=0)
    state = engine.prefill([tok.encode_text_sample("one context"), tok.encode_text_sample("another one")])
    engine.share(state, 2)  # (4) rows, two per shared context
    outer, outer_logits = engine.snapshot(state), state.logits.clone()
    engine.feed(state, torch.tensor([[3], [4], [5], [6]]))
    inner, inner_logits = engine.snapshot(state), state.logits.clone()
    engine.repeat(state, 2)  # (8)
    engine.feed(state, torch.randint(0, 500, (8, 1)))
    engine.select(state, torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]))
    engine.restore(inner)
    assert state.batch_size == 4 and torch.equal(state.logits, inner_logits)
    engine.feed(state, torch.tensor([[3], [4], [5], [6]]))
    engine.restore(outer)
    assert state.batch_size == 4 and state.prefix.group == 2 and torch.equal(state.logits, outer_logits)
    with pytest.raises(ValueError, match="no longer valid"):
        engine.restore(inner)  # an earlier snapshot was restored
    state = engine.prefill([tok.encode_text_sample("one context"), tok.encode_text_sample("another one")])
    length = state.length
    engine.feed(state, torch.tensor([[3], [4]]))
    snap = engine.snapshot(state)
    engine.select(state, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        engine.restore(snap)  # row 1 has no descendant left
    engine.truncate(state, length)
    with pytest.raises(ValueError, match="no longer valid"):
        engine.restore(snap)


def test_sample_and_generate_take_the_cdf_filter(model, tok):
    """``cdf`` reaches the sampler: probabilities [0.5, 0.3, 0.1, 0.1] at cdf 0.6 leave one token
    (nucleus top_p 0.6 would leave two)."""
    engine = Engine(model, seed=0)
    state = engine.prefill(tok.encode_text_sample("x"), num_rows=64)
    state.logits = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log().expand(64, -1).clone()
    assert set(engine.sample(state, (0, 4), 1.0, top_p=0.6).tolist()) == {0, 1}
    assert set(engine.sample(state, (0, 4), 1.0, cdf=0.6).tolist()) == {0}
    assert set(engine.generate(state, [(0, 4)], 1.0, cdf=0.6, feed_last=False).flatten().tolist()) == {0}
    # rows in runs of equal logits (a beam's children): filtered once a run, drawn once a row
    assert set(engine.sample(state, (0, 4), 1.0, top_p=0.6, runs=4).tolist()) == {0, 1}
    with pytest.raises(ValueError, match="runs=5 must divide the 64 rows"):
        engine.sample(state, (0, 4), 1.0, runs=5)


# --- the KV cache and transformers --------------------------------------------------------------------


def test_append_layer_still_fits_the_transformers_cache_layer_interface():
    problems = layer_contract_problems()
    assert not problems, (
        f"generalist/kv_cache.py::AppendLayer implements transformers' cache-layer interface by hand (written "
        f"against 5.24); transformers {transformers.__version__} changed it:\n" + "\n".join(problems))


@pytest.mark.parametrize("huge_pages", [False, True])
def test_append_layer_behaves_like_dynamic_layer(huge_pages, monkeypatch):
    """The same public ``Cache`` calls on an AppendLayer cache and on transformers' DynamicCache
    give the same keys and values: growth past the headroom, repeat, reorder, crop, select, reset;
    also with every buffer in huge-page-advised mappings (CPU storage of 4 MiB or more)."""
    if huge_pages:
        monkeypatch.setattr(kv_cache, "HUGE_PAGES_FROM", 0)
    g = torch.Generator().manual_seed(0)
    ours, theirs = Cache(layers=[AppendLayer(), AppendLayer()]), DynamicCache()
    version = transformers.__version__

    def update(b: int, n: int) -> None:
        for i in range(2):
            k, v = torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)  # (B, H_kv, n, D)
            for a, t in zip(ours.update(k, v, i), theirs.update(k, v, i), strict=True):
                assert torch.equal(a, t), f"AppendLayer.update differs from DynamicLayer's (transformers {version})"

    def same(after: str) -> None:
        assert ours.get_seq_length() == theirs.get_seq_length(), after
        assert ours.get_mask_sizes(3, 0) == theirs.get_mask_sizes(3, 0), after
        for a, t in zip(ours.layers, theirs.layers, strict=True):
            assert torch.equal(a.keys, t.keys) and torch.equal(a.values, t.values), (
                f"AppendLayer differs from DynamicLayer after {after} (transformers {version})")

    update(2, 5)
    same("update")
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):  # the mapping's path ran: storage aligned to a huge page
        assert all(layer._k.data_ptr() % kv_cache.HUGE_PAGE == 0 for layer in ours.layers)
    update(2, 70)
    same("an update past the headroom")
    for cache in (ours, theirs):
        cache.batch_repeat_interleave(3)
    same("batch_repeat_interleave")
    for cache in (ours, theirs):
        cache.reorder_cache(torch.tensor([5, 0, 0, 3]))
    same("reorder_cache")
    for cache in (ours, theirs):
        cache.crop(-7)
    same("crop")
    update(4, 1)
    same("an update after crop")
    for cache in (ours, theirs):
        cache.batch_select_indices(torch.tensor([2, 1]))
    same("batch_select_indices")
    for cache in (ours, theirs):
        cache.reset()
    assert ours.get_seq_length() == theirs.get_seq_length() == 0


@pytest.mark.parametrize("use_cache", [True, False])
def test_decoding_forwards_never_use_cudnn_attention(model, tok, use_cache):
    """cuDNN attention builds a graph per key length, which decoding changes at every call: on an H200 it was 86 % of
    a bfloat16 decision. Every forward the engine runs must exclude it (the flag is global, so it is read inside the
    model's forward, where SDPA would choose), and the setting must not leak out to training afterwards."""
    seen, before = [], torch.backends.cuda.cudnn_sdp_enabled()
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        _drive(Engine(model, seed=0, use_cache=use_cache), tok)
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # restored after each feed
