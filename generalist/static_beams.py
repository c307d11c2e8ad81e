"""A beam decoder with static shapes for the Trajectory Transformer planner (:func:`generalist.modes.tt.tt_plan`).

Why a second decoder: :class:`~generalist.engine.Engine` decodes anything (rows that drift apart, left padding,
snapshots, cache levels shared between beams), and pays for it at every forward in Python bookkeeping and in
tensors whose shapes change at every call. A plan is ~230 forwards (hopper at the reference's settings), and on a
2-core CPU that bookkeeping and the per-operator dispatch of each forward were as much time as the arithmetic
(``bench/tt_bound.py``). A plan needs much less: every beam advances one token (one cache *column*) at a time in
lockstep, every beam of an environment reads the same context, and the planner's sliding window
(``TTConfig.context_steps``, the reference's ``max_context_transitions``) bounds how far back any token reads. So
the keys and values live in two fixed blocks, per layer:

* ``ring`` (E*B, H, T, d): each beam's window, T = ``context_steps`` steps. It starts with the window's part of
  the context, copied once from the engine's cache into every beam (``context_steps - 1`` whole steps and the
  current step's prompt; a column the engine had masked, left padding or a forgotten past, stays masked here). The
  token of column c is written at slot ``(c - L) mod T`` (L: the context's length); a window never reaches back T
  columns, so a slot is overwritten only after its token has left every window.
* ``wide`` (E*B*X, H, W, d): between :meth:`StaticBeams.branch` and :meth:`StaticBeams.select`, each child's new
  tokens (the action tokens and the reward). The children read their parent's ring in place (queries viewed as
  (parent, child, ...)), so branching copies nothing; ``select`` copies each survivor's parent ring once and
  writes its new tokens into it.

Every forward then has one of three shapes (children with one token, beams with one, beams with two), times the
width of the logits it computes (only the next token's ids: an action's bins, an observation's, the value's), and
AOTInductor compiles each into one program (``compile=True``, :func:`compiled_forward`; five for the planner at
the reference's settings). The method names are
the engine's (``feed``, ``branch``, ``select``, ``attend_from``, ``sample``, ``generate``), so the planner's loop
drives either decoder. It computes what the engine computes: the same logits and the same plan
(``tests/test_static_beams.py``). It supports the Llama backbone (the default; grouped-query attention too, no biases);
:func:`unsupported` names what else makes the planner use the engine.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from generalist.decode_state import Chunk, DecodeState
from generalist.engine import Engine, TokenSampler, as_range
from generalist.kv_cache import AppendLayer
from generalist.sampling import median_index


@dataclass
class BeamState:
    """What :class:`StaticBeams`' rows hold that the planner reads: the next-token logits (rows, V') of ids from
    ``logits_offset``, the number of cache columns so far, and where the sliding window starts."""

    logits: torch.Tensor
    logits_offset: int
    length: int
    window_start: int = 0
    median: torch.Tensor | None = None  # (rows,) the median bin over StaticBeams.median_range, where computed

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]


def unsupported(engine: Engine, state: DecodeState) -> str | None:
    """Why :class:`StaticBeams` cannot plan from ``state`` (then the planner uses the engine), or ``None``."""
    text = engine.model.config.text_config
    backbone = getattr(getattr(engine.model, "backbone", None), "model", None)
    if getattr(text, "model_type", None) != "llama" or backbone is None:
        return f"its backbone is {getattr(text, 'model_type', None)!r}, not a Llama"
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        return "biases in attention or MLP"
    if state.cache is None or state.prefix is not None or state.branch is not None:
        return "the state has no cache of its own (use_cache=False, or rows sharing a prefix)"
    layers = getattr(state.cache, "layers", None)
    if not layers or not all(isinstance(layer, AppendLayer) and layer.is_initialized for layer in layers):
        return "the cache is not the engine's own"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: the statistics in float32, the weight applied in ``x``'s dtype."""
    return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021) as Llama applies it (``rotate_half``)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def beam_forward(ids, local, cos, sin, ring_mask, ring_slots, wide_mask, wide_slots, head, tables, layers, norm,
                 ring, wide, *, eps: float, scaling: float, act, median_columns: tuple[int, int] | None):
    """Q new tokens per row through the model -> logits at the last one (R, V'), and with ``median_columns``
    (a, b) the bin of the predicted median over logit columns a..b-1 (R,) (:func:`~generalist.sampling.median_index`:
    what the planner reads as an imagined observation), else ``None``.

    The first nine arguments change at every call, the rest only between :meth:`StaticBeams.branch` and
    :meth:`StaticBeams.select` (every argument but the keywords is a tensor or a list of them, or ``None``: what
    the compiled program takes as its inputs, :func:`compiled_forward`). ``head`` (V', D): the rows of the output
    embedding of the ids the next token may be (the logits computed). ``ids`` and ``local`` (R, Q): the new
    tokens and their local positions, embedded by lookup in ``tables`` (:meth:`GeneralistForCausalLM.embedding_tables`);
    ``cos``/``sin`` (E, Q, d): rotary tables of each environment's positions (its beams are all at the same one).
    ``layers[i]``: the weights of layer i (``norm1``, ``qkv``, ``o``, ``norm2``, ``gate_up``, ``down``); ``act``
    the MLP's activation. Per layer ``ring[i]`` = (keys, values) (P, Hkv, T, d), P = E x B beams (R = P rows without
    ``wide``, P x children with it), ``wide[i]`` (R, Hkv, W, d) or ``None``; Hkv key/value heads, each read by
    H / Hkv query heads (``qkv`` holds H + 2 Hkv heads' rows). Additive masks: ``ring_mask`` (E, Q, T),
    ``wide_mask`` (Q, W). The new keys and values are written (in place) into the ring at ``ring_slots`` (Q,), or
    into ``wide`` at ``wide_slots`` (Q,) when it is given, before attending, so that each token reads itself.
    """
    tokens, places = tables
    x = (tokens[ids] + places[local.clamp(max=places.shape[0] - 1)]).to(head.dtype)  # (R, Q, D)
    rows, q_len, width = x.shape
    envs = cos.shape[0]
    parents, kv_heads, slots, dim = ring[0][0].shape
    heads = layers[0]["qkv"].shape[0] // dim - 2 * kv_heads  # query heads: kv_heads groups of `group`
    group = heads // kv_heads  # 1 without grouped-query attention (Ainslie et al. 2023)
    cos, sin = cos[:, None, :, None], sin[:, None, :, None]  # (E, 1, Q, 1, d)
    ring_mask = ring_mask[:, None, None, :, None, None]  # (E, 1, 1, Q, 1, 1, T)
    for i, w in enumerate(layers):
        q, k, v = F.linear(rms_norm(x, w["norm1"], eps), w["qkv"]).split(
            [heads * dim, kv_heads * dim, kv_heads * dim], -1)
        q = rotate(q.view(envs, rows // envs, q_len, heads, dim), cos, sin) * scaling  # (E, R/E, Q, H, d)
        k = rotate(k.view(envs, rows // envs, q_len, kv_heads, dim), cos, sin).view(rows, q_len, kv_heads, dim)
        own_k, own_v, at = (ring[i][0], ring[i][1], ring_slots) if wide is None else (*wide[i], wide_slots)
        own_k.index_copy_(2, at, k.transpose(1, 2))  # (R, Hkv, Q, d) into (R, Hkv, T or W, d)
        own_v.index_copy_(2, at, v.view(rows, q_len, kv_heads, dim).transpose(1, 2))
        q = q.reshape(envs, parents // envs, -1, q_len, kv_heads, group, dim)  # (E, B, children, Q, Hkv, G, d)
        ring_k = ring[i][0].view(envs, parents // envs, kv_heads, slots, dim)
        # one product per child: each is then a matrix-vector product, which inductor fuses into one kernel that
        # reads the parent's ring once for all its children (as one product (children, d) x (d, T), an extern
        # batched product per layer read it at half the speed)
        scores = [(torch.stack([torch.einsum("ebqkgd,ebktd->ebqkgt", child, ring_k) for child in q.unbind(2)], 2)
                   + ring_mask).reshape(rows, q_len, heads, slots)]  # (R, Q, H, T)
        if wide is not None:
            scores.append(torch.einsum("rqkgd,rkwd->rqkgw", q.reshape(rows, q_len, kv_heads, group, dim), wide[i][0])
                          .reshape(rows, q_len, heads, -1) + wide_mask[:, None])  # (R, Q, H, W)
        sizes = [s.shape[-1] for s in scores]
        p = torch.cat(scores, -1).float().softmax(-1).to(x.dtype).split(sizes, -1)  # (R, Q, H, keys)
        ring_v = ring[i][1].view(envs, parents // envs, kv_heads, slots, dim)
        out = torch.stack([torch.einsum("ebqkgt,ebktd->ebqkgd", child, ring_v) for child in p[0].reshape(
            envs, parents // envs, -1, q_len, kv_heads, group, slots).unbind(2)], 2).reshape(rows, q_len, heads, dim)
        if wide is not None:
            out = out + torch.einsum("rqkgw,rkwd->rqkgd", p[1].reshape(rows, q_len, kv_heads, group, -1),
                                     wide[i][1]).reshape(rows, q_len, heads, dim)
        x = x + F.linear(out.reshape(rows, q_len, heads * dim), w["o"])
        gate, up = F.linear(rms_norm(x, w["norm2"], eps), w["gate_up"]).chunk(2, -1)
        x = x + F.linear(act(gate) * up, w["down"])
    logits = F.linear(rms_norm(x[:, -1], norm, eps), head).float()  # (R, V')
    if median_columns is None:
        return logits, None
    return logits, median_index(logits[:, median_columns[0]: median_columns[1]])


# Inductor options of the compiled forward on a CPU, measured on bfloat16 plans at the reference's hopper settings
# (A/B in one process, 5 plans per variant, alternating; 2-core Intel Xeon with AMX): defaults 1.29 s, ``cpp_wrapper``
# (the generated code calls its kernels from C++, not Python) 1.21 s, and with ``realize_opcount_threshold`` 4 1.11 s;
# in a second run thresholds 4 / 8 / 16: 1.06 / 1.04 / 1.16 s (the CPU default is 50). With the default, the one-token
# attention kernel recomputed each query's rotary embedding and scaling for every key it read (85 times): the query
# was a cheap enough expression to inline into the score loop. Neither option changed a float32 plan beyond noise
# (1.45 / 1.39 / 1.39 s). A CUDA device keeps inductor's defaults (not measured).
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True, "realize_opcount_threshold": 8}


LAYER_WEIGHTS = ("norm1", "qkv", "o", "norm2", "gate_up", "down")  # the keys of beam_forward's layers[i]


def _tensors(step: tuple, kept: tuple) -> list[torch.Tensor]:
    """:func:`beam_forward`'s positional arguments (``step``: the first nine, ``kept``: the rest) as one flat list
    of tensors, the order the compiled program takes them in (``None`` leaves none; :func:`_arguments` inverts)."""
    tables, layers, norm, ring, wide = kept
    return ([t for t in step if t is not None] + list(tables) + [w[k] for w in layers for k in LAYER_WEIGHTS]
            + [norm] + [t for kv in ring + (wide or []) for t in kv])


def _arguments(tensors: tuple, layers: int, children: bool) -> tuple:
    """The positional arguments of :func:`beam_forward` from :func:`_tensors`' list (``children``: with ``wide``)."""
    t = iter(tensors)
    step = [next(t) for _ in range(6)] + ([next(t), next(t)] if children else [None, None]) + [next(t)]
    tables = (next(t), next(t))
    weights = [{k: next(t) for k in LAYER_WEIGHTS} for _ in range(layers)]
    norm = next(t)
    ring = [(next(t), next(t)) for _ in range(layers)]
    wide = [(next(t), next(t)) for _ in range(layers)] if children else None
    return (*step, tables, weights, norm, ring, wide)


class _Program(torch.nn.Module):
    """:func:`beam_forward` at one shape with its keyword arguments bound, as ``torch.export`` takes it: its inputs
    are :func:`_tensors`' flat list."""

    def __init__(self, layers: int, children: bool, static: dict):
        super().__init__()
        self.layers, self.children, self.static = layers, children, static

    def forward(self, *tensors):
        return beam_forward(*_arguments(tensors, self.layers, self.children), **self.static)


def cache_dir() -> Path:
    """Where compiled forwards are kept between processes: ``$GENERALIST_CACHE/aoti`` (default
    ``~/.cache/generalist/aoti``)."""
    return Path(os.environ.get("GENERALIST_CACHE", Path.home() / ".cache" / "generalist")) / "aoti"


CACHE_MB = 512  # default bound on cache_dir()'s packages (~2.3 MB each: five per plan shape and dtype)
_PACKAGE = re.compile(r"beam_forward-[0-9a-f]{32}\.pt2")  # a complete package (a partial one adds -<pid>)


def prune_cache(max_bytes: int | None = None, partial_age_s: float = 3600.0) -> list[Path]:
    """Bound :func:`cache_dir`: keep the most recently used packages whose sizes add up to at most ``max_bytes``
    (default ``$GENERALIST_AOTI_CACHE_MB``, else :data:`CACHE_MB`; the newest is always kept) and delete the rest,
    and partial packages older than ``partial_age_s`` (a compile that died). Returns the deleted paths.

    Why: a package is named by a digest that includes this module's code, so every upgrade of generalist, every
    task, number of environments, beam width and dtype leaves five more behind; unbounded, the cache only grows.
    "Used" is the file's modification time, which :func:`compiled_forward` refreshes at every load. Run after each
    new package is written; files that are not packages are never touched."""
    if max_bytes is None:
        value = os.environ.get("GENERALIST_AOTI_CACHE_MB", str(CACHE_MB))
        try:
            max_bytes = int(float(value) * 2**20)
        except ValueError:
            raise ValueError(f"GENERALIST_AOTI_CACHE_MB must be a number of megabytes, got {value!r}") from None
    folder, now, deleted = cache_dir(), time.time(), []
    if not folder.is_dir():
        return deleted
    packages = []
    for path in folder.glob("beam_forward-*.pt2"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # deleted by another process meanwhile
            continue
        if _PACKAGE.fullmatch(path.name):
            packages.append((stat.st_mtime, stat.st_size, path))
        elif now - stat.st_mtime > partial_age_s:
            deleted.append(path)
    total = 0
    for i, (_, size, path) in enumerate(sorted(packages, reverse=True)):  # most recently used first
        total += size
        if i > 0 and total > max_bytes:
            deleted.append(path)
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


@functools.cache
def _code_digest() -> str:
    """What the compiled program is made of besides its inputs' shapes: this module's and the median's code and
    torch's version (a package compiled by other code is never loaded)."""
    from generalist import sampling

    text = Path(__file__).read_text() + Path(sampling.__file__).read_text() + torch.__version__
    return hashlib.sha256(text.encode()).hexdigest()


def _mark_used(path: Path) -> bool:
    """Whether the package ``path`` exists; if so its modification time becomes now (:func:`prune_cache` keeps the
    most recently used). A cache one may not write to is read as it is."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:
        return path.exists()
    return True


_programs: dict[str, object] = {}  # digest -> the loaded program's run(list of tensors) -> list of tensors
_failed: set[str] = set()  # device types where compiling failed: eager there from then on


def compiled_forward(step: tuple, kept: tuple, static: dict):
    """:func:`beam_forward` at the shape of its arguments (``step``: the first nine, ``kept``: the rest) compiled
    ahead of time by AOTInductor: ``run(_tensors(step, kept))`` -> ``[logits]`` or ``[logits, median]``.
    ``None`` where compiling is not possible here (a warning says why once; the caller runs eagerly).

    Why ahead of time and not ``torch.compile``: a plan is ~230 forwards of ~3 ms, and ``torch.compile``'s call
    path (dynamo's frame hook and guards over ~50 inputs, the AOT runtime wrappers) took ~0.3 ms of each (through
    AOTInductor a plan is 1.10x faster in bfloat16, 1.07x in float32, docs/speed.md). The program takes every
    weight as an input (no copy of them, nothing stale when the model changes), and is kept on disk
    (:func:`cache_dir`) under a digest of the inputs' shapes, strides and dtypes, the keyword arguments, the
    inductor options and the code, so that it compiles once per machine (~15 s a shape on 2 cores), not once per
    process."""
    tensors = _tensors(step, kept)
    device = tensors[0].device
    if device.type in _failed:
        return None
    options = CPU_COMPILE_OPTIONS if device.type == "cpu" else {}
    layers, children = len(kept[1]), kept[-1] is not None
    signature = repr(([(tuple(t.shape), t.stride(), t.dtype) for t in tensors], layers, children, device.type,
                      static, options))
    digest = hashlib.sha256((signature + _code_digest()).encode()).hexdigest()[:32]
    if digest not in _programs:
        path = cache_dir() / f"beam_forward-{digest}.pt2"
        try:
            if not _mark_used(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f"{path.stem}-{os.getpid()}.pt2")  # renamed when complete
                with warnings.catch_warnings():  # torch's own deprecation inside export, once per program
                    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                    program = torch.export.export(_Program(layers, children, static), tuple(tensors), strict=False)
                    torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                             inductor_configs=dict(options))
                os.replace(partial, path)
                prune_cache()
            _programs[digest] = torch._inductor.aoti_load_package(str(path)).loader.boxed_run
        except Exception as err:  # noqa: BLE001  (exporting and compiling fail in many ways: no C++ compiler...)
            _failed.add(device.type)
            warnings.warn(f"StaticBeams: compiling the forward failed ({type(err).__name__}: {err}); decoding "
                          "eagerly", RuntimeWarning, stacklevel=3)
            return None
    return _programs[digest]


class StaticBeams(TokenSampler):
    """``beams`` beams per row of an engine ``state``, decoded on fixed buffers (see the module's docstring).

    Args:
        engine: the engine whose model, device and generator the beams use; its ``state`` is only read.
        state: E environments whose context ends where the plan starts (its logits predict the first token).
        beams: B beams per environment (every one starts as the context).
        window: columns the ring holds (>= any window's reach: ``context_steps`` steps).
        shared: columns of the context kept (the first window's part of it).
        wide: tokens a child may be fed between ``branch`` and ``select``.
        columns: tokens the plan may feed in all.
        vocab_range: (lo, hi) the ids every forward computes logits for (all the plan samples from).
        median_range: (lo, hi) the ids of one continuous value's bins: every forward of one token per beam (not
            children) also computes the predicted median over them in the same call, which :meth:`sample` returns
            when asked for that median (the planner's imagined observations, ``k_obs=1``).
        compile: run each forward as a program compiled ahead of time (:func:`compiled_forward`; eager, with a
            warning, where compiling fails).
    """

    def __init__(self, engine: Engine, state: DecodeState, beams: int, window: int, shared: int, wide: int,
                 columns: int, vocab_range: tuple[int, int], median_range: tuple[int, int] | None = None,
                 compile: bool = False):
        if (reason := unsupported(engine, state)) is not None:
            raise ValueError(f"StaticBeams cannot decode this state: {reason}")
        model, text = engine.model, engine.model.config.text_config
        self.generator, self.device, self.dtype = engine.generator, engine.device, engine.dtype
        self.compile = compile
        body = model.backbone.model
        self.layers = [dict(norm1=layer.input_layernorm.weight, norm2=layer.post_attention_layernorm.weight,
                            qkv=torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                           layer.self_attn.v_proj.weight]),
                            o=layer.self_attn.o_proj.weight, down=layer.mlp.down_proj.weight,
                            gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
                       for layer in body.layers]
        self.static = dict(eps=float(text.rms_norm_eps), scaling=float(body.layers[0].self_attn.scaling),
                           act=body.layers[0].mlp.act_fn)
        self.tables = model.embedding_tables()
        self.norm = body.norm.weight
        # (rows, tokens, children?, median columns, logit width) -> compiled_forward's run
        self._programs: dict[tuple, object] = {}
        self._kept: dict[tuple, list[torch.Tensor]] = {}  # (ring, wide) buffers -> their _tensors
        lo, hi = vocab_range
        self.head = model.backbone.get_output_embeddings().weight[lo:hi].contiguous()  # (V', D)
        self.offset = lo
        if median_range is not None and not lo <= median_range[0] < median_range[1] <= hi:
            raise ValueError(f"StaticBeams: median_range {median_range} is outside vocab_range {vocab_range}")
        self.median_range = median_range

        e, length = state.batch_size, state.length
        self.envs, self.beams, self.context = e, beams, length
        cache = state.cache.layers
        heads, dim = cache[0].keys.shape[1], cache[0].keys.shape[-1]
        kept = min(shared, length)

        def block(rows: int, columns: int) -> torch.Tensor:
            return torch.zeros(rows, heads, columns, dim, dtype=self.dtype, device=self.device)

        if not kept < window:
            raise ValueError(f"StaticBeams: the ring ({window} columns) must hold more than the context kept ({kept})")
        self.ring = []  # the context's last ``kept`` columns in the slots they map to, in every beam
        for layer in cache:
            k, v = block(e * beams, window), block(e * beams, window)
            k[:, :, window - kept:] = layer.keys[:, :, length - kept:].repeat_interleave(beams, 0)
            v[:, :, window - kept:] = layer.values[:, :, length - kept:].repeat_interleave(beams, 0)
            self.ring.append((k, v))
        self.ring_columns = torch.full((window,), -1)  # (T,) the column each slot holds; -1: none
        self.ring_columns[window - kept:] = torch.arange(length - kept, length)
        self.valid = torch.ones(e, window, dtype=torch.bool)  # (E, T) False: a context column left out (padding)
        self.valid[:, window - kept:] = state.attention_mask[:, length - kept:].bool()
        self.spare = [(block(e * beams, window), block(e * beams, window)) for _ in cache]
        self.wide_size, self.wide, self.children = wide, None, 0
        self.wide_columns: list[int] = []
        # rotary tables of every column the plan may feed, each environment at its own position: (E, columns, d)
        positions = state.next_position[:, None] + torch.arange(columns)  # (E, columns)
        self.cos, self.sin = (t.to(self.dtype) for t in body.rotary_emb(self.head, positions.to(self.device)))
        self.state = BeamState(logits=state.logits.repeat_interleave(beams, 0), logits_offset=state.logits_offset,
                               length=length)  # the first logits are the engine's, over whatever range it chose

    # --- the engine's methods the planner calls ---
    def _median(self, state: BeamState, allowed, logits: torch.Tensor, offset: int) -> torch.Tensor:
        """The median over ``median_range`` is the one the forward computed (:meth:`TokenSampler._median`)."""
        if state.median is not None and as_range(allowed) == self.median_range:
            return state.median + offset
        return super()._median(state, allowed, logits, offset)

    def attend_from(self, state: BeamState, start: int | None) -> BeamState:
        """Every later forward reads only columns ``start`` and after (:meth:`Engine.attend_from`)."""
        state.window_start = start or 0
        return state

    def branch(self, state: BeamState, n: int) -> BeamState:
        """Each beam becomes ``n`` children (grouped per beam) that read its ring in place (:meth:`Engine.branch`)."""
        if self.children:
            raise RuntimeError("StaticBeams.branch: the beams are branched already; select first")
        if self.wide is None or self.wide[0][0].shape[0] != self.envs * self.beams * n:
            rows = self.envs * self.beams * n
            heads, dim = self.ring[0][0].shape[1], self.ring[0][0].shape[-1]
            self.wide = [tuple(torch.zeros(rows, heads, self.wide_size, dim, dtype=self.dtype, device=self.device)
                               for _ in range(2)) for _ in self.ring]
        self.children, self.wide_columns = n, []
        state.logits, state.median = state.logits.repeat_interleave(n, 0), None
        return state

    def select(self, state: BeamState, rows: torch.Tensor) -> BeamState:
        """Keep the children ``rows`` (one per beam slot, E*B of them): each survivor's ring is its parent's
        with its own new tokens written in (:meth:`Engine.select`)."""
        if not self.children or len(rows) != self.envs * self.beams:
            raise ValueError(f"StaticBeams.select takes {self.envs * self.beams} children after a branch, got "
                             f"{len(rows)}{'' if self.children else ' without one'}")
        rows_d = rows.to(self.device)
        parents, n = rows_d // self.children, len(self.wide_columns)
        columns = torch.tensor(self.wide_columns)
        slots = (columns - self.context) % self.ring_columns.shape[0]
        slots_d = slots.to(self.device)
        for (k, v), (new_k, new_v), (wide_k, wide_v) in zip(self.ring, self.spare, self.wide, strict=True):
            torch.index_select(k, 0, parents, out=new_k)
            torch.index_select(v, 0, parents, out=new_v)
            new_k[:, :, slots_d] = wide_k[rows_d, :, :n]
            new_v[:, :, slots_d] = wide_v[rows_d, :, :n]
        self.ring, self.spare = self.spare, self.ring
        self.ring_columns[slots] = columns
        self.valid[:, slots] = True
        self.children = 0
        state.logits, state.median = state.logits[rows], None
        return state

    @torch.inference_mode()
    def feed(self, state: BeamState, chunk: Chunk | torch.Tensor, next_allowed=None) -> BeamState:
        """Feed one or two tokens per row (ids (R,) / (R, Q), or a :class:`Chunk` with local positions);
        ``state.logits`` then predicts the next token: over ``next_allowed``'s ids where it is an id range (the
        product with the output embedding is then a fraction of the whole: an action's bins are ~a quarter of
        ``vocab_range``, an observation's half), else over ``vocab_range``."""
        if isinstance(chunk, Chunk):
            if not bool(chunk.attention_mask.all()):
                raise ValueError("StaticBeams.feed: every row must be fed the same number of tokens (no padding)")
            ids, local = chunk.input_ids, chunk.local_positions
        else:
            ids = torch.as_tensor(chunk, dtype=torch.long)
            # contiguous: a broadcast id (the planner's <no_return> for every beam) would otherwise be a stride-0
            # tensor, which another compiled program would be made for
            ids = (ids[:, None] if ids.dim() == 1 else ids).contiguous()
            local = torch.zeros_like(ids)
        rows, q_len = ids.shape
        if rows != state.batch_size:
            raise ValueError(f"StaticBeams.feed: {rows} rows fed, the beams have {state.batch_size}")
        columns = state.length + torch.arange(q_len)  # (Q,)
        at = state.length - self.context
        if at + q_len > self.cos.shape[1]:
            raise ValueError(f"StaticBeams: fed past the {self.cos.shape[1]} columns it was made for")
        start = state.window_start
        if self.children:  # children: new tokens into their wide block; their parents' rings read as they are
            if len(self.wide_columns) + q_len > self.wide_size:
                raise ValueError(f"StaticBeams: more than {self.wide_size} tokens fed between branch and select")
            wide_slots = torch.arange(len(self.wide_columns), len(self.wide_columns) + q_len)
            self.wide_columns += columns.tolist()
            ring_seen = (self.valid & (self.ring_columns >= start))[:, None].expand(-1, q_len, -1)  # (E, Q, T)
            wide_seen = torch.arange(self.wide_size)[None] <= wide_slots[:, None]  # (Q, W)
            ring_slots = torch.zeros(q_len, dtype=torch.long)
            wide, wide_mask = self.wide, _additive(wide_seen, self.dtype, self.device)
        else:
            ring_slots = (columns - self.context) % self.ring_columns.shape[0]
            self.ring_columns[ring_slots] = columns
            self.valid[:, ring_slots] = True
            ring_seen = (self.valid[:, None] & (self.ring_columns >= start)
                         & (self.ring_columns <= columns[:, None]))  # (E, Q, T)
            wide, wide_mask, wide_slots = None, None, None
        lo, hi = self._logit_range(next_allowed)
        medians = None if (self.median_range is None or wide is not None or q_len > 1
                           or not lo <= self.median_range[0] < self.median_range[1] <= hi) else (
            self.median_range[0] - lo, self.median_range[1] - lo)
        step = (ids.to(self.device), local.to(self.device), self.cos[:, at: at + q_len], self.sin[:, at: at + q_len],
                _additive(ring_seen, self.dtype, self.device), ring_slots.to(self.device),
                wide_mask, None if wide_slots is None else wide_slots.to(self.device),
                self.head[lo - self.offset: hi - self.offset])
        kept = (self.tables, self.layers, self.norm, self.ring, wide)
        static = dict(self.static, median_columns=medians)
        kind = (rows, q_len, wide is not None, medians, hi - lo)
        if self.compile and kind not in self._programs:
            self._programs[kind] = compiled_forward(step, kept, static)
        run = self._programs.get(kind)
        if run is None:
            logits, median = beam_forward(*step, *kept, **static)
        else:  # what the beams keep listed once per set of buffers (the ring and its spare swap at each select)
            buffers = (id(self.ring[0][0]), None if wide is None else id(wide[0][0]))
            if buffers not in self._kept:
                self._kept[buffers] = _tensors((), kept)
            logits, median = (*run([t for t in step if t is not None] + self._kept[buffers]), None)[:2]
        state.logits, state.logits_offset = logits.cpu(), lo
        state.median = None if median is None else median.cpu()
        state.length += q_len
        return state

    def _logit_range(self, allowed) -> tuple[int, int]:
        """The ids (lo, hi) a forward computes logits for when the next token is constrained by ``allowed``."""
        full = (self.offset, self.offset + self.head.shape[0])
        if allowed is None or (r := as_range(allowed)) is None:
            return full
        if not full[0] <= r[0] < r[1] <= full[1]:
            raise ValueError(f"StaticBeams.feed: next_allowed ids {r} are outside the vocab_range {full}")
        return r


def _additive(seen: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A bool mask (True = read) as an additive one: 0 where read, -inf where not."""
    return torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf")).to(device)


__all__ = ["BeamState", "StaticBeams", "beam_forward", "cache_dir", "compiled_forward", "prune_cache", "rms_norm",
           "rotate", "unsupported"]
