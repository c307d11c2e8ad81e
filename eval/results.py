"""The README's result tables, generated from the committed result files (never typed by hand).

    python -m eval.results                       # docs/results/*.json -> the tables in README.md
    python -m eval.results --check               # exit 1 if README.md is not what the files say

Every ``control_*.json`` and ``locomotion_*.json`` that ``eval.control`` wrote into ``docs/results/`` is a table:
expert-normalised score per task (mean ± standard error over every episode of every checkpoint),
the rliable IQM with its 95 % stratified-bootstrap CI over (checkpoints × tasks), and how many
episodes and checkpoints (training seeds) stand behind each number, with the command that made it.
The tables replace what stands between ``<!-- results:start -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from generalist.training.settings import parse

START, END = "<!-- results:start -->", "<!-- results:end -->"
# result fields of BabyAI runs shown a changed mission (eval.control --swap_mission / --blank_mission): the count of
# episodes changed, the run's label, and what those episodes were shown
MISSION_CHANGES = {"swapped_missions": ("mission swapped", "shown a mission naming another object"),
                   "blanked_missions": ("mission blanked", "shown the mission without the object it names")}


def _score(entry: dict) -> str:
    if "normalized_score" not in entry:
        return "–"
    se = entry.get("stderr_normalized")
    return f"{entry['normalized_score']:.2f}" + (f" ± {se:.2f}" if se is not None and not math.isnan(se) else "")


def table(result: dict, name: str) -> str:
    """One result file as a markdown section."""
    refs = result.get("references", {})
    iqm = result.get("iqm") or {}
    rated = any("success_rate" in entry for entry in result["results"])  # tasks whose env says what success is
    d4rl = any("d4rl_score" in entry for entry in result["results"])  # locomotion: D4RL's published scale too
    decoys = any("decoy_first_rate" in entry for entry in result["results"])  # BabyAI: eval.control's MissionDecoy
    heading = f"#### `{name}` — {result['mode']} mode"
    for field, (label, shown) in MISSION_CHANGES.items():
        if changed := [entry for entry in result["results"] if field in entry]:
            heading += (f", **{label.replace('mission', 'missions')}** ({sum(r[field] for r in changed)} of "
                        f"{sum(r['episodes'] for r in changed)} episodes {shown})")
    lines = [heading, "",
             f"`{result.get('command', '')}`", "",
             "| task | expert-normalised score | " + ("success rate | " if rated else "")
             + ("D4RL score (D4RL's references) | " if d4rl else "")
             + ("decoy met first (episodes) | mean length | " if decoys else "") + "return "
             "| episodes × checkpoints | expert / random reference | env threshold |",
             "|---|---|---|---|---|---|" + ("---|" if rated else "") + ("---|" if d4rl else "")
             + ("---|---|" if decoys else "")]
    for entry in result["results"]:
        ref = refs.get(entry["task"], {})
        fmt = lambda x, digits=1: "–" if x is None else f"{x:.{digits}f}"  # noqa: E731
        success = f"{fmt(entry.get('success_rate'), 2)} | " if rated else ""
        if d4rl:
            success += f"{fmt(entry.get('d4rl_score'))} ± {fmt(entry.get('stderr_d4rl'))} | "
        if decoys:
            lengths = [n for r in result.get("per_checkpoint", ()) for rec in r if rec.get("task") == entry["task"]
                       for n in rec.get("lengths", ())]
            success += (f"{fmt(entry.get('decoy_first_rate'), 2)} ({entry.get('decoy_met', 0)}) | "
                        f"{fmt(float(np.mean(lengths)) if lengths else None)} | ")
        lines.append(
            f"| {entry['task']} | {_score(entry)} | {success}{entry['mean_return']:.1f} ± {entry['stderr_return']:.1f} "
            f"| {entry['episodes'] // max(1, entry['checkpoints'])} × {entry['checkpoints']} "
            f"| {fmt(ref.get('expert_return'))} / {fmt(ref.get('random_return'))} "
            f"| {fmt(ref.get('env_reward_threshold'))} |")
    if iqm:
        lo, hi = iqm["iqm_ci95"]
        lines += ["", f"**IQM {iqm['iqm']:.2f}** (95 % CI {lo:.2f} – {hi:.2f}) over {len(iqm['tasks'])} tasks × "
                      f"{iqm['checkpoints']} checkpoints; {iqm['method']}."]
    if result.get("profile_plot"):
        lines += ["", f"![performance profile of {name}](docs/results/{result['profile_plot']})"]
    sweep = result.get("dt_sweep_spearman")
    if sweep:
        lines += ["", "DT return sweep, Spearman ρ(target, achieved): "
                  + ", ".join(f"{t} {rho:.2f}" for t, rho in sweep.items() if rho == rho) + "."]
    return "\n".join(lines)


def result_files(results_dir: Path) -> list[Path]:
    """The eval.control result files the README's tables are made from."""
    return sorted(results_dir.glob("control_*.json")) + sorted(results_dir.glob("locomotion_*.json"))


def render(results_dir: Path) -> str:
    files = result_files(results_dir)
    if not files:
        return "_No result files in `docs/results/` yet._"
    sections = [table(json.loads(f.read_text()), f.stem) for f in files]
    return ("_Generated by `python -m eval.results` from `docs/results/*.json`; do not edit by hand._\n\n"
            + "\n\n".join(sections))


def update(readme: Path, body: str) -> str:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


@dataclass
class Args:
    results: Path = Path("docs/results")
    """the committed eval.control result files"""
    readme: Path = Path("README.md")
    check: bool = False
    """only check that the README is up to date"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(Args, argv, description=__doc__)
    new = update(args.readme, render(args.results))
    if args.check:
        if new != args.readme.read_text():
            print(f"{args.readme} is out of date with {args.results}: run `python -m eval.results`")
            return 1
        return 0
    args.readme.write_text(new)
    print(f"updated {args.readme} from {len(result_files(args.results))} result files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
