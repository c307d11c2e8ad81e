"""The training data stream: sample sources by mixture weight, prompt Gato-style, pack to a fixed length.

Everything here needs only the tokenizer (no model, no dataset builder), so it runs inside
``DataLoader`` workers, where tokenization belongs: the training step never waits for it.

::

    PackedStream (IterableDataset)            batch b of rank r = sequences b*B .. b*B+B-1
      └─ sequence i: rng = default_rng([seed, r, i])
           ├─ pick a source by mixture weight (one source per sequence, as in Gato)
           └─ source.pack(rng) -> exactly seq_len tokens
                TextSource      <bos> text <eos> <bos> text <eos> ...   (long texts: a random window)
                CaptionSource   <bos> <image>*N <sep> caption <eos> ...
                ControlSource   [end of a demonstration episode of the same task] + live episode(s) of
                                that task; returns-to-go shown, or every R_t = <no_return>

A sequence depends only on ``(seed, rank, index)``, never on what was drawn before, so the stream
resumes exactly from a batch index, gives every rank its own shard (by ``rank`` in the seed) and
gives the same batches whatever the number of workers.

Weights mean *share of sequences* (hence of tokens: every sequence has ``seq_len`` of them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from generalist.tokenizer import (
    GeneralistTokenizer,
    Sample,
    concat_samples,
    count_steps_within,
    returns_to_go,
    slice_sample,
    token_sample,
)
from generalist.vocab import Modality

SampleBy = Literal["episodes", "steps"]  # how a task's episodes are drawn: PackingConfig.sample_by


@dataclass(frozen=True)
class PackingConfig:
    """How sequences are built.

    Attributes:
        seq_len: tokens per packed sequence (the model's context in training).
        return_prob: probability that a control sequence shows returns-to-go (Decision Transformer
            conditioning); otherwise every ``R_t`` is ``<no_return>`` (Gato mode).
        prompt_prob: probability that a ``<no_return>`` control sequence starts with the end of
            another episode of the same task as a demonstration (Gato's prompt).
        prompt_fraction: at most this share of ``seq_len`` goes to the demonstration.
        imitation_threshold: ``<no_return>`` sequences show only episodes whose expert-normalised
            return is at least this (Gato's filter is 0.8); ``None``: every episode (plain behaviour
            cloning of the whole dataset). Return-conditioned sequences always see every episode.
        hidden_action_prob: probability that a control sequence shows every action *input* as
            ``<hidden_action>`` (labels kept): the policy view, which Gato and DT modes use at
            inference. A policy that sees its past actions learns to repeat them (the "copycat"
            problem of behaviour cloning from histories, Wen et al. 2020); hidden, it must read the
            states. The other sequences keep real actions for the world model TT plans with.
        expert_labels: in unconditioned (imitation) sequences of episodes that record the expert's
            action at every step (``expert_actions``, datasets_build's control datasets), that action
            is the label and the executed one stays the input. The perturbed episodes then teach what
            the expert does in the states they reach, where a cloned policy's own errors lead (DART,
            Laskey et al. 2017); without it they teach the noise. Where a source records the expert's
            actions in every episode (:attr:`ControlSource.expert_labelled`), every episode is such a
            lesson and ``imitation_threshold`` picks only the prompts. Return-conditioned sequences
            keep the executed actions.
        task_weights: how much more often a control task's episodes start a sequence than its
            episode count alone would say (``{task: weight}``; a task not named weighs 1). Tasks learn
            at different speeds in one model: the control preset's Pendulum needs about three times
            its share of sequences to learn the expert's energy switch (docs/control.md, "What held learning
            back"). ``None``: episodes are drawn uniformly within their dataset.
        sample_by: ``"episodes"``: within a task every episode is equally likely to be drawn (a sequence's
            first and every following episode); ``"steps"``: in proportion to its length, so every step
            is equally likely, as Decision Transformer (``p_sample`` in its gym experiment) and Trajectory
            Transformer (one item per step) sample D4RL. On data whose good episodes are the long ones
            (a replay buffer: early policies fall within tens of steps, late ones run hundreds), drawing
            by episode shows mostly the short bad ones. Tasks keep their share either way.
        dt_window_steps: return-conditioned sequences are packed as independent windows of at most this
            many steps (a uniformly drawn start, cut at the episode's end), each its own attention document:
            its position ids restart at 0 and it attends only to itself (:meth:`Mixture.batch`). Decision
            Transformer trains on K-step windows (Chen et al. 2021: K = 20 on D4RL) and return-conditioned
            policies without history on single steps (RvS, Emmons et al. 2022: K = 1). With a long history
            the history says which of the data's policies is playing and the target is read little
            (docs/control.md, "DT's context length"); in a K-step window it must be. DT mode then acts with
            the same window (:attr:`GeneralistConfig.dt_context_steps`). ``None``: whole episodes, as
            unconditioned sequences always are.
    """

    seq_len: int = 512
    return_prob: float = 0.5
    prompt_prob: float = 0.25
    prompt_fraction: float = 0.25
    imitation_threshold: float | None = 0.8
    hidden_action_prob: float = 0.0
    expert_labels: bool = False
    task_weights: Mapping[str, float] | None = None
    sample_by: SampleBy = "episodes"
    dt_window_steps: int | None = None

    def __post_init__(self):
        if self.sample_by not in get_args(SampleBy):
            raise ValueError(f"sample_by must be one of {get_args(SampleBy)}, got {self.sample_by!r}")
        for task, weight in (self.task_weights or {}).items():
            if not weight > 0:
                raise ValueError(f"task_weights[{task!r}] must be > 0, got {weight!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.dt_window_steps is not None and self.dt_window_steps < 1:
            raise ValueError(f"dt_window_steps must be at least 1 (None: whole episodes), got {self.dt_window_steps}")
        for name in ("return_prob", "prompt_prob", "prompt_fraction", "hidden_action_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class Source(Protocol):
    """A dataset in the mixture: packs one full sequence from its own items."""

    name: str

    def pack(self, rng: np.random.Generator, tok: GeneralistTokenizer, cfg: PackingConfig) -> tuple[Sample, dict]:
        """Exactly ``cfg.seq_len`` tokens and a small dict describing what went in."""
        ...


@runtime_checkable
class WindowedSource(Protocol):
    """A dataset read as a stream (``datasets_build.streaming``): sequence ``index`` of ``rank`` is packed
    from the in-memory source ``at(rank, index)`` returns (the stream's window at that point)."""

    name: str

    def at(self, rank: int, index: int) -> Source:
        ...


def fit(sample: Sample, room: int, seq_len: int, rng: np.random.Generator) -> Sample:
    """A sample longer than the context is cut to a random ``seq_len`` window; then to ``room``."""
    n = len(sample["input_ids"])
    if n > seq_len:
        start = int(rng.integers(0, n - seq_len + 1))
        sample = slice_sample(sample, start, start + seq_len)
    return slice_sample(sample, 0, room) if len(sample["input_ids"]) > room else sample


def _length(sample: Sample) -> int:
    return len(sample["input_ids"])


@dataclass
class TextSource:
    """Plain text for language modelling (``<bos> text <eos>`` samples, packed end to end)."""

    name: str
    texts: Sequence[str]

    def pack(self, rng: np.random.Generator, tok: GeneralistTokenizer, cfg: PackingConfig) -> tuple[Sample, dict]:
        parts, room = [], cfg.seq_len
        while room > 0:
            sample = fit(tok.encode_text_sample(self.texts[int(rng.integers(len(self.texts)))]), room, cfg.seq_len, rng)
            parts.append(sample)
            room -= _length(sample)
        return concat_samples(parts), {"source": self.name, "kind": "text"}


@dataclass
class CaptionSource:
    """Image–caption pairs (items with ``image`` and ``caption``), packed end to end."""

    name: str
    items: Sequence[Mapping[str, Any]]

    def pack(self, rng: np.random.Generator, tok: GeneralistTokenizer, cfg: PackingConfig) -> tuple[Sample, dict]:
        parts, room = [], cfg.seq_len
        while room > 0:
            item = self.items[int(rng.integers(len(self.items)))]
            sample = fit(tok.encode_image_caption(item["image"], item["caption"]), room, cfg.seq_len, rng)
            parts.append(sample)
            room -= _length(sample)
        return concat_samples(parts), {"source": self.name, "kind": "caption"}


def episode_steps(tok: GeneralistTokenizer, episode: Mapping[str, Any], t0: int, t1: int,
                  condition_on_return: bool, expert_labels: bool = False) -> list[Sample]:
    """Steps ``t0..t1-1`` of an episode; returns-to-go (inputs) or values (labels) over the whole episode.

    ``expert_labels`` (unconditioned steps of an episode that records ``expert_actions``): each action
    token's *label* is the expert's action at that state, its input the executed one (DART, see
    :attr:`PackingConfig.expert_labels`).
    """
    rewards = np.asarray(episode["rewards"], np.float64)
    obs = {k: v[t0:t1] for k, v in episode["observations"].items()}
    act = {k: v[t0:t1] for k, v in episode["actions"].items()}
    if condition_on_return:
        return tok.encode_steps(episode["task"], obs, act, rewards[t0:t1], returns_to_go(rewards)[t0:t1])
    discount = tok.get_task_spec(episode["task"]).discount
    labels = None
    if expert_labels and "expert_actions" in episode:
        labels = {k: v[t0:t1] for k, v in episode["expert_actions"].items()}
    return tok.encode_steps(episode["task"], obs, act, rewards[t0:t1], None,
                            values=returns_to_go(rewards, discount)[t0:t1], action_labels=labels)


def demonstration(tok: GeneralistTokenizer, episode: Mapping[str, Any], budget: int, rng: np.random.Generator,
                  end: bool | None = None, expert_labels: bool = False) -> Sample:
    """A Gato prompt (Reed et al. 2022, §3.3) of at most ``budget`` tokens from one episode.

    Half of the prompts (``end=None``: drawn by ``rng``) are the *end* of the episode (its last
    whole steps, then ``<eos>``), where the goal is reached; the other half a window of whole steps
    at a uniformly drawn start (``<bos>`` if it starts the episode, ``<eos>`` if it ends it). Every
    ``R`` is ``<no_return>``. Training (:class:`ControlSource`) and evaluation
    (:func:`generalist.modes.gato.demonstration_prompt`) both draw prompts here, so they match.
    """
    if end is None:
        end = bool(rng.random() < 0.5)
    n_steps = len(episode["rewards"])
    per_step = max(1, _length(episode_steps(tok, episode, n_steps - 1, n_steps, False)[0]))
    k = max(1, min(n_steps, (budget - 1) // per_step))  # whole steps that fit beside <bos>/<eos>
    t0 = n_steps - k if end else int(rng.integers(0, n_steps - k + 1))
    steps = episode_steps(tok, episode, t0, t0 + k, False, expert_labels)
    head = [token_sample([tok.bos_id], Modality.SPECIAL)] if t0 == 0 else []
    tail = [tok.end_of_episode(bool(episode.get("terminated", False)))] if t0 + k == n_steps else []
    room = budget - sum(_length(p) for p in head + tail)
    n = count_steps_within([_length(x) for x in steps], room, from_end=end)  # variable-length (text) steps
    if n == 0:  # one step is longer than the budget: its last tokens
        tail_tokens = concat_samples(steps[-1:] + tail)
        return slice_sample(tail_tokens, max(0, _length(tail_tokens) - budget))
    if n < len(steps):  # variable-length (text) steps: fewer fit than estimated
        steps, head, tail = (steps[len(steps) - n:], [], tail) if end else (steps[:n], head, [])
    return concat_samples(head + steps + tail)


def hide_actions(sample: Sample, tok: GeneralistTokenizer) -> Sample:
    """``sample`` with every action token's *input* replaced by ``<hidden_action>``; labels unchanged (see
    :attr:`PackingConfig.hidden_action_prob`). Training and the Agent's policy view both call this."""
    if tok.hidden_action_id is None:
        raise ValueError("this tokenizer's layout has no <hidden_action> token (saved by an earlier version); "
                         "a new model gets it from GeneralistTokenizer.with_all_special_tokens()")
    out = dict(sample)
    out["labels"] = sample["labels"].copy()  # token_sample shares one array between ids and labels
    out["input_ids"] = np.where(sample["modality_ids"] == int(Modality.ACTION), tok.hidden_action_id,
                                sample["input_ids"])
    return out


@dataclass
class ControlSource:
    """Episodes of one or more control tasks (dicts as ``datasets_build.iter_episodes`` yields them).

    Args:
        name: the dataset's name in the mixture.
        episodes: random-access episodes ``{"task", "observations", "actions", "rewards", ...}``.
        tasks: the task of each episode (so that a demonstration of the same task is found without
            reading every episode).
        sources: the policy that made each episode (``"expert"``, ``"noisy-0.3"``...): a Gato prompt
            comes from an episode of the *same* source as the live one (Gato §3.3), so the model
            learns to play as well as its prompt. ``None``: any episode of the task.
        returns: each episode's return, for :attr:`PackingConfig.imitation_threshold`.
        expert_labelled: every episode records the expert's action at each step (``expert_actions``).
            With :attr:`PackingConfig.expert_labels` the labels of every episode are then the expert's,
            so imitation sequences draw from *all* episodes of the task, whatever their return: the
            noisy, burst and random ones are where the recovery states are. The return filter and the
            same-source rule then apply only to the prompt, which is drawn from the successful episodes.
        lengths: steps of each episode, for :attr:`PackingConfig.sample_by` ``"steps"``; ``None``: read from
            each episode's rewards (pass them where reading an episode decodes it).
    """

    name: str
    episodes: Sequence[Mapping[str, Any]]
    tasks: Sequence[str]
    sources: Sequence[str] | None = None
    returns: Sequence[float] | None = None
    expert_labelled: bool = False
    lengths: Sequence[int] | None = None

    def __post_init__(self):
        for what in ("tasks", "sources", "returns", "lengths"):
            values = getattr(self, what)
            if values is not None and len(values) != len(self.episodes):
                raise ValueError(f"{self.name}: {len(values)} {what} for {len(self.episodes)} episodes")
        if not len(self.episodes):
            raise ValueError(f"{self.name}: no episodes")
        tasks = np.asarray([str(t) for t in self.tasks])
        self.by_task = {t: np.flatnonzero(tasks == t) for t in np.unique(tasks)}
        self._source = np.asarray([str(s) for s in self.sources]) if self.sources is not None else None
        self._pools: dict[tuple[str, float | None], np.ndarray] = {}
        self._lengths: np.ndarray | None = None  # read when first needed: sample_by="steps" only

    def draw(self, rng: np.random.Generator, pool: np.ndarray, cfg: PackingConfig) -> int:
        """One episode of ``pool``: uniformly, or in proportion to its length (``cfg.sample_by``)."""
        if cfg.sample_by == "episodes":
            return int(pool[rng.integers(len(pool))])
        if self._lengths is None:
            lengths = self.lengths if self.lengths is not None else [len(e["rewards"]) for e in self.episodes]
            self._lengths = np.asarray(lengths, np.float64)
        cumulative = np.cumsum(self._lengths[pool])  # (len(pool),)
        return int(pool[min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(pool) - 1)])

    def imitation_pool(self, tok: GeneralistTokenizer, task: str, threshold: float | None) -> np.ndarray:
        """Episodes of ``task`` shown without returns: those scoring ``>= threshold`` (expert-normalised).

        Gato trains only on episodes whose return is at least 80 % of the expert's (Reed et al. 2022,
        §3); without references or returns (or when no episode passes) every episode of the task.
        """
        key = (task, threshold)
        if key not in self._pools:
            idx = self.by_task[task]
            score = None
            if threshold is not None and self.returns is not None:
                score = tok.get_task_spec(task).normalized_returns(np.asarray(self.returns, np.float64)[idx])
            if score is not None and (score >= threshold).any():
                idx = idx[score >= threshold]
            self._pools[key] = idx
        return self._pools[key]

    def _episode_tokens(self, tok: GeneralistTokenizer, episode: Mapping[str, Any], t0: int, room: int,
                        condition_on_return: bool, expert_labels: bool = False) -> Sample:
        """Encode from step ``t0`` (``<bos>`` if 0) until ``room`` tokens are filled or ``<eos>``.

        Steps are encoded in chunks sized from the first step's length, so a long episode costs
        about one context of tokenization, not the whole episode.
        """
        n_steps = len(episode["rewards"])
        parts = []
        if t0 == 0:
            parts.append(token_sample([tok.bos_id], Modality.SPECIAL))
        used = sum(_length(p) for p in parts)
        t, per_step = t0, None
        while used < room and t < n_steps:
            chunk = 1 if per_step is None else max(1, -(-(room - used) // per_step))
            steps = episode_steps(tok, episode, t, min(n_steps, t + chunk), condition_on_return, expert_labels)
            if per_step is None:
                per_step = max(1, _length(steps[0]))
            parts += steps
            used += sum(_length(s) for s in steps)
            t += len(steps)
        if t >= n_steps and used < room:
            parts.append(tok.end_of_episode(bool(episode.get("terminated", False))))
        return slice_sample(concat_samples(parts), 0, room)

    def first_episode(self, rng: np.random.Generator, cfg: PackingConfig) -> int:
        """The episode a sequence starts from: tasks by episode count (times ``cfg.task_weights``), then
        :meth:`draw` within the task."""
        weights = {t: w for t, w in (cfg.task_weights or {}).items() if t in self.by_task and w != 1.0}
        if not weights and cfg.sample_by == "episodes":
            return int(rng.integers(len(self.episodes)))
        tasks = list(self.by_task)
        p = np.array([len(self.by_task[t]) * weights.get(t, 1.0) for t in tasks])  # (tasks,)
        return self.draw(rng, self.by_task[tasks[rng.choice(len(tasks), p=p / p.sum())]], cfg)

    def pack(self, rng: np.random.Generator, tok: GeneralistTokenizer, cfg: PackingConfig) -> tuple[Sample, dict]:
        first = self.first_episode(rng, cfg)
        task = str(self.tasks[first])
        condition = bool(rng.random() < cfg.return_prob)
        relabelled = not condition and cfg.expert_labels and self.expert_labelled
        # return-conditioned sequences see every episode; unconditioned ones (imitation) the good ones,
        # or all of them when every label is the expert's
        good = None if condition else self.imitation_pool(tok, task, cfg.imitation_threshold)
        pool = self.by_task[task] if condition or relabelled else good
        if not condition:
            first = self.draw(rng, pool, cfg)
        parts, room = [], cfg.seq_len
        meta: dict[str, Any] = {"source": self.name, "kind": "control", "task": task,
                                "condition_on_return": condition, "prompt_episode": None}
        if not condition and rng.random() < cfg.prompt_prob:
            if relabelled:  # a successful episode shows the task; any source, its labels are the expert's
                same = good
            else:
                same = pool if self._source is None else pool[self._source[pool] == self._source[first]]
            others = same[same != first] if len(same) > 1 else same
            j = int(others[rng.integers(len(others))])
            demo = demonstration(tok, self.episodes[j], int(cfg.prompt_fraction * cfg.seq_len), rng,
                                 expert_labels=cfg.expert_labels)
            parts.append(demo)
            room -= _length(demo)
            meta["prompt_episode"], meta["prompt_task"] = j, str(self.tasks[j])
        if condition and cfg.dt_window_steps:
            sample = self._windows(rng, tok, cfg, first, pool, meta)
        else:
            sample = self._episodes(rng, tok, cfg, first, pool, condition, parts, room, meta)
        # drawn only when used, so that runs without hidden actions keep their exact data order
        meta["hidden_actions"] = bool(cfg.hidden_action_prob and rng.random() < cfg.hidden_action_prob)
        return (hide_actions(sample, tok) if meta["hidden_actions"] else sample), meta

    def _episodes(self, rng: np.random.Generator, tok: GeneralistTokenizer, cfg: PackingConfig, first: int,
                  pool: np.ndarray, condition: bool, parts: list[Sample], room: int, meta: dict[str, Any]) -> Sample:
        """``parts`` (a prompt, or nothing) filled up with whole episodes of ``pool`` from ``first`` on."""
        index, live = first, []
        while room > 0:
            episode = self.episodes[index]
            n_steps = len(episode["rewards"])
            # a live episode longer than what is left starts at a random step (Gato's random window)
            per_step = max(1, _length(episode_steps(tok, episode, 0, 1, condition)[0]))
            fits = room // per_step
            t0 = 0 if n_steps <= fits else int(rng.integers(0, n_steps - max(fits, 1) + 1))
            sample = self._episode_tokens(tok, episode, t0, room, condition, cfg.expert_labels and not condition)
            parts.append(sample)
            room -= _length(sample)
            live.append(index)
            index = self.draw(rng, pool, cfg)
        meta["episodes"] = live
        return concat_samples(parts)

    def _windows(self, rng: np.random.Generator, tok: GeneralistTokenizer, cfg: PackingConfig, first: int,
                 pool: np.ndarray, meta: dict[str, Any]) -> Sample:
        """A return-conditioned sequence of independent ``cfg.dt_window_steps``-step windows of ``pool``'s episodes
        (see :attr:`PackingConfig.dt_window_steps`); ``meta["documents"]`` holds their lengths in tokens."""
        parts, documents, live, index, room = [], [], [], first, cfg.seq_len
        while room > 0:
            episode = self.episodes[index]
            n_steps = len(episode["rewards"])
            t0 = int(rng.integers(0, n_steps))  # every step of the episode starts a window equally often
            t1 = min(n_steps, t0 + int(cfg.dt_window_steps))
            head = [token_sample([tok.bos_id], Modality.SPECIAL)] if t0 == 0 else []
            tail = [tok.end_of_episode(bool(episode.get("terminated", False)))] if t1 == n_steps else []
            window = slice_sample(concat_samples(head + episode_steps(tok, episode, t0, t1, True) + tail), 0, room)
            window["labels"][0] = -100  # the token before it is another document's: nothing to predict it from
            parts.append(window)
            documents.append(_length(window))
            room -= documents[-1]
            live.append(index)
            index = self.draw(rng, pool, cfg)
        meta.update(episodes=live, documents=documents)
        return concat_samples(parts)


class Mixture:
    """Sources with weights; draws one full sequence per call, deterministic in ``(seed, rank, index)``."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], tok: GeneralistTokenizer,
                 cfg: PackingConfig):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"need one weight per source, got {len(sources)} sources and {len(weights)} weights")
        w = np.asarray(weights, np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 and not all 0, got {list(weights)}")
        self.sources, self.probs, self.tok, self.cfg = list(sources), w / w.sum(), tok, cfg

    def sequence(self, seed: int, rank: int, index: int) -> tuple[Sample, dict]:
        rng = np.random.default_rng([seed, rank, index])
        source = self.sources[int(rng.choice(len(self.sources), p=self.probs))]
        if isinstance(source, WindowedSource):
            source = source.at(rank, index)
        sample, meta = source.pack(rng, self.tok, self.cfg)
        if _length(sample) != self.cfg.seq_len:
            raise RuntimeError(f"{source.name} packed {_length(sample)} tokens instead of {self.cfg.seq_len}")
        return sample, meta

    def batch(self, seed: int, rank: int, batch_index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Collated batch ``batch_index``: sequences ``batch_index * batch_size + k``."""
        first = batch_index * batch_size
        samples, metas = zip(*(self.sequence(seed, rank, first + k) for k in range(batch_size)), strict=True)
        batch = self.tok.collate(samples)
        if any("documents" in m for m in metas):  # windows packed as documents: positions restart in each
            batch["position_ids"] = torch.from_numpy(np.stack([
                np.concatenate([np.arange(n) for n in m["documents"]]) if "documents" in m
                else np.arange(self.cfg.seq_len) for m in metas]))  # (B, L)
        return batch


class PackedStream(IterableDataset):
    """Endless collated batches of one rank, from ``start_batch`` on (use ``DataLoader(batch_size=None)``).

    Worker ``w`` of ``W`` builds batches ``start_batch + w, start_batch + w + W, ...``; the DataLoader
    takes them round robin, so the order is the same for any number of workers.
    """

    def __init__(self, mixture: Mixture, batch_size: int, seed: int, rank: int = 0, start_batch: int = 0,
                 num_batches: int | None = None):
        super().__init__()
        self.mixture, self.batch_size, self.seed, self.rank = mixture, batch_size, seed, rank
        self.start_batch, self.num_batches = start_batch, num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stop = None if self.num_batches is None else self.start_batch + self.num_batches
        b = self.start_batch + worker
        while stop is None or b < stop:
            yield self.mixture.batch(self.seed, self.rank, b, self.batch_size)
            b += workers
