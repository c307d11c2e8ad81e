"""Does the model read its mission? Teacher-forced on held-out episodes, in seconds.

A BabyAI level names its target in a text observation (the mission); a policy that ignores it can still
succeed by visiting objects until the episode ends on the right one, so success alone cannot tell
(``eval.control --swap_mission`` / ``--blank_mission`` show it in rollouts, minutes per level). This asks
the model directly, on episodes it never trained on (the held-out split of ``train.py``): each held-out
episode is read in Gato mode's policy view (every ``R_t`` ``<no_return>``, action inputs
``<hidden_action>``, the first window of the model's trained context) twice — with its own text observation
and with another held-out episode's of the same task (one that differs) — and the log-likelihood of the
actions it took is compared:

* ``gain_nats``: mean over action tokens of ``NLL(a | other episode's mission) − NLL(a | own mission)``.
  Positive: the mission tells the model which actions (the bot's turns toward *its* target are likelier
  with its own mission). Zero: the mission is ignored.
* ``gain_nats_first_step``: over the first step only, where no history can say where the bot is going.
* ``nll_own``: the actions' NLL with their own mission, for scale.

    python -m eval.missions --model runs/babyai-s0/model runs/babyai-s1/model --dataset babyai
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.returns import action_nll, probe_models, save_probe
from eval.values import HeldOutArgs
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer, slice_sample
from generalist.training.settings import parse


@dataclass
class Args(HeldOutArgs):
    episodes: int = 40
    """held-out episodes per task (spread over the data's sources), or all of them if fewer"""
    out: Path | None = None
    """writes OUT/missions_NAME.json (default: print only)"""


def text_field(spec: TaskSpec) -> str | None:
    """The name of the task's text observation (BabyAI's mission), or ``None``."""
    return next((f.name for f in spec.observation_fields if f.kind == "text"), None)


def episode_nll(model, tok: GeneralistTokenizer, spec: TaskSpec, episode: dict, field: str, text: str) -> torch.Tensor:
    """(A,) action NLL of the episode's first context window with every step's ``field`` set to ``text``."""
    observations = dict(episode["observations"])
    observations[field] = np.array([text] * len(episode["rewards"]), dtype=object)
    sample = tok.encode_episode(spec, observations, episode["actions"], episode["rewards"], condition_on_return=False)
    return action_nll(model, tok, slice_sample(sample, 0, min(model.config.context_length,
                                                                 len(sample["input_ids"]))))


def probe_task(model, tok: GeneralistTokenizer, spec: TaskSpec, episodes: list[dict]) -> dict:
    """The mission gain of one task's held-out episodes (see the module docstring)."""
    field = text_field(spec)
    if field is None:
        return {"episodes": len(episodes), "skipped": "the task has no text observation"}
    texts = [str(e["observations"][field][0]) for e in episodes]
    if len(set(texts)) < 2:
        return {"episodes": len(episodes), "skipped": f"every held-out episode says {texts[0]!r}: nothing to swap"}
    own, other = [], []
    for i, episode in enumerate(episodes):
        swap = next(t for t in texts[i + 1:] + texts[:i] if t != texts[i])  # the next episode's that differs
        a, b = (episode_nll(model, tok, spec, episode, field, t) for t in (texts[i], swap))
        n = min(len(a), len(b))  # texts of other lengths fit other numbers of steps in the window
        own.append(a[:n])
        other.append(b[:n])
    n_act = len(tok.action_token_ranges(spec))
    gain = torch.cat([b - a for a, b in zip(own, other, strict=True)])
    first = torch.cat([b[:n_act] - a[:n_act] for a, b in zip(own, other, strict=True)])
    return {"episodes": len(episodes), "missions": len(set(texts)), "gain_nats": float(gain.mean()),
            "gain_nats_first_step": float(first.mean()), "nll_own": float(torch.cat(own).mean())}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(Args, argv, description=__doc__)
    records = probe_models(args, probe_task)
    print(f"\n{'model':<34}{'task':<28}{'gain':>8}{'1st step':>10}{'NLL own':>9}"
          "   (nats per action token; gain > 0: the model reads its mission)")
    for path, tasks in records.items():
        for task, r in tasks.items():
            if "skipped" in r:
                print(f"{path[-33:]:<34}{task[:27]:<28}  skipped: {r['skipped']}")
                continue
            print(f"{path[-33:]:<34}{task[:27]:<28}{r['gain_nats']:>8.3f}{r['gain_nats_first_step']:>10.3f}"
                  f"{r['nll_own']:>9.3f}")
    record = {"command": "python -m eval.missions " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "dataset": args.dataset, "episodes_per_task": args.episodes, "dtype": args.dtype, "models": records}
    save_probe(args, "missions", record)
    return record


if __name__ == "__main__":
    main()
