"""Does a Decision Transformer read its target? Teacher-forced on held-out episodes, in seconds.

DT mode acts on ``R_t``, so a model that has not learnt what ``R`` means plays the data's average policy
whatever target it is given (``eval.control --sweep`` shows it in rollouts, minutes per task). This asks
the model directly, on real episodes it never trained on (the held-out split of ``train.py``): each
task's held-out episodes are split at their median return into a *high* and a *low* half (the episodes at the top return
are the high half when they are more than half of them); every episode
is read in DT's policy view (returns-to-go as inputs, action inputs ``<hidden_action>``, windows of the
model's trained context) twice — with its own returns-to-go, and with them shifted by the other half's
mean initial return (``R'_t = R_t + R̄_0(other) − R̄_0(own)``, so ``R_{t+1} = R_t − r_t`` still holds) —
and the log-likelihood of the actions it took is compared:

* ``gain_nats``: mean over action tokens of ``NLL(a | other half's R) − NLL(a | own R)``, per half and both
  together. Positive: the returns tell the model *which* behaviour (a high-return episode's actions are
  likelier under a high target). Zero: DT ignores its target — imitation with extra tokens. Negative:
  it reads them the wrong way round.
* ``gain_nats_first_step`` / ``gain_nats_later_steps``: the gain over the first step of each window (no steps
  before it: only ``R`` can say which behaviour) and over the rest (where the steps before can say it too).
* ``nll_own`` / ``nll_no_return``: the actions' NLL with their own returns and in Gato's unconditioned
  context (``<no_return>``), for scale.

    python -m eval.returns --model runs/loco-hme-s0/model runs/loco-hme-s1/model --dataset hopper-medium-expert
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eval.values import HeldOutArgs, held_out_episodes
from generalist.training.settings import parse


@dataclass
class Args(HeldOutArgs):
    episodes: int = 40
    """held-out episodes per task (spread over the data's sources), or all of them if fewer; split at their median"""
    windows: int = 4
    """windows read per episode, evenly spread from its start (each as long as the model's trained context)"""
    out: Path | None = None
    """writes OUT/returns_NAME.json (default: print only)"""


@torch.inference_mode()
def action_nll(model, tok, sample: dict) -> torch.Tensor:
    """(A,) NLL of ``sample``'s action tokens, read in DT's policy view (action inputs hidden, labels kept)."""
    from generalist.packing import hide_actions
    from generalist.vocab import Modality

    batch = tok.collate([hide_actions(sample, tok)])
    logits = model(**{k: v.to(model.device) for k, v in batch.items() if k != "labels"}).logits[0, :-1].float()
    labels, is_action = batch["labels"][0, 1:], batch["modality_ids"][0, 1:] == int(Modality.ACTION)
    return -logits[is_action].log_softmax(-1).gather(-1, labels[is_action, None].to(logits.device)).squeeze(-1).cpu()


def window_nll(model, tok, spec, episode: dict, start: int, steps: int, shift: float) -> dict[str, torch.Tensor]:
    """The action NLL of ``steps`` steps from ``start`` with the episode's returns-to-go (``own``), with them plus
    ``shift`` (``other``) and with ``<no_return>`` (``none``, Gato's context); the steps are encoded once."""
    from generalist.tokenizer import concat_samples, returns_to_go, token_sample
    from generalist.vocab import Modality

    rewards = np.asarray(episode["rewards"], np.float64)
    stop = min(start + steps, len(rewards))
    steps_none = tok.encode_steps(spec, {k: np.asarray(v)[start:stop] for k, v in episode["observations"].items()},
                                  {k: np.asarray(v)[start:stop] for k, v in episode["actions"].items()},
                                  rewards[start:stop])  # R_t = <no_return>
    rtg = returns_to_go(rewards)[start:stop]
    head = [token_sample([tok.bos_id], Modality.SPECIAL)] if start == 0 else []
    variants = {"own": tok.set_returns(spec, steps_none, rtg), "other": tok.set_returns(spec, steps_none, rtg + shift),
                "none": steps_none}
    return {kind: action_nll(model, tok, concat_samples(head + blocks)) for kind, blocks in variants.items()}


def probe_task(model, tok, spec, episodes: list[dict], windows: int) -> dict:
    """The return gain of one task's held-out episodes (see the module docstring)."""
    steps = max(1, (model.config.context_length - 1) // tok.step_layout(spec).tokens)
    totals = np.array([float(np.sum(e["rewards"])) for e in episodes])
    high = totals > np.median(totals)
    if not high.any():  # more than half share the top return (CartPole's 500): the top return is the high half
        high = totals >= np.median(totals)
    if high.all():
        return {"episodes": len(episodes), "skipped": f"its {len(episodes)} held-out episode(s) have one return; "
                "the probe compares two halves"}
    r0 = {True: float(totals[high].mean()), False: float(totals[~high].mean())}  # mean initial return-to-go
    nll: dict[str, dict[bool, list[torch.Tensor]]] = {k: {True: [], False: []} for k in ("own", "other", "none")}
    for e, h in zip(episodes, high, strict=True):
        n = len(e["rewards"])
        for start in np.unique(np.linspace(0, max(n - steps, 0), windows).round().astype(int)):
            for kind, x in window_nll(model, tok, spec, e, start, steps, r0[not h] - r0[h]).items():
                nll[kind][h].append(x)

    n_act = len(tok.action_token_ranges(spec))

    def mean(kind: str, halves: Sequence[bool], part: slice = slice(None)) -> float:
        return float(torch.cat([x[part] for h in halves for x in nll[kind][h]]).mean())

    def gain(halves: Sequence[bool], part: slice = slice(None)) -> float:
        return mean("other", halves, part) - mean("own", halves, part)

    out = {"episodes": len(episodes), "context_steps": steps,
           "mean_initial_return": {"high": r0[True], "low": r0[False]}}
    for label, halves in (("high", [True]), ("low", [False]), ("all", [True, False])):
        out[label] = {"gain_nats": gain(halves), "nll_own": mean("own", halves), "nll_no_return": mean("none", halves)}
    # a window's first step has no history to tell the behaviour from, only R: where a model that identifies the
    # policy from the steps before reads its return, and nowhere else
    out["all"]["gain_nats_first_step"] = gain([True, False], slice(n_act))
    out["all"]["gain_nats_later_steps"] = gain([True, False], slice(n_act, None))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(Args, argv, description=__doc__)
    records = probe_models(args, lambda model, tok, spec, eps: probe_task(model, tok, spec, eps, args.windows))
    print(f"\n{'model':<34}{'task':<26}{'gain high':>10}{'gain low':>10}{'gain all':>10}{'1st step':>9}{'later':>8}"
          f"{'NLL own':>9}{'no R':>8}   (nats per action token; gain > 0: the model reads its return)")
    for path, tasks in records.items():
        for task, r in tasks.items():
            if "skipped" in r:
                print(f"{path[-33:]:<34}{task[:25]:<26}  skipped: {r['skipped']}")
                continue
            print(f"{path[-33:]:<34}{task[:25]:<26}{r['high']['gain_nats']:>10.3f}{r['low']['gain_nats']:>10.3f}"
                  f"{r['all']['gain_nats']:>10.3f}{r['all']['gain_nats_first_step']:>9.3f}"
                  f"{r['all']['gain_nats_later_steps']:>8.3f}{r['all']['nll_own']:>9.3f}{r['all']['nll_no_return']:>8.3f}")
    record = {"command": "python -m eval.returns " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "dataset": args.dataset, "episodes_per_task": args.episodes, "windows": args.windows,
              "dtype": args.dtype, "models": records}
    save_probe(args, "returns", record)
    return record


def probe_models(args: HeldOutArgs, probe: Callable[..., dict]) -> dict[str, dict[str, dict]]:
    """``{model: {task: probe(model, tok, spec, episodes)}}`` over the held-out episodes of every task the model
    knows (``eval.returns``, ``eval.missions``)."""
    from eval.checkpoint import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    episodes = held_out_episodes(args.dataset, args.data_root, args.episodes, args.tasks)
    records: dict[str, dict[str, dict]] = {}
    for path in tqdm(args.model, desc="models", unit="model"):
        model, tok, _ = load_checkpoint(path, args.device, args.dtype)
        records[str(path)] = {task: probe(model, tok, tok.get_task_spec(task), eps)
                              for task, eps in episodes.items() if task in tok.task_specs}
    return records


def save_probe(args: HeldOutArgs, kind: str, record: dict) -> None:
    """``record`` to ``OUT/<kind>_NAME.json`` when the probe's ``--out`` is given."""
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{kind}_{args.name or Path(args.dataset).name.replace('-', '_')}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
