"""Property-based tests (hypothesis) over random spaces and values.

For any supported space and any value: encoding never raises anything but the documented
`TokenizationError` (NaN, out of space), every id lies in the range its modality declares, and
decoding returns the value within one bin (continuous) or exactly (discrete).
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generalist import Modality, TaskSpec, TokenizationError
from generalist.vocab import MU_LAW_M
from tests.conftest import random_episode, reference_bin_edges_in_x

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple)
bounds = st.floats(-1e4, 1e4, allow_nan=False)


@st.composite
def boxes(draw):
    shape = draw(shapes)
    if draw(st.booleans()):
        return spaces.Box(-np.inf, np.inf, shape, np.float32)
    lo = draw(bounds)
    return spaces.Box(lo, lo + draw(st.floats(1e-3, 1e4)), shape, np.float64)


leaf_spaces = st.one_of(
    boxes(),
    st.builds(spaces.Discrete, st.integers(1, 1024), start=st.integers(-10, 10)),
    st.builds(lambda nvec: spaces.MultiDiscrete(nvec), st.lists(st.integers(1, 1024), min_size=1, max_size=4)),
    st.builds(spaces.MultiBinary, st.integers(1, 6)),
    st.builds(lambda lo, n, shape: spaces.Box(lo, lo + n - 1, shape, np.int64),
              st.integers(-50, 50), st.integers(1, 1024), shapes),
)
obs_spaces = st.recursive(
    st.one_of(leaf_spaces, st.builds(spaces.Text, st.integers(1, 20))),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda xs: spaces.Tuple(tuple(xs))),
        st.dictionaries(st.sampled_from("abcde"), children, min_size=1, max_size=3).map(spaces.Dict)),
    max_leaves=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obs_space=obs_spaces, act_space=leaf_spaces, seed=st.integers(0, 2**16), steps=st.integers(1, 4))
def test_random_spaces_round_trip(tok, obs_space, act_space, seed, steps):
    spec = TaskSpec.from_spaces("random", obs_space, act_space)
    ep = random_episode(spec, obs_space, act_space, steps=steps, seed=seed)
    sample = tok.encode_episode(spec, **{k: v for k, v in ep.items() if k != "task"})
    ids, mod, r = sample["input_ids"], sample["modality_ids"], tok.layout.ranges
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    for m in (Modality.RETURN, Modality.REWARD):
        assert np.all((ids[mod == m] >= r["continuous"].start) & (ids[mod == m] < r["continuous"].stop))
    actions = ids[mod == Modality.ACTION].reshape(steps, spec.action_size)
    for t in range(steps):
        lo_hi = tok.action_token_ranges(spec)
        assert all(lo <= i < hi for i, (lo, hi) in zip(actions[t], lo_hi, strict=True)) or any(
            f.kind == "continuous" for f in spec.action_fields)
        decoded = tok.decode_action(spec, actions[t])
        assert spec.action_space().contains(decoded)
        want = np.asarray(ep["actions"]["action"][t], np.float64).reshape(-1)
        got = np.asarray(decoded, np.float64).reshape(-1)
        if spec.action_fields[0].kind == "discrete":
            assert np.array_equal(got, want)
        else:  # within one bin up to |x| = M; beyond, saturated at the end bin (clipped to the Box)
            inside = np.abs(want) <= MU_LAW_M
            k = tok.encode_continuous(want) - tok.layout.continuous_offset
            lo, hi = reference_bin_edges_in_x(k)
            assert np.all((np.abs(got - want) <= (hi - lo) * (1 + 1e-5) + 1e-6)[inside])
            saturated = np.sign(want) * tok.decode_continuous([tok.layout.ranges['continuous'].stop - 1])[0]
            fld = spec.action_fields[0]
            assert np.allclose(got[~inside], np.clip(saturated, fld.low, fld.high)[~inside], rtol=1e-5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=20))
def test_any_float_encodes_in_range_or_nan_error(tok, x):
    x = np.array(x)
    try:
        ids = tok.encode_continuous(x, field="f")
    except TokenizationError as e:
        assert np.isnan(x).any() and "f: NaN" in str(e)
        return
    r = tok.layout.ranges["continuous"]
    assert np.all((ids >= r.start) & (ids < r.stop))
    assert np.all(np.isfinite(tok.decode_continuous(ids)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=st.lists(st.integers(-2000, 2000), min_size=1, max_size=10), n=st.integers(1, 1024))
def test_any_integer_is_in_range_or_out_of_space_error(tok, x, n):
    x = np.array(x)
    try:
        ids = tok.encode_discrete(x, field="d", n=n)
    except TokenizationError as e:
        assert ((x < 0) | (x >= n)).any() and "d: value" in str(e)
        return
    assert np.array_equal(tok.decode_discrete(ids), x)
