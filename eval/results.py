"""The result tables of the docs, generated from the committed result files (never typed by hand).

    python -m eval.results            # docs/results/*.json -> the tables in docs/*.md and README.md
    python -m eval.results --check    # exit 1 if a page is not what the files say

Every ``control_*.json`` and ``locomotion_*.json`` that ``eval.control`` wrote into ``docs/results/`` is a table:
expert-normalised score per task (mean ± standard error over every episode of every checkpoint),
the rliable IQM with its 95 % stratified-bootstrap CI over (checkpoints × tasks), and how many
episodes and checkpoints (training seeds) stand behind each number, with the command that made it.
The tables replace what stands between ``<!-- results:start -->`` and ``<!-- results:end -->``; the
``locomotion_*`` files are also summed up in one table beside the published D4RL scores, between
``<!-- locomotion:start -->`` and ``<!-- locomotion:end -->``. Each block is filled in whichever of the
``--pages`` holds it (images linked relative to that page). The README's results table (between
``<!-- headline:start -->`` and ``<!-- headline:end -->``) is :mod:`eval.headline`'s: each figure read from the result
file or ``bench/`` log named beside it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.headline import HEADLINE_END, HEADLINE_START, counted_by_share, headline
from generalist.training.settings import parse

START, END = "<!-- results:start -->", "<!-- results:end -->"
LOCO_START, LOCO_END = "<!-- locomotion:start -->", "<!-- locomotion:end -->"
# Published D4RL scores (the -v2 datasets, mean over seeds) as (BC, DT, TT): BC and DT from Chen et al. 2021
# (Decision Transformer, Table 2), TT from Janner et al. 2021 (Trajectory Transformer, Table 1). Means 74.7 (DT)
# and 78.9 (TT) over the nine, as the papers report.
PUBLISHED_D4RL: dict[str, tuple[float, float, float]] = {
    "halfcheetah-medium-expert": (59.9, 86.8, 95.0),
    "hopper-medium-expert": (79.6, 107.6, 110.0),
    "walker2d-medium-expert": (36.6, 108.1, 101.9),
    "halfcheetah-medium": (42.6, 42.6, 46.9),
    "hopper-medium": (52.9, 67.6, 61.1),
    "walker2d-medium": (75.3, 74.0, 79.0),
    "halfcheetah-medium-replay": (36.6, 36.6, 41.9),
    "hopper-medium-replay": (18.1, 82.7, 91.5),
    "walker2d-medium-replay": (26.0, 66.6, 82.6),
}
_LOCO_FILE = re.compile(r"locomotion_(hopper|halfcheetah|walker2d)_(medium_replay|medium_expert|medium)_\w+")
# result fields of BabyAI runs shown a changed mission (eval.control --swap_mission / --blank_mission): the count of
# episodes changed, the run's label, and what those episodes were shown
MISSION_CHANGES = {"swapped_missions": ("mission swapped", "shown a mission naming another object"),
                   "blanked_missions": ("mission blanked", "shown the mission without the object it names")}


def _score(entry: dict) -> str:
    if "normalized_score" not in entry:
        return "–"
    se = entry.get("stderr_normalized")
    return f"{entry['normalized_score']:.2f}" + (f" ± {se:.2f}" if se is not None and not math.isnan(se) else "")


def table(result: dict, name: str, images: str) -> str:
    """One result file as a markdown section (``images``: the results folder as the page links it)."""
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
    if not counted_by_share(result):
        heading += ", episodes counted first-to-finish (before 2026-12-06: biased, README \"A counting fault\")"
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
        lines += ["", f"![performance profile of {name}]({images}/{result['profile_plot']})"]
    sweep = result.get("dt_sweep_spearman")
    if sweep:
        lines += ["", "DT return sweep, Spearman ρ(target, achieved): "
                  + ", ".join(f"{t} {rho:.2f}" for t, rho in sweep.items() if rho == rho) + "."]
    return "\n".join(lines)


def result_files(results_dir: Path) -> list[Path]:
    """The eval.control result files the README's tables are made from."""
    return sorted(results_dir.glob("control_*.json")) + sorted(results_dir.glob("locomotion_*.json"))


def pooled_parts(results: Sequence[dict]) -> set[str]:
    """The commands of the result files that ``eval.pool`` pooled into another of ``results`` (e.g. one seed of an
    evaluation run seed by seed): the pooled file stands for them."""
    return {command for result in results for command in result.get("pooled_from", [])}


def render(results_dir: Path, page: Path) -> str:
    files = result_files(results_dir)
    if not files:
        return "_No result files in `docs/results/` yet._"
    images = Path(os.path.relpath(results_dir, page.parent)).as_posix()
    loaded = [(f.stem, json.loads(f.read_text())) for f in files]
    parts = pooled_parts([result for _, result in loaded])
    sections = [table(result, stem, images) for stem, result in loaded if result.get("command") not in parts]
    return ("_Generated by `python -m eval.results` from `docs/results/*.json`; do not edit by hand. A file that "
            "`eval.pool` pooled into another is shown only as the pooled table._\n\n" + "\n\n".join(sections))


def _given_targets(result: dict) -> set[float]:
    """The DT target returns a result file's checkpoints were given (empty: the expert's, or not DT)."""
    return {rec["target_return"] for run in result["per_checkpoint"] for rec in run
            if rec.get("target_return") is not None}


def _eval_command(result: dict) -> str:
    """The ``eval.control`` command behind a result file: a pooled file's first part's (its parts differ only in
    their checkpoints or tasks)."""
    return (result.get("pooled_from") or [result.get("command", "")])[0]


def _locomotion_column(result: dict) -> str | None:
    """Which column of the summary a locomotion result file fills (None: a return sweep, not a score)."""
    if result.get("dt_sweep"):
        return None
    if result["mode"] != "dt":
        return {"gato": "imitation"}.get(result["mode"], result["mode"].upper())
    if "--expert_returns" in _eval_command(result).split():
        return "DT, MGDT expert returns"
    return "DT, target given" if _given_targets(result) else "DT, expert target"


def _cdf_by_bin_probability(result: dict) -> bool:
    """A TT run whose cdf filter ranked continuous bins by per-bin probability: every run before
    ``TTConfig.cdf_density`` (files without a ``tt_config``, unless their command asked for density) and those
    run with ``--cdf_density False``."""
    if result["mode"] != "tt":
        return False
    planner = result["results"][0].get("tt_config")
    return not (planner["cdf_density"] if planner else "--cdf_density True" in _eval_command(result))


def locomotion_summary(results_dir: Path) -> str:
    """Every measured locomotion score (D4RL scale) in one table, beside the published ones.

    A file ``locomotion_<env>_<dataset>_<anything>.json`` fills the row of its dataset and the column of its mode
    (DT split by how its returns were set: the expert's, a given target, or MGDT's sampling); a cell is the D4RL
    score, mean ± standard error over its episodes × checkpoints, and the expert-normalised IQM with its 95 % CI.
    A name ending ``_<N>steps`` says its models trained N steps (where the others trained the preset's or fewer),
    one holding ``_bysteps_`` that they drew their episodes in proportion to length (``train.py --sample_by steps``),
    ``_dtwin<K>_`` that their return-conditioned sequences were K-step windows (``train.py --dt_window_steps K``).
    A cell says which checkpoints played when any is not a run's final model (``checkpoints/step_N``), and its
    env seeds when they do not start at 0 (``eval.control --seed``: other episodes than the table's).
    A file that ``eval.pool`` pooled into another (e.g. one seed of a TT evaluation run seed by seed) is left out:
    the pooled file is its cell.
    """
    cells: dict[tuple[str, str], list[str]] = {}
    loaded = [(path, match, json.loads(path.read_text())) for path in sorted(results_dir.glob("locomotion_*.json"))
              if (match := _LOCO_FILE.fullmatch(path.stem))]
    parts = pooled_parts([result for _, _, result in loaded])
    for path, match, result in loaded:
        if result.get("command") in parts:
            continue
        column = _locomotion_column(result)
        if column is None or len(result["results"]) != 1 or "d4rl_score" not in result["results"][0]:
            continue
        entry, iqm, targets = result["results"][0], result.get("iqm") or {}, _given_targets(result)
        se = entry["stderr_d4rl"]
        flags = re.findall(r"--(beam_width|horizon|temperature) ([\d.]+)", _eval_command(result))
        env_seed = result["per_checkpoint"][0][0]["seed"]  # the first episode's env seed: eval.control's --seed
        steps_of = [re.search(r"checkpoints/step_0*(\d+)", model) for model in result.get("models", [])]
        text = (f"{entry['d4rl_score']:.1f} ± {se:.{2 if se < 0.1 else 1}f}"
                + (f", target {', '.join(f'{t:.0f}' for t in sorted(targets))}" if targets else "")
                + "".join(f", {name.split('_')[0]} {n}" for name, n in flags)
                + (", checkpoints " + " / ".join(f"step {int(m.group(1)):,}" if m else "final" for m in steps_of)
                   if any(steps_of) else "")
                + (f", env seeds from {env_seed}" if env_seed else "")
                + (f", {result['dtype']}" if result.get("dtype", "float32") != "float32" else "")
                + (", cdf by bin probability" if _cdf_by_bin_probability(result) else "")
                + (", episodes drawn by steps" if "_bysteps_" in path.stem else "")
                + (f", DT trained on {w.group(1)}-step windows" if (w := re.search(r"_dtwin(\d+)_", path.stem)) else "")
                + (f", {int(steps.group(1)):,} training steps" if (steps := re.search(r"_(\d+)steps$", path.stem))
                   else "")
                + f" ({entry['episodes'] // max(1, entry['checkpoints'])} × {entry['checkpoints']})"
                + ("" if counted_by_share(result) else " †"))
        if "iqm_ci95" in iqm:
            text += f"<br>IQM {iqm['iqm']:.3f} [{iqm['iqm_ci95'][0]:.3f}, {iqm['iqm_ci95'][1]:.3f}]"
        dataset = f"{match.group(1)}-{match.group(2).replace('_', '-')}"
        cells.setdefault((dataset, column), []).append(text)
    columns = ["imitation", "DT, expert target", "DT, target given", "DT, MGDT expert returns", "TT"]
    lines = ["_Generated by `python -m eval.results` from `docs/results/locomotion_*.json`; do not edit by hand._", "",
             "| dataset | " + " | ".join(f"ours: {c}" for c in columns) + " | published BC / DT / TT |",
             "|---|" + "---|" * (len(columns) + 1)]
    for dataset, published in PUBLISHED_D4RL.items():
        row = ["; ".join(cells.get((dataset, c), ["–"])) for c in columns]
        lines.append(f"| {dataset} | " + " | ".join(row) + " | " + " / ".join(f"{x:.1f}" for x in published) + " |")
    measured = sorted({d for d, _ in cells})
    lines += ["", f"{len(measured)} of {len(PUBLISHED_D4RL)} datasets measured. Cells: D4RL score (0 = random, 100 = "
              "D4RL's expert), mean ± standard error over every episode (episodes per seed × training seeds), and "
              "the expert-normalised IQM (rliable, 95 % stratified-bootstrap CI over seeds). Published: BC and DT "
              "from the Decision Transformer paper (Table 2), TT from the Trajectory Transformer paper (Table 1), "
              "on D4RL's -v2 datasets (1 M steps; ours: gymnasium -v5, 40k–300k steps, 3.7 M-parameter models). "
              "†: measured before 2026-12-06, when eval.control kept the first 20 episodes to finish, which favours "
              "short ones (falls, here): those figures are low (README, \"A counting fault\")."]
    return "\n".join(lines)


def update(text: str, body: str, start: str = START, end: str = END) -> str:
    """``text`` with what stands between ``start`` and ``end`` replaced by ``body``."""
    if start not in text or end not in text:
        raise SystemExit(f"no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


@dataclass
class Args:
    results: Path = Path("docs/results")
    """the committed eval.control result files"""
    bench: Path = Path("docs/bench")
    """the committed bench/ logs the README's speed figures are read from"""
    pages: tuple[Path, ...] = (Path("docs/control.md"), Path("docs/locomotion.md"), Path("README.md"))
    """the markdown pages whose generated blocks are filled (the results block must be in one of them)"""
    check: bool = False
    """only check that the pages are up to date"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(Args, argv, description=__doc__)
    pages = [Path(page) for page in args.pages]
    old = {page: page.read_text() for page in pages}
    if not any(START in text for text in old.values()):
        raise SystemExit(f"none of {[str(p) for p in pages]} has a {START} ... {END} block to fill")
    new = dict(old)
    for page, text in old.items():
        if START in text:
            text = update(text, render(args.results, page))
        if LOCO_START in text:  # the locomotion summary, where a page has a place for it
            text = update(text, locomotion_summary(args.results), LOCO_START, LOCO_END)
        if HEADLINE_START in text:  # the README's table of headline figures
            text = update(text, headline(args.results, args.bench, page), HEADLINE_START, HEADLINE_END)
        new[page] = text
    stale = [page for page in pages if new[page] != old[page]]
    if args.check:
        if stale:
            print(f"{', '.join(map(str, stale))} out of date with {args.results}: run `python -m eval.results`")
            return 1
        return 0
    for page in stale:
        page.write_text(new[page])
    print(f"updated {len(stale)} of {len(pages)} pages from {len(result_files(args.results))} result files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
