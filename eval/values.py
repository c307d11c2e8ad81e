"""How good are the values a Trajectory Transformer plans with? Teacher-forced on held-out episodes.

TT mode scores a beam by the rewards it predicts and the value it predicts after them
(``generalist.modes.tt``), so a planner can be no better than those predictions: a value that does
not drop before a fall cannot steer a plan away from one. This reads them exactly where the planner
does, on real episodes the model never trained on (every 10th episode of each task, the split
``train.py`` holds out):

for every step ``t`` of an episode the model reads the real steps ``t - context_steps + 1 .. t``
(the planner's window, ``TTConfig.context_steps``), ``R`` as ``<no_return>`` as in TT's context, and
predicts ``r_t`` (from the last action token) and the next ``R`` position: ``E[V_{t+1} | not ended]``
and ``P(<eos>)`` (:func:`generalist.modes.tt.read_value`, the planner's own readout). The truth is
what TT trains on: the discounted return-to-go from ``t + 1`` (γ of the task spec), and ``<eos>``
after a terminated episode's last step. Reported per model and task:

* ``value``: Pearson and Spearman correlation with the truth, mean absolute error (and over the truth's
  standard deviation, ``nmae``), bias; over every step but the last of each episode (a time-limited
  episode's last value is not in the data), also per data source (expert, medium, random...);
* ``reward``: the same for the expected reward;
* ``eos_auroc``: ``P(<eos>)`` as a score for "the episode terminates after this step";
* ``fall_auroc``: ``-V`` as a score for "the episode terminates within ``--within`` steps", beside the same
  AUROC of the true value (``fall_auroc_truth``, what a perfect value would get): does the value see a
  fall coming?

    python -m eval.values --model runs/loco-hme-s0/model runs/loco-hme-s1/model \\
        --dataset hopper-medium-expert --out docs/results --name hopper_medium_expert
"""

from __future__ import annotations

import json
import shlex
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from generalist.training.settings import parse


@dataclass
class HeldOutArgs:
    """The models and held-out episodes a teacher-forced probe reads (this one, ``eval.returns``, ``eval.missions``)."""

    model: tuple[str, ...]
    """checkpoint folders, run folders or 🤗 Hub repo ids; several = training seeds"""
    dataset: str
    """a built control dataset (name under --data_root, or a folder) whose held-out episodes are read"""
    data_root: Path = Path("data")
    tasks: tuple[str, ...] | None = None
    """default: every task of the dataset that the model knows"""
    episodes: int = 20
    """held-out episodes per task (spread over the data's sources), or all of them if fewer"""
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = None
    name: str | None = None
    """names the output file (default: the dataset's name)"""


@dataclass
class Args(HeldOutArgs):
    context_steps: int = 5
    """steps each prediction reads, the current one included (TTConfig.context_steps, the reference's 5)"""
    within: int = 20
    """fall_auroc: "terminates within this many steps" (a Hopper step is 8 ms, so 20 steps = 0.16 s)"""
    rollouts: Literal["none", "gato", "dt", "tt"] = "none"
    """also play --episodes episodes per task in this mode and read the values on them: the states the model's
    own policy reaches, which a planner visits, rather than the data's"""
    temperature: float = 1.0
    """of the --rollouts policy (1: sampled actions, as the planner samples them)"""
    seed: int = 0
    """environment and sampling seed of the rollouts (checkpoint k adds 1000 k, as eval.control)"""
    batch_size: int = 64
    """windows per forward"""
    out: Path = Path("docs/results")
    """writes OUT/values_NAME.json and .png"""


def held_out_episodes(dataset: str, root: Path, per_task: int, tasks: Sequence[str] | None) -> dict[str, list[dict]]:
    """Up to ``per_task`` of the episodes ``train.py`` holds out of each task, evenly spread over them (rows are
    stored by source, so the first ones would all come from one source)."""
    from datasets_build.sources import load_sources

    _, held, _ = load_sources({dataset: 1.0}, root)
    rows = held[0].episodes
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(held[0].tasks):
        by_task[task].append(i)
    if tasks:
        if missing := sorted(set(tasks) - set(by_task)):
            raise SystemExit(f"--tasks {missing}: not in {dataset} (it has {sorted(by_task)})")
        by_task = {t: by_task[t] for t in tasks}
    out = {}
    for task, idx in by_task.items():
        pick = np.unique(np.linspace(0, len(idx) - 1, min(per_task, len(idx))).round().astype(int))
        out[task] = [rows[idx[i]] for i in pick]
    return out


@torch.inference_mode()
def predict_episode(model, tok, spec, episode: dict, context_steps: int, batch_size: int) -> dict[str, np.ndarray]:
    """The planner's readouts at every step of one real episode, teacher-forced, and their truths.

    Returns (T,) arrays: ``value`` E[V_{t+1} | not ended], ``p_end`` P(<eos>), ``reward`` E[r_t] (predicted), and
    the truths ``true_value`` (V_{t+1}; 0 after the last step) and ``true_reward``.
    """
    from generalist.modes.control import continuous_values
    from generalist.modes.tt import expected, read_value
    from generalist.tokenizer import returns_to_go, slice_sample

    sample = tok.encode_episode(spec, episode["observations"], episode["actions"], episode["rewards"],
                                condition_on_return=False, terminated=bool(episode.get("terminated", False)))
    layout = tok.step_layout(spec)
    n_steps, step = len(episode["rewards"]), layout.tokens
    if len(sample["input_ids"]) != 2 + n_steps * step:  # <bos> steps <eos>
        raise ValueError(f"{spec.name}: steps of {len(sample['input_ids']) - 2} / {n_steps} tokens, not {step} each; "
                         "TT reads numeric observations only (no text or image fields)")
    (lo, _), centres = continuous_values(tok)
    eos_col = tok.eos_id - lo
    ends = 1 + step * np.arange(1, n_steps + 1)  # (T,) one past r_t
    starts = np.maximum(ends - context_steps * step, 0)  # the window; <bos> while it reaches the start
    value, p_end, reward = [], [], []
    device = model.device
    for b in range(0, n_steps, batch_size):
        rows = range(b, min(b + batch_size, n_steps))
        batch = tok.collate([slice_sample(sample, starts[t], ends[t]) for t in rows])
        last = batch["attention_mask"].sum(1) - 1  # (B,) r_t's position (right-padded)
        out = model(**{k: v.to(device) for k, v in batch.items() if k not in ("labels", "patches", "patch_positions")},
                    vocab_range=(lo, tok.eos_id + 1))
        logits = out.logits.float().cpu()  # (B, L, eos - lo + 1)
        at = torch.arange(len(rows))
        v, p = read_value(logits[at, last], eos_col, centres / spec.return_scale)
        value.append(v)
        p_end.append(p)
        reward.append(expected(logits[at, last - 1, : len(centres)], centres / spec.reward_scale))
    rewards = np.asarray(episode["rewards"], np.float64)
    true_value = np.append(returns_to_go(rewards, spec.discount)[1:], 0.0)  # V_{t+1}
    return {"value": torch.cat(value).numpy(), "p_end": torch.cat(p_end).numpy(), "reward": torch.cat(reward).numpy(),
            "true_value": true_value, "true_reward": rewards}


def fit(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Correlations and errors of predictions against the truth (None where the truth is constant)."""
    varies = len(truth) > 2 and np.std(truth) > 0 and np.std(pred) > 0
    mae = float(np.mean(np.abs(pred - truth)))
    return {"n": len(truth),
            "pearson": float(stats.pearsonr(pred, truth)[0]) if varies else None,
            "spearman": float(stats.spearmanr(pred, truth)[0]) if varies else None,
            "mae": mae, "nmae": mae / float(np.std(truth)) if np.std(truth) > 0 else None,
            "bias": float(np.mean(pred - truth)), "truth_mean": float(np.mean(truth))}


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a random positive > that of a random negative), ties half (Mann-Whitney U)."""
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return None
    ranks = stats.rankdata(score)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def score_task(episodes: list[dict], predictions: list[dict], within: int) -> dict:
    """Every figure of one model on one task's episodes."""
    per_step = defaultdict(list)  # every step's: sources, steps to a termination (inf: none), last step?
    for e, p in zip(episodes, predictions, strict=True):
        n, fell = len(p["value"]), bool(e.get("terminated"))
        per_step["source"].append(np.full(n, str(e.get("source", "?"))))
        per_step["to_end"].append(n - 1 - np.arange(n) if fell else np.full(n, np.inf))
        per_step["last"].append(np.arange(n) == n - 1)

    def cat(key: str) -> np.ndarray:
        return np.concatenate([p[key] for p in predictions])

    source, to_end, last = (np.concatenate(per_step[k]) for k in ("source", "to_end", "last"))
    value, truth = cat("value")[~last], cat("true_value")[~last]  # a time-limited episode's last V is not in the data
    return {
        "episodes": len(episodes), "terminated_episodes": int(sum(bool(e.get("terminated")) for e in episodes)),
        "steps": len(last), "value": fit(value, truth), "reward": fit(cat("reward"), cat("true_reward")),
        "value_by_source": {str(s): fit(value[source[~last] == s], truth[source[~last] == s])
                            for s in np.unique(source)},
        "eos_auroc": auroc(cat("p_end"), to_end == 0),
        "fall_auroc": auroc(-cat("value"), to_end < within),
        "fall_auroc_truth": auroc(-cat("true_value"), to_end < within),
    }


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def plot(records: dict[str, dict[str, dict]], traces: dict[str, list[dict]], name: str):
    """Per task: predicted against true value (first model, coloured by source), and a few episodes' values
    over time (terminated ones first)."""
    from matplotlib.figure import Figure

    tasks = list(traces)
    fig = Figure(figsize=(9, 3.4 * len(tasks)))
    for row, task in enumerate(tasks):
        scatter, trace = fig.add_subplot(len(tasks), 2, 2 * row + 1), fig.add_subplot(len(tasks), 2, 2 * row + 2)
        by_source = defaultdict(lambda: ([], []))
        for item in traces[task]:
            by_source[item["source"]][0].extend(item["true_value"][:-1])
            by_source[item["source"]][1].extend(item["value"][:-1])
        for source, (x, y) in sorted(by_source.items()):
            scatter.scatter(x, y, s=3, alpha=0.4, label=source)
        lim = [min(min(x) for x, _ in by_source.values()), max(max(x) for x, _ in by_source.values())]
        scatter.plot(lim, lim, "k--", lw=0.8)
        first = next(iter(records))
        v = records[first][task]["value"]
        scatter.set(xlabel="true discounted return-to-go", ylabel="predicted value (planner's readout)",
                    title=f"{task}: Pearson {_fmt(v['pearson'])}, nMAE {_fmt(v['nmae'])} ({Path(first).parent.name})")
        scatter.title.set_fontsize(9)
        scatter.legend(fontsize=7, markerscale=3)
        shown = sorted(traces[task], key=lambda item: (not item["terminated"], item["length"]))[:3]
        for k, item in enumerate(shown):
            line = trace.plot(item["true_value"], lw=1, color=f"C{k}", label=f"{item['source']}, "
                              f"{item['length']} steps{' (fell)' if item['terminated'] else ''}")[0]
            trace.plot(item["value"], lw=1, ls="--", color=line.get_color())
        trace.set(xlabel="step", ylabel="value (solid: true, dashed: predicted)")
        trace.legend(fontsize=7)
    fig.suptitle(f"values_{name}: what the TT planner reads, teacher-forced on held-out episodes", fontsize=10)
    fig.tight_layout()
    return fig


def played_episodes(model, tok, spec, mode: str, episodes: int, temperature: float, seed: int) -> list[dict]:
    """``episodes`` episodes of the model's own play in ``mode`` (eval.control's envs), as the dataset holds them."""
    from eval.control import make_envs, rollout
    from generalist import Agent

    envs = make_envs(spec.name, episodes, spec)
    played = rollout(Agent(model, tok, mode, temperature=temperature, seed=seed), envs, spec, episodes, seed,
                     record=True)
    envs.close()
    return [{"task": spec.name, "source": f"{mode} rollout", "terminated": e["terminated"],
             "observations": {k: np.stack([o[k] for o in e["trace"]["obs"]]) for k in e["trace"]["obs"][0]},
             "actions": {k: np.stack([a[k] for a in e["trace"]["act"]]) for k in e["trace"]["act"][0]},
             "rewards": np.asarray(e["trace"]["rew"], np.float32)} for e in played if e["error"] is None]


def main(argv: Sequence[str] | None = None) -> dict:
    from eval.checkpoint import load_checkpoint
    from eval.plots import save_figure

    args = parse(Args, argv, description=__doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or Path(args.dataset).name.replace("-", "_")
    episodes = held_out_episodes(args.dataset, args.data_root, args.episodes, args.tasks)
    records: dict[str, dict[str, dict]] = {}
    traces: dict[str, list[dict]] = {}
    for k, path in enumerate(args.model):
        model, tok, folder = load_checkpoint(path, args.device, args.dtype)
        records[str(path)] = {}
        for task, data in episodes.items():
            if task not in tok.task_specs:
                raise SystemExit(f"{path}: the model does not know task {task!r} (it knows {sorted(tok.task_specs)})")
            spec = tok.get_task_spec(task)
            sets = {task: data}
            if args.rollouts != "none":
                sets[f"{task} ({args.rollouts} rollouts)"] = played_episodes(
                    model, tok, spec, args.rollouts, args.episodes, args.temperature, args.seed + 1000 * k)
            for label, eps in sets.items():
                predictions = [predict_episode(model, tok, spec, e, args.context_steps, args.batch_size)
                               for e in tqdm(eps, desc=f"{Path(path).parent.name or path} {label}", unit="episode")]
                records[str(path)][label] = score_task(eps, predictions, args.within) | {"discount": spec.discount}
                if k == 0:
                    traces[label] = [{"source": e.get("source", "?"), "terminated": bool(e.get("terminated")),
                                      "length": len(p["value"]), "value": p["value"].tolist(),
                                      "true_value": p["true_value"].tolist()}
                                     for e, p in zip(eps, predictions, strict=True)]
    print(f"\n{'model':<34}{'episodes':<30}{'steps':>7}{'pearson':>9}{'spearman':>9}{'nMAE':>7}{'reward r':>9}"
          f"{'eos AUC':>9}{'fall AUC':>9}{'(truth)':>8}")
    for path, tasks in records.items():
        for task, r in tasks.items():
            print(f"{path[-33:]:<34}{task[:29]:<30}{r['steps']:>7}{_fmt(r['value']['pearson']):>9}"
                  f"{_fmt(r['value']['spearman']):>9}{_fmt(r['value']['nmae']):>7}{_fmt(r['reward']['pearson']):>9}"
                  f"{_fmt(r['eos_auroc']):>9}{_fmt(r['fall_auroc']):>9}{_fmt(r['fall_auroc_truth']):>8}")
    record = {"command": "python -m eval.values " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "dataset": args.dataset, "context_steps": args.context_steps, "within": args.within,
              "episodes_per_task": args.episodes, "dtype": args.dtype, "rollouts": args.rollouts,
              "temperature": args.temperature if args.rollouts != "none" else None, "models": records}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"values_{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    record["plot"] = str(save_figure(plot(records, traces, name), args.out / f"values_{name}.png"))
    print(f"wrote {path} and {record['plot']}")
    return record


if __name__ == "__main__":
    main()
