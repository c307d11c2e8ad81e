"""Gato mode (Reed et al. 2022, §3.3): a demonstration of the task as prompt, no return tokens, act.

The context is ``demonstration <bos> live steps``, every ``R_t`` being ``<no_return>``, so the
model infers the task (and the level of play) from the demonstration alone. Prompts are drawn
exactly as in training (:func:`generalist.packing.demonstration`): half the end of an episode,
half a uniformly placed window, at most the model's trained ``prompt_length`` tokens, from an
episode of the same task — at evaluation a successful (expert) one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from generalist.modes.control import ControlStep, Sampler
from generalist.packing import demonstration
from generalist.tokenizer import GeneralistTokenizer, Sample


def demonstration_prompt(tok: GeneralistTokenizer, episode: Mapping[str, Any], max_tokens: int,
                         rng: np.random.Generator | int = 0, end: bool | None = None) -> Sample:
    """A demonstration episode as a Gato prompt of at most ``max_tokens`` tokens (use the model's
    ``config.prompt_length``, what it saw in training).

    ``episode`` has ``task``, ``observations``, ``actions`` ({field: (T, ...)}) and ``rewards`` (T,)
    (and ``terminated``). ``end``: the end of the episode (True), a uniformly placed window (False),
    or either with probability ½ (None, as in training).
    """
    return demonstration(tok, episode, max_tokens, np.random.default_rng(rng), end)


class GatoMode(Sampler):
    """Gato control through :class:`~generalist.Agent`: every ``R_t`` is ``<no_return>``."""

    name = "gato"

    def returns(self, step: ControlStep) -> None:
        return None


__all__ = ["GatoMode", "demonstration_prompt"]
