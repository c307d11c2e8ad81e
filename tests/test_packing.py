"""Properties of the packed training stream (generalist.packing), on tiny in-memory data."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets_build import synthetic
from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer
from generalist.packing import (
    CaptionSource,
    ControlSource,
    Mixture,
    PackedStream,
    PackingConfig,
    TextSource,
)
from generalist.vocab import Modality
from tests.conftest import TINY_LLAMA


@pytest.fixture(scope="module")
def tok() -> GeneralistTokenizer:
    tok = GeneralistTokenizer.default()
    for spec in synthetic.task_specs().values():
        tok.add_task_spec(spec)
    return tok


@pytest.fixture(scope="module")
def sources():
    eps = synthetic.episodes(12)
    return [TextSource("text", synthetic.texts()), CaptionSource("captions", synthetic.captions()),
            ControlSource("control", eps, [e["task"] for e in eps])]


def mixture(tok, sources, weights=(1, 1, 2), **cfg) -> Mixture:
    return Mixture(sources, list(weights), tok, PackingConfig(**{"seq_len": 96, **cfg}))


@pytest.mark.parametrize("seq_len", [7, 96, 333])
def test_every_sequence_has_exactly_seq_len_tokens_and_one_patch_per_image_token(tok, sources, seq_len):
    mix = mixture(tok, sources, seq_len=seq_len)
    for i in range(60):
        sample, meta = mix.sequence(seed=0, rank=0, index=i)
        assert {len(sample[k]) for k in ("input_ids", "modality_ids", "local_positions")} == {seq_len}
        n_image = int((sample["input_ids"] == tok.image_id).sum())
        assert n_image == int((sample["modality_ids"] == Modality.IMAGE).sum())
        assert len(sample["patches"]) == len(sample["patch_positions"]) == n_image


def test_batches_feed_the_model_shapes(tok, sources):
    batch = mixture(tok, sources).batch(seed=0, rank=0, batch_index=0, batch_size=4)
    assert batch["input_ids"].shape == (4, 96) and bool(batch["attention_mask"].all())
    assert batch["patches"].shape[0] == int((batch["input_ids"] == tok.image_id).sum())


def test_sources_are_drawn_with_their_mixture_weights(tok, sources):
    weights = (1, 1, 2)
    mix = mixture(tok, sources, weights, seq_len=16)
    n = 1200
    counts = Counter(mix.sequence(seed=3, rank=0, index=i)[1]["source"] for i in range(n))
    for source, w in zip(sources, weights, strict=True):
        expected = w / sum(weights)
        assert abs(counts[source.name] / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n)


def test_task_weights_give_a_task_more_of_its_datasets_sequences(tok):
    eps = synthetic.episodes(24)
    tasks = [e["task"] for e in eps]
    control = ControlSource("control", eps, tasks)
    counts = Counter(tasks)
    assert len(counts) >= 2
    heavy = sorted(counts)[0]
    n = 1200
    for weights in (None, {heavy: 3.0}):
        mix = Mixture([control], [1.0], tok, PackingConfig(seq_len=16, imitation_threshold=None, task_weights=weights))
        drawn = Counter(mix.sequence(seed=1, rank=0, index=i)[1]["task"] for i in range(n))
        w = {t: (weights or {}).get(t, 1.0) * c for t, c in counts.items()}
        expected = w[heavy] / sum(w.values())
        assert abs(drawn[heavy] / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n), (weights, drawn)
    with pytest.raises(ValueError, match="task_weights"):
        PackingConfig(task_weights={heavy: 0.0})


def _first_steps(episode: dict, n: int) -> dict:
    cut = {key: {leaf: v[:n] for leaf, v in value.items()} for key, value in episode.items()
           if key in ("observations", "actions")}
    return {**episode, **cut, "rewards": episode["rewards"][:n]}


def test_sampling_by_steps_draws_episodes_in_proportion_to_their_length(tok):
    """DT and TT sample D4RL uniformly over steps: a replay buffer's long (good) episodes must not be drawn
    as rarely as its many short ones."""
    box = [e for e in synthetic.episodes(24) if e["task"] == "Box-v0"][:4]
    eps = [_first_steps(e, 4) for e in box[:2]] + box[2:]  # two 4-step episodes, two long ones
    lengths = [len(e["rewards"]) for e in eps]
    source = ControlSource("control", eps, [e["task"] for e in eps])
    n = 1000
    for sample_by, expected in (("episodes", 0.5), ("steps", 8 / sum(lengths))):
        cfg = PackingConfig(seq_len=16, imitation_threshold=None, sample_by=sample_by)
        for return_prob in (0.0, 1.0):  # imitation and return-conditioned sequences alike
            mix = Mixture([source], [1.0], tok, replace(cfg, return_prob=return_prob))
            short = np.mean([mix.sequence(seed=2, rank=0, index=i)[1]["episodes"][0] < 2 for i in range(n)])
            assert abs(short - expected) < 4 * np.sqrt(expected * (1 - expected) / n), (sample_by, short, expected)
    with pytest.raises(ValueError, match="sample_by"):
        PackingConfig(sample_by="transitions")
    with pytest.raises(ValueError, match="lengths"):
        ControlSource("control", eps, [e["task"] for e in eps], lengths=lengths[:3])


def test_a_dataset_on_disk_gives_each_episode_its_length_for_sampling_by_steps(data_root):
    from datasets_build.sources import load_sources

    train, held_out, _ = load_sources({"tiny_box": 1.0}, data_root)
    for source in (train[0], held_out[0]):
        assert list(source.lengths) == [len(e["rewards"]) for e in source.episodes]


def test_gato_prompts_come_from_the_same_task_and_source_half_from_the_episode_end(tok):
    eps = synthetic.episodes(24)
    sources = ["expert" if i % 4 < 2 else "random" for i in range(len(eps))]
    control = ControlSource("control", eps, [e["task"] for e in eps], sources=sources)
    mix = Mixture([control], [1.0], tok, PackingConfig(seq_len=200, return_prob=0.0, prompt_prob=1.0,
                                                         imitation_threshold=None))
    ends = 0
    for i in range(60):
        sample, meta = mix.sequence(seed=0, rank=0, index=i)
        j, live = meta["prompt_episode"], meta["episodes"][0]
        assert j is not None and j != live
        assert meta["prompt_task"] == meta["task"] == eps[j]["task"]
        assert sources[j] == sources[live]  # Gato §3.3: a prompt from the same source agent
        assert all(eps[k]["task"] == meta["task"] for k in meta["episodes"])
        assert not (sample["modality_ids"] == Modality.RETURN).any()  # Gato mode shows no return
        prompt = sample["input_ids"][: int(0.25 * 200)]
        ends += tok.eos_id in prompt  # the end of an episode closes with <eos>; a uniform window rarely does
    assert 15 <= ends <= 45, ends  # about half of the prompts are episode ends (Reed et al. 2022, §3.3)


def test_unconditioned_sequences_show_only_episodes_above_the_imitation_threshold(tok):
    eps = synthetic.episodes(24)
    spec = tok.get_task_spec("Box-v0")
    returns = [float(e["rewards"].sum()) for e in eps]
    tok.add_task_spec(type(spec)(**{**spec.__dict__, "expert_return": 40.0, "random_return": 0.0}))
    try:
        control = ControlSource("control", eps, [e["task"] for e in eps], returns=returns)
        mix = Mixture([control], [1.0], tok, PackingConfig(seq_len=300, return_prob=0.0, prompt_prob=0.5,
                                                             imitation_threshold=0.8))
        good = {i for i, e in enumerate(eps) if e["task"] == "Box-v0" and returns[i] >= 32.0}
        assert good and len(good) < sum(e["task"] == "Box-v0" for e in eps)
        for i in range(40):
            meta = mix.sequence(seed=1, rank=0, index=i)[1]
            if meta["task"] == "Box-v0":
                shown = set(meta["episodes"]) | ({meta["prompt_episode"]} - {None})
                assert shown <= good
        conditioned = Mixture([control], [1.0], tok, PackingConfig(seq_len=300, return_prob=1.0))
        seen = set()
        for i in range(60):
            meta = conditioned.sequence(seed=1, rank=0, index=i)[1]
            seen |= set(meta["episodes"])
        assert seen - good  # return-conditioned sequences still see the poor episodes
        # every episode labelled by the expert (DART): imitation learns from all of them, prompts stay good
        relabelled = ControlSource("control", eps, [e["task"] for e in eps], returns=returns, expert_labelled=True)
        for expert_labels, poor_shown in ((True, True), (False, False)):
            mix = Mixture([relabelled], [1.0], tok, PackingConfig(seq_len=300, return_prob=0.0, prompt_prob=0.5,
                                                                  imitation_threshold=0.8, expert_labels=expert_labels))
            live, prompts = set(), set()
            for i in range(60):
                meta = mix.sequence(seed=1, rank=0, index=i)[1]
                if meta["task"] == "Box-v0":
                    live |= set(meta["episodes"])
                    prompts |= {meta["prompt_episode"]} - {None}
            assert prompts and prompts <= good
            assert bool(live - good) == poor_shown
    finally:
        tok.add_task_spec(spec)


def test_expert_labels_teach_the_experts_action_where_the_noisy_one_was_executed(tok):
    """DART: an imitation sequence of an episode that records the expert's actions is *labelled* with them
    while its inputs stay the executed actions; a return-conditioned one keeps the executed labels."""
    eps = [e for e in synthetic.episodes(12) if e["task"] == "Box-v0"]
    for e in eps:  # the expert would have pushed the other way at every step
        e["expert_actions"] = {"action": -e["actions"]["action"]}
    control = ControlSource("control", eps, [e["task"] for e in eps])
    executed = {int(i) for e in eps for i in tok.encode_continuous(e["actions"]["action"].reshape(-1), "action")}
    expert = {int(i) for e in eps for i in tok.encode_continuous(-e["actions"]["action"].reshape(-1), "action")}
    for return_prob, labelled in ((0.0, expert), (1.0, executed)):
        mix = Mixture([control], [1.0], tok, PackingConfig(seq_len=200, return_prob=return_prob, prompt_prob=0.5,
                                                           imitation_threshold=None, expert_labels=True))
        for i in range(10):
            sample, _ = mix.sequence(seed=0, rank=0, index=i)
            act = sample["modality_ids"] == Modality.ACTION
            assert set(sample["input_ids"][act].tolist()) <= executed  # the model is shown what was done
            assert set(sample["labels"][act].tolist()) <= labelled
            assert (sample["labels"][act] != sample["input_ids"][act]).any() == (return_prob == 0.0)
    plain = Mixture([control], [1.0], tok, PackingConfig(seq_len=200, return_prob=0.0, imitation_threshold=None))
    sample, _ = plain.sequence(seed=0, rank=0, index=0)
    act = sample["modality_ids"] == Modality.ACTION
    assert act.any() and (sample["labels"][act] == sample["input_ids"][act]).all()  # off: the executed actions


def test_return_conditioning_is_shown_or_replaced_by_no_return(tok):
    eps = synthetic.episodes(6)
    control = ControlSource("control", eps, [e["task"] for e in eps])
    shown = Mixture([control], [1.0], tok, PackingConfig(seq_len=120, return_prob=1.0)).sequence(0, 0, 0)[0]
    hidden = Mixture([control], [1.0], tok, PackingConfig(seq_len=120, return_prob=0.0, prompt_prob=0.0)
                     ).sequence(0, 0, 0)[0]
    assert (shown["modality_ids"] == Modality.RETURN).any() and tok.no_return_id not in shown["input_ids"]
    assert not (hidden["modality_ids"] == Modality.RETURN).any() and tok.no_return_id in hidden["input_ids"]


def test_hidden_action_sequences_show_no_action_but_still_learn_every_one(tok, sources):
    """The policy view: in a share ``hidden_action_prob`` of control sequences every action *input* is
    ``<hidden_action>`` while its label is the real action; text, captions and other tokens are untouched,
    and a run without it keeps its exact data (no extra random draw)."""
    plain, hidden = mixture(tok, sources), mixture(tok, sources, hidden_action_prob=0.5)
    shown = []
    for i in range(120):
        a, meta_a = plain.sequence(seed=0, rank=0, index=i)
        b, meta_b = hidden.sequence(seed=0, rank=0, index=i)
        if meta_b.get("kind") != "control":
            assert np.array_equal(a["input_ids"], b["input_ids"])
            continue
        act = b["modality_ids"] == Modality.ACTION
        assert act.any() and np.array_equal(a["labels"], b["labels"])  # the same sequence, the same targets
        assert np.array_equal(a["input_ids"][~act], b["input_ids"][~act])
        if meta_b["hidden_actions"]:
            assert (b["input_ids"][act] == tok.hidden_action_id).all()
            assert (b["labels"][act] != tok.hidden_action_id).all()
        else:
            assert np.array_equal(a["input_ids"], b["input_ids"])
        assert tok.hidden_action_id not in a["input_ids"] and not meta_a["hidden_actions"]
        shown.append(meta_b["hidden_actions"])
    assert len(shown) > 30 and 0.3 < np.mean(shown) < 0.7


def test_long_text_is_cut_into_a_window_of_the_context(tok):
    long = " ".join(["robot moves left"] * 400)
    mix = Mixture([TextSource("long", [long])], [1.0], tok, PackingConfig(seq_len=64))
    starts = {int(mix.sequence(0, 0, i)[0]["input_ids"][0]) for i in range(20)}
    assert len(starts) > 1  # random windows, not always the beginning


def test_stream_is_deterministic_per_rank_and_independent_of_workers(tok, sources):
    mix = mixture(tok, sources)

    def batches(rank: int, start: int, workers: int, n: int = 4) -> list[torch.Tensor]:
        stream = PackedStream(mix, batch_size=2, seed=7, rank=rank, start_batch=start, num_batches=n)
        return [b["input_ids"] for b in DataLoader(stream, batch_size=None, num_workers=workers)]

    single, two_workers = batches(0, 0, 0), batches(0, 0, 2)
    assert all(torch.equal(a, b) for a, b in zip(single, two_workers, strict=True))
    resumed = batches(0, 2, 0, n=2)  # a stream resumed at batch 2 continues the same sequence
    assert all(torch.equal(a, b) for a, b in zip(single[2:], resumed, strict=True))
    other_rank = batches(1, 0, 0)
    assert not all(torch.equal(a, b) for a, b in zip(single, other_rank, strict=True))


def test_bad_settings_are_refused(tok, sources):
    with pytest.raises(ValueError, match="seq_len"):
        PackingConfig(seq_len=1)
    with pytest.raises(ValueError, match="return_prob"):
        PackingConfig(return_prob=1.5)
    with pytest.raises(ValueError, match="weights"):
        Mixture(sources, [0, 0, 0], tok, PackingConfig())


@pytest.mark.parametrize("k", [1, 3])
def test_return_conditioned_windows_are_documents_the_model_keeps_apart(tok, k):
    """``dt_window_steps=K`` (DT's K-step training windows; RvS at K = 1): a return-conditioned sequence is a run of
    windows, each starting at a step (its ``R``, or ``<bos>``) and holding at most K steps; the batch's position ids
    restart at each, no label asks a window to predict the one after it, and a model's logits in one window equal
    those of the window fed alone. Imitation sequences stay whole episodes."""
    eps = synthetic.episodes(8)
    control = ControlSource("control", eps, [e["task"] for e in eps])
    windows = Mixture([control], [1.0], tok, PackingConfig(seq_len=120, return_prob=1.0, dt_window_steps=k))
    batch = windows.batch(seed=0, rank=0, batch_index=0, batch_size=3)
    for row in range(3):
        documents = windows.sequence(seed=0, rank=0, index=row)[1]["documents"]
        starts = np.cumsum([0] + documents[:-1])
        assert len(documents) > 1 and sum(documents) == 120
        np.testing.assert_array_equal(batch["position_ids"][row].numpy(),
                                      np.concatenate([np.arange(n) for n in documents]))
        modality, ids = batch["modality_ids"][row].numpy(), batch["input_ids"][row].numpy()
        assert all(ids[s] == tok.bos_id or modality[s] == Modality.RETURN for s in starts)
        for s, n in zip(starts, documents, strict=True):
            assert (modality[s:s + n] == Modality.RETURN).sum() <= k
        assert (batch["labels"][row].numpy()[starts] == -100).all()
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)).eval()
    s, n = int(np.cumsum(documents)[0]), documents[1]  # the last row's second window
    with torch.no_grad():
        packed = model(**batch).logits[2, s:s + n]
        alone = model(**{key: batch[key][2:3, s:s + n] for key in ("input_ids", "modality_ids", "local_positions")},
                      patches=batch["patches"][:0], patch_positions=batch["patch_positions"][:0]).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    whole = Mixture([control], [1.0], tok, PackingConfig(seq_len=120, return_prob=0.0, dt_window_steps=k))
    assert "position_ids" not in whole.batch(seed=0, rank=0, batch_index=0, batch_size=3)
    with pytest.raises(ValueError, match="dt_window_steps"):
        PackingConfig(dt_window_steps=0)
