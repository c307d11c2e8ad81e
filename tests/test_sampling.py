"""Sampling: constraints, the filters (cdf against the reference planner's semantics), seeding."""

from __future__ import annotations

import math

import pytest
import torch

from generalist.sampling import (
    constrain,
    filter_cdf,
    filter_top_k,
    filter_top_p,
    sample_distinct,
    sample_next_token,
)


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])  # (1, V)


def _kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(~torch.isneginf(logits[0])).flatten().tolist()


def _draws(logits: torch.Tensor, n: int = 300, **kwargs) -> set[int]:
    g = torch.Generator().manual_seed(0)
    return {int(sample_next_token(logits, g, 1.0, **kwargs)) for _ in range(n)}


def reference_cdf_removed(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """The reference planner's ``filter_cdf`` written out step by step, one row at a time:
    ascending probabilities, cumulative sum, the cut is the largest probability still below the
    threshold (the first one when none is), and probabilities <= cut go. -> (B, V) bool."""
    probs = logits.float().softmax(-1)
    removed = torch.zeros_like(probs, dtype=torch.bool)
    for row in range(len(probs)):
        ascending = probs[row].sort().values
        cumulative = ascending.cumsum(0)
        below = [i for i in range(len(ascending)) if cumulative[i] < threshold]
        cut = ascending[below[-1] if below else 0]
        removed[row] = probs[row] <= cut
    return removed


def test_cdf_drops_the_lowest_mass_unlike_nucleus():
    """probs [0.5, 0.3, 0.1, 0.1], threshold 0.6: ascending cumsum 0.1, 0.2, 0.5, 1.0; the last
    below 0.6 is 0.3's, so 0.3 and both 0.1 go. Nucleus top_p=0.6 would keep 0.3 as well."""
    logits = _logits(0.5, 0.3, 0.1, 0.1)
    assert _kept(filter_cdf(logits, 0.6)) == [0]
    assert _kept(filter_top_p(logits, 0.6)) == [0, 1]
    assert _draws(logits, cdf=0.6) == {0}


def test_cdf_matches_the_reference_semantics_on_random_logits():
    g = torch.Generator().manual_seed(0)
    for v in (2, 7, 50, 1024):  # 1024: a TT value token's bins, sharply peaked (x6)
        logits = torch.randn(64, v, generator=g) * (2 if v < 1024 else 6)
        logits[:16] = logits[:16].round()  # ties at the cut
        for threshold in (0.0, 0.05, 0.3, 0.6, 0.9, 0.99):
            expected = reference_cdf_removed(logits, threshold)
            out = filter_cdf(logits, threshold)
            partial = ~expected.all(-1)  # rows where something survives
            assert torch.equal(torch.isneginf(out)[partial], expected[partial]), (v, threshold)
            assert torch.equal(out[~partial], torch.zeros_like(out[~partial]))  # all tied with the cut: uniform


def test_cdf_edge_cases():
    # every token tied with the cut: the reference's row turns uniform (all -1000), so does ours
    uniform = _logits(0.25, 0.25, 0.25, 0.25)
    assert _kept(filter_cdf(uniform, 0.6)) == [0, 1, 2, 3]
    assert _draws(uniform, cdf=0.6) == {0, 1, 2, 3}
    # nothing below the threshold: the cut is the smallest probability, which goes
    assert _kept(filter_cdf(_logits(0.5, 0.3, 0.2), 0.0)) == [0, 1]
    # disallowed ids (-inf) are not tokens: the smallest *allowed* probability is the cut
    masked = torch.cat([torch.full((1, 2), float("-inf")), _logits(0.5, 0.3, 0.2)], 1)
    assert _kept(filter_cdf(masked, 0.0)) == [2, 3]
    assert _kept(filter_cdf(masked, 0.6)) == [2]
    with pytest.raises(ValueError, match="cdf"):
        filter_cdf(uniform, 1.0)


def test_cdf_by_density_is_the_reference_filter_on_equal_bins_and_keeps_the_centre_of_mu_law_bins(tok):
    """Equal widths: the same filter. Mu-law bins (an action's [-1, 1]): a prediction centred on 0 (a normal of
    sd 0.3 in value) keeps the central bins by density; ranked by per-bin probability the wide outer bins win and
    the centre goes, which pushes a planner's actions to the extremes."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 300, generator=g) * 3
    for threshold in (0.0, 0.3, 0.6, 0.9):
        assert torch.equal(filter_cdf(logits, threshold, torch.full((300,), 0.7)), filter_cdf(logits, threshold))
    from generalist.modes.control import bin_log_widths, continuous_values

    (lo, hi), centres = continuous_values(tok)
    log_width = bin_log_widths(tok)[lo:hi]
    inside = centres.abs() <= 1.0  # the bins of a [-1, 1] action
    x, w = centres[inside], log_width[inside].exp().double()
    logits = (torch.log(w) - 0.5 * (x / 0.3) ** 2)[None].float()  # (1, bins): probability = density x width
    by_density, by_bin = (filter_cdf(logits, 0.6, lw) for lw in (log_width[inside], None))
    kept = lambda filtered: x[~torch.isneginf(filtered[0])].abs()  # noqa: E731
    assert kept(by_density).max() < 0.35 and kept(by_density).min() == x.abs().min()  # one central interval
    assert kept(by_bin).min() > 0.1  # per-bin probability: the centre is dropped
    p = logits.softmax(-1)[0]
    assert p[~torch.isneginf(by_density[0])].sum() > 0.39  # about 1 - cdf of the mass (± pairs tie at the cut)


def test_cdf_runs_before_top_k_as_in_the_reference():
    """probs [0.4, 0.3, 0.2, 0.1], cdf 0.35, top_k 2. Reference order (cdf on the full
    distribution, then top-k): the cut is 0.2, so 0.4 and 0.3 stay. The other order would
    renormalise to [4/7, 3/7] first, find no cumulative mass below 0.35 and drop 3/7 too."""
    logits = _logits(0.4, 0.3, 0.2, 0.1)
    assert _draws(logits, cdf=0.35, top_k=2) == {0, 1}
    assert _kept(filter_cdf(filter_top_k(logits, 2), 0.35)) == [0]


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
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(logits, g, temperature=1.0, top_k=0)


def test_samples_follow_the_probabilities_and_never_a_disallowed_id():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log().expand(40_000, 4)  # one draw per row, 40,000 rows
    ids = sample_next_token(logits, torch.Generator().manual_seed(0), 1.0)
    freq = torch.bincount(ids, minlength=4) / len(ids)
    assert freq[3] == 0 and torch.allclose(freq, probs, atol=0.01), freq


def test_sampling_is_seeded():
    logits = torch.randn(8, 50)
    a = sample_next_token(logits, torch.Generator().manual_seed(3), 1.0, cdf=0.3, top_k=20)
    b = sample_next_token(logits, torch.Generator().manual_seed(3), 1.0, cdf=0.3, top_k=20)
    assert torch.equal(a, b)


def test_repeats_draw_what_the_repeated_rows_would():
    """``repeats``: the filters run once per row, and the draws are those of the rows repeated (the planner's
    first action token, sampled once per beam for its children)."""
    logits = torch.randn(8, 50)
    for kwargs in (dict(temperature=1.0, cdf=0.6, cdf_log_width=torch.rand(50).log()), dict(temperature=1.0, top_k=5),
                   dict(temperature=0.0)):
        a = sample_next_token(logits, torch.Generator().manual_seed(3), repeats=3, **kwargs)
        b = sample_next_token(logits.repeat_interleave(3, 0), torch.Generator().manual_seed(3), **kwargs)
        assert a.shape == (24,) and torch.equal(a, b)
    assert len(set(sample_next_token(torch.zeros(1, 50), torch.Generator(), 1.0, repeats=40).tolist())) > 1
    with pytest.raises(ValueError, match="repeats"):
        sample_next_token(logits, None, 1.0, repeats=0)


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


def test_greedy_continuous_value_is_the_median_not_the_most_probable_bin():
    """30 % of the mass on the end bin (a clipped extreme), 70 % spread over 10 central bins: the
    argmax is the extreme, the median a central bin (what greedy control decoding must pick)."""
    from generalist.sampling import median_index

    probs = torch.zeros(1, 100)
    probs[0, 45:55] = 0.07
    probs[0, 99] = 0.30
    logits = probs.log()
    assert int(logits.argmax(-1)) == 99
    assert int(median_index(logits)) == 52  # cumulative 0.07 * 8 = 0.56 >= 0.5 at bin 52


def test_sample_distinct_draws_without_replacement_in_proportion():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).expand(20_000, -1)  # id 3 never allowed
    ids = sample_distinct(logits, 2, g)  # (B, 2)
    assert (ids[:, 0] != ids[:, 1]).all() and (ids != 3).all()
    first = torch.bincount(ids[:, 0], minlength=4) / len(ids)
    assert torch.allclose(first, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.015), first
    # the second draw is from what is left: P(1 second) = 0.7·0.2/0.3 + 0.1·0.2/0.9
    assert abs(float((ids[:, 1] == 1).float().mean()) - (0.7 * 0.2 / 0.3 + 0.1 * 0.2 / 0.9)) < 0.015
    # fewer allowed ids than asked for: the first draw fills the rest
    only_one = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert sample_distinct(only_one, 3, g).tolist() == [[0, 0, 0]]
