"""The engine's KV cache: transformers' ``Cache`` holding :class:`AppendLayer` layers.

Why a layer of our own: ``DynamicLayer`` copies the whole cache into fresh memory on every token
(``torch.cat``), so a decision's cost grows with the context, and beam search (expand, prune,
expand...) allocates a new cache per step. :class:`AppendLayer` appends into preallocated storage
and gathers rows into recycled buffers instead; the fix lives in the cache, not in the modes
(STYLE.md §3).

Everything outside this module talks to the cache through ``Cache``'s public methods only
(``get_seq_length``, ``crop``, ``reorder_cache``, ``batch_repeat_interleave``): their per-layer
tensor layout changed between releases. The one place that depends on transformers' layer
*internals* is :class:`AppendLayer`: it implements the abstract ``CacheLayerMixin`` that ``Cache``
dispatches to, by method name. :func:`layer_contract_problems` lists what would break if a new
transformers release changed that contract; ``tests/test_engine.py`` fails loudly on it, naming
the installed version.
"""

from __future__ import annotations

import inspect
import mmap

import numpy as np
import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, get_layer_types_and_kwargs


class AppendLayer(CacheLayerMixin):
    """A full-attention cache layer that appends into preallocated storage instead of ``torch.cat``.

    Keeps headroom after the filled part (amortised O(1) appends), hands attention a view of the
    filled part, only moves the fill mark on ``crop``, and gathers rows (``reorder_cache``,
    ``batch_repeat_interleave``) with ``index_select(out=...)`` into buffers it recycles, so beam
    search touches no new memory after its first step. Same behaviour as ``DynamicLayer`` (checked
    against it in the tests).

    ``keys`` / ``values`` are (B, H_kv, L, D) views of the filled part; assigning them (as
    ``CacheLayerMixin.__init__`` does) replaces the storage.

    ``spares``: the list of recycled buffers to take from and give to; pass the same list to every layer
    at one depth of a model's caches (:func:`new_cache`) so that what one cache frees the next one
    reuses. ``Engine`` keeps one per depth for its lifetime: a Trajectory Transformer plan builds and
    drops several caches, and each fresh buffer costs a page fault per page it is written into (20
    walker envs, 32 beams: ~1 GB of fresh storage per decision, a fifth of the decision's CPU time).
    Default: a list of this layer's own.

    ``dtype``: store keys and values in this dtype (e.g. ``torch.bfloat16``) whatever the model
    computes in. Decoding is bound by reading the cache, so half the bytes is up to twice the speed
    where the cache is large (a beam search's per-beam tokens); the attention function then sees
    keys and values in this dtype (see :mod:`generalist.shared_prefix`).
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = True
    headroom = 64  # free positions kept after the filled part when storage is (re)allocated
    max_spares = 8  # recycled buffers kept per layer (per depth, where the spares are shared)
    min_spare_bytes = 64 << 10  # smaller storage is not kept (a fresh one costs next to nothing)

    def __init__(self, dtype: torch.dtype | None = None, spares: list[torch.Tensor] | None = None, **kwargs):
        self.storage_dtype = dtype
        self._k: torch.Tensor | None = None  # (B, H_kv, capacity, D)
        self._v: torch.Tensor | None = None
        self._length = 0
        self._spares: list[torch.Tensor] = [] if spares is None else spares  # flat, already-touched storage
        super().__init__(**kwargs)

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

    def _buffer(self, like: torch.Tensor, shape: tuple[int, ...], room: float = 0.0) -> torch.Tensor:
        """A contiguous tensor of ``shape``, from a recycled buffer when one is large enough; a new
        one is allocated ``room`` x larger than asked, so that a slightly larger request later fits."""
        n = int(np.prod(shape))
        fits = [i for i, flat in enumerate(self._spares) if flat.numel() >= n and flat.dtype == like.dtype]
        if fits:
            flat = self._spares.pop(min(fits, key=lambda i: self._spares[i].numel()))
            return flat[:n].view(shape)
        return _empty(like, int(n * (1 + room)))[:n].view(shape)

    def release(self) -> None:
        """Hand this layer's storage to its spares and empty it (the layer must not be read afterwards)."""
        if self.is_initialized:
            self._recycle(self._k)
            self._recycle(self._v)
            self.reset()

    def _recycle(self, t: torch.Tensor) -> None:
        if t.untyped_storage().nbytes() < self.min_spare_bytes:  # not worth a place among the spares
            return
        flat = t.new_empty(0).set_(t.untyped_storage())  # the whole storage, flat
        self._spares[:] = sorted([*self._spares, flat], key=lambda x: -x.numel())[: self.max_spares]  # in place: shared

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        dtype = self.storage_dtype or key_states.dtype
        self._k = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]), dtype=dtype)  # (B, H_kv, 0, D)
        self._v = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]), dtype=dtype)
        self._length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H_kv, n, D) new keys/values; return all of them, (B, H_kv, L + n, D)."""
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

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask for ``query_length`` new tokens: all past ones are kept."""
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1  # grows without bound, like DynamicLayer

    def reset(self) -> None:
        self._k = self._v = None
        self._length = 0
        self._spares = []
        self.is_initialized = False

    def offload(self) -> None:
        if self.is_initialized:
            self._k, self._v = self._k.to("cpu", non_blocking=True), self._v.to("cpu", non_blocking=True)
            self._spares = []

    def prefetch(self) -> None:
        if self.is_initialized and self._k.device != self.device:
            self._k = self._k.to(self.device, non_blocking=True)
            self._v = self._v.to(self.device, non_blocking=True)

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

    @classmethod
    def gathered(cls, parts: list[tuple[AppendLayer, int, torch.Tensor]], spares_from: AppendLayer, *,
                 pad: int = 0, headroom: int = 0) -> AppendLayer:
        """A new layer whose row i is ``pad`` unset positions, then each part's row ``rows[i]`` from its
        stored position ``start`` on, in order (``parts``: ``(layer, start, rows)``): one copy.

        ``Engine``'s merge of a branch: what a beam's children shared (one row per beam) and what each
        child added, gathered per survivor. ``headroom = 0`` stores each row's keys as one contiguous
        block (a level that is read, never appended to: see ``SharedPrefix.start``); otherwise the
        layer keeps room to append. It takes over ``spares_from``'s recycled buffers, and recycles the
        parts' storage once copied.
        """
        first = parts[0][0]
        layer = cls(first.storage_dtype, spares=spares_from._spares)
        layer.device, layer.is_initialized = first.device, True
        parts = [(part, start, torch.as_tensor(rows, dtype=torch.long, device=layer.device))
                 for part, start, rows in parts]
        n = len(parts[0][2])
        layer._length = pad + sum(part._length - start for part, start, _ in parts)
        for name in ("_k", "_v"):
            like = getattr(first, name)
            new = layer._buffer(like, (n, like.shape[1], layer._length + headroom, like.shape[-1]),
                                room=1.0 if headroom else 0.5)
            new[:, :, :pad].zero_()  # never attended (Engine.attend_from refuses a window over them)
            at = pad
            for part, start, rows in parts:
                k = part._length - start
                torch.index_select(getattr(part, name)[:, :, start: part._length], 0, rows, out=new[:, :, at: at + k])
                at += k
            setattr(layer, name, new)
        for part in {id(part): part for part, _, _ in parts}.values():
            layer._recycle(part._k)
            layer._recycle(part._v)
        return layer

    def split_off(self) -> AppendLayer:
        """An empty layer storing the same dtype and sharing this one's recycled buffers
        (the rows' own layer of ``Engine.branch``, while this one is what they share)."""
        return AppendLayer(self.storage_dtype, spares=self._spares)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.reorder_cache(torch.arange(self._k.shape[0], device=self.device).repeat_interleave(repeats))


HUGE_PAGE = 2 << 20  # bytes of an x86-64 / arm64 transparent huge page
HUGE_PAGES_FROM = 4 << 20  # CPU storage at least this large asks the kernel for huge pages


def _empty(like: torch.Tensor, n: int) -> torch.Tensor:
    """Uninitialised flat storage for ``n`` elements of ``like``'s dtype, on its device.

    Large CPU storage is an anonymous mapping advised as transparent huge pages (Linux's
    ``MADV_HUGEPAGE``; a no-op where THP is off). Why: the cache is written a few positions at a
    time into every (row, head) block, each of those writes landing on a page never touched
    before; with 4 KiB pages each is a page fault inside the copy kernel. Measured at JAT's size
    (12 x 768, 32 envs, a 15-token append per decision, 2-core VM): the appends were 15-33 % of a
    decision, 0.7 % on huge pages (``bench/decode.py``'s JAT-size row, see docs/speed.md "Measured
    (speed)"). The mapping is returned to the system when the tensor is freed (the tensor holds
    the ``mmap``). Elsewhere (no ``MADV_HUGEPAGE``, another device, small storage) plain
    ``new_empty``.
    """
    size = n * like.element_size()
    if like.device.type != "cpu" or size < HUGE_PAGES_FROM or not hasattr(mmap, "MADV_HUGEPAGE"):
        return like.new_empty(n)
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps ``region`` alive as long as any view
    start = -whole.data_ptr() % HUGE_PAGE  # a huge page can only back an aligned 2 MiB range
    return whole[start: start + size].view(like.dtype)


def release(cache: Cache | None) -> None:
    """Hand the storage of a cache that is about to be dropped to its layers' spares (a cache of
    :class:`AppendLayer` made with shared spares, :func:`new_cache`), so that the next cache reuses it instead
    of touching fresh memory. The cache must not be read afterwards."""
    for layer in getattr(cache, "layers", ()):
        if isinstance(layer, AppendLayer):
            layer.release()


def new_cache(text_config, dtype: torch.dtype | None = None,
              spares: list[list[torch.Tensor]] | None = None) -> Cache:
    """An :class:`AppendLayer` cache (storing ``dtype``, default: the model's) when every backbone layer
    is full attention, else ``DynamicCache`` (which stores what the model computes). ``spares``: one list of
    recycled buffers per layer, shared with the other caches made with them (see :class:`AppendLayer`); it is
    extended in place to one list per layer of this cache."""
    layer_types, _ = get_layer_types_and_kwargs(text_config.get_text_config(decoder=True))
    if layer_types and all(t == "full_attention" for t in layer_types):
        if spares is not None:
            spares.extend([] for _ in range(len(layer_types) - len(spares)))
        return Cache(layers=[AppendLayer(dtype, spares=None if spares is None else spares[i])
                             for i in range(len(layer_types))])
    return DynamicCache(config=text_config)


def layer_contract_problems() -> list[str]:
    """What :class:`AppendLayer` assumes about transformers' cache-layer interface and no longer holds.

    Empty when the installed transformers matches what it was written against. Checks that
    ``CacheLayerMixin`` has no abstract method AppendLayer lacks, that ``DynamicLayer`` (the layer it
    replaces) has no public method or attribute AppendLayer does not define itself, and that the
    signatures ``Cache`` calls are unchanged.
    """
    version = transformers.__version__
    problems = []
    missing = sorted(n for n in getattr(CacheLayerMixin, "__abstractmethods__", ()) if n not in vars(AppendLayer))
    if missing:
        problems.append(f"transformers {version}: CacheLayerMixin gained abstract methods {missing}")
    unknown = sorted(n for n in dir(DynamicLayer) if not n.startswith("_") and n not in vars(AppendLayer))
    if unknown:
        problems.append(f"transformers {version}: the cache layer interface has members {unknown} that AppendLayer "
                        "does not define itself (it would inherit versions written for torch.cat storage)")
    expected = {
        "update": ["self", "key_states", "value_states", "args", "kwargs"],
        "crop": ["self", "tokens_to_remove"],
        "reorder_cache": ["self", "beam_idx"],
        "batch_repeat_interleave": ["self", "repeats"],
        "batch_select_indices": ["self", "indices"],
        "get_mask_sizes": ["self", "query_length"],
        "lazy_initialization": ["self", "key_states", "value_states"],
    }
    for name, params in expected.items():
        got = list(inspect.signature(getattr(DynamicLayer, name)).parameters)
        if got != params:
            problems.append(f"transformers {version}: DynamicLayer.{name}{tuple(got)} was {tuple(params)}")
    return problems
