"""The decoding engine: token ids and allowed-token constraints in, next tokens out.

It knows no decoding mode, environment or :class:`~generalist.TaskSpec`; the modes in
:mod:`generalist.modes` drive it (after karpathy/nanochat's ``engine.py``). What it does:

* **Prefill once, then feed only new tokens.** :meth:`Engine.prefill` runs the context through the
  model and keeps the backbone's KV cache; :meth:`Engine.feed` appends a chunk of new tokens per row.
  A batch-1 prefill can be copied to ``num_rows`` rows (one prompt shared by many environments or
  beams) with the cache's own ``batch_repeat_interleave``.
* **Rows that drift apart.** Rows (environments, beams) may hold different numbers of real tokens:
  each row keeps a 0/1 attention mask over the cache and its own position counter, so a chunk is
  *left-padded* per row (pads are masked, never attended), and a row whose episode restarts simply
  masks out its whole past (:meth:`Engine.forget`) and counts positions from 0 again. All rows share
  one cache length; when that grows past the context window, the caller re-prefills from what it
  wants to keep (the agent keeps its last whole steps). This is one general mechanism instead of a
  lock-step assumption, and it is exact: a row's logits equal those of the row decoded alone.
* **Beams.** :meth:`Engine.repeat` and :meth:`Engine.select` expand and gather rows through the
  cache's ``batch_repeat_interleave`` / ``reorder_cache``: the shared prefix is never recomputed.
  :meth:`Engine.share` goes further: the context is stored once per group of beams
  (:class:`SharedPrefix`) and a registered attention function (:func:`shared_prefix_attention`)
  asks it for all the group's queries in one product, so neither attention nor beam reordering
  touches one copy of it per beam (decoding is bound by reading the KV cache, not by arithmetic).
* **Constraints.** :func:`constrain` restricts logits to an id range or a boolean mask (an action
  token can only be an id valid for the action space); :func:`sample_next_token` then does greedy,
  temperature, top-k and top-p (nucleus) sampling with a seeded ``torch.Generator``.

With ``use_cache=False`` the same API recomputes the whole sequence for every new token: the
reference for tests ("cached and uncached decoding give the same tokens") and benchmarks.

Only transformers' ``Cache`` methods are used (``get_seq_length``, ``reorder_cache``,
``batch_repeat_interleave``), never its per-layer tensors, whose layout changes between releases;
a shared prefix reads the tensors of our own :class:`AppendLayer` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from generalist.modeling_generalist import GeneralistForCausalLM
from generalist.tokenizer import PATCH_DIM, Sample

Allowed = tuple[int, int] | range | torch.Tensor | None
"""Which ids may be sampled: a half-open ``(lo, hi)`` range, a bool mask ``(V,)`` or ``(B, V)``, or all."""


# --- sampling: standalone functions ----------------------------------------------------------------


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


def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Sample one token per row from logits (B, V) -> (B,) int64.

    ``temperature == 0`` is greedy (argmax). ``top_k`` keeps the k most likely tokens; ``top_p``
    keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus
    sampling, Holtzman et al. 2020; the Trajectory Transformer's ``cdf`` filter, Janner et al. 2021).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if top_p <= 0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # (B, V)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- the KV cache ---------------------------------------------------------------------------------


class AppendLayer(DynamicLayer):
    """A full-attention cache layer that appends into preallocated storage instead of ``torch.cat``.

    ``DynamicLayer`` copies the whole cache into freshly allocated memory on every token
    (``torch.cat``), so a decision's cost grows with the context, and on CPU the page faults of the
    fresh memory cost more than the copy itself. This layer keeps headroom after the filled part
    (amortised O(1) appends), hands attention a view of the filled part, only moves the fill mark
    on ``crop``, and gathers rows (``reorder_cache``, ``batch_repeat_interleave``) with
    ``index_select(out=...)`` into buffers it recycles, so beam search (expand, prune, expand...)
    touches no new memory after its first step. Same interface as ``DynamicLayer``; the fix lives in
    the cache, not in the modes (STYLE.md §3).
    """

    headroom = 64  # free positions kept after the filled part when storage is (re)allocated
    max_spares = 4  # recycled buffers kept per layer

    def __init__(self, **kwargs):
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._length = 0
        self._spares: list[torch.Tensor] = []  # flat, already-touched storage to reuse
        super().__init__(**kwargs)

    # ``keys`` / ``values`` are the filled part; assigning them (as the base class does) replaces storage
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self._length = 0 if value is None else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value

    def _buffer(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous tensor of ``shape``, from a recycled buffer when one is large enough."""
        n = int(np.prod(shape))
        fits = [i for i, flat in enumerate(self._spares) if flat.numel() >= n and flat.dtype == like.dtype]
        if fits:
            flat = self._spares.pop(min(fits, key=lambda i: self._spares[i].numel()))
            return flat[:n].view(shape)
        return like.new_empty(shape)

    def _recycle(self, t: torch.Tensor) -> None:
        flat = t.new_empty(0).set_(t.untyped_storage())  # the whole storage, flat
        self._spares = sorted([*self._spares, flat], key=lambda x: -x.numel())[: self.max_spares]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._k = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self._v = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self._length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            capacity = end + max(self.headroom, end // 2)
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = self._buffer(old, (*old.shape[:2], capacity, old.shape[-1]))
                new[:, :, : self._length] = old[:, :, : self._length]
                setattr(self, name, new)
                self._recycle(old)
        self._k[:, :, self._length: end] = key_states
        self._v[:, :, self._length: end] = value_states
        self._length = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self._spares = []

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self._length = max(0, self._length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        rows = torch.as_tensor(beam_idx, dtype=torch.long, device=self.device)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = self._buffer(old, (len(rows), *old.shape[1:]))
            # only the filled part moves (the headroom after it holds nothing)
            torch.index_select(old[:, :, : self._length], 0, rows, out=new[:, :, : self._length])
            setattr(self, name, new)
            self._recycle(old)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.reorder_cache(torch.arange(self._k.shape[0], device=self.device).repeat_interleave(repeats))


def new_cache(text_config) -> Cache:
    """An :class:`AppendLayer` cache when every backbone layer is full attention, else ``DynamicCache``."""
    layer_types, _ = get_layer_types_and_kwargs(text_config.get_text_config(decoder=True))
    if layer_types and all(t == "full_attention" for t in layer_types):
        return Cache(layers=[AppendLayer() for _ in layer_types])
    return DynamicCache(config=text_config)


# --- a context shared by groups of rows (beams) ----------------------------------------------------


@dataclass
class SharedPrefix:
    """A cache of E rows that rows ``i*group .. i*group+group-1`` of the live cache all continue.

    Beam search over one context copies that context to every beam, so each new token's attention
    reads (and every beam reordering copies) it once per beam. With a shared prefix it is stored
    once per environment, and attention asks it for all of a group's queries in one product
    (:func:`shared_prefix_attention`); only the beams' own tokens live in per-row storage.

    Attributes:
        cache: the prefix's cache (E rows, :class:`AppendLayer` layers).
        length: positions in it.
        mask: (E, length) bool, False at padding; ``None`` when every position is real.
        group: live rows per prefix row.
    """

    cache: Cache
    length: int
    mask: torch.Tensor | None
    group: int

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.layers[i].keys, self.cache.layers[i].values


SHARED_PREFIX_ATTENTION = "generalist_shared_prefix"


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            shared_prefix: SharedPrefix | None = None, **kwargs):
    """Attention over a :class:`SharedPrefix` and each row's own keys; sdpa when there is no prefix.

    ``query`` (B, H, Q, D); ``key``/``value`` (B, Hkv, Ls, D) the rows' own tokens (new ones
    included); ``attention_mask`` the backbone's mask over those (bool, True = attend) or ``None``.
    One softmax over [prefix keys, own keys], as if the prefix were in every row.
    """
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    pk, pv = shared_prefix.layer(module.layer_idx)  # (E, Hkv, Lp, D)
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        key, value, pk, pv = (repeat_kv(t, n_rep) for t in (key, value, pk, pv))
    b, h, q, d = query.shape
    e, lp, ls = pk.shape[0], pk.shape[2], key.shape[2]
    g = b // e
    scale = d**-0.5 if scaling is None else scaling
    # the prefix: all g*Q queries of a group against its prefix row, one matrix product
    qe = query.view(e, g, h, q, d).transpose(1, 2).reshape(e, h, g * q, d)
    sp = torch.matmul(qe, pk.transpose(-1, -2)).mul_(scale)  # (E, H, gQ, Lp)
    if shared_prefix.mask is not None:
        sp = sp.masked_fill(~shared_prefix.mask[:, None, None, :], float("-inf"))
    sp = sp.view(e, h, g, q, lp).transpose(1, 2).reshape(b, h, q, lp)
    ss = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # (B, H, Q, Ls)
    if attention_mask is not None:
        mask = attention_mask[..., -ls:]
        ss = ss.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else ss + mask
    elif q > 1:  # causal among the new tokens, which are the last Q keys
        future = torch.ones(q, ls, dtype=torch.bool).triu(ls - q + 1)
        ss = ss.masked_fill(future, float("-inf"))
    probs = torch.cat([sp, ss], -1).softmax(-1).to(value.dtype)  # (B, H, Q, Lp + Ls)
    pp = probs[..., :lp].reshape(e, g, h, q, lp).transpose(1, 2).reshape(e, h, g * q, lp)
    out = torch.matmul(pp, pv).view(e, h, g, q, d).transpose(1, 2).reshape(b, h, q, d)
    out = out + torch.matmul(probs[..., lp:], value)
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_PREFIX_ATTENTION, sdpa_mask)


# --- inputs ----------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """New tokens for every row, left-padded to a common length ``n``.

    Attributes:
        input_ids, attention_mask, local_positions: (B, n); the mask is 0 on left padding.
        patches, patch_positions: (P, C*16*16) and (P, 2) for the ``<image>`` tokens, in row-major order.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    local_positions: torch.Tensor
    patches: torch.Tensor | None = None
    patch_positions: torch.Tensor | None = None

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> Chunk:
        """Plain tokens (actions, rewards, text): (B, n) ids, no padding, no local positions."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[:, None]
        return cls(ids, torch.ones_like(ids), torch.zeros_like(ids))

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], pad_id: int) -> Chunk:
        """Left-pad tokenizer samples (one per row) into a chunk."""
        n = max(len(s["input_ids"]) for s in samples)
        b = len(samples)
        ids = np.full((b, n), pad_id, np.int64)
        mask = np.zeros((b, n), np.int64)
        local = np.zeros((b, n), np.int64)
        for i, s in enumerate(samples):
            k = len(s["input_ids"])
            if k:
                ids[i, n - k:], mask[i, n - k:], local[i, n - k:] = s["input_ids"], 1, s["local_positions"]
        patches = [s["patches"] for s in samples if len(s["patches"])]
        chunk = cls(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(local))
        if patches:
            chunk.patches = torch.from_numpy(np.concatenate(patches))
            chunk.patch_positions = torch.from_numpy(np.concatenate(
                [s["patch_positions"] for s in samples if len(s["patches"])]))
        return chunk


@dataclass
class DecodeState:
    """Everything a batch of rows has been fed so far.

    Attributes:
        cache: the backbone's KV cache (``None`` for the uncached engine).
        attention_mask: (B, L) 1 where a cached position is a real token of the row's current sequence.
        next_position: (B,) position id of the row's next real token.
        logits: (B, V') float32 next-token logits after the last fed token, for ids
            ``[logits_offset, logits_offset + V')`` (the whole vocabulary unless the feed was told
            which range the next token must come from).
        logits_offset: the id of ``logits[:, 0]``.
        history: the uncached engine's record of every input (it recomputes from it).
        prefix: the first ``prefix.length`` positions, when they are shared by groups of rows
            (:meth:`Engine.share`); ``cache`` then holds only the positions after them.
    """

    cache: Cache | None
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor | None = None
    history: dict | None = field(default=None, repr=False)
    logits_offset: int = 0
    prefix: SharedPrefix | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        """Cache length: positions held per row, padding and forgotten tokens included."""
        return self.attention_mask.shape[1]


class Engine:
    """KV-cached, batched decoding over :class:`~generalist.GeneralistForCausalLM`.

    Args:
        model: the model (put in eval mode here).
        seed: seed of the engine's ``torch.Generator`` (all sampling draws from it).
        use_cache: ``False`` recomputes the whole sequence for every feed (reference / benchmarks).

    Example::

        engine = Engine(model, seed=0)
        state = engine.prefill(tok.encode_text_sample("hello")[...], num_rows=4)
        ids = engine.generate(state, 5, temperature=0.8, top_k=20)   # (4, 5)
    """

    def __init__(self, model: GeneralistForCausalLM, seed: int = 0, use_cache: bool = True):
        self.model = model.eval()
        self.use_cache = use_cache
        self.generator = torch.Generator().manual_seed(seed)
        self.pad_id = int(model.config.text_config.pad_token_id)
        self.vocab_size = int(model.config.vocab_size)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 2048))

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    # --- feeding ---
    def new_state(self, batch_size: int) -> DecodeState:
        """An empty state (no tokens yet) for ``batch_size`` rows."""
        return DecodeState(
            cache=new_cache(self.model.config.text_config) if self.use_cache else None,
            attention_mask=torch.zeros(batch_size, 0, dtype=torch.long),
            next_position=torch.zeros(batch_size, dtype=torch.long),
            history=None if self.use_cache else _empty_history(batch_size),
        )

    @torch.inference_mode()
    def prefill(self, samples: Sample | Sequence[Sample], num_rows: int = 1) -> DecodeState:
        """Run a context through the model.

        One sample with ``num_rows > 1``: a batch-1 prefill whose cache is then copied to every row.
        A list of samples: one row each, left-padded.
        """
        if isinstance(samples, dict):
            state = self.new_state(1)
            self.feed(state, Chunk.from_samples([samples], self.pad_id))
            if num_rows > 1:
                self.repeat(state, num_rows)
            return state
        state = self.new_state(len(samples))
        self.feed(state, Chunk.from_samples(samples, self.pad_id))
        return state

    @torch.inference_mode()
    def feed(self, state: DecodeState, chunk: Chunk | Sequence[Sample] | torch.Tensor,
             next_allowed: Allowed = None) -> DecodeState:
        """Append new tokens to every row; ``state.logits`` then predicts each row's next token.

        ``chunk`` is a :class:`Chunk`, a list of samples (one per row), or ids (B,) / (B, n).
        ``next_allowed``: when it is an id range, the next token will be drawn from it, and only
        its logits are computed (the rest of the LM head is skipped).
        """
        if isinstance(chunk, torch.Tensor):
            chunk = Chunk.from_ids(chunk)
        elif not isinstance(chunk, Chunk):
            chunk = Chunk.from_samples(chunk, self.pad_id)
        if chunk.input_ids.shape[0] != state.batch_size:
            raise ValueError(f"chunk has {chunk.input_ids.shape[0]} rows, the state {state.batch_size}")
        mask = chunk.attention_mask
        counts = mask.sum(1)  # (B,)
        vocab_range = as_range(next_allowed)
        if state.logits is not None and not bool(counts.all()):
            vocab_range = None  # rows fed only padding keep logits that may cover other ids
        positions = (state.next_position[:, None] + mask.cumsum(1) - 1).clamp_min(0)  # (B, n)
        state.next_position = state.next_position + counts
        state.attention_mask = torch.cat([state.attention_mask, mask], 1)  # (B, L + n)
        if state.cache is None:
            logits = self._forward_uncached(state, chunk, positions, vocab_range)
        else:
            own_mask = state.attention_mask if state.prefix is None else state.attention_mask[:, state.prefix.length:]
            extra = {}
            if state.prefix is not None:
                extra["shared_prefix"] = state.prefix
            with _attention(self.model, SHARED_PREFIX_ATTENTION if state.prefix is not None else None):
                out = self.model(
                    input_ids=chunk.input_ids, local_positions=chunk.local_positions, patches=chunk.patches,
                    patch_positions=chunk.patch_positions, attention_mask=None if bool(own_mask.all()) else own_mask,
                    position_ids=positions, cache=state.cache, use_cache=True, logits_to_keep=1,
                    vocab_range=vocab_range, **extra,
                )
            state.cache = out.cache
            logits = out.logits[:, -1].float()
        # a model that ignores ``vocab_range`` (a stand-in, a wrapper) returns the whole vocabulary
        offset = 0 if vocab_range is None or logits.shape[-1] != vocab_range[1] - vocab_range[0] else vocab_range[0]
        self._set_logits(state, logits, offset, counts == 0)
        return state

    def _set_logits(self, state: DecodeState, logits: torch.Tensor, offset: int, empty: torch.Tensor) -> None:
        """New next-token logits (B, V'); a row fed only padding (``empty``) keeps its previous ones."""
        if state.logits is not None and bool(empty.any()):  # then ``logits`` covers the whole vocabulary
            old = state.logits
            if state.logits_offset or old.shape[-1] != logits.shape[-1]:  # ids outside it were never allowed
                old = logits.new_full(logits.shape, float("-inf"))
                old[:, state.logits_offset: state.logits_offset + state.logits.shape[-1]] = state.logits
            logits[empty] = old[empty]
        state.logits, state.logits_offset = logits, offset

    def _forward_uncached(self, state: DecodeState, chunk: Chunk, positions: torch.Tensor,
                          vocab_range: tuple[int, int] | None) -> torch.Tensor:
        h = state.history
        h["input_ids"] = torch.cat([h["input_ids"], chunk.input_ids], 1)
        h["local_positions"] = torch.cat([h["local_positions"], chunk.local_positions], 1)
        h["position_ids"] = torch.cat([h["position_ids"], positions], 1)
        is_image = chunk.input_ids == self.model.config.image_token_id  # (B, n)
        counts = is_image.sum(1).tolist()
        if sum(counts):
            parts = torch.split(torch.cat([chunk.patches, chunk.patch_positions.to(chunk.patches.dtype)], 1), counts)
            h["patches"] = [torch.cat([old, new]) for old, new in zip(h["patches"], parts, strict=True)]
        patches = torch.cat(h["patches"])  # rows in order = row-major order of <image> tokens
        out = self.model(
            input_ids=h["input_ids"], local_positions=h["local_positions"],
            patches=patches[:, :PATCH_DIM] if len(patches) else None,
            patch_positions=patches[:, PATCH_DIM:].long() if len(patches) else None,
            attention_mask=state.attention_mask, position_ids=h["position_ids"], use_cache=False, logits_to_keep=1,
            vocab_range=vocab_range,
        )
        return out.logits[:, -1].float()

    # --- rows ---
    def repeat(self, state: DecodeState, n: int) -> DecodeState:
        """Each row becomes ``n`` consecutive copies (row i -> rows i*n .. i*n+n-1)."""
        if n == 1:
            return state
        if state.cache is not None:
            state.cache.batch_repeat_interleave(n)
        if state.prefix is not None:
            state.prefix.group *= n
        return self._index_rows(state, torch.arange(state.batch_size).repeat_interleave(n))

    def share(self, state: DecodeState, n: int) -> DecodeState:
        """Like :meth:`repeat`, but the rows' context so far is stored once and shared by each group
        of ``n`` copies (:class:`SharedPrefix`): what beam search over a long context wants.

        Until :meth:`truncate` cuts back into it, :meth:`select` must keep every row in its group
        and :meth:`forget` is not available. Falls back to :meth:`repeat` without a cache, with a
        cache that is not all :class:`AppendLayer`, or when a prefix is already shared.
        """
        layers = getattr(state.cache, "layers", None)
        if (n == 1 or state.prefix is not None or state.length == 0 or not layers
                or not all(isinstance(layer, AppendLayer) and layer.is_initialized for layer in layers)):
            return self.repeat(state, n)
        mask = None if bool(state.attention_mask.all()) else state.attention_mask.bool()
        state.prefix = SharedPrefix(cache=state.cache, length=state.length, mask=mask, group=n)
        state.cache = new_cache(self.model.config.text_config)
        return self._index_rows(state, torch.arange(state.batch_size).repeat_interleave(n))

    def select(self, state: DecodeState, rows: torch.Tensor) -> DecodeState:
        """Keep rows ``rows`` (B',) in that order; rows may repeat (beam search survivors)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if state.prefix is not None:
            e = state.prefix.cache.layers[0].keys.shape[0]
            if len(rows) % e or not torch.equal(rows // state.prefix.group,
                                                torch.arange(len(rows)) // (len(rows) // e)):
                raise ValueError("with a shared prefix, select must keep every row in its prefix's group")
            state.prefix.group = len(rows) // e
        if state.cache is not None:
            state.cache.reorder_cache(rows)
        return self._index_rows(state, rows)

    def _unshare(self, state: DecodeState) -> None:
        """Back to one cache per row: only when each row is its own group and holds nothing more."""
        if state.prefix.group != 1 or state.length != state.prefix.length:
            raise ValueError("cannot drop a shared prefix while rows share it or hold tokens after it")
        state.cache, state.prefix = state.prefix.cache, None

    def _index_rows(self, state: DecodeState, rows: torch.Tensor) -> DecodeState:
        state.attention_mask = state.attention_mask[rows]
        state.next_position = state.next_position[rows]
        if state.logits is not None:
            state.logits = state.logits[rows]
        if state.history is not None:
            h = state.history
            for key in ("input_ids", "local_positions", "position_ids"):
                h[key] = h[key][rows]
            h["patches"] = [h["patches"][i] for i in rows.tolist()]
        return state

    def forget(self, state: DecodeState, rows: Sequence[int]) -> DecodeState:
        """Rows ``rows`` start a new sequence: their past is masked out and positions restart at 0.

        The cache keeps the (now unattended) entries until the next re-prefill.
        """
        if len(rows):
            if state.prefix is not None:
                raise ValueError("forget is not available while rows share a prefix (Engine.share)")
            hit = torch.zeros(state.batch_size, dtype=torch.bool)
            hit[torch.as_tensor(list(rows), dtype=torch.long)] = True
            state.attention_mask = state.attention_mask.masked_fill(hit[:, None], 0)
            state.next_position = state.next_position.masked_fill(hit, 0)
        return state

    def truncate(self, state: DecodeState, length: int) -> DecodeState:
        """Drop every cached position after the first ``length`` (``Cache.crop``).

        ``state.logits`` is left as it was; callers that truncate restore it (TT planning does).
        """
        extra = state.length - length
        if extra <= 0:
            return state
        if state.prefix is not None:  # first the rows' own tokens; the prefix only once unshared
            keep = max(length, state.prefix.length)
            state.cache.crop(keep - state.length)
            state.next_position = state.next_position - state.attention_mask[:, keep:].sum(1)
            state.attention_mask = state.attention_mask[:, :keep]
            extra = keep - length
            if extra or state.prefix.group == 1:
                self._unshare(state)
            if not extra:
                return state
        if state.cache is not None:
            state.cache.crop(-extra)
        removed = state.attention_mask[:, length:]  # (B, extra)
        state.next_position = state.next_position - removed.sum(1)
        state.attention_mask = state.attention_mask[:, :length]
        if state.history is not None:
            h = state.history
            dropped = (h["input_ids"][:, length:] == self.model.config.image_token_id).sum(1).tolist()
            for key in ("input_ids", "local_positions", "position_ids"):
                h[key] = h[key][:, :length]
            h["patches"] = [p[: len(p) - k] for p, k in zip(h["patches"], dropped, strict=True)]
        return state

    # --- sampling ---
    def sample(self, state: DecodeState, allowed: Allowed = None, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
        """Next token of every row (B,), drawn from ``state.logits`` restricted to ``allowed``."""
        logits, offset = constrain(state.logits, allowed, state.logits_offset)
        return sample_next_token(logits, self.generator, temperature, top_k, top_p) + offset

    @torch.inference_mode()
    def generate(self, state: DecodeState, allowed: Sequence[Allowed], temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, feed_last: bool = True,
                 then: Allowed = None) -> torch.Tensor:
        """Sample ``len(allowed)`` tokens per row, ``allowed[j]`` constraining the j-th -> (B, n).

        Each sampled token is fed back before the next is drawn; the last one only if ``feed_last``
        (a control loop feeds it together with the next step's tokens, saving a forward pass), and
        then ``then`` constrains the token after it (see :meth:`feed`'s ``next_allowed``).
        """
        out = []
        for j, allow in enumerate(allowed):
            token = self.sample(state, allow, temperature, top_k, top_p)  # (B,)
            out.append(token)
            if j < len(allowed) - 1 or feed_last:
                self.feed(state, token[:, None], allowed[j + 1] if j < len(allowed) - 1 else then)
        return torch.stack(out, 1) if out else torch.zeros(state.batch_size, 0, dtype=torch.long)

    @torch.inference_mode()
    def generate_until(self, state: DecodeState, stop_id: int, max_new_tokens: int, allowed: Allowed = None,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
                       ) -> list[list[int]]:
        """Sample until each row emits ``stop_id`` (not returned) or ``max_new_tokens``; ragged output."""
        b = state.batch_size
        done = torch.zeros(b, dtype=torch.bool)
        out: list[list[int]] = [[] for _ in range(b)]
        for _ in range(max_new_tokens):
            token = self.sample(state, allowed, temperature, top_k, top_p)  # (B,)
            stopped = token == stop_id
            for i in torch.nonzero(~done & ~stopped).flatten().tolist():
                out[i].append(int(token[i]))
            done |= stopped
            if bool(done.all()):
                break
            # finished rows are fed a masked pad token, so they stay aligned and unchanged
            mask = (~done).long()[:, None]
            self.feed(state, Chunk(torch.where(done, self.pad_id, token)[:, None], mask, torch.zeros_like(mask)))
        return out


class _attention:
    """Within the block, the backbone uses attention implementation ``name`` (``None``: unchanged)."""

    def __init__(self, model: GeneralistForCausalLM, name: str | None):
        self.config, self.name = model.config.get_text_config(decoder=True), name

    def __enter__(self):
        if self.name is not None:
            self.saved = self.config._attn_implementation
            self.config._attn_implementation = self.name

    def __exit__(self, *exc):
        if self.name is not None:
            self.config._attn_implementation = self.saved


def _empty_history(batch_size: int) -> dict:
    empty = torch.zeros(batch_size, 0, dtype=torch.long)
    return {"input_ids": empty, "local_positions": empty, "position_ids": empty,
            "patches": [torch.zeros(0, PATCH_DIM + 2) for _ in range(batch_size)]}
