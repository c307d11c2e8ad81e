"""Command-line settings of a training script: a dataclass parsed by tyro, named presets, and the
settings a run saved, which ``--resume`` restores.

Why restore: a resumed run must be the same run. Its checkpoint holds weights and optimizer state
for one model shape and its data position assumes one batch size and seed, so ``--resume`` loads the
saved settings and refuses a flag that contradicts them (naming it) instead of silently training a
different run on top of the old one. Flags that do not change what is trained (how long, how often
to log, where to push) may change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro

T = TypeVar("T")


def parse(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Every command line of the project (train, data, eval, bench) in one style: tyro, ``--snake_case``."""
    return tyro.cli(cls, args=argv, description=description, use_underscores=True)


def parse_with_presets(cls: type[T], presets: Mapping[str, Mapping[str, Any]], argv: Sequence[str] | None,
                       description: str | None = None) -> T:
    """``--preset`` picks the defaults (``cls``'s, updated by the preset) that the other flags override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=next(iter(presets)), choices=sorted(presets))
    preset = pre.parse_known_args(argv)[0].preset
    default = dataclasses.replace(cls(), preset=preset, **presets[preset])
    return tyro.cli(cls, default=default, args=argv, description=description, use_underscores=True)


def command_line(args: Any, presets: Mapping[str, Mapping[str, Any]], script: str = "python train.py",
                 omit: Collection[str] = ("preset", "resume", "overwrite", "hub_token")) -> str:
    """The shortest command that gives ``args``: the flags that differ from its preset's defaults."""
    default = dataclasses.replace(type(args)(), **presets[args.preset])
    flags = [] if args.preset == next(iter(presets)) else [f"--preset {args.preset}"]
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if f.name in omit or value == getattr(default, f.name):
            continue
        if isinstance(value, bool):
            flags.append(f"--{f.name}" if value else f"--no_{f.name}")
        elif isinstance(value, tuple | list):
            flags.append(" ".join([f"--{f.name}", *map(shlex.quote, map(str, value))]))
        elif value is not None:
            flags.append(f"--{f.name} {shlex.quote(str(value))}")
    return " ".join([script, *flags])


def save(args: Any, path: Path, secret: Collection[str] = ("hub_token",)) -> None:
    """Write the settings as JSON (secrets left out: the file lives next to the model)."""
    values = {k: (None if k in secret else v) for k, v in dataclasses.asdict(args).items()}
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(values, indent=2, default=str))
    tmp.replace(path)


def flat_config(args: Any, secret: Collection[str] = ("hub_token",)) -> dict[str, int | float | str | bool]:
    """The settings as the scalars experiment trackers take (TensorBoard's hparams refuse None and lists)."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in dataclasses.asdict(args).items() if k not in secret}


def load(cls: type[T], path: Path) -> T:
    """Settings saved by :func:`save` (fields it does not know are ignored, missing ones default)."""
    saved = json.loads(Path(path).read_text())
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in saved:
            value = saved[f.name]
            is_path = hints[f.name] is Path or Path in typing.get_args(hints[f.name])
            values[f.name] = (Path(value) if is_path and value is not None
                              else tuple(value) if isinstance(value, list) else value)  # JSON has no tuples
    return cls(**values)


def restore(args: T, argv: Sequence[str] | None, path: Path, may_change: Collection[str]) -> T:
    """The settings saved at ``path`` with the flags of ``argv`` applied; a flag outside ``may_change``
    that contradicts a saved value stops the run, naming both."""
    if not Path(path).is_file():  # killed before it saved them, or an older run: the flags are all there is
        return args
    saved = load(type(args), path)
    merged = tyro.cli(type(args), default=saved, args=argv, use_underscores=True)
    conflicts = [f"--{f.name} {getattr(merged, f.name)} conflicts with the run's saved "
                 f"{f.name}={getattr(saved, f.name)}"
                 for f in dataclasses.fields(merged)
                 if f.name not in may_change and getattr(merged, f.name) != getattr(saved, f.name)]
    if conflicts:
        raise SystemExit("--resume: " + "; ".join(conflicts) + f" ({path}). Drop these flags to continue the "
                         "run as it was, or start another run with --run_name.")
    return merged
