"""Caption metrics: BLEU (sacrebleu), CIDEr-D (Vedantam et al. 2015) and exact match.

Pure functions over strings; no model, no dataset. ``eval.caption`` calls them on generated
captions, the tests call them on hand-made examples.

CIDEr-D follows the reference implementation of the COCO caption evaluation
(``pyciderevalcap/ciderD/ciderD_scorer.py``):

* every caption is lower-cased and split into words; n-grams of length 1..4 are counted;
* each n-gram gets a TF-IDF weight ``tf(g) * (log N - log max(1, df(g)))``, where ``N`` is the
  number of images and ``df(g)`` the number of images whose *references* contain ``g``;
* for each n the score is the cosine of candidate and reference vectors, with the candidate's
  weights clipped to the reference's (``min(c, r) * r`` — the "-D" that stops repeated n-grams
  from gaming the score), times a Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))``
  with ``sigma = 6`` on the word counts;
* the per-n scores are averaged with equal weights, averaged over references and multiplied by 10.

The document frequencies come from the references that are available, so the score depends on
the evaluation set: with one reference per image (our held-out caption split) an n-gram shared by
every reference carries no weight, and the maximum per image is 10 only when the caption has at
least four words whose 4-grams are informative. Numbers are comparable across models on the same
split, not with published COCO figures (which use five references and the PTB tokenizer).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import sacrebleu

CIDER_MAX_N = 4
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(caption: str) -> list[str]:
    """Lower-case word tokens; punctuation is dropped (a simple stand-in for the PTB tokenizer)."""
    return _WORD.findall(caption.lower())


def normalize(caption: str) -> str:
    """The form two captions are compared in for exact match: lower-case words joined by spaces."""
    return " ".join(words(caption))


def _ngrams(tokens: Sequence[str], max_n: int) -> list[Counter[tuple[str, ...]]]:
    """Counts of n-grams, one Counter per n = 1..max_n."""
    return [Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, max_n + 1)]


@dataclass(frozen=True)
class _Vector:
    """TF-IDF weights of one caption, per n-gram length, with their norms and the word count."""

    weights: list[dict[tuple[str, ...], float]]
    norms: list[float]
    length: int


class CiderD:
    """CIDEr-D over a fixed set of references (the document frequencies are fitted on them).

    Args:
        references: for each image, its reference captions (at least one each).
        sigma: width of the Gaussian length penalty, in words (6 in the paper).
        max_n: longest n-gram (4 in the paper).
    """

    def __init__(self, references: Sequence[Sequence[str]], sigma: float = CIDER_SIGMA, max_n: int = CIDER_MAX_N):
        if not references:
            raise ValueError("CIDEr-D needs at least one image with references, got none")
        for i, refs in enumerate(references):
            if isinstance(refs, str) or not refs:
                raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")
        self.sigma, self.max_n = sigma, max_n
        self.references = [[_ngrams(words(r), max_n) for r in refs] for refs in references]
        self.doc_freq: Counter[tuple[str, ...]] = Counter()
        for refs in self.references:
            # an n-gram counts once per image, however many of its references contain it
            self.doc_freq.update({g for ref in refs for counts in ref for g in counts})
        self.log_n = math.log(len(references))

    def _vector(self, counts: list[Counter[tuple[str, ...]]]) -> _Vector:
        weights = [{g: tf * (self.log_n - math.log(max(1.0, self.doc_freq[g]))) for g, tf in c.items()}
                   for c in counts]
        norms = [math.sqrt(sum(w * w for w in ws.values())) for ws in weights]
        return _Vector(weights, norms, sum(counts[0].values()))

    def _similarity(self, cand: _Vector, ref: _Vector) -> float:
        """Mean over n of the clipped cosine, times the length penalty (before the x10)."""
        penalty = math.exp(-((cand.length - ref.length) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for c, r, cn, rn in zip(cand.weights, ref.weights, cand.norms, ref.norms, strict=True):
            if cn == 0 or rn == 0:
                continue
            dot = sum(min(w, r[g]) * r[g] for g, w in c.items() if g in r)
            total += dot / (cn * rn) * penalty
        return total / self.max_n

    def score_one(self, index: int, candidate: str) -> float:
        """CIDEr-D of one candidate against the references of image ``index``."""
        cand = self._vector(_ngrams(words(candidate), self.max_n))
        refs = [self._vector(r) for r in self.references[index]]
        return CIDER_SCALE * sum(self._similarity(cand, r) for r in refs) / len(refs)

    def scores(self, candidates: Sequence[str]) -> list[float]:
        """Per-image CIDEr-D of ``candidates`` (one per image, in the order of the references)."""
        if len(candidates) != len(self.references):
            raise ValueError(f"{len(candidates)} candidates for {len(self.references)} images")
        return [self.score_one(i, c) for i, c in enumerate(candidates)]


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = CIDER_SIGMA) -> float:
    """Corpus CIDEr-D: the mean per-image score, document frequencies fitted on ``references``."""
    scores = CiderD(references, sigma=sigma).scores(candidates)
    return sum(scores) / len(scores)


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (sacrebleu defaults: 13a tokenizer, exponential smoothing), 0..100.

    Images may have different numbers of references; sacrebleu wants reference *streams*, so the
    missing ones are padded with ``None``, which it skips.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(candidates), streams).score)


def exact_match(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of candidates equal to one of their references after :func:`normalize`."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    if not candidates:
        return 0.0
    hits = sum(normalize(c) in {normalize(r) for r in refs} for c, refs in zip(candidates, references, strict=True))
    return hits / len(candidates)
