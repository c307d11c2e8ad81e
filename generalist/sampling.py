"""Next-token sampling: allowed-id constraints, then temperature, cdf, top-k and top-p filters.

Standalone functions over logits ``(B, V)``, with no model, cache or mode in sight (after
karpathy/nanochat's ``sample_next_token``), so each is testable on a hand-written tensor and the
modes can call them on logits they post-process themselves (DT's expert-return tilt, TT's scores).

Order inside :func:`sample_next_token`, as in the Trajectory Transformer's planner
(``trajectory/search/sampling.py::sample``: cdf filter, then top-k) followed by the usual nucleus
filter: ``logits / temperature -> filter_cdf -> filter_top_k -> filter_top_p -> multinomial``.

Two filters look alike and are not:

* :func:`filter_top_p` (nucleus, Holtzman et al. 2020) *keeps* the smallest set of most likely
  tokens whose mass reaches ``p``: ``top_p=0.6`` keeps about 60 % of the mass.
* :func:`filter_cdf` (Janner et al. 2021) *drops* the least likely tokens whose ascending
  cumulative mass stays below ``threshold``: ``cdf=0.6`` drops about 60 % of the mass and keeps
  the top ~40 %, about twice as strict.
"""

from __future__ import annotations

import numpy as np
import torch

Allowed = tuple[int, int] | range | torch.Tensor | None
"""Which ids may be sampled: a half-open ``(lo, hi)`` range, a bool mask ``(V,)`` or ``(B, V)``, or all."""


def as_range(allowed: Allowed) -> tuple[int, int] | None:
    """``allowed`` as a half-open ``(lo, hi)`` id range, or ``None`` if it is a mask or everything."""
    if isinstance(allowed, range):
        return allowed.start, allowed.stop
    if isinstance(allowed, tuple):
        return int(allowed[0]), int(allowed[1])
    return None


def constrain(logits: torch.Tensor, allowed: Allowed, offset: int = 0) -> tuple[torch.Tensor, int]:
    """Restrict ``logits`` (B, V) to the allowed ids.

    ``logits[:, i]`` is the logit of id ``offset + i`` (logits computed for an id range only, see
    ``GeneralistForCausalLM.forward(vocab_range=...)``). Returns ``(sub_logits, offset)``: for a
    range, the sliced logits (B, hi - lo) and ``lo`` (token id = index + offset), which is cheaper
    than masking the whole vocabulary; for a mask (over the whole vocabulary), logits with the
    disallowed ids at -inf.
    """
    width = logits.shape[-1]
    if allowed is None:
        return logits, offset
    if (r := as_range(allowed)) is not None:
        lo, hi = r
        if not offset <= lo < hi <= offset + width:
            raise ValueError(f"allowed id range [{lo}, {hi}) is empty or outside the computed logits "
                             f"[{offset}, {offset + width})")
        return logits[..., lo - offset: hi - offset], lo
    if allowed.dtype != torch.bool or allowed.shape[-1] < offset + width:
        raise ValueError(f"allowed mask must be bool (..., {offset + width}), "
                         f"got {allowed.dtype} {tuple(allowed.shape)}")
    if offset or allowed.shape[-1] != width:
        if allowed[..., :offset].any() or allowed[..., offset + width:].any():
            raise ValueError(f"allowed mask allows ids outside the computed logits [{offset}, {offset + width})")
        allowed = allowed[..., offset: offset + width]
    if not allowed.any(-1).all():
        raise ValueError("allowed mask allows no token for some row")
    return logits.masked_fill(~allowed, float("-inf")), offset


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th kept too); the rest -> -inf."""
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)  # (B, V)
    drop_sorted = probs.cumsum(-1) - probs >= p  # the mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V) back in id order
    return logits.masked_fill(drop, float("-inf"))


def filter_cdf(logits: torch.Tensor, threshold: float, log_width: torch.Tensor | None = None) -> torch.Tensor:
    """The Trajectory Transformer's cdf filter: drop the least likely ``threshold`` of the mass.

    Same semantics as the reference planner's ``filter_cdf`` (jannerm/trajectory-transformer,
    ``trajectory/search/sampling.py``), per row:

    1. sort the probabilities ascending and take their cumulative sum;
    2. the cut is the largest sorted probability whose cumulative sum is still ``< threshold``
       (the smallest probability when none is);
    3. every token whose probability is ``<= cut`` is removed (ties with the cut included).

    E.g. probabilities ``[0.5, 0.3, 0.1, 0.1]``, ``threshold=0.6``: ascending cumulative sums
    ``0.1, 0.2, 0.5, 1.0``; the last one below 0.6 belongs to 0.3, so 0.3 and both 0.1 go and only
    the 0.5 token is left (nucleus ``top_p=0.6`` would keep 0.5 and 0.3).

    Differences from the reference, none of which changes which tokens may be drawn:

    * ids already at ``-inf`` (disallowed by :func:`constrain`, or by an earlier filter) are not
      tokens here: they neither count in step 2's "smallest probability" nor come back;
    * removed tokens get ``-inf``, not the reference's finite ``-1000``. When every token of a row
      is removed (all tied with the cut), the reference's row becomes all ``-1000``, i.e. uniform
      over its tokens; here it becomes uniform over the row's finite logits.

    ``log_width`` (V,): the log width of each token's bin on its value's axis. Tokens are then ranked by
    probability *density* (probability / width) instead of probability, and the mass dropped is still
    ``threshold`` of the probability. On bins of equal width (the reference's uniform discretiser)
    this is the same filter; on mu-law bins, ~100x wider at ±1 than at 0 over an action's [-1, 1],
    ranking by per-bin probability keeps the wide outer bins and drops the narrow central ones that
    hold the same mass, so the filtered actions are pushed to the extremes (held-out Hopper states,
    loco-hme-s0: mean |a| 0.61 filtered by probability, 0.49 by density, 0.50 in the data).
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"cdf threshold must be in [0, 1), got {threshold}")
    logits = logits.float()
    probs = logits.softmax(-1)  # (B, V)
    if log_width is None:  # rank by probability: the masses in rank order are the ranks themselves
        rank = probs  # (B, V)
        ascending = ranked = _ascending(probs)  # (B, V)
    else:  # rank by density
        rank = logits - log_width.to(logits.device, logits.dtype)  # (B, V)
        order = _argsort(rank)  # (B, V)
        ascending, ranked = probs.gather(-1, order), rank.gather(-1, order)  # masses and ranks, in rank order
    below = ascending.cumsum(-1) < threshold  # (B, V): True on a prefix (the sum never decreases)
    not_tokens = torch.isneginf(logits).sum(-1, keepdim=True)  # (B, 1) ids sorted first, with probability 0
    last = (below.sum(-1, keepdim=True) - 1).clamp_min(not_tokens).clamp_max(logits.shape[-1] - 1)  # (B, 1) the cut
    cut = ranked.gather(-1, last)  # (B, 1)
    removed = rank <= cut  # (B, V): the cut is a real token's, so every -inf logit (rank -inf or 0) goes too
    out = logits.masked_fill(removed, float("-inf"))
    emptied = removed.all(-1)  # (B,) every token tied with the cut: uniform over the row's tokens
    if bool(emptied.any()):
        uniform = torch.zeros_like(logits).masked_fill(torch.isneginf(logits), float("-inf"))
        out = torch.where(emptied[:, None], uniform, out)
    return out


def _ascending(probs: torch.Tensor) -> torch.Tensor:
    """Each row of ``probs`` (B, V) sorted ascending. On the CPU through numpy, whose vectorised sort
    (x86-simd-sort) took 0.1 ms where ``torch.sort`` took 5 ms for a TT action token's 256 x 466
    probabilities (2-core AVX-512 machine, 1 thread): the sort was 7 % of a plan."""
    if probs.device.type == "cpu":
        return torch.from_numpy(np.sort(probs.numpy(), -1))
    return probs.sort(-1).values


def _argsort(x: torch.Tensor) -> torch.Tensor:
    """Indices that sort each row of ``x`` (B, V) ascending (through numpy on the CPU, as :func:`_ascending`).

    Not stable: the cdf filter removes every token tied with the cut, so the order among ties changes nothing,
    and numpy's vectorised argsort took 1.6 ms where the stable one took 4.8 ms for 256 x 466 (AVX-512)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.numpy(), -1))
    return x.argsort(-1)


def median_index(logits: torch.Tensor) -> torch.Tensor:
    """The bin where the predicted distribution's cumulative probability reaches ½ -> (B,).

    The greedy reading of a *continuous* value whose ids are its bins in order. The argmax of
    per-bin probability is biased: mu-law bins are far wider at large magnitudes than near 0 (and
    clipping piles mass into the end bins), so a broad prediction's most probable *bin* sits at the
    extremes even when the values are centred. On Pendulum, argmax actions saturated at ±2 in 85 %
    of steps and played worse than random; the median saturated none (docs/token_layout.md). Since
    mu-law is monotonic, the median bin is the predicted median value, whatever the binning.

    In float32: a cumulative sum over ~1,000 bins is off by ~1e-7, which moves the median only where the
    distribution's mass up to a bin edge is within that of ½ (float64 took 4 % longer per TT plan, where every
    imagined observation value is one of these).
    """
    cum = logits.float().softmax(-1).cumsum(-1)  # (B, V)
    return (cum < 0.5).sum(-1).clamp(max=logits.shape[-1] - 1)


def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    cdf: float | None = None,
    cdf_log_width: torch.Tensor | None = None,
    repeats: int = 1,
) -> torch.Tensor:
    """Sample one token per row from logits (B, V) -> (B * repeats,) int64.

    ``temperature == 0`` is greedy (argmax). Otherwise the filters run in the reference planner's
    order: ``cdf`` (:func:`filter_cdf`, drops the least likely ``cdf`` of the mass), then ``top_k``
    (:func:`filter_top_k`), then ``top_p`` (:func:`filter_top_p`, nucleus); ``None`` skips one.
    ``cdf_log_width`` (V,): rank by density in the cdf filter (:func:`filter_cdf`'s ``log_width``).
    ``repeats``: each row's distribution is drawn from that many times, in a run (the same tokens, in the same
    order, as filtering ``logits.repeat_interleave(repeats, 0)``, at 1 / ``repeats`` of the filters' cost: the
    planner's first action token of a beam's children).
    Draws come from ``generator`` (seeded by the caller), so a run is reproducible.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1).repeat_interleave(repeats)
    logits = logits.float() / temperature  # (B, V)
    if cdf is not None:
        logits = filter_cdf(logits, cdf, cdf_log_width)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    return _draw(logits.softmax(-1).repeat_interleave(repeats, 0), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row drawn from probabilities (B, V) -> (B,), by inverting the cumulative sum.

    One uniform per row, where ``torch.multinomial`` draws V exponentials per row for one sample
    (3.5 ms per TT action token at 256 beams x 1,024 bins). A draw never lands on a zero-probability
    id: the search returns the first id whose cumulative sum exceeds the draw, and is capped at the
    row's last possible id against rounding at the top.
    """
    cum = probs.double().cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * cum[:, -1:]
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # (B,) last id with probability
    return torch.minimum(torch.searchsorted(cum, u, right=True).squeeze(-1), last)


def sample_distinct(logits: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` *different* ids per row drawn without replacement from ``softmax(logits)`` (B, V) -> (B, n).

    The Gumbel-top-k trick (Kool et al. 2019): the ``n`` largest ``logits + Gumbel noise`` are a
    sample without replacement, in the order drawn. A row with fewer than ``n`` allowed (finite) ids
    repeats its first draw in the places left over.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    logits = logits.float()
    uniform = torch.rand(logits.shape, generator=generator).clamp_(1e-20, 1.0)
    keys = logits - (-uniform.log()).log()  # (B, V) logits + Gumbel(0, 1)
    top = keys.topk(min(n, logits.shape[-1]), dim=-1)  # (B, n')
    ids = torch.where(torch.isneginf(top.values), top.indices[:, :1], top.indices)
    if ids.shape[1] < n:
        ids = torch.cat([ids, ids[:, :1].expand(-1, n - ids.shape[1])], 1)
    return ids
