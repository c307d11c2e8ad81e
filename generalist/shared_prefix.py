"""A context stored once for a group of rows (beams), and the attention function that reads it.

Beam search over one context copies that context to every beam, so each new token's attention
reads it (and every beam reordering copies it) once per beam, while decoding is bound by reading
the KV cache, not by arithmetic. With a :class:`SharedPrefix` it is stored once per environment,
and :func:`shared_prefix_attention` asks it for all of a group's queries in one product; only the
beams' own tokens live in per-row storage (see ``Engine.share``).

Opt-in, never at import: transformers picks a model's attention function from its config
(``AttentionInterface``; no per-call switch exists as of v5.24), so
:func:`enable_shared_prefix_attention` registers ours under :data:`SHARED_PREFIX_ATTENTION` and
switches the model to it once, with the public ``PreTrainedModel.set_attn_implementation``. Without
a ``shared_prefix=`` keyword the function *is* sdpa (same call, same mask), so the model computes
exactly what it did before; a forward that passes ``shared_prefix=`` (transformers forwards extra
keywords to the attention function) gets the shared context. That keyword is the per-call switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache

SHARED_PREFIX_ATTENTION = "generalist_shared_prefix"
BASE_ATTENTION = "sdpa"  # what the function computes without a prefix; only models on it are switched


@dataclass
class SharedPrefix:
    """A cache of E rows that rows ``i*group .. i*group+group-1`` of the live cache all continue.

    Attributes:
        cache: the prefix's cache (E rows, ``AppendLayer`` layers).
        length: positions in it.
        mask: (E, length) bool, False at padding; ``None`` when every position is real.
        group: live rows per prefix row.
        start: positions before it hold no keys (``cache`` stores positions ``start .. length - 1``):
            ``Engine.select`` leaves out what a sliding window has passed (``Engine.attend_from``), so
            that each row's keys lie in one contiguous block, which a batched product reads ~2.5x as
            fast as the same keys strided through a larger buffer (measured, ``bench/decode.py``).
    """

    cache: Cache
    length: int
    mask: torch.Tensor | None
    group: int
    start: int = 0

    @property
    def num_rows(self) -> int:
        return self.mask.shape[0] if self.mask is not None else self.cache.layers[0].keys.shape[0]

    def layer(self, i: int, position: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (E, H_kv, length - position, D) of backbone layer ``i`` from ``position`` on."""
        if position < self.start:
            raise ValueError(f"positions before {self.start} of this level were left out (a sliding window had "
                             f"passed them); cannot read from {position}")
        layer, cut = self.cache.layers[i], position - self.start
        return layer.keys[:, :, cut:], layer.values[:, :, cut:]


def window_cuts(levels: Sequence[SharedPrefix], window_start: int | None) -> tuple[list[tuple[SharedPrefix, int]], int]:
    """What a window starting at ``window_start`` (counted over [levels, own keys]) reads: each level it
    reaches with the first of its positions read, and how many of the rows' own keys it skips."""
    skip, read = window_start or 0, []
    for level in levels:
        cut = min(skip, level.length)
        skip -= cut
        if cut < level.length:
            read.append((level, cut))
    return read, skip


def _repeat_heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H_kv, L, D) -> (B, H_kv * n, L, D): grouped-query keys/values, one copy per query head."""
    return t if n == 1 else t.repeat_interleave(n, dim=1)


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            shared_prefix: SharedPrefix | Sequence[SharedPrefix] | None = None,
                            window_start: int | None = None, **kwargs):
    """Attention over shared levels and each row's own keys; sdpa when there is no prefix.

    ``query`` (B, H, Q, D); ``key``/``value`` (B, H_kv, Ls, D) the rows' own tokens (new ones
    included); ``attention_mask`` the backbone's mask over those (bool, True = attend) or ``None``.
    ``shared_prefix``: one :class:`SharedPrefix` or a chain of them, outermost first (the context
    shared by every beam of an environment, then what a beam holds that its ``n_expand`` children
    share: ``Engine.branch``); level ``l`` has ``E_l`` rows, each read by ``B / E_l`` consecutive rows.
    One softmax over [every level's keys, own keys], as if the levels were copied into every row.
    ``window_start``: attend only to the positions from this one on, counted over [levels, own keys]
    (``Engine.attend_from``); the keys before it are sliced off, never read.
    Returns (B, Q, H, D) and no attention weights, like transformers' attention functions.
    """
    if shared_prefix is None:
        return AttentionInterface()[BASE_ATTENTION](module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, **kwargs)
    levels = (shared_prefix,) if isinstance(shared_prefix, SharedPrefix) else tuple(shared_prefix)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_heads(key, n_rep), _repeat_heads(value, n_rep)  # (B, H, Ls, D)
    b, h, q, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    read, skip = window_cuts(levels, window_start)  # the levels' keys before the window are sliced off unread
    scores, level_values = [], []  # per level: (B, H, Q, Lp) scores, (E, H, Lp, D) values
    for level, cut in read:
        pk, pv = (_repeat_heads(t, n_rep).to(query.dtype) for t in level.layer(module.layer_idx, cut))  # (E, H, Lp, D)
        e, lp = pk.shape[0], pk.shape[2]
        g = b // e
        # all g*Q queries of a group against its level row: one matrix product
        qe = query.view(e, g, h, q, d).transpose(1, 2).reshape(e, h, g * q, d)  # (E, H, gQ, D)
        sp = _scores(qe, pk).mul_(scale)  # (E, H, gQ, Lp)
        if level.mask is not None:
            sp = sp.masked_fill(~level.mask[:, None, None, cut:], float("-inf"))
        scores.append(sp.view(e, h, g, q, lp).transpose(1, 2).reshape(b, h, q, lp))  # (B, H, Q, Lp)
        level_values.append(pv)
    own = _own_mask(attention_mask, q, key.shape[2], query.device)  # (B or 1, 1, Q, Ls) bool or None
    if skip:  # the window starts inside the rows' own keys
        key, value = key[:, :, skip:], value[:, :, skip:]
        own = None if own is None else own[..., skip:]
    if key.dtype != query.dtype:  # the rows' own tokens are cached in a narrower dtype (Engine.share)
        if query.device.type == "cpu" and scores:
            return _merged_attention(query, key, value, scores, level_values, own, scale)
        key, value = key.to(query.dtype), value.to(query.dtype)
    ss = _scores(query, key).mul_(scale)  # (B, H, Q, Ls)
    if own is not None:
        ss = ss.masked_fill(~own, float("-inf"))
    probs = torch.cat([*scores, ss], -1).softmax(-1).to(value.dtype)  # (B, H, Q, ΣLp + Ls)
    lp = sum(s.shape[-1] for s in scores)
    out = _weighted(probs[..., lp:], value) + _levels_output(probs[..., :lp], level_values)
    return out.transpose(1, 2).contiguous(), None  # (B, Q, H, D)


def _levels_output(probs: torch.Tensor, level_values: list[torch.Tensor]) -> torch.Tensor:
    """Σ over levels of (attention weights on the level) @ (its values), each level's rows read once.

    ``probs`` (B, H, Q, ΣLp) weights on the levels' keys in order; ``level_values`` (E_l, H, Lp_l, D).
    """
    b, h, q, _ = probs.shape
    out, start = 0, 0
    for pv in level_values:
        e, lp, d = pv.shape[0], pv.shape[2], pv.shape[3]
        g = b // e
        pp = probs[..., start: start + lp].reshape(e, g, h, q, lp).transpose(1, 2).reshape(e, h, g * q, lp)
        out = out + _weighted(pp, pv).view(e, h, g, q, d).transpose(1, 2).reshape(b, h, q, d)  # (B, H, Q, D)
        start += lp
    return out


# Up to this many keys, attention's two products are computed as broadcast multiply-and-sum: a batched
# matrix product pays a fixed cost per (row, head) matrix, which over a beam's few own tokens (1-16
# keys, 1,024 matrices) took 2-3x the time of the elementwise form in float32 (bench/decode.py's TT plan,
# 1 thread). Not in bfloat16, whose elementwise products are slow on a CPU: with 1,280 x 4 one-query
# matrices of 48 dims (eval.control's 20 walker envs at 32 beams), multiply-and-sum took 2.5 / 6.4 ms at 7 / 12
# keys against 1.5 / 1.6 ms for the matrix products, and broke even at 3. In float32 the break-even point moves with
# the batch: 12 / 13 keys at the reference plan's 256 x 4 matrices (0.21 vs 0.59 ms at 12, 0.22 vs 0.14 at 13), 8 / 9
# at 1,280 x 4 (1.3 vs 3.1 ms at 8, 1.8 vs 0.9 at 9); best of 25, 1 thread.
SMALL_KEYS = {torch.float32: 12, torch.float64: 12}
SMALL_KEYS_OTHER = 3  # bfloat16, float16


def _small(keys: torch.Tensor) -> bool:
    return keys.shape[-2] <= SMALL_KEYS.get(keys.dtype, SMALL_KEYS_OTHER)


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (..., Q, D), k (..., L, D) -> q @ k^T (..., Q, L)."""
    if _small(k):
        return (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1)
    return torch.matmul(q, k.transpose(-1, -2))


def _weighted(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (..., Q, L), v (..., L, D) -> p @ v (..., Q, D)."""
    if _small(v):
        return (p.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
    return torch.matmul(p, v)


def _own_mask(attention_mask: torch.Tensor | None, q: int, ls: int, device: torch.device) -> torch.Tensor | None:
    """Which of the rows' own keys each query may attend to (True = attend), or ``None`` for all."""
    if attention_mask is not None:
        mask = attention_mask[..., -ls:]
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if q > 1:  # causal among the new tokens, which are the last Q keys
        return ~torch.ones(q, ls, dtype=torch.bool, device=device).triu(ls - q + 1)[None, None]
    return None


def _merged_attention(query, key, value, scores, level_values, own, scale):
    """Attention over [levels, own keys] as two parts merged by their log-sum-exp (as in cascade /
    flash-decoding attention): the levels' part in the query's dtype, the own part by torch's fused
    CPU kernel in the cache's dtype, which reads each key and value once.

    ``scores`` the levels' (B, H, Q, Lp) scores, ``level_values`` their (E, H, Lp, D) values, ``own``
    the own-key mask.
    """
    sp = torch.cat(scores, -1)  # (B, H, Q, ΣLp)
    lse_p = sp.logsumexp(-1, keepdim=True)  # (B, H, Q, 1)
    out_p = _levels_output((sp - lse_p).exp_(), level_values)  # (B, H, Q, D)
    bias = None
    if own is not None:  # the fused kernel takes an additive mask of the cache's dtype
        bias = torch.zeros(own.shape, dtype=key.dtype, device=key.device).masked_fill_(~own, float("-inf"))
    out_s, lse_s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.to(key.dtype), key, value, 0.0, False, attn_mask=bias, scale=scale)  # (B, H, Q, D), (B, H, Q)
    lse_p = lse_p[..., 0]
    top = torch.maximum(lse_p, lse_s)
    w_p, w_s = (lse_p - top).exp_()[..., None], (lse_s - top).exp_()[..., None]  # (B, H, Q, 1)
    out = (out_p * w_p + out_s * w_s) / (w_p + w_s)  # in the widest of the two dtypes, then the query's
    return out.to(query.dtype).transpose(1, 2).contiguous(), None  # (B, Q, H, D)


def enable_shared_prefix_attention(model) -> bool:
    """Let ``model`` attend to a :class:`SharedPrefix`; ``True`` if it can (now or already).

    The one place where the model's attention implementation changes: registers
    :func:`shared_prefix_attention` (and sdpa's mask) under :data:`SHARED_PREFIX_ATTENTION`, then
    ``model.set_attn_implementation`` once. Only a model whose backbone runs sdpa is switched, since
    that is what the function computes without a prefix; any other model (eager, flash, a stand-in
    without ``set_attn_implementation``) is left alone and ``False`` returned, and the engine then
    copies the context to every row instead.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return False
    current = config.get_text_config(decoder=True)._attn_implementation
    if current == SHARED_PREFIX_ATTENTION:
        return True
    if current != BASE_ATTENTION:
        return False
    if SHARED_PREFIX_ATTENTION not in AttentionInterface():
        AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
        AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, AttentionMaskInterface()[BASE_ATTENTION])
    model.set_attn_implementation(SHARED_PREFIX_ATTENTION)
    return True
