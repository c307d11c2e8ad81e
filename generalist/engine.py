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
  wants to keep (the agent keeps its last whole steps). This is exact: a row's logits equal those
  of the row decoded alone, and those of a plain forward of its whole sequence (tested).
* **Beams.** :meth:`Engine.repeat` and :meth:`Engine.select` expand and gather rows through the
  cache's ``batch_repeat_interleave`` / ``reorder_cache``: the shared prefix is never recomputed.
  :meth:`Engine.share` goes further: the context is stored once per group of beams
  (:mod:`generalist.shared_prefix`), so neither attention nor beam reordering touches one copy of
  it per beam; :meth:`Engine.branch` does the same one level down (a beam's imagined tokens read
  once by its children until the next :meth:`Engine.select`).
* **Coming back.** :meth:`Engine.snapshot` / :meth:`Engine.restore` return a state to an earlier
  point (the rows it had, its logits, positions and masks; imagined tokens cropped off the cache),
  e.g. after a planner's look-ahead.
* **Sampling.** Constraints and filters are :mod:`generalist.sampling`'s functions (re-exported
  here); the engine draws from its own seeded ``torch.Generator``.

With ``use_cache=False`` the same API recomputes the whole sequence for every new token: the
reference for tests ("cached and uncached decoding give the same tokens") and benchmarks.

Where things live: sampling in :mod:`generalist.sampling`, the KV cache in
:mod:`generalist.kv_cache`, the shared-prefix attention in :mod:`generalist.shared_prefix`, the
state dataclasses in :mod:`generalist.decode_state`; the names other modules import from here
(``Allowed``, ``constrain``, ``sample_next_token``, ``Chunk``, ``DecodeState``...) are re-exported.
What is left (~450 lines) is the one :class:`Engine` class: its methods all keep the same per-row
bookkeeping (mask, positions, logits, cache rows, snapshot lineage) consistent, which is why they
stay together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache

from generalist.decode_state import Chunk, DecodeState, Snapshot
from generalist.kv_cache import AppendLayer, new_cache, release
from generalist.modeling_generalist import GeneralistForCausalLM
from generalist.sampling import (
    Allowed,
    as_range,
    constrain,
    filter_cdf,
    filter_top_k,
    filter_top_p,
    median_index,
    sample_distinct,
    sample_next_token,
)
from generalist.shared_prefix import (
    SHARED_PREFIX_ATTENTION,
    SharedPrefix,
    enable_shared_prefix_attention,
    shared_prefix_attention,
)
from generalist.tokenizer import PATCH_DIM, Sample, concat_samples, token_sample
from generalist.vocab import Modality

# The attention kernels a decoding forward may use: every one but cuDNN's. Decoding changes the key length at every
# call, and PyTorch's cuDNN attention builds a graph per shape (milliseconds of CPU each): on an H200, where it is
# chosen for bfloat16, it took 86 % of a decision at JAT's size (bench/profile_decision.py, its log in docs/bench/).
# The other kernels take any length at no set-up cost. Training (one fixed shape) keeps the default. The flags are
# process-wide while a feed runs: a training step in another thread at that moment would not use cuDNN either.
DECODE_ATTENTION = [b for b in SDPBackend.__members__.values()
                    if b not in (SDPBackend.CUDNN_ATTENTION, SDPBackend.ERROR)]

__all__ = [
    "SHARED_PREFIX_ATTENTION", "Allowed", "AppendLayer", "Chunk", "DecodeState", "Engine", "SharedPrefix",
    "Snapshot", "TokenSampler", "as_range", "constrain", "enable_shared_prefix_attention", "filter_cdf", "filter_top_k",
    "filter_top_p", "new_cache", "sample_distinct", "sample_next_token", "shared_prefix_attention",
]


class TokenSampler:
    """Sampling from a decoder's ``state.logits``: what :class:`Engine` and
    :class:`~generalist.static_beams.StaticBeams` share. A subclass provides ``generator`` (a seeded
    ``torch.Generator``) and ``feed(state, chunk, next_allowed)``; ``state`` has ``logits``,
    ``logits_offset`` and ``batch_size``."""

    generator: torch.Generator

    def sample(self, state: DecodeState, allowed: Allowed = None, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, *, cdf: float | None = None,
               cdf_log_width: torch.Tensor | None = None, median: bool = False, runs: int = 1) -> torch.Tensor:
        """Next token of every row (B,), drawn from ``state.logits`` restricted to ``allowed``.

        Filters as in :func:`~generalist.sampling.sample_next_token`: ``cdf`` (the Trajectory
        Transformer's, drops the least likely ``cdf`` of the mass), then ``top_k``, then ``top_p``.
        ``median``: when greedy, the ids are bins of one value in order and the token is the predicted
        median (:func:`~generalist.sampling.median_index`) rather than the most probable bin.
        ``cdf_log_width`` (vocabulary,): each id's log bin width; the cdf filter then ranks by density
        (:func:`~generalist.sampling.filter_cdf`).
        ``runs``: the rows come in runs of this many with the same logits (a beam's children, just branched); the
        filters then run once per run (``sample_next_token``'s ``repeats``), the draws one per row as ever.
        """
        if runs < 1 or state.batch_size % runs:
            raise ValueError(f"runs={runs} must divide the {state.batch_size} rows into runs of equal logits")
        logits, offset = constrain(state.logits, allowed, state.logits_offset)
        if median and (temperature == 0 or top_k == 1):
            return self._median(state, allowed, logits, offset)
        if cdf_log_width is not None:
            cdf_log_width = cdf_log_width[offset: offset + logits.shape[-1]]
        return sample_next_token(logits[::runs], self.generator, temperature, top_k, top_p, cdf=cdf,
                                 cdf_log_width=cdf_log_width, repeats=runs) + offset

    def _median(self, state: DecodeState, allowed: Allowed, logits: torch.Tensor, offset: int) -> torch.Tensor:
        """The id of each row's predicted median bin (B,) over ``logits`` (``allowed``'s, ids from ``offset``);
        a decoder that computed it in its forward returns that."""
        return median_index(logits) + offset

    @torch.inference_mode()
    def generate(self, state: DecodeState, allowed: Sequence[Allowed], temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, feed_last: bool = True,
                 then: Allowed = None, *, cdf: float | None = None, cdf_log_width: torch.Tensor | None = None,
                 median: Sequence[bool] | None = None, feed_as: int | None = None,
                 local_positions: Sequence[int] | None = None) -> torch.Tensor:
        """Sample ``len(allowed)`` tokens per row, ``allowed[j]`` constraining the j-th -> (B, n).

        Each sampled token is fed back before the next is drawn; the last one only if ``feed_last``
        (a control loop feeds it together with the next step's tokens, saving a forward pass), and
        then ``then`` constrains the token after it (see :meth:`feed`'s ``next_allowed``).
        Sampling arguments as in :meth:`sample`; ``median[j]`` is its ``median`` for the j-th token.
        ``feed_as``: feed this id in place of every sampled token (``<hidden_action>``: the policy view).
        ``local_positions[j]``: the j-th token's place inside its observation when it is fed (tokens of an
        imagined observation; see :meth:`Chunk.from_ids`); default 0, a token outside an observation.
        """
        out = []
        for j, allow in enumerate(allowed):
            token = self.sample(state, allow, temperature, top_k, top_p, cdf=cdf, cdf_log_width=cdf_log_width,
                                median=bool(median and median[j]))  # (B,)
            out.append(token)
            if j < len(allowed) - 1 or feed_last:
                fed = token if feed_as is None else torch.full_like(token, feed_as)
                chunk = fed[:, None] if local_positions is None else Chunk.from_ids(
                    fed[:, None], local_positions=[local_positions[j]])
                self.feed(state, chunk, allowed[j + 1] if j < len(allowed) - 1 else then)
        return torch.stack(out, 1) if out else torch.zeros(state.batch_size, 0, dtype=torch.long)


class Engine(TokenSampler):
    """KV-cached, batched decoding over :class:`~generalist.GeneralistForCausalLM`.

    Args:
        model: the model (put in eval mode here).
        seed: seed of the engine's ``torch.Generator`` (all sampling draws from it).
        use_cache: ``False`` recomputes the whole sequence for every feed (reference / benchmarks).
        shared_prefix: let :meth:`share` store a context once per group of rows. The first
            :meth:`share` that can use it switches the model to the shared-prefix attention
            function (:func:`~generalist.shared_prefix.enable_shared_prefix_attention`: once, and
            only for a model on sdpa, which that function equals without a prefix). ``False``:
            :meth:`share` copies the context to every row (:meth:`repeat`) and the model is never
            touched.

    Example::

        engine = Engine(model, seed=0)
        state = engine.prefill(tok.encode_text_sample("hello"), num_rows=4)
        ids = engine.generate(state, [None] * 5, temperature=0.8, top_k=20)   # (4, 5)
    """

    def __init__(self, model: GeneralistForCausalLM, seed: int = 0, use_cache: bool = True,
                 shared_prefix: bool = True):
        self.model = model.eval()
        # Bookkeeping (masks, positions, sampling) stays on the CPU; tensors cross to the model's
        # device only at the forward call, and logits (B, V') come back: one small copy per feed.
        weight = next(model.parameters(), torch.empty(0))  # a stand-in model may have no weights
        self.device, self.dtype = weight.device, weight.dtype
        self.use_cache = use_cache
        self.shared_prefix = shared_prefix and use_cache
        self._shared_prefix_ready: bool | None = None  # enable_shared_prefix_attention's answer, asked once
        self.generator = torch.Generator().manual_seed(seed)
        self.pad_id = int(model.config.text_config.pad_token_id)
        self.vocab_size = int(model.config.vocab_size)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 2048))
        # the KV storage the caches free, per layer, for the next cache to reuse (kv_cache.AppendLayer's spares;
        # kv_cache.new_cache adds a list per layer)
        self._spares: list[list[torch.Tensor]] = []

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    # --- feeding ---
    def new_state(self, batch_size: int) -> DecodeState:
        """An empty state (no tokens yet) for ``batch_size`` rows."""
        return DecodeState(
            cache=new_cache(self.model.config.text_config, spares=self._spares) if self.use_cache else None,
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

    def feed(self, state: DecodeState, chunk: Chunk | Sequence[Sample] | torch.Tensor,
             next_allowed: Allowed = None) -> DecodeState:
        """Append new tokens to every row; ``state.logits`` then predicts each row's next token.

        ``chunk`` is a :class:`Chunk`, a list of samples (one per row), or ids (B,) / (B, n).
        ``next_allowed``: when it is an id range, the next token will be drawn from it, and only
        its logits are computed (the rest of the LM head is skipped).
        """
        logits, offset, empty = self._feed(state, chunk, as_range(next_allowed), keep=1)
        if logits is not None:
            self._set_logits(state, logits[:, -1], offset, empty)
        return state

    @torch.inference_mode()
    @sdpa_kernel(DECODE_ATTENTION)
    def _feed(self, state: DecodeState, chunk: Chunk | Sequence[Sample] | torch.Tensor,
              vocab_range: tuple[int, int] | None, keep: int
              ) -> tuple[torch.Tensor | None, int, torch.Tensor | None]:
        """Run ``chunk`` through the model -> the logits at its last ``keep`` positions (B, keep, V'), the
        id of their first column, and which rows were fed only padding (``None`` logits: nothing fed)."""
        if isinstance(chunk, torch.Tensor):
            chunk = Chunk.from_ids(chunk)
        elif not isinstance(chunk, Chunk):
            chunk = Chunk.from_samples(chunk, self.pad_id)
        if chunk.input_ids.shape[0] != state.batch_size:
            raise ValueError(f"chunk has {chunk.input_ids.shape[0]} rows, the state {state.batch_size}")
        if not chunk.input_ids.shape[1]:  # nothing fed (e.g. a re-prefill whose window keeps no whole step, no prompt)
            return None, 0, None
        mask = chunk.attention_mask
        if state.window_start is not None and state.window_start >= state.length + mask.shape[1]:
            raise ValueError(f"attend_from: the window starts at {state.window_start}, after every token this feed "
                             f"ends at ({state.length + mask.shape[1]})")
        counts = mask.sum(1)  # (B,)
        if state.logits is not None and not bool(counts.all()):
            vocab_range = None  # rows fed only padding keep logits that may cover other ids
        positions = (state.next_position[:, None] + mask.cumsum(1) - 1).clamp_min(0)  # (B, n)
        state.next_position = state.next_position + counts
        state.attention_mask = torch.cat([state.attention_mask, mask], 1)  # (B, L + n)
        if state.cache is None:
            logits = self._forward_uncached(state, chunk, positions, vocab_range, keep)
        else:
            levels = [level for level in (state.prefix, state.branch) if level is not None]
            own_mask = state.attention_mask[:, sum(level.length for level in levels):]
            extra = {}
            if levels:  # the per-call switch: only this forward reads the shared levels
                if self.model.config.get_text_config(decoder=True)._attn_implementation != SHARED_PREFIX_ATTENTION:
                    raise RuntimeError("the model's attention implementation was changed while rows share a prefix; "
                                       "its attention would ignore the prefix")
                extra["shared_prefix"] = levels[0] if len(levels) == 1 else levels
                if state.window_start:  # the keys before it are not even read (shared_prefix_attention)
                    extra["window_start"] = state.window_start
            elif state.window_start:
                own_mask = _windowed(own_mask, state.window_start)
            out = self.model(
                **self._on_device(input_ids=chunk.input_ids, local_positions=chunk.local_positions,
                                  patches=chunk.patches, patch_positions=chunk.patch_positions,
                                  attention_mask=None if bool(own_mask.all()) else own_mask, position_ids=positions),
                cache=state.cache, use_cache=True, logits_to_keep=keep, vocab_range=vocab_range, **extra,
            )
            state.cache = out.cache
            logits = out.logits[:, -keep:].float().cpu()  # (B, keep, V')
        # a model that ignores ``vocab_range`` (a stand-in, a wrapper) returns the whole vocabulary
        offset = 0 if vocab_range is None or logits.shape[-1] != vocab_range[1] - vocab_range[0] else vocab_range[0]
        return logits, offset, counts == 0

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
                          vocab_range: tuple[int, int] | None, keep: int) -> torch.Tensor:
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
            **self._on_device(input_ids=h["input_ids"], local_positions=h["local_positions"],
                              patches=patches[:, :PATCH_DIM] if len(patches) else None,
                              patch_positions=patches[:, PATCH_DIM:].long() if len(patches) else None,
                              attention_mask=_windowed(state.attention_mask, state.window_start),
                              position_ids=h["position_ids"]),
            use_cache=False, logits_to_keep=keep, vocab_range=vocab_range,
        )
        return out.logits[:, -keep:].float().cpu()  # (B, keep, V')

    def _on_device(self, **tensors: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """The model's inputs on its device (a no-op on the CPU)."""
        return {k: None if v is None else v.to(self.device, non_blocking=True) for k, v in tensors.items()}

    # --- rows ---
    def repeat(self, state: DecodeState, n: int) -> DecodeState:
        """Each row becomes ``n`` consecutive copies (row i -> rows i*n .. i*n+n-1)."""
        if n == 1:
            return state
        self._merge_branch(state)
        if state.cache is not None:
            state.cache.batch_repeat_interleave(n)
        if state.prefix is not None:
            state.prefix.group *= n
        return self._index_rows(state, torch.arange(state.batch_size).repeat_interleave(n))

    def share(self, state: DecodeState, n: int, dtype: torch.dtype | None = None) -> DecodeState:
        """Like :meth:`repeat`, but the rows' context so far is stored once and shared by each group
        of ``n`` copies (:class:`SharedPrefix`): what beam search over a long context wants.
        ``dtype``: the rows' own tokens (what each beam adds) are cached in it (e.g. ``torch.bfloat16``:
        half the bytes to read per token; see :class:`AppendLayer`); the shared context keeps its own.

        Until :meth:`truncate` cuts back into it, :meth:`select` must keep every row in its group
        and :meth:`forget` is not available. Falls back to :meth:`repeat` without a cache, with a
        cache that is not all :class:`AppendLayer`, when a prefix is already shared, or when the
        model cannot take the shared-prefix attention (see the class's ``shared_prefix``).
        """
        layers = getattr(state.cache, "layers", None)
        if (n == 1 or state.prefix is not None or state.length == 0 or not layers
                or not all(isinstance(layer, AppendLayer) and layer.is_initialized for layer in layers)
                or not self._can_share()):
            return self.repeat(state, n)
        mask = None if bool(state.attention_mask.all()) else state.attention_mask.bool().to(self.device)
        state.prefix = SharedPrefix(cache=state.cache, length=state.length, mask=mask, group=n)
        state.cache = new_cache(self.model.config.text_config, dtype, self._spares)
        return self._index_rows(state, torch.arange(state.batch_size).repeat_interleave(n))

    def branch(self, state: DecodeState, n: int) -> DecodeState:
        """Like :meth:`repeat`, for rows that share a prefix (:meth:`share`): what each row holds
        after the prefix is not copied but stored once and read by its ``n`` copies. A beam search's
        expand-then-prune step: the children of a beam share everything the beam imagined so far, so
        neither expanding nor their attention touches one copy of it per child. :meth:`select` then
        gathers each survivor's shared part and own tokens in one copy, into a level of its own again
        (each row's keys one contiguous block, from the sliding window's start on), which the next
        ``branch`` extends with what was fed since.

        Falls back to :meth:`repeat` without a shared prefix, with nothing after it, with a cache
        that is not all :class:`AppendLayer`, or when rows already branched and were not selected
        since (that branch is gathered first). Only :meth:`feed` (and what samples through it) and
        :meth:`select` keep a branch; every other method gathers it into the rows' cache first.
        """
        layers = getattr(state.cache, "layers", None)
        rows = torch.arange(state.batch_size)
        if (n == 1 or state.prefix is None or (state.branch is not None and state.branch.group > 1)
                or state.length == state.prefix.length
                or not layers or not all(isinstance(layer, AppendLayer) for layer in layers)):
            return self.repeat(state, n)
        if state.branch is None:
            if not all(layer.is_initialized for layer in layers):
                return self.repeat(state, n)
            own = state.attention_mask[:, state.prefix.length:]
            mask = None if bool(own.all()) else own.bool().to(self.device)
            state.branch = SharedPrefix(cache=state.cache, length=own.shape[1], mask=mask, group=1)
            state.cache = Cache(layers=[layer.split_off() for layer in layers])
        elif all(layer.is_initialized for layer in layers):  # what was fed since the last select joins the level
            self._gather_branch(state, rows, rows, as_level=True)
        state.branch.group = n
        state.prefix.group *= n
        return self._index_rows(state, rows.repeat_interleave(n))

    def _gather_branch(self, state: DecodeState, parents: torch.Tensor, rows: torch.Tensor, as_level: bool) -> None:
        """Row i becomes the branch's row ``parents[i]`` followed by old row ``rows[i]``'s own tokens, in one
        copy (the per-row fields are the caller's to index). ``as_level``: into a new branch level of
        group 1 (:meth:`select`), each row's keys one contiguous block that leaves out the positions
        before the window (``SharedPrefix.start``); else back into the rows' own cache, the positions
        left out earlier kept as unset keys that no window may reach again (``state.discarded``).
        """
        level, own, p = state.branch, state.cache.layers, state.prefix.length
        fed = own[0].get_seq_length() if all(layer.is_initialized for layer in own) else 0
        total = level.length + fed  # positions after the prefix
        start = level.start
        if as_level:
            start = min(max(start, (state.window_start or 0) - p), total)
            for snap in state.snapshots:  # never leave out what a live snapshot still reads
                if snap.length > p:
                    start = min(start, max(level.start, (snap.window_start or 0) - p))
        shared_from, own_from = min(start, level.length) - level.start, max(start - level.length, 0)
        new = [AppendLayer.gathered([(shared, shared_from, parents)] + ([(mine, own_from, rows)] if fed else []),
                                    spares_from=mine, pad=0 if as_level else start,
                                    headroom=0 if as_level else AppendLayer.headroom)
               for shared, mine in zip(level.cache.layers, own, strict=True)]
        if as_level:
            region = state.attention_mask[rows, p:]  # (B', total)
            mask = None if bool(region.all()) else region.bool().to(self.device)
            state.branch = SharedPrefix(cache=Cache(layers=new), length=total, mask=mask, group=1, start=start)
            state.cache = Cache(layers=[layer.split_off() for layer in new])
        else:
            state.branch, state.cache = None, Cache(layers=new)
        if start:  # positions p .. p + start - 1 hold no keys from now on
            state.discarded = (p, max(p + start, state.discarded[1] if state.discarded else 0))

    def _merge_branch(self, state: DecodeState) -> None:
        """Gather a :meth:`branch` back into one cache row per row (each row's copy of what it shared)."""
        if state.branch is not None:
            rows = torch.arange(state.batch_size)
            self._gather_branch(state, rows // state.branch.group, rows, as_level=False)

    def _can_share(self) -> bool:
        if self._shared_prefix_ready is None:
            self._shared_prefix_ready = self.shared_prefix and enable_shared_prefix_attention(self.model)
        return self._shared_prefix_ready

    def select(self, state: DecodeState, rows: torch.Tensor) -> DecodeState:
        """Keep rows ``rows`` (B',) in that order; rows may repeat (beam search survivors)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if state.prefix is not None:
            e = state.prefix.num_rows
            if len(rows) % e or not torch.equal(rows // state.prefix.group,
                                                torch.arange(len(rows)) // (len(rows) // e)):
                raise ValueError("with a shared prefix, select must keep every row in its prefix's group")
            state.prefix.group = len(rows) // e
        if state.branch is not None:  # one gather: each survivor's shared part, then its own tokens
            self._gather_branch(state, rows // state.branch.group, rows, as_level=True)
        elif state.cache is not None:
            state.cache.reorder_cache(rows)
        return self._index_rows(state, rows)

    def _unshare(self, state: DecodeState) -> None:
        """Back to one cache per row: only when each row is its own group and holds nothing more."""
        if state.prefix.group != 1 or state.length != state.prefix.length:
            raise ValueError("cannot drop a shared prefix while rows share it or hold tokens after it")
        release(state.cache)  # the rows' own (now empty) cache: its storage goes to the next one
        state.cache, state.prefix = state.prefix.cache, None

    def _index_rows(self, state: DecodeState, rows: torch.Tensor) -> DecodeState:
        """Every per-row field follows the cache's rows: row i becomes old row ``rows[i]``."""
        state.attention_mask = state.attention_mask[rows]
        if state.origin is not None:
            state.origin = state.origin[rows]
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

    def attend_from(self, state: DecodeState, start: int | None) -> DecodeState:
        """From the next :meth:`feed` on, every row attends only to cache positions ``start`` and later
        (``None``: to all); :meth:`restore` brings back the snapshot's.

        A sliding window without re-prefilling: the Trajectory Transformer's planner crops every input
        to its last few transitions (reference ``trajectory/search/sampling.py::forward``). The keys
        before ``start`` stay cached; they are masked out, and with a shared prefix not even read.
        The window's own keys keep what they were computed from (the standard cached sliding window;
        in a model of several layers, what they once read still reaches the new tokens through them).
        The uncached engine recomputes the window alone, as the reference does.
        Without shared levels ``start`` may lie in the tokens the next feed appends (a decision's own step,
        fed together with the previous step's last tokens); that feed refuses a window holding none of them.
        """
        shared = state.prefix is not None or state.branch is not None
        if start is not None and (start < 0 or (shared and start > state.length)):
            raise ValueError(f"attend_from: start must be in [0, {state.length}] (the cache length"
                             f"{'' if shared else '; without shared levels, any position from 0 on'}), got {start}")
        _check_window(state, start)
        state.window_start = start or None
        return state

    def truncate(self, state: DecodeState, length: int) -> DecodeState:
        """Drop every cached position after the first ``length`` (``Cache.crop``).

        ``state.logits`` is left as it was (to come back to an earlier point with its logits, use
        :meth:`snapshot` / :meth:`restore`). Snapshots longer than ``length`` become invalid.
        """
        extra = state.length - length
        if extra <= 0:
            return state
        if state.discarded is not None and length > state.discarded[0] and (state.window_start or length) >= length:
            lo, hi = state.discarded
            raise ValueError(f"truncate: positions {lo}..{hi - 1} hold no keys (a sliding window had passed them when "
                             f"rows were selected), and cutting to {length} would end the window that keeps them "
                             f"unread; cut to {lo} or less, or to more than the window's start")
        if state.branch is not None and state.prefix is not None and length <= state.prefix.length:
            release(state.branch.cache)  # nothing after the prefix stays: the branch is dropped, not gathered
            state.branch = None
        self._merge_branch(state)
        if state.window_start is not None and state.window_start >= length:
            state.window_start = None
        if state.discarded is not None:
            lo, hi = state.discarded
            state.discarded = None if length <= lo else (lo, min(hi, length))
        for i, snap in enumerate(state.snapshots):
            if snap.length > length:  # it, and every later one (their rows are traced through it)
                self._drop_snapshots(state, i)
                break
        if state.prefix is not None:  # first the rows' own tokens; the prefix only once unshared
            keep = max(length, state.prefix.length)
            state.cache.crop(keep - state.length)
            state.next_position = state.next_position - state.attention_mask[:, keep:].sum(1)
            state.attention_mask = state.attention_mask[:, :keep]
            extra = keep - length
            if extra or (state.prefix.group == 1 and keep == state.prefix.length):
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

    # --- snapshots ---
    def snapshot(self, state: DecodeState) -> Snapshot:
        """Remember ``state`` as it is now, to come back to with :meth:`restore`.

        In between, anything may happen to the state except cutting into the snapshot's tokens
        (:meth:`truncate` below its length, which invalidates it) or replacing it (a new
        :meth:`prefill` is a new state). Snapshots nest: restoring one invalidates the later ones.
        """
        self._merge_branch(state)
        snap = Snapshot(
            state=state, length=state.length, attention_mask=state.attention_mask.clone(),
            next_position=state.next_position.clone(),
            logits=None if state.logits is None else state.logits.clone(), logits_offset=state.logits_offset,
            outer_origin=state.origin, window_start=state.window_start,
        )
        state.snapshots.append(snap)
        state.origin = torch.arange(state.batch_size)
        return snap

    def restore(self, snapshot: Snapshot) -> DecodeState:
        """Put the snapshot's state back as it was when :meth:`snapshot` was taken; returns it.

        Each of its rows comes back from the first current row that descends from it (through
        :meth:`repeat`, :meth:`share` and :meth:`select`; every beam of a group holds the same
        context), the tokens fed since are cropped off the cache, and its logits, positions and
        attention mask are the snapshot's. The snapshot stays valid, so a loop may restore it
        after every look-ahead.
        """
        state = snapshot.state
        index = next((i for i, s in enumerate(state.snapshots) if s is snapshot), None)
        if index is None:
            raise ValueError("this snapshot is no longer valid: its state was truncated below its length, or an "
                             "earlier snapshot was restored since")
        origin = self._origin_at(state, index)  # (B,) row of the snapshot each current row descends from
        b, b0 = state.batch_size, snapshot.batch_size
        rows = torch.full((b0,), b).scatter_reduce(0, origin, torch.arange(b), reduce="amin")  # (B0,)
        if bool((rows == b).any()):
            lost = torch.nonzero(rows == b).flatten().tolist()
            raise ValueError(f"rows {lost} of the snapshot have no descendant left to restore them from")
        self._drop_snapshots(state, index + 1)
        if state.prefix is not None:  # first what lies past the prefix (a beams' branch): dropped, not gathered
            self.truncate(state, max(snapshot.length, state.prefix.length))
        if b != b0 or not torch.equal(rows, torch.arange(b0)):
            self.select(state, rows)
        self.truncate(state, snapshot.length)
        if state.prefix is not None and state.prefix.group == 1 and state.length == state.prefix.length:
            self._unshare(state)  # as truncate does when it cuts back to a prefix no longer shared
        state.attention_mask = snapshot.attention_mask.clone()
        state.next_position = snapshot.next_position.clone()
        state.logits = None if snapshot.logits is None else snapshot.logits.clone()
        state.logits_offset = snapshot.logits_offset
        state.window_start = snapshot.window_start  # select kept every key it reads (_gather_branch)
        state.origin = torch.arange(b0)
        return state

    @staticmethod
    def _origin_at(state: DecodeState, index: int) -> torch.Tensor:
        """(B,) for each current row, the row of ``state.snapshots[index]`` it descends from."""
        origin = state.origin
        for snap in reversed(state.snapshots[index + 1:]):
            origin = snap.outer_origin[origin]
        return origin

    def _drop_snapshots(self, state: DecodeState, index: int) -> None:
        """Forget ``state.snapshots[index:]``; ``origin`` then refers to the one before them."""
        if index < len(state.snapshots):
            state.origin = self._origin_at(state, index - 1) if index else None
            del state.snapshots[index:]

    @torch.inference_mode()
    def generate_blind(self, state: DecodeState, samples: Sequence[Sample], allowed: Sequence[Allowed],
                       feed_as: int, temperature: float = 0.0, top_k: int | None = None,
                       top_p: float | None = None, *, median: Sequence[bool] | None = None) -> torch.Tensor:
        """``feed(state, samples, allowed[0])`` then ``generate(state, allowed, ..., feed_last=False,
        feed_as=feed_as)`` in one forward instead of ``len(allowed)`` -> (B, n).

        Tokens fed as ``feed_as`` (the policy view's ``<hidden_action>``) do not depend on what was
        sampled, so each row's sample and ``n - 1`` of them go in together, and the logits at the last
        ``n`` positions predict the ``n`` tokens: the same tokens, from the same random draws, as the
        token-by-token loop, and the state ends where that loop leaves it. An action of ``n``
        elements then costs one pass over the cache rather than ``n``.
        """
        n = len(allowed)
        blind = token_sample(np.full(max(n - 1, 0), feed_as), Modality.ACTION)
        ranges = [as_range(a) for a in allowed]
        union = None if not ranges or None in ranges else (min(r[0] for r in ranges), max(r[1] for r in ranges))
        logits, offset, empty = self._feed(state, [concat_samples([s, blind]) for s in samples], union, keep=max(n, 1))
        out = []
        for j in range(max(n, 1)):  # the last logits stay in the state, as the loop leaves them
            self._set_logits(state, logits[:, j], offset, empty)
            if j < n:
                out.append(self.sample(state, allowed[j], temperature, top_k, top_p, median=bool(median and median[j])))
        return torch.stack(out, 1) if out else torch.zeros(state.batch_size, 0, dtype=torch.long)

    @torch.inference_mode()
    def generate_until(self, state: DecodeState, stop_id: int, max_new_tokens: int, allowed: Allowed = None,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, *,
                       cdf: float | None = None) -> list[list[int]]:
        """Sample until each row emits ``stop_id`` (not returned) or ``max_new_tokens``; ragged output."""
        b = state.batch_size
        done = torch.zeros(b, dtype=torch.bool)
        out: list[list[int]] = [[] for _ in range(b)]
        for _ in range(max_new_tokens):
            token = self.sample(state, allowed, temperature, top_k, top_p, cdf=cdf)  # (B,)
            stopped = token == stop_id
            for i in torch.nonzero(~done & ~stopped).flatten().tolist():
                out[i].append(int(token[i]))
            done |= stopped
            if bool(done.all()):
                break
            # finished rows are fed a masked pad token, so they stay aligned and unchanged
            self.feed(state, Chunk.from_ids(torch.where(done, self.pad_id, token), attention_mask=~done))
        return out


def _check_window(state: DecodeState, start: int | None) -> None:
    """A window may not start before positions whose keys were left out (``state.discarded``)."""
    if state.discarded is not None and (start or 0) < state.discarded[1]:
        lo, hi = state.discarded
        raise ValueError(f"attend_from: positions {lo}..{hi - 1} hold no keys any more (a sliding window had passed "
                         f"them when rows were selected); a window must start at {hi} or later, got {start}")


def _windowed(mask: torch.Tensor, start: int | None) -> torch.Tensor:
    """``mask`` (B, L) with the positions before ``start`` masked out (:meth:`Engine.attend_from`)."""
    if not start:
        return mask
    mask = mask.clone()
    mask[:, :start] = 0
    return mask


def _empty_history(batch_size: int) -> dict:
    empty = torch.zeros(batch_size, 0, dtype=torch.long)
    return {"input_ids": empty, "local_positions": empty, "position_ids": empty,
            "patches": [torch.zeros(0, PATCH_DIM + 2) for _ in range(batch_size)]}
