"""GeneralistTokenizer: value round trips, id ranges, episode layout, batching, errors, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gymnasium import spaces
from PIL import Image

from generalist import GeneralistTokenizer, Modality, TaskSpec, TokenizationError, UnsupportedSpaceError
from tests.conftest import BINS, SPACES, M, random_episode, reference_bin_edges_in_x


def test_continuous_round_trip_within_one_bin(tok):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, s, 20_000) for s in (0.01, 1, 30, 200)] + [np.linspace(-M, M, 5001)])
    x = x[np.abs(x) <= M]  # beyond +-M the value saturates (tested below)
    ids = tok.encode_continuous(x)
    k = ids - tok.layout.continuous_offset
    lo, hi = reference_bin_edges_in_x(k)
    # the value lies in its bin, and decodes to a point of the same bin
    assert np.all((x >= lo - 1e-9) & (x <= hi + 1e-9))
    err = np.abs(tok.decode_continuous(ids).astype(np.float64) - x)
    assert np.all(err <= (hi - lo) * (1 + 1e-5) + 1e-6)


def test_continuous_saturation_and_edges(tok):
    off = tok.layout.continuous_offset
    ids = tok.encode_continuous(np.array([M, 1e9, np.inf, -M, -np.inf, 0.0]))
    assert list(ids[:5]) == [off + BINS - 1] * 3 + [off] * 2  # +1 after companding -> last bin, never past
    assert ids[5] in (off + BINS // 2 - 1, off + BINS // 2)


def test_continuous_nan_is_an_error_naming_the_field(tok):
    with pytest.raises(TokenizationError, match="observation.*NaN"):
        tok.encode_continuous(np.array([0.0, np.nan]), field="observation")


def test_discrete_round_trip_and_out_of_space(tok):
    x = np.arange(1024)
    assert np.array_equal(tok.decode_discrete(tok.encode_discrete(x)), x)
    with pytest.raises(TokenizationError, match="1024"):
        tok.encode_discrete(np.array([1024]))
    with pytest.raises(TokenizationError, match="action.*5"):
        tok.encode_discrete(np.array([1, 5]), field="action", n=[3, 3])


def test_id_ranges_disjoint_and_cover_vocabulary(tok):
    ranges = tok.layout.ranges
    covered = sorted(i for r in ranges.values() for i in r)
    assert covered == list(range(tok.vocab_size))
    assert len(ranges["continuous"]) == 1024 and len(ranges["discrete"]) == 1024
    assert len(ranges["text"]) == tok.text_tokenizer.get_vocab_size()


@pytest.mark.parametrize("name", list(SPACES))
def test_episode_round_trip_over_spaces(tok, name):
    obs_space, act_space = SPACES[name]
    spec = TaskSpec.from_spaces(name, obs_space, act_space)
    ep = random_episode(spec, obs_space, act_space, steps=5)
    sample = tok.encode_episode(spec, **{k: v for k, v in ep.items() if k != "task"})
    ids, mod = sample["input_ids"], sample["modality_ids"]
    r = tok.layout.ranges
    # every token sits in the range its modality allows
    for m, allowed in [(Modality.ACTION, ("continuous", "discrete")), (Modality.REWARD, ("continuous",)),
                       (Modality.RETURN, ("continuous",))]:
        assert all(any(i in r[k] for k in allowed) for i in ids[mod == m])
    assert np.all(ids[mod == Modality.IMAGE] == tok.image_id)
    assert len(sample["patches"]) == int((mod == Modality.IMAGE).sum())
    # actions decode back: exact for discrete, within a bin for continuous
    per_step = np.flatnonzero(mod == Modality.ACTION).reshape(5, spec.action_size)
    for t in range(5):
        decoded = spec.flatten_action(tok.decode_action(spec, ids[per_step[t]]))
        for f in spec.action_fields:
            want = np.asarray(ep["actions"][f.name][t], np.float64)
            got = np.asarray(decoded[f.name], np.float64)
            if f.kind == "discrete":
                assert np.array_equal(got, want)
            else:
                k = tok.encode_continuous(want) - tok.layout.continuous_offset
                lo, hi = reference_bin_edges_in_x(k)
                assert np.all(np.abs(got - want) <= (hi - lo) + 1e-6)
        assert spec.action_space().contains(tok.decode_action(spec, ids[per_step[t]]))


def test_hand_checked_episode_layout(tok):
    """Two steps of a 2-d observation, Discrete(3) action: every id, modality and local position."""
    spec = TaskSpec.from_spaces("toy", spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(3), return_scale=0.5)
    obs = np.array([[0.0, 1.0], [0.5, -1.0]], np.float32)
    sample = tok.encode_episode(spec, {"observation": obs}, {"action": np.array([2, 0])}, np.array([1.0, 3.0]))
    c, d = tok.encode_continuous, tok.layout.discrete_offset
    r0, r1 = c(np.array([4.0 * 0.5, 3.0 * 0.5]))  # returns-to-go 4, 3 scaled by 0.5
    expected = [tok.bos_id,
                r0, *c(obs[0]), tok.sep_id, d + 2, c(np.array([1.0]))[0],
                r1, *c(obs[1]), tok.sep_id, d + 0, c(np.array([3.0]))[0],
                tok.eos_id]
    assert sample["input_ids"].tolist() == [int(i) for i in expected]
    S, R, O, A, W = Modality.SPECIAL, Modality.RETURN, Modality.OBSERVATION, Modality.ACTION, Modality.REWARD  # noqa: E741
    assert sample["modality_ids"].tolist() == [S, R, O, O, S, A, W, R, O, O, S, A, W, S]
    assert sample["local_positions"].tolist() == [0, 0, 1, 2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0]
    unconditioned = tok.encode_episode(spec, {"observation": obs}, {"action": np.array([2, 0])}, np.array([1, 3.0]),
                                       condition_on_return=False)
    assert sample["labels"].tolist() == sample["input_ids"].tolist()  # conditioned: every label is its input
    # unconditioned: R_t is <no_return> as input, and its label is the *discounted* value V_t (never an input)
    assert unconditioned["input_ids"][[1, 7]].tolist() == [tok.no_return_id] * 2
    assert unconditioned["modality_ids"][[1, 7]].tolist() == [Modality.VALUE] * 2
    v0, v1 = c(np.array([(1.0 + 0.99 * 3.0) * 0.5, 3.0 * 0.5]))  # γ = 0.99 (the spec's default), scale 0.5
    assert unconditioned["labels"][[1, 7]].tolist() == [v0, v1]
    others = np.ones(14, bool)
    others[[1, 7]] = False
    assert (unconditioned["labels"][others] == unconditioned["input_ids"][others]).all()
    # <eos> after a terminated episode is a target ("no future"); after a truncated one only a separator
    ended = tok.encode_episode(spec, {"observation": obs}, {"action": np.array([2, 0])}, np.array([1, 3.0]),
                               condition_on_return=False, terminated=True)
    assert ended["modality_ids"][-1] == Modality.VALUE and unconditioned["modality_ids"][-1] == S


def test_mixed_batch_padding_and_masks(tok):
    spec = TaskSpec.from_spaces("toy", spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(3))
    tok.add_task_spec(spec)
    ep = {"task": "toy", "observations": {"observation": np.zeros((3, 2))}, "actions": {"action": [0, 1, 2]},
          "rewards": [0, 0, 1]}
    image = Image.new("RGB", (100, 37), (255, 0, 0))
    batch = tok([ep, "print('hello')", {"image": image, "caption": "a red bar"}])
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] == 1 + 3 * 6 + 1
    for i, n in enumerate(lengths):
        assert (batch["input_ids"][i, n:] == tok.pad_id).all()
        assert (batch["labels"][i, n:] == -100).all()
        assert (batch["modality_ids"][i, n:] == Modality.PAD).all()
    assert batch["patches"].shape == (tok.patches_per_image, 3 * 16 * 16)
    assert (batch["input_ids"] == tok.image_id).sum() == tok.patches_per_image
    assert (batch["modality_ids"][2] == Modality.CAPTION).sum() == len(tok.encode_text("a red bar")) + 1


@pytest.mark.parametrize("mode,size", [("RGB", (64, 64)), ("L", (17, 90)), ("RGBA", (200, 50)), ("P", (33, 33))])
def test_images_of_any_size_and_mode(tok, mode, size):
    patches = tok.encode_image(Image.new(mode, size))
    assert patches.shape == (tok.patches_per_image, 768) and patches.dtype == np.float32
    white = tok.encode_image(np.full((64, 64, 3), 255, np.uint8))
    assert np.allclose(white, 1 / 4) and np.allclose(tok.encode_image(np.zeros((64, 64, 3), np.uint8)), -1 / 4)


def test_bad_images_are_clear_errors(tok):
    with pytest.raises(TokenizationError, match="uint8"):
        tok.encode_image(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(TokenizationError, match="shape"):
        tok.encode_image(np.zeros((64, 64, 2), np.uint8))


def test_text_round_trip_including_unseen_characters(tok):
    for text in ["def f(x):\n    return x + 1", "émoji 🤖 and 中文", ""]:
        assert tok.decode_text(tok.encode_text(text)) == text
    assert all(0 <= i < tok.layout.text_size for i in tok.encode_text("any string ✓"))


def test_bad_episode_inputs_name_the_problem(tok):
    spec = TaskSpec.from_spaces("toy", spaces.Box(-1, 1, (2,), np.float32), spaces.Box(-1, 1, (1,), np.float32))
    good = {"observations": {"observation": np.zeros((2, 2))}, "actions": {"action": np.zeros((2, 1))},
            "rewards": np.zeros(2)}
    with pytest.raises(TokenizationError, match="observation.*NaN"):
        tok.encode_episode(spec, **{**good, "observations": {"observation": np.array([[0, np.nan], [0, 0]])}})
    with pytest.raises(TokenizationError, match=r"action.*outside the Box bounds"):
        tok.encode_episode(spec, **{**good, "actions": {"action": np.array([[0.5], [3.0]])}})
    with pytest.raises(TokenizationError, match=r"observation: expected values of shape \(2, 2\)"):
        tok.encode_episode(spec, **{**good, "observations": {"observation": np.zeros((2, 3))}})
    with pytest.raises(TokenizationError, match="empty"):
        tok.encode_episode(spec, {"observation": np.zeros((0, 2))}, {"action": np.zeros((0, 1))}, np.zeros(0))
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        tok.encode_episode("nope", **good)


def test_unsupported_space_is_a_clear_error():
    with pytest.raises(UnsupportedSpaceError, match="Graph"):
        TaskSpec.from_spaces("g", spaces.Graph(spaces.Box(0, 1, (2,)), None), spaces.Discrete(2))
    with pytest.raises(UnsupportedSpaceError, match="2000 values"):
        TaskSpec.from_spaces("d", spaces.Box(0, 1, (2,)), spaces.Discrete(2000))


@pytest.mark.parametrize("name", list(SPACES))
def test_task_spec_json_round_trip_rebuilds_spaces(name):
    obs_space, act_space = SPACES[name]
    spec = TaskSpec.from_spaces(name, obs_space, act_space, return_scale=0.01, expert_return=500.0)
    again = TaskSpec.from_json(json.dumps(json.loads(spec.to_json())))
    assert again == spec
    assert again.action_space() == act_space
    rebuilt = again.observation_space()
    obs_space.seed(0)
    assert rebuilt.contains(obs_space.sample()) or isinstance(obs_space, spaces.Dict)


def test_save_load_round_trip(tok, tmp_path):
    spec = TaskSpec.from_spaces("pix", *SPACES["pixels-tuple"], reward_scale=0.1)
    tok2 = GeneralistTokenizer(tok.text_tokenizer, image_size=32, task_specs=[spec])
    tok2.save_pretrained(tmp_path)
    loaded = GeneralistTokenizer.from_pretrained(tmp_path)
    assert loaded.layout == tok2.layout and loaded.image_size == 32
    assert loaded.task_specs == {"pix": spec}
    ep = random_episode(spec, *SPACES["pixels-tuple"], steps=3)
    a, b = tok2.encode(ep), loaded.encode(ep)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_corrupted_tokenizer_files_name_the_file(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"image_size": 6')
    with pytest.raises(OSError, match="tokenizer_config.json"):
        GeneralistTokenizer.from_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    path = tmp_path / "text_tokenizer.json"
    path.write_text(path.read_text()[:1000])
    with pytest.raises(OSError, match="text_tokenizer.json"):
        GeneralistTokenizer.from_pretrained(tmp_path)


def test_set_returns_equals_encoding_the_steps_with_returns(tok):
    spec = TaskSpec.from_spaces("toy-returns", spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(3),
                                return_scale=0.5)
    obs = {"observation": np.array([[0.0, 1.0], [0.5, -1.0]], np.float32)}
    returns = np.array([4.0, -3.0])
    swapped = tok.set_returns(spec, tok.encode_steps(spec, obs), returns)
    direct = tok.encode_steps(spec, obs, returns_to_go=returns)
    for a, b in zip(swapped, direct, strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_the_default_tokenizer_is_what_its_recipe_builds():
    """``generalist/default_tokenizer`` is package data: ``tokenizers_cfg/build_default.py`` rebuilds it exactly."""
    from tokenizers_cfg.build_default import train_text_bpe

    shipped = GeneralistTokenizer.default().text_tokenizer
    assert train_text_bpe(shipped.get_vocab_size()).get_vocab() == shipped.get_vocab()

