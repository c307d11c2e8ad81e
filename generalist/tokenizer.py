"""`GeneralistTokenizer`: one object that turns every modality into one token stream.

(Over 400 lines on purpose: the product contract is *one* tokenizer object for text, images,
discrete and continuous values and whole episodes, with their save/load; the per-modality pieces
are short methods of it, and the sample helpers at the top are what every other module builds on.)

It knows no model. Its output is a *sample*: a dict of numpy arrays

====================  ==========================  ==================================================
key                   shape / dtype               meaning
====================  ==========================  ==================================================
``input_ids``         (L,) int64                  token ids in the layout of :mod:`generalist.vocab`
``modality_ids``      (L,) int64                  :class:`~generalist.vocab.Modality` of each token
``local_positions``   (L,) int64                  1 + index of the token inside its observation
                                                  (Gato §2.2); 0 for tokens outside observations
``patches``           (P, C*16*16) float32        pixels of each ``<image>`` token, in token order
``patch_positions``   (P, 2) int64                (row, column) of each patch inside its image
``labels``            (L,) int64                  the token this position is trained to *be*:
                                                  ``input_ids`` except at ``<no_return>`` positions,
                                                  whose label is the discounted value (see below)
====================  ==========================  ==================================================

and :meth:`GeneralistTokenizer.collate` pads a list of samples into a batch of torch tensors that
:class:`~generalist.modeling_generalist.GeneralistForCausalLM` takes as keyword arguments
(plus ``attention_mask`` and ``labels``).

One control timestep is laid out as (docs/token_layout.md)::

    [R_t] [o_t: its fields in TaskSpec.observation_fields order (text, image patches or values)] <sep> [a_t] [r_t]

``R_t`` is either an *input* (the return-to-go a Decision Transformer is conditioned on) or, in
unconditioned sequences, the token ``<no_return>`` whose *label* is the discounted return-to-go
``V_t = Σ_k γ^k r_{t+k}`` (modality ``VALUE``). The model thus predicts a value at every step without
ever being given one, which is what Trajectory Transformer planning reads (Janner et al. 2021, §3.2:
the value is a prediction of the model, never an input). After an episode that *terminated*, the
token at the next ``R`` position is ``<eos>``, trained like a value: "the episode is over".
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from generalist.task_spec import FieldSpec, TaskSpec
from generalist.vocab import (
    BOS,
    DEFAULT_IMAGE_SIZE,
    EOS,
    HIDDEN_ACTION,
    IMAGE,
    IMAGE_CHANNELS,
    MU_LAW_M,
    MU_LAW_MU,
    NO_RETURN,
    PAD,
    PATCH_SIZE,
    SEP,
    SPECIAL_TOKENS,
    Modality,
    VocabLayout,
)

CONFIG_FILE = "tokenizer_config.json"
# the packaged default: a byte-level BPE of 2048 tokens trained on CPython's documentation
# (tokenizers_cfg/build_default.py), so training works from any directory without a download
DEFAULT_TOKENIZER_DIR = Path(__file__).parent / "default_tokenizer"
TEXT_TOKENIZER_FILE = "text_tokenizer.json"
TASK_SPECS_FILE = "task_specs.json"

Sample = dict[str, np.ndarray]
SAMPLE_KEYS = ("input_ids", "modality_ids", "local_positions", "patches", "patch_positions", "labels")
PATCH_DIM = IMAGE_CHANNELS * PATCH_SIZE * PATCH_SIZE


class TokenizationError(ValueError):
    """Input that cannot be tokenized; the message names the field, the value and what was expected."""


# --- mu-law (Gato §2.1) ----------------------------------------------------------------------------


def mu_law_encode(x: np.ndarray, mu: float = MU_LAW_MU, m: float = MU_LAW_M) -> np.ndarray:
    """F(x) = sign(x) log(|x| mu + 1) / log(M mu + 1), not yet clipped."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sign(x) * np.log1p(np.abs(x) * mu) / np.log1p(m * mu)


def mu_law_decode(y: np.ndarray, mu: float = MU_LAW_MU, m: float = MU_LAW_M) -> np.ndarray:
    """Inverse of :func:`mu_law_encode` on [-1, 1]."""
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(m * mu)) / mu


# --- the sample under construction ---------------------------------------------------------------


def empty_sample() -> Sample:
    return {
        "input_ids": np.zeros(0, np.int64),
        "modality_ids": np.zeros(0, np.int64),
        "local_positions": np.zeros(0, np.int64),
        "patches": np.zeros((0, PATCH_DIM), np.float32),
        "patch_positions": np.zeros((0, 2), np.int64),
        "labels": np.zeros(0, np.int64),
    }


def returns_to_go(rewards: np.ndarray, discount: float = 1.0) -> np.ndarray:
    """``G_t = Σ_{k≥0} γ^k r_{t+k}`` for every step of an episode (T,) -> (T,) float64.

    The one place returns-to-go are computed: ``discount=1`` gives the Decision Transformer's
    undiscounted return-to-go (Chen et al. 2021), ``discount=γ`` the value targets.
    """
    rewards = np.asarray(rewards, np.float64).reshape(-1)
    if discount == 1.0:
        return np.cumsum(rewards[::-1])[::-1].copy()
    out = np.empty_like(rewards)
    acc = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + discount * acc
        out[t] = acc
    return out


def count_steps_within(lengths: Sequence[int], budget: int, from_end: bool = True) -> int:
    """How many whole steps (of these token ``lengths``) fit in ``budget`` tokens, taken from the end
    (the most recent steps: sliding windows, end-of-episode prompts) or from the start.

    The one place "keep the last whole steps that fit" is decided, for packing, prompts and the Agent.
    """
    lengths = np.asarray(lengths, np.int64)
    cum = np.cumsum(lengths[::-1] if from_end else lengths)
    return int(np.searchsorted(cum, budget, side="right"))


def concat_samples(samples: Sequence[Sample]) -> Sample:
    """Join samples end to end (patches follow their placeholder tokens)."""
    if not samples:
        return empty_sample()
    return {k: np.concatenate([s[k] for s in samples]) for k in SAMPLE_KEYS}


def slice_sample(sample: Sample, start: int, stop: int | None = None) -> Sample:
    """Tokens ``[start, stop)`` of a sample, with exactly the patches of the image tokens kept."""
    n = len(sample["input_ids"])
    start, stop, _ = slice(start, stop).indices(n)
    is_image = sample["modality_ids"] == Modality.IMAGE
    p0, p1 = int(is_image[:start].sum()), int(is_image[:stop].sum())
    out = {k: sample[k][start:stop] for k in ("input_ids", "modality_ids", "local_positions", "labels")}
    out["patches"] = sample["patches"][p0:p1]
    out["patch_positions"] = sample["patch_positions"][p0:p1]
    return out


def token_sample(ids, modality: Modality, local: np.ndarray | None = None) -> Sample:
    """Plain tokens of one modality (no image patches) as a sample; local positions 0 unless given."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    s = empty_sample()
    s["input_ids"] = ids
    s["modality_ids"] = np.full(len(ids), int(modality), np.int64)
    s["local_positions"] = np.zeros(len(ids), np.int64) if local is None else local
    s["labels"] = ids
    return s


def _block(ids: np.ndarray, modality: Modality, patches: np.ndarray | None = None,
           patch_positions: np.ndarray | None = None) -> Sample:
    """A block of T steps: ids (T, k); patches (T, p, D) and positions (T, p, 2) follow the ids."""
    ids = np.asarray(ids, np.int64)
    t = ids.shape[0]
    return {
        "input_ids": ids,
        "modality_ids": np.full(ids.shape, int(modality), np.int64),
        "local_positions": np.zeros(ids.shape, np.int64),
        "patches": np.zeros((t, 0, PATCH_DIM), np.float32) if patches is None else patches,
        "patch_positions": np.zeros((t, 0, 2), np.int64) if patch_positions is None else patch_positions,
        "labels": ids,
    }


def _concat_blocks(blocks: Sequence[Sample]) -> Sample:
    return {k: np.concatenate([b[k] for b in blocks], axis=1) for k in SAMPLE_KEYS}


def _row(block: Sample | list[Sample], i: int) -> Sample:
    """Step ``i`` of a block (or of a list of per-step samples) as a sample."""
    return block[i] if isinstance(block, list) else {k: v[i] for k, v in block.items()}


@dataclass(frozen=True)
class StepLayout:
    """Where the tokens of one control step sit: ``[R] [o ...] <sep> [a ...] [r]``.

    The one source of "tokens per step" for packing, prompts, the Agent's window and the planner
    (nothing else adds up ``+ 3  # R, <sep>, r``). ``observation_tokens`` is the most an observation
    can take; a text field makes it vary, and then it is an estimate (its encoded length of a
    typical value) rather than exact.
    """

    observation_tokens: int
    action_tokens: int

    return_index = 0  # R_t opens the step

    @property
    def prompt_tokens(self) -> int:
        """``[R] [o] <sep>``: what a decision feeds before sampling the action."""
        return self.observation_tokens + 2

    @property
    def closing_tokens(self) -> int:
        """``[a] [r]``: what follows the prompt."""
        return self.action_tokens + 1

    @property
    def tokens(self) -> int:
        """The whole step, reward included."""
        return self.prompt_tokens + self.closing_tokens


class GeneralistTokenizer:
    """Gato-style tokenizer for text, images, discrete and continuous values (Reed et al. 2022, §2).

    Args:
        text_tokenizer: a trained 🤗 ``tokenizers.Tokenizer`` (any BPE JSON file works).
        image_size: every image is fitted into an ``image_size`` x ``image_size`` box (see
            :meth:`preprocess_image`), so it always gives ``(image_size / 16) ** 2`` patches.
        task_specs: the tasks this tokenizer (and the model trained with it) knows.
    """

    def __init__(self, text_tokenizer: Tokenizer, image_size: int = DEFAULT_IMAGE_SIZE,
                 task_specs: Iterable[TaskSpec] = ()):
        if image_size % PATCH_SIZE or image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
        self.text_tokenizer = text_tokenizer
        self.layout = VocabLayout(text_size=text_tokenizer.get_vocab_size())
        self.image_size = image_size
        self.task_specs: dict[str, TaskSpec] = {}
        for spec in task_specs:
            self.add_task_spec(spec)
        self._set_layout(self.layout)

    def _set_layout(self, layout: VocabLayout) -> None:
        self.layout = layout
        self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.image_id, self.no_return_id = (
            layout.special_id(t) for t in (PAD, BOS, EOS, SEP, IMAGE, NO_RETURN)
        )
        # None in a layout saved before the token existed (its model never saw it)
        self.hidden_action_id = layout.special_id(HIDDEN_ACTION) if HIDDEN_ACTION in layout.special_tokens else None

    def with_all_special_tokens(self) -> GeneralistTokenizer:
        """This tokenizer with every special token this version defines (appended; no id changes), for a
        *new* model. A loaded tokenizer keeps the layout it was saved with, which its model was built on."""
        if self.layout.special_tokens != SPECIAL_TOKENS[: len(self.layout.special_tokens)]:
            raise ValueError(f"special tokens {self.layout.special_tokens} are not a prefix of {SPECIAL_TOKENS}")
        self._set_layout(replace(self.layout, special_tokens=SPECIAL_TOKENS))
        return self

    # --- vocabulary ---
    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // PATCH_SIZE) ** 2

    def add_task_spec(self, spec: TaskSpec) -> None:
        self.task_specs[spec.name] = spec

    def get_task_spec(self, task: str | TaskSpec) -> TaskSpec:
        if isinstance(task, TaskSpec):
            return task
        try:
            return self.task_specs[task]
        except KeyError:
            raise KeyError(f"unknown task {task!r}; this tokenizer knows {sorted(self.task_specs)}") from None

    # --- continuous values ---
    def encode_continuous(self, x: np.ndarray, field: str = "value") -> np.ndarray:
        """mu-law companding, clip to [-1, 1], 1024 uniform bins (vectorised; ±inf saturate)."""
        try:
            x = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TokenizationError(f"{field}: continuous values must be numbers, got {np.asarray(x).dtype} "
                                    f"({e})") from None
        if np.isnan(x).any():
            bad = np.argwhere(np.isnan(x))[0].tolist()
            raise TokenizationError(f"{field}: NaN at index {bad}; continuous values must not be NaN")
        y = np.clip(mu_law_encode(x), -1.0, 1.0)
        bins = self.layout.num_continuous
        idx = np.minimum(np.floor((y + 1.0) / 2.0 * bins).astype(np.int64), bins - 1)  # +1 -> last bin
        return idx + self.layout.continuous_offset

    def decode_continuous(self, ids: np.ndarray) -> np.ndarray:
        """Token ids -> bin centres, mapped back through the inverse mu-law."""
        idx = np.asarray(ids, dtype=np.int64) - self.layout.continuous_offset
        self._check_range(idx, self.layout.num_continuous, "continuous")
        y = -1.0 + (idx + 0.5) * 2.0 / self.layout.num_continuous
        return mu_law_decode(y).astype(np.float32)

    # --- discrete values ---
    def encode_discrete(self, x, field: str = "value", n: Sequence[int] | int | None = None,
                        start: Sequence[int] | int = 0) -> np.ndarray:
        """Integers 0..n-1 (after subtracting ``start``) -> their own id range."""
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_)):
            if np.issubdtype(x.dtype, np.floating) and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
                x = x.astype(np.int64)
            else:
                raise TokenizationError(f"{field}: discrete values must be integers, got {x!r}")
        v = x.astype(np.int64) - np.asarray(start, np.int64)
        limit = np.asarray(self.layout.num_discrete if n is None else n, np.int64)
        bad = (v < 0) | (v >= limit)
        if bad.any():
            i = tuple(int(k) for k in np.argwhere(bad)[0])
            raise TokenizationError(
                f"{field}: value {x[i] if x.ndim else x.item()} at index {list(i)} is outside the space "
                f"(expected {int(np.broadcast_to(np.asarray(start), x.shape)[i])} <= value < "
                f"{int(np.broadcast_to(np.asarray(start), x.shape)[i] + np.broadcast_to(limit, x.shape)[i])})"
            )
        return v + self.layout.discrete_offset

    def decode_discrete(self, ids) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64) - self.layout.discrete_offset
        self._check_range(idx, self.layout.num_discrete, "discrete")
        return idx

    @staticmethod
    def _check_range(idx: np.ndarray, size: int, kind: str) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise TokenizationError(f"ids outside the {kind} range (offsets {idx.min()}..{idx.max()})")

    # --- text ---
    def encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizationError(f"text must be a str, got {type(text).__name__}")
        return self.text_tokenizer.encode(text).ids

    def decode_text(self, ids: Iterable[int]) -> str:
        """Text ids -> str; ids of other kinds (specials, values) are skipped."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.layout.text_size]
        return self.text_tokenizer.decode(ids)

    # --- images ---
    def preprocess_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Any image -> uint8 (S, S, 3), S = ``image_size``.

        The rule: convert to RGB (grey, palette and alpha modes are converted by PIL, alpha dropped),
        scale bilinearly so the longer side is S (aspect ratio kept), centre on a black S x S canvas.
        An (S, S, 3) uint8 array is used as is.
        """
        s = self.image_size
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TokenizationError(f"image arrays must be uint8 (H, W, C), got dtype {image.dtype}")
            if image.ndim == 2:
                image = image[..., None]
            if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
                raise TokenizationError(f"image arrays must have shape (H, W, 1|3|4), got {image.shape}")
            if image.shape == (s, s, 3):
                return image
            image = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        if not isinstance(image, Image.Image):
            raise TokenizationError(f"images must be PIL images or uint8 arrays, got {type(image).__name__}")
        image = image.convert("RGB")
        w, h = image.size
        scale = s / max(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        if new != (w, h):
            image = image.resize(new, Image.BILINEAR)
        canvas = Image.new("RGB", (s, s))
        canvas.paste(image, ((s - new[0]) // 2, (s - new[1]) // 2))
        return np.asarray(canvas, dtype=np.uint8)

    def encode_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Image -> patches float32 (N_patches, C*16*16), row-major, pixels in [-1, 1] / sqrt(16)."""
        return self._patchify(self.preprocess_image(image)[None])[0]

    def _patchify(self, images: np.ndarray) -> np.ndarray:
        """uint8 (T, S, S, C) -> float32 (T, N, C*P*P) (Gato §2.2 normalisation)."""
        t, s = images.shape[0], self.image_size
        g = s // PATCH_SIZE
        x = images.reshape(t, g, PATCH_SIZE, g, PATCH_SIZE, IMAGE_CHANNELS)
        x = x.transpose(0, 1, 3, 5, 2, 4).reshape(t, g * g, PATCH_DIM)  # (T, N, C*P*P), channel-first
        return ((x.astype(np.float32) / 127.5 - 1.0) / np.sqrt(PATCH_SIZE)).astype(np.float32)

    def _patch_positions(self, n_images: int) -> np.ndarray:
        g = self.image_size // PATCH_SIZE
        rows, cols = np.divmod(np.arange(g * g), g)
        return np.tile(np.stack([rows, cols], 1), (n_images, 1)).astype(np.int64)

    # --- samples: text, image-caption ---
    def encode_text_sample(self, text: str) -> Sample:
        """Plain text for language modelling: ``<bos> text <eos>``."""
        return concat_samples([
            token_sample([self.bos_id], Modality.SPECIAL),
            token_sample(self.encode_text(text) + [self.eos_id], Modality.TEXT),
        ])

    def encode_image_caption(self, image, caption: str | None = None) -> Sample:
        """``<bos> <image>*N <sep> caption <eos>``; without a caption, the prompt for captioning."""
        image_tokens = self._image_tokens(self.preprocess_image(image)[None])
        parts = [token_sample([self.bos_id], Modality.SPECIAL), image_tokens,
                 token_sample([self.sep_id], Modality.SPECIAL)]
        if caption is not None:
            parts.append(token_sample(self.encode_text(caption) + [self.eos_id], Modality.CAPTION))
        return concat_samples(parts)

    def _image_tokens(self, frames: np.ndarray) -> Sample:
        s = token_sample(np.full(len(frames) * self.patches_per_image, self.image_id), Modality.IMAGE)
        s["patches"] = self._patchify(frames).reshape(-1, PATCH_DIM)
        s["patch_positions"] = self._patch_positions(len(frames))
        return s

    # --- control episodes ---
    # A *block* is a sample whose arrays have a leading step axis: ids (T, k), patches (T, p, D).
    # Fixed-size fields give blocks, so a whole episode is laid out with array concatenation;
    # only text fields (variable length per step) need the per-step path.

    def _field_block(self, fld: FieldSpec, values, t: int, modality: Modality) -> Sample | list[Sample]:
        """One field for ``t`` steps -> a block, or ``t`` per-step samples for text."""
        if fld.kind == "text":
            if isinstance(values, str) or len(values) != t:
                raise TokenizationError(f"{fld.name}: expected {t} strings, got {values!r:.80}")
            return [token_sample(self.encode_text(v), modality) for v in values]
        if fld.kind == "image":
            frames = self._frames(fld, values, t)
            n = self.patches_per_image
            return _block(np.full((t, n), self.image_id), Modality.IMAGE,
                          patches=self._patchify(frames), patch_positions=self._patch_positions(t).reshape(t, n, 2))
        arr = np.asarray(values)
        if arr.ndim == 0 or arr.shape[0] != t or int(np.prod(arr.shape[1:])) != fld.size:
            raise TokenizationError(
                f"{fld.name}: expected values of shape ({t}, {', '.join(map(str, fld.shape))}) "
                f"(T steps of {fld.space_type} {fld.shape}), got {arr.shape}")
        arr = arr.reshape(t, fld.size)
        if fld.kind == "continuous":
            ids = self.encode_continuous(arr, field=fld.name)
            if modality == Modality.ACTION:
                self._check_bounds(fld, arr)
        else:
            ids = self.encode_discrete(arr, field=fld.name, n=fld.n, start=fld.start)
        return _block(ids, modality)

    def _check_bounds(self, fld: FieldSpec, arr: np.ndarray) -> None:
        low, high = np.asarray(fld.low), np.asarray(fld.high)
        bad = (arr < low - 1e-6) | (arr > high + 1e-6)
        if bad.any():
            t, j = np.argwhere(bad)[0]
            raise TokenizationError(
                f"{fld.name}: action value {arr[t, j]:.6g} at step {t}, element {j} is outside the "
                f"Box bounds [{low[j]:.6g}, {high[j]:.6g}]")

    def _frames(self, fld: FieldSpec, values, t: int) -> np.ndarray:
        if isinstance(values, np.ndarray) and values.dtype == np.uint8 and values.shape[1:] == (
                self.image_size, self.image_size, IMAGE_CHANNELS) and len(values) == t:
            return values
        if len(values) != t:
            raise TokenizationError(f"{fld.name}: expected {t} images, got {len(values)}")
        try:
            return np.stack([self.preprocess_image(np.asarray(v) if not isinstance(v, Image.Image) else v)
                             for v in values])
        except TokenizationError as e:
            raise TokenizationError(f"{fld.name}: {e}") from None

    def encode_steps(
        self,
        task: str | TaskSpec,
        observations: dict[str, Any],
        actions: dict[str, Any] | None = None,
        rewards: np.ndarray | None = None,
        returns_to_go: np.ndarray | None = None,
        values: np.ndarray | None = None,
        action_labels: dict[str, Any] | None = None,
    ) -> list[Sample]:
        """Encode T timesteps; one sample per step ``[R_t] [o_t] <sep> [a_t] [r_t]``.

        ``returns_to_go`` None means "no return" (Gato mode): ``R_t`` is ``<no_return>``, labelled
        with ``values`` (T,) (discounted returns-to-go, task units) when given. Without ``actions``
        each step ends after ``<sep>`` (the prompt for the next action); without ``rewards`` after
        the action. ``action_labels`` (same fields as ``actions``): the action tokens' labels, where the
        inputs stay ``actions`` (DART: the expert's action where a noisy one was executed).
        """
        steps = self._steps(task, observations, actions, rewards, returns_to_go, values, action_labels)
        return steps if isinstance(steps, list) else [_row(steps, i) for i in range(len(steps["input_ids"]))]

    def _steps(self, task, observations, actions, rewards, returns_to_go, values=None,
               action_labels=None) -> Sample | list[Sample]:
        """The steps as one block (fixed layout) or as per-step samples (text fields)."""
        spec = self.get_task_spec(task)
        t = self._num_steps(spec, observations)
        obs = [self._field_block(f, self._get(observations, f, "observations"), t, Modality.OBSERVATION)
               for f in spec.observation_fields]
        act = [] if actions is None else [
            self._field_block(f, self._get(actions, f, "actions"), t, Modality.ACTION) for f in spec.action_fields]
        if action_labels is not None:  # the same ids layout: only which action each token is trained to be
            act = [{**block, "labels": self._field_block(f, self._get(action_labels, f, "action_labels"), t,
                                                         Modality.ACTION)["input_ids"]}
                   for block, f in zip(act, spec.action_fields, strict=True)]
        rew = []
        if rewards is not None:  # before the returns: they are computed from the rewards
            r = self._scalars(rewards, t, "rewards") * spec.reward_scale
            rew = [_block(self.encode_continuous(r, "rewards")[:, None], Modality.REWARD)]
        ret = self._return_block(spec, t, returns_to_go, values)
        sep = _block(np.full((t, 1), self.sep_id), Modality.SPECIAL)
        if all(isinstance(b, dict) for b in obs):  # fixed layout: lay out all steps at once
            obs_block = _concat_blocks(obs)
            obs_block["local_positions"][:] = np.arange(1, obs_block["input_ids"].shape[1] + 1)
            return _concat_blocks([ret, obs_block, sep, *act, *rew])
        per_step = []
        for i in range(t):
            o = concat_samples([_row(b, i) for b in obs])
            o["local_positions"] = np.arange(1, len(o["input_ids"]) + 1, dtype=np.int64)
            per_step.append(concat_samples([_row(ret, i), o, _row(sep, i), *(_row(b, i) for b in act + rew)]))
        return per_step

    def _return_block(self, spec: TaskSpec, t: int, returns_to_go: np.ndarray | None,
                      values: np.ndarray | None = None) -> Sample:
        """The ``R`` token of ``t`` steps (a (t, 1) block): the return-to-go as input, or ``<no_return>``
        labelled with the value when ``values`` are given."""
        if returns_to_go is not None:
            rtg = self._scalars(returns_to_go, t, "returns_to_go") * spec.return_scale
            return _block(self.encode_continuous(rtg, "returns_to_go")[:, None], Modality.RETURN)
        ret = _block(np.full((t, 1), self.no_return_id), Modality.SPECIAL)
        if values is not None:  # the input stays <no_return>; the label is the value (a prediction)
            v = self._scalars(values, t, "values") * spec.return_scale
            ret["labels"] = self.encode_continuous(v, "values")[:, None]
            ret["modality_ids"][:] = int(Modality.VALUE)
        return ret

    def set_returns(self, task: str | TaskSpec, steps: Sequence[Sample], returns_to_go: np.ndarray) -> list[Sample]:
        """These steps (one per row, as :meth:`encode_steps` gives them) with ``R_t`` set to
        ``returns_to_go`` (task units): an agent conditions already-encoded observations on returns
        without encoding them again."""
        block = self._return_block(self.get_task_spec(task), len(steps), returns_to_go)
        i = StepLayout.return_index
        out = []
        for row, step in enumerate(steps):
            step = dict(step)
            for key in ("input_ids", "modality_ids", "labels"):
                step[key] = step[key].copy()
                step[key][i] = block[key][row, 0]
            out.append(step)
        return out

    @staticmethod
    def _get(values: dict[str, Any], fld: FieldSpec, what: str):
        try:
            return values[fld.name]
        except KeyError:
            raise TokenizationError(f"{what} has no field {fld.name!r}; got fields {sorted(values)}") from None

    @staticmethod
    def _num_steps(spec: TaskSpec, observations: dict[str, Any]) -> int:
        first = spec.observation_fields[0]
        if first.name not in observations:
            raise TokenizationError(f"observations has no field {first.name!r}; got fields {sorted(observations)}")
        return len(observations[first.name])

    @staticmethod
    def _scalars(x, t: int, name: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if len(x) != t:
            raise TokenizationError(f"{name}: expected {t} values (one per step), got {len(x)}")
        return x

    def encode_episode(
        self,
        task: str | TaskSpec,
        observations: dict[str, Any],
        actions: dict[str, Any],
        rewards: np.ndarray,
        condition_on_return: bool = True,
        start: bool = True,
        end: bool = True,
        terminated: bool = False,
        **_: Any,
    ) -> Sample:
        """A whole (or the first part of an) episode -> one sample.

        ``<bos>`` (if ``start``) + T steps + ``<eos>`` (if ``end``). Returns-to-go are the
        undiscounted sums of the remaining rewards; with ``condition_on_return=False`` every ``R_t``
        is ``<no_return>``, labelled with the discounted value. ``terminated``: see
        :meth:`end_of_episode`. Extra keys of an episode dict (``task``, ``source``...) are ignored,
        so ``encode_episode(**episode)`` works.
        """
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if len(rewards) == 0:
            raise TokenizationError(f"{getattr(task, 'name', task)}: episode is empty (0 steps)")
        spec = self.get_task_spec(task)
        rtg = returns_to_go(rewards) if condition_on_return else None
        values = None if condition_on_return else returns_to_go(rewards, spec.discount)
        steps = self._steps(spec, observations, actions, rewards, rtg, values)
        if isinstance(steps, dict):  # block (T, k, ...) -> flat (T*k, ...)
            steps = [{k: v.reshape(-1, *v.shape[2:]) for k, v in steps.items()}]
        head = [token_sample([self.bos_id], Modality.SPECIAL)] if start else []
        tail = [self.end_of_episode(terminated)] if end else []
        return concat_samples(head + steps + tail)

    def end_of_episode(self, terminated: bool) -> Sample:
        """``<eos>`` after an episode's last step.

        After a *terminated* episode it stands where the next ``R`` would and is a training target
        (modality ``VALUE``): the planner reads its probability as "the episode ends here". After a
        truncated one (a time limit, which the model cannot see) it only separates episodes.
        """
        return token_sample([self.eos_id], Modality.VALUE if terminated else Modality.SPECIAL)

    def step_layout(self, task: str | TaskSpec) -> StepLayout:
        """The token layout of one step of ``task`` (text observation fields count 16 tokens)."""
        spec = self.get_task_spec(task)
        per_field = {"image": self.patches_per_image, "text": 16}
        obs = sum(per_field.get(f.kind, f.size) for f in spec.observation_fields)
        return StepLayout(observation_tokens=obs, action_tokens=spec.action_size)

    # --- decoding actions ---
    def action_token_ranges(self, task: str | TaskSpec) -> list[tuple[int, int]]:
        """Half-open id range ``[lo, hi)`` allowed for each action token of a task, in order.

        Continuous elements allow only the bins whose centres lie inside the Box bounds; discrete
        elements only the values of their space.
        """
        spec = self.get_task_spec(task)
        out = []
        for fld in spec.action_fields:
            if fld.kind == "continuous":
                for lo, hi in zip(fld.low, fld.high, strict=True):
                    ids = self.encode_continuous(np.array([lo, hi]))
                    a, b = int(ids[0]), int(ids[1]) + 1
                    centres = self.decode_continuous(np.arange(a, b))
                    inside = np.flatnonzero((centres >= lo) & (centres <= hi))
                    out.append((a + int(inside[0]), a + int(inside[-1]) + 1) if len(inside) else (a, b))
            else:
                base = self.layout.discrete_offset
                out += [(base, base + n) for n in fld.n]
        return out

    def decode_action(self, task: str | TaskSpec, ids: Sequence[int]):
        """Action token ids of one step -> the action as the env expects it (clipped to its Box)."""
        spec = self.get_task_spec(task)
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) != spec.action_size:
            raise TokenizationError(f"{spec.name}: expected {spec.action_size} action tokens, got {len(ids)}")
        leaves, i = {}, 0
        for fld in spec.action_fields:
            chunk = ids[i:i + fld.size]
            i += fld.size
            if fld.kind == "continuous":
                v = np.clip(self.decode_continuous(chunk), fld.low, fld.high).astype(fld.dtype)
            else:
                v = (self.decode_discrete(chunk) + np.asarray(fld.start)).astype(fld.dtype)
            leaves[fld.name] = v.reshape(fld.shape) if fld.shape else v.reshape(()).item()
        return spec.unflatten_action(leaves)

    def encode_action(self, task: str | TaskSpec, action) -> np.ndarray:
        """One env action -> its action token ids (the inverse of :meth:`decode_action`)."""
        spec = self.get_task_spec(task)
        leaves = spec.flatten_action(action)
        return np.concatenate([
            self._field_block(f, [leaves[f.name]], 1, Modality.ACTION)["input_ids"][0] for f in spec.action_fields])

    # --- batching ---
    def encode(self, item) -> Sample:
        """One item of any modality -> a sample (see :meth:`__call__`)."""
        if isinstance(item, str):
            return self.encode_text_sample(item)
        if isinstance(item, dict):
            if "input_ids" in item:
                return item
            if "caption" in item or "image" in item:
                return self.encode_image_caption(item["image"], item.get("caption"))
            if "observations" in item:
                return self.encode_episode(item.get("spec") or item["task"], **{
                    k: v for k, v in item.items() if k not in ("task", "spec")})
        raise TokenizationError(
            f"cannot tokenize {type(item).__name__}: expected a str, an {{'image', 'caption'}} dict, an "
            "episode dict {'task', 'observations', 'actions', 'rewards'} or an encoded sample")

    def __call__(self, items, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize and batch a list of texts, image–caption dicts and episode dicts (mixed)."""
        if isinstance(items, str | dict):
            items = [items]
        return self.collate([self.encode(x) for x in items], max_length=max_length)

    def collate(self, samples: Sequence[Sample], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Right-pad samples into a batch. Longer samples than ``max_length`` keep their first tokens.

        Returns ``input_ids``, ``attention_mask``, ``modality_ids``, ``local_positions``, ``labels``
        (B, L) and ``patches`` (P, C*16*16), ``patch_positions`` (P, 2) over the whole batch in order.
        """
        if max_length is not None:
            samples = [slice_sample(s, 0, max_length) for s in samples]
        length = max(len(s["input_ids"]) for s in samples)
        b = len(samples)
        input_ids = np.full((b, length), self.pad_id, np.int64)
        modality = np.full((b, length), int(Modality.PAD), np.int64)
        local = np.zeros((b, length), np.int64)
        mask = np.zeros((b, length), np.int64)
        labels = np.full((b, length), -100, np.int64)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n], modality[i, :n], local[i, :n], mask[i, :n], labels[i, :n] = (
                s["input_ids"], s["modality_ids"], s["local_positions"], 1, s["labels"])
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "modality_ids": torch.from_numpy(modality),
            "local_positions": torch.from_numpy(local),
            "labels": torch.from_numpy(labels),
            "patches": torch.from_numpy(np.concatenate([s["patches"] for s in samples])),
            "patch_positions": torch.from_numpy(np.concatenate([s["patch_positions"] for s in samples])),
        }

    # --- save / load ---
    def save_pretrained(self, save_directory: str | os.PathLike) -> list[Path]:
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": type(self).__name__, "image_size": self.image_size,
                  "layout": self.layout.to_dict(), "mu_law": {"mu": MU_LAW_MU, "M": MU_LAW_M},
                  "patch_size": PATCH_SIZE}
        files = [d / CONFIG_FILE, d / TEXT_TOKENIZER_FILE, d / TASK_SPECS_FILE]
        files[0].write_text(json.dumps(config, indent=2))
        self.text_tokenizer.save(str(files[1]))
        files[2].write_text(json.dumps({k: v.to_dict() for k, v in self.task_specs.items()}, indent=2))
        return files

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs) -> GeneralistTokenizer:
        """Load from a directory written by :meth:`save_pretrained`, or from a 🤗 Hub repo id."""
        d = Path(name_or_path)
        if not d.is_dir():
            from huggingface_hub import snapshot_download
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            if d.exists():
                raise NotADirectoryError(f"{name_or_path}: a tokenizer is a folder (written by save_pretrained), "
                                         "not a file")
            try:  # a path that cannot be a repo id ('a/b/c', './x', '/x') was meant as a local folder
                validate_repo_id(str(name_or_path))
            except HFValidationError:
                raise FileNotFoundError(f"{name_or_path}: no such tokenizer folder (and not a Hub repo id "
                                        "'user/name')") from None
            d = Path(snapshot_download(str(name_or_path), allow_patterns=[
                CONFIG_FILE, TEXT_TOKENIZER_FILE, TASK_SPECS_FILE], **hub_kwargs))
        config = _read_json(d / CONFIG_FILE)
        try:
            text = Tokenizer.from_file(str(d / TEXT_TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise OSError(f"cannot read text tokenizer {d / TEXT_TOKENIZER_FILE}: {e}") from e
        specs = [TaskSpec.from_dict(s) for s in _read_json(d / TASK_SPECS_FILE).values()] if (
            d / TASK_SPECS_FILE).exists() else []
        tok = cls(text, image_size=config.get("image_size", DEFAULT_IMAGE_SIZE), task_specs=specs)
        saved = VocabLayout.from_dict(config["layout"])
        if saved == replace(tok.layout, special_tokens=SPECIAL_TOKENS[: len(saved.special_tokens)]):
            tok._set_layout(saved)  # saved by an earlier version, with fewer special tokens: keep its ids
        else:
            raise ValueError(f"{d / CONFIG_FILE}: saved vocabulary layout {saved} does not match the text "
                             f"tokenizer's (text vocabulary {tok.layout.text_size})")
        return tok

    @classmethod
    def default(cls) -> GeneralistTokenizer:
        """The tokenizer shipped with the package (:data:`DEFAULT_TOKENIZER_DIR`), no task specs."""
        return cls.from_pretrained(DEFAULT_TOKENIZER_DIR)

    @classmethod
    def from_text_tokenizer_file(cls, path: str | os.PathLike, **kwargs) -> GeneralistTokenizer:
        """Use any 🤗 ``tokenizers`` JSON file for the text part."""
        return cls(Tokenizer.from_file(str(path)), **kwargs)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OSError(f"{path} not found; is this a directory written by save_pretrained?") from None
    except json.JSONDecodeError as e:
        raise OSError(f"{path} is not valid JSON (truncated or corrupted?): {e}") from e
