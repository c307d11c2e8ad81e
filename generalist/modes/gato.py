"""Gato mode (Reed et al. 2022, §3.3): a demonstration of the task as prompt, no return tokens, act.

The context is ``<bos> demo steps <eos> <bos> live steps``, every ``R_t`` being ``<no_return>``,
so the model infers the task (and the level of play) from the demonstration alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from generalist.engine import DecodeState, Engine
from generalist.modes.control import sample_actions, step_prompts
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer, Sample, concat_samples, token_sample
from generalist.vocab import Modality


def demonstration_prompt(tok: GeneralistTokenizer, spec: TaskSpec, episode: dict[str, Any],
                         max_tokens: int | None = None) -> Sample:
    """A demonstration episode as a Gato prompt: ``<bos> steps <eos>`` with ``<no_return>`` tokens.

    ``episode`` has ``observations``, ``actions`` ({field: (T, ...)}) and ``rewards`` (T,). If it is
    longer than ``max_tokens``, its *last* whole steps are kept: Gato prompts with the end of a
    successful episode (§3.3), where the goal is reached.
    """
    steps = tok.encode_steps(spec, episode["observations"], episode["actions"], episode["rewards"], None)
    if max_tokens is not None:
        budget, kept = max_tokens - 2, []
        for step in reversed(steps):
            budget -= len(step["input_ids"])
            if budget < 0:
                break
            kept.append(step)
        if not kept:
            raise ValueError(f"{spec.name}: max_tokens={max_tokens} is smaller than one step of the demonstration")
        steps = kept[::-1]
    return concat_samples([token_sample([tok.bos_id], Modality.SPECIAL), *steps,
                           token_sample([tok.eos_id], Modality.SPECIAL)])


def gato_act(engine: Engine, state: DecodeState, tok: GeneralistTokenizer, spec: TaskSpec,
             observations: dict[str, Any], temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, prefixes: list[Sample] | None = None) -> np.ndarray:
    """One decision for a batch of environments -> action ids (B, A).

    ``observations``: {field: (B, ...)}; ``prefixes``: per-row tokens to feed before the step
    (the previous step's last action token and reward, or ``<bos>`` at an episode start).
    """
    prompts = step_prompts(tok, spec, observations, None)
    if prefixes is not None:
        prompts = [concat_samples([p, s]) for p, s in zip(prefixes, prompts, strict=True)]
    return sample_actions(engine, state, tok, spec, prompts, temperature, top_k, top_p)
