"""What the engine reads and holds: :class:`Chunk` (new tokens per row), :class:`DecodeState`
(everything fed so far) and :class:`Snapshot` (a point to come back to).

Plain data, apart from :meth:`Chunk.from_samples`, the one function that left-pads tokenizer
samples into rows. The operations on them are :class:`~generalist.engine.Engine`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache

from generalist.shared_prefix import SharedPrefix
from generalist.tokenizer import Sample


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
    def from_ids(cls, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 local_positions: Sequence[int] | None = None) -> Chunk:
        """Tokens given as ids: (B, n) or (B,), every row the same kind of token at each column.

        ``attention_mask`` (same shape, 0 = padding) defaults to every token being real.
        ``local_positions`` (n,): each column's place inside its observation (1, 2, ...; 0 for tokens
        outside one: actions, rewards, text, the default). Observation tokens a planner imagines must
        carry them, as the tokenizer's observations do, or the model reads them as something else.
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[:, None]
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long().view_as(ids)
        local = torch.zeros_like(ids)
        if local_positions is not None:
            local[:] = torch.as_tensor(list(local_positions), dtype=torch.long)
        return cls(ids, mask, local)

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
            (``Engine.share``); ``cache`` then holds only the positions after them.
        branch: the next ``branch.length`` positions, when each row's are shared by its
            ``branch.group`` copies (``Engine.branch``, until the next ``Engine.select``); ``cache``
            then holds only the positions after those.
        snapshots: the live snapshots of this state, oldest first (``Engine.snapshot``).
        origin: (B,) for each row, the row of the newest live snapshot it descends from
            (``None`` without snapshots); kept up to date whenever rows are repeated or selected.
        window_start: the first cache position every row attends to (``Engine.attend_from``: a
            sliding window, as the Trajectory Transformer crops its planner's inputs); ``None``: all.
        discarded: ``(lo, hi)``: cache positions ``lo .. hi - 1`` hold no keys, left out by
            ``Engine.select`` once the window had passed them (never those a live snapshot reads);
            no window may start before ``hi`` again (``attend_from`` and ``truncate`` refuse it).
    """

    cache: Cache | None
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor | None = None
    history: dict | None = field(default=None, repr=False)
    logits_offset: int = 0
    prefix: SharedPrefix | None = field(default=None, repr=False)
    branch: SharedPrefix | None = field(default=None, repr=False)
    snapshots: list[Snapshot] = field(default_factory=list, repr=False)
    origin: torch.Tensor | None = field(default=None, repr=False)
    window_start: int | None = None
    discarded: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        """Cache length: positions held per row, padding and forgotten tokens included."""
        return self.attention_mask.shape[1]


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A :class:`DecodeState` as it was, to come back to with ``Engine.restore``.

    Stores only what is small (masks, positions, next-token logits): the cached keys and values
    stay in the state's cache, which may grow, have rows repeated or selected and be truncated back
    to ``length`` (the state's ``origin`` tells which rows descend from which).

    Attributes:
        state: the state it was taken of.
        length, attention_mask (B, length), next_position (B,), logits (B, V'), logits_offset,
        window_start: the state's at the time.
        outer_origin: the state's ``origin`` at the time, relative to the previous live snapshot.
    """

    state: DecodeState = field(repr=False)
    length: int
    attention_mask: torch.Tensor = field(repr=False)
    next_position: torch.Tensor = field(repr=False)
    logits: torch.Tensor | None = field(repr=False)
    logits_offset: int
    outer_origin: torch.Tensor | None = field(repr=False)
    window_start: int | None = None

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]
