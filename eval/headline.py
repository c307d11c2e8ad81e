"""The README's results table, generated from committed result files and bench logs (never typed by hand).

Each row of :data:`ROWS` names the file its figure comes from (an ``eval.control`` / ``eval.pool`` result in
``docs/results/``, or a ``bench/`` log in ``docs/bench/``) and the issue's target; the figure, the episodes and
training seeds behind it, and whether the target is met are read from that file. ``python -m eval.results`` writes
the table between ``<!-- headline:start -->`` and ``<!-- headline:end -->`` of the README, and ``--check`` fails when
a figure there is not what its file says — so a README number can only change with the file that stands behind it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


# how eval.control counts a task's episodes, written into every result file since the counting fix of 2026-12-06:
# each env plays a fixed share and nothing past it is recorded (eval.control.rollout). A file without the field
# counted the first N episodes to finish, which favours short episodes (README: "A counting fault").
EPISODES_COUNTED = "each env's share, (episodes + i) // num_envs"


def counted_by_share(result: dict) -> bool:
    """Whether a result file's episodes are those :data:`EPISODES_COUNTED` gives: counted so, or from before the
    field but with every episode of a task and checkpoint equally long and one env per episode (Pendulum,
    halfcheetah, CartPole held to 500 steps), where the first N to finish are each env's first episode."""
    if result.get("episodes_counted") == EPISODES_COUNTED:
        return True
    commands = " ".join([result.get("command", ""), *(result.get("pooled_from") or [])])
    records = [record for run in result.get("per_checkpoint", []) for record in run]
    return (bool(records) and "--num_envs" not in commands
            and all(len(set(record.get("lengths") or [0, 1])) == 1 for record in records))


def _path(results: Path, stem: str) -> Path:
    return results / f"{stem}.json"


def _load(results: Path, stem: str) -> dict:
    return json.loads(_path(results, stem).read_text())


def _ci(iqm: dict) -> str:
    lo, hi = iqm["iqm_ci95"]
    return f"{iqm['iqm']:.2f} [{lo:.2f}, {hi:.2f}]"


def _short(task: str) -> str:
    return task.removeprefix("BabyAI-").removesuffix("-v0").removesuffix("-v1")


def _old_count(*results: dict) -> str:
    """A mark for figures standing on a file whose episodes were counted first-to-finish (see EPISODES_COUNTED)."""
    return "" if all(map(counted_by_share, results)) else " (counted first-to-finish)"


def _behind(result: dict, *others: dict) -> str:
    """Episodes per task and seed × training seeds (× tasks) that a result file's IQM stands on."""
    iqm = result["iqm"]
    per = {e["episodes"] // max(1, e["checkpoints"]) for e in result["results"]}
    episodes = "/".join(str(n) for n in sorted(per))
    return (f"{episodes} episodes × {iqm['checkpoints']} seeds × {len(iqm['tasks'])} "
            f"task{'s' * (len(iqm['tasks']) > 1)}{_old_count(result, *others)}")


def _all_met(*verdicts: bool | None) -> bool | None:
    """Several targets' verdicts as one: ``None`` where no target was set, else whether every set one is met."""
    set_ = [v for v in verdicts if v is not None]
    return all(set_) if set_ else None


def _task_column(result: dict, task: str) -> int:
    tasks = result["iqm"]["tasks"]
    if task not in tasks:
        raise ValueError(f"{task!r} is not a task of the result file (its tasks: {tasks})")
    return tasks.index(task)


@dataclass(frozen=True)
class Iqm:
    """The IQM of one result file (``at_least``: the target), and optionally one task's score per seed."""

    stem: str
    at_least: float | None = None
    task: str | None = None
    task_at_least: float | None = None

    def render(self, results: Path, bench: Path) -> tuple[str, str, bool | None, list[Path]]:
        result = _load(results, self.stem)
        iqm = result["iqm"]
        figure, met = f"IQM **{_ci(iqm)}**", None if self.at_least is None else iqm["iqm"] >= self.at_least
        if self.task is not None:
            scores = [row[_task_column(result, self.task)] for row in iqm["matrix"]]  # one per seed
            mean = sum(scores) / len(scores)
            figure += f"; {_short(self.task)} {mean:.2f} ({' / '.join(f'{s:.2f}' for s in scores)} per seed)"
            if self.task_at_least is not None:
                met = _all_met(met, mean >= self.task_at_least)
        return figure, _behind(result), met, [_path(results, self.stem)]


@dataclass(frozen=True)
class Gap:
    """How far one result file's IQM is above another's (the same checkpoints and tasks, another mode)."""

    stem: str
    baseline: str
    at_least: float

    def render(self, results: Path, bench: Path) -> tuple[str, str, bool | None, list[Path]]:
        ours, base = _load(results, self.stem), _load(results, self.baseline)
        if ours["iqm"]["tasks"] != base["iqm"]["tasks"]:
            raise ValueError(f"{self.stem} and {self.baseline} cover different tasks")
        gap = ours["iqm"]["iqm"] - base["iqm"]["iqm"]
        figure = f"**{gap:+.2f}**: {_ci(ours['iqm'])} against {_ci(base['iqm'])}"
        files = [_path(results, s) for s in (self.stem, self.baseline)]
        return figure, _behind(ours, base), gap >= self.at_least, files


@dataclass(frozen=True)
class Sweep:
    """A DT return sweep: on how many tasks the achieved return follows the target (Spearman ρ)."""

    stem: str
    rho_at_least: float = 0.8
    tasks_needed: int = 3

    def render(self, results: Path, bench: Path) -> tuple[str, str, bool | None, list[Path]]:
        result = _load(results, self.stem)
        rho = {t: r for t, r in result["dt_sweep_spearman"].items() if r == r}  # NaN: a flat sweep
        following = sum(r >= self.rho_at_least - 1e-9 for r in rho.values())
        targets = len({s["target_return"] for s in result["dt_sweep"] if s["task"] == next(iter(rho))})
        figure = (f"ρ ≥ {self.rho_at_least} on **{following} of {len(rho)}** tasks ("
                  + ", ".join(f"{_short(t)} {r:.1f}" for t, r in sorted(rho.items(), key=lambda kv: -kv[1])) + ")")
        seeds = result["iqm"]["checkpoints"]
        behind = f"{targets} targets × {result['episodes_per_checkpoint']} episodes × {seeds} seeds{_old_count(result)}"
        return figure, behind, following >= self.tasks_needed, [_path(results, self.stem)]


@dataclass(frozen=True)
class Success:
    """BabyAI: the success rate of every level per seed (``at_least``: every level's mean must reach it)."""

    stem: str
    at_least: float

    def render(self, results: Path, bench: Path) -> tuple[str, str, bool | None, list[Path]]:
        result = _load(results, self.stem)
        rates: dict[str, list[float]] = {}
        for checkpoint in result["per_checkpoint"]:
            for record in checkpoint:
                rates.setdefault(record["task"], []).append(record["success_rate"])
        figure = ", ".join(f"{_short(t)} **{'/'.join(f'{r:.2f}' for r in rs)}**" for t, rs in rates.items())
        met = all(sum(rs) / len(rs) >= self.at_least for rs in rates.values())
        return figure + " (success per seed)", _behind(result), met, [_path(results, self.stem)]


@dataclass(frozen=True)
class Bench:
    """A figure a ``bench/`` script printed as ``name=value`` into a committed log (``docs/bench/``)."""

    log: str
    pattern: str  # a regex whose first group is the number
    unit: str
    at_least: float | None = None
    at_most: float | None = None

    def render(self, results: Path, bench: Path) -> tuple[str, str, bool | None, list[Path]]:
        text = (bench / self.log).read_text()
        if (match := re.search(self.pattern, text)) is None:
            raise ValueError(f"{self.log}: no line matches {self.pattern!r}")
        value = float(match.group(1))
        met = _all_met(None if self.at_least is None else value >= self.at_least,
                       None if self.at_most is None else value <= self.at_most)
        return f"**{match.group(1)}{self.unit}**", "one run", met, [bench / self.log]


@dataclass(frozen=True)
class Row:
    what: str
    figure: Iqm | Gap | Sweep | Success | Bench
    target: str


_CONTROL = "`python train.py --preset control` (≤ 30 min; runs `ctl-pv`)"
_LOWQ = "`--preset control-lowq` (5 % expert data, DT trained on one-step windows; runs `lowqw1`)"
_LOWQ_BEFORE = "the preset before 2026-12-06 (whole-episode DT sequences; runs `lowqst`)"
_TT_LOG = "decode_tt_2026-12-07-gqa.log"
ROWS: tuple[Row, ...] = (
    Row(f"{_CONTROL}, Gato mode prompted, 7 tasks", Iqm("control_pv_gato_recount", 0.9), "IQM ≥ 0.9"),
    Row("same runs, Decision Transformer (target = expert return)", Iqm("control_pv_dt", 0.9), "IQM ≥ 0.9"),
    Row("same runs, Trajectory Transformer (each task's preset, past actions hidden: the default) on Pendulum and "
        "CartPole",
        Iqm("control_pv_tt", task="Pendulum-v1", task_at_least=0.8), "Pendulum ≥ 0.8"),
    Row("same runs and file, CartPole (the plan is the greedy policy's: docs/control.md)",
        Iqm("control_pv_tt", task="CartPole-v1", task_at_least=0.8), "CartPole ≥ 0.8"),
    Row("same runs, TT on Pendulum reading real past actions (`--tt_policy_view False`, the view before 2026-12-05)",
        Iqm("control_pv_tt_realview", 0.8), "≥ 0.8"),
    Row("`python train.py` (the demo, all modalities), Gato mode prompted, 5 core tasks",
        Iqm("control_demo_gato", 0.6, task="CartPole-v1", task_at_least=0.9), "IQM ≥ 0.6, CartPole ≥ 0.9"),
    Row(f"{_LOWQ}: Decision Transformer − imitation (unprompted Gato)",
        Gap("control_lowq_w1_dt_sweep20_recount", "control_lowq_w1_gato_unprompted_recount", 0.2), "≥ +0.2"),
    Row("same runs: Trajectory Transformer (each task's preset) − imitation",
        Gap("control_lowq_w1_tt_recount", "control_lowq_w1_gato_unprompted_recount", 0.2), "≥ +0.2"),
    Row("same runs: DT return sweep, greedy", Sweep("control_lowq_w1_dt_sweep20_recount"), "ρ ≥ 0.8 on 3 tasks"),
    Row("same runs: DT return sweep, greedy, other episodes (`--seed 500`)",
        Sweep("control_lowq_w1_dt_sweep20_seed500_recount"), "ρ ≥ 0.8 on 3 tasks"),
    Row("same runs: DT return sweep, sampled actions (temperature 1)",
        Sweep("control_lowq_w1_dt_sweep20_sampled_recount"), "ρ ≥ 0.8 on 3 tasks"),
    Row(f"{_LOWQ_BEFORE}: DT − imitation",
        Gap("control_lowq_steps_dt_recount", "control_lowq_steps_gato_unprompted_recount", 0.2), "≥ +0.2"),
    Row(f"{_LOWQ_BEFORE}: TT − imitation",
        Gap("control_lowq_pv_tt_recount", "control_lowq_steps_gato_unprompted_recount", 0.2), "≥ +0.2"),
    Row(f"{_LOWQ_BEFORE}: DT return sweep, greedy", Sweep("control_lowq_steps_dt_sweep20_recount"),
        "ρ ≥ 0.8 on 3 tasks"),
    Row("`--preset babyai` (detour data), Gato mode greedy", Success("control_babyai_detour_gato", 0.9),
        "≥ 0.9 every level"),
    Row("`--preset babyai` with missions in the BPE corpus, Gato mode greedy", Success("control_babyai_tok_gato", 0.9),
        "≥ 0.9 every level"),
    Row("TT decision at the reference's hopper settings vs the original planner (same run)",
        Bench(_TT_LOG, r"tt_reference_s_per_decision=[\d.]+ -> speedup=([\d.]+)x", "×", at_least=50), "≥ 50×"),
    Row("the same vs Faster-TT (same run)",
        Bench(_TT_LOG, r"faster_tt_reference_s_per_decision=[\d.]+ -> speedup=([\d.]+)x", "×", at_least=20),
        "≥ 20×"),
    Row("the same, bfloat16 model, vs the original planner",
        Bench(_TT_LOG, r"(?m)^\s+tt_reference speedup\[bfloat16 model, [^]]*\]=([\d.]+)x", "×", at_least=50), "≥ 50×"),
    Row("the same, bfloat16 model, vs Faster-TT",
        Bench(_TT_LOG, r"faster_tt_reference speedup\[bfloat16 model, [^]]*\]=([\d.]+)x", "×", at_least=20), "≥ 20×"),
    Row("agent decisions/s at JAT's size, 32 envs, float32, vs JAT's own loop (same run)",
        Bench("decode_jat_2026-12-07-bracketed.log", r"decisions_per_s\[float32\]=.*vs_jat=([\d.]+)x", "×",
              at_least=1.5), "≥ 1.5×"),
    Row("the same, bfloat16 weights",
        Bench("decode_jat_2026-12-07-bracketed.log", r"decisions_per_s\[bfloat16\]=.*vs_jat=([\d.]+)x", "×",
              at_least=1.5), "≥ 1.5×"),
    Row("32 envs vs 1, 994-token context, decisions/s",
        Bench("decode_decisions_2026-12-07-amd3.log", r"ctx 994: .*batched_speedup=([\d.]+)x", "×",
              at_least=10), "≥ 10×"),
    Row("the same, bfloat16 weights and KV cache",
        Bench("decode_decisions_2026-12-07-amd3.log", r"ctx 994: .*batched_speedup\[bfloat16\]=([\d.]+)x", "×",
              at_least=10), "≥ 10×"),
    Row("decision at 994 vs 92 tokens, KV cache, 1 env",
        Bench("decode_decisions_2026-12-07-amd3.log", r"flat_in_context_ratio=([\d.]+)", "×", at_most=1.5),
        "≤ 1.5×"),
)


def headline(results: Path, bench: Path, page: Path, rows: Sequence[Row] = ROWS) -> str:
    """The table: one line per row, its figure read from the file named, links relative to ``page``."""
    lines = ["_Generated by `python -m eval.results` from the files in the last column; do not edit by hand._", "",
             "| what | figure | behind it | target (issue) | met | from |", "|---|---|---|---|---|---|"]
    for row in rows:
        figure, behind, met, files = row.figure.render(results, bench)
        links = ", ".join(f"[{f.stem}]({Path(os.path.relpath(f, page.parent)).as_posix()})" for f in files)
        mark = "–" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {row.what} | {figure} | {behind} | {row.target} | {mark} | {links} |")
    return "\n".join(lines)

