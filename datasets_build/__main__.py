"""``python -m datasets_build <name|mixture|all> --out data/``: build datasets (see ``--help``).

``python -m datasets_build push --dataset control-core --repo_id user/control-core``: push one to the Hub
(:mod:`datasets_build.hub`); ``train.py --mixture user/control-core=1`` trains on it.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from datasets_build.base import BuildOptions
from datasets_build.registry import DATASETS, MIXTURES, resolve
from generalist.training.settings import parse

OFFLINE_IMPORTS = ("minari", "d4rl")
D4RL_EXPORT = "export-d4rl"


@dataclass
class Args:
    """Build generalist datasets: control episodes (experts, noisy experts, random play), image
    captions and text. Interrupted builds resume where they stopped."""

    name: Annotated[str, tyro.conf.Positional] = "demo"
    """a dataset (control-core, control-pixels, babyai, metaworld, captions, text), a mixture (demo,
    full, locomotion), `all`, an import: `minari` (needs --minari_id) / `d4rl` (needs --d4rl_path), `export-d4rl`
    (a built dataset as a D4RL-style file: --dataset NAME --d4rl_path FILE) or `push` (a built dataset to
    the 🤗 Hub: --dataset NAME --repo_id user/name)"""
    out: Path = Path("data")
    """root folder; each dataset goes to <out>/<dataset name>/"""
    episodes: int | None = None
    """control episodes per task, all sources together (default: each dataset's own)"""
    num_envs: int = 8
    """envs stepped together per task (gymnasium SyncVectorEnv)"""
    seed: int = 0
    """build seed: every episode seed and generated sample derives from it"""
    episodes_per_shard: int = 16
    """episodes of one (task, source) per atomically written shard"""
    samples: int | None = None
    """caption scenes in the train split (default 4000; test gets 15% more, held out)"""
    overwrite: bool = False
    """delete existing datasets and build them again"""
    progress: bool = True
    """show progress bars"""
    minari_id: str | None = None
    """Minari dataset id to import from $MINARI_DATASETS_PATH (with name `minari`)"""
    d4rl_path: Path | None = None
    """D4RL-style .hdf5/.npz file to import (with name `d4rl`) or to write (with name `export-d4rl`)"""
    d4rl_task: str = "d4rl-task"
    """task name given to the imported D4RL-style episodes"""
    list: bool = False
    """list datasets and mixtures, then exit"""
    repo_id: str | None = None
    """with name `push`: the 🤗 Hub dataset repo (user/name) to push --dataset to"""
    dataset: str | None = None
    """with name `push` / `export-d4rl`: the built dataset (a name under --out, or a folder)"""
    private: bool = False
    """with name `push`: create the repo as private"""
    hub_token: str | None = None
    """with name `push`: Hub token (default: HF_TOKEN or the cached login)"""


def _dataset_folder(args: Args) -> Path:
    """``--dataset``: a folder, or the name of a dataset under ``--out``."""
    return Path(args.dataset) if Path(args.dataset).is_dir() else args.out / args.dataset


def main(argv: list[str] | None = None) -> None:
    args = parse(Args, argv, description=__doc__)
    if args.list:
        for name, builder in DATASETS.items():
            print(f"{name:26s} {builder.kind:9s} {builder.description}")
        for name, weights in MIXTURES.items():
            print(f"mixture {name}: {weights}")
        return
    options = BuildOptions(
        episodes=args.episodes, num_envs=args.num_envs, seed=args.seed,
        episodes_per_shard=args.episodes_per_shard, overwrite=args.overwrite, progress=args.progress,
        samples=args.samples, command=shlex.join(["python", "-m", "datasets_build", *(argv or sys.argv[1:])]),
    )
    if args.name == "push":
        from datasets_build.hub import push_dataset

        if not (args.repo_id and args.dataset):
            raise SystemExit("`push` needs --dataset NAME and --repo_id user/name")
        folder = _dataset_folder(args)
        if not push_dataset(folder, args.repo_id, token=args.hub_token, private=args.private):
            raise SystemExit(f"push of {folder} to {args.repo_id} failed (see the warnings above)")
        print(f"pushed {folder} to https://huggingface.co/datasets/{args.repo_id}")
        return
    if args.name == D4RL_EXPORT:
        from datasets_build.offline import export_d4rl

        if not (args.dataset and args.d4rl_path):
            raise SystemExit(f"`{D4RL_EXPORT}` needs --dataset NAME and --d4rl_path FILE.hdf5")
        folder = _dataset_folder(args)
        print(export_d4rl(folder, args.d4rl_path))
        return
    if args.name in OFFLINE_IMPORTS:
        from datasets_build.offline import import_d4rl, import_minari

        if args.name == "minari":
            if not args.minari_id:
                raise SystemExit("`minari` needs --minari_id")
            print(import_minari(args.minari_id, args.out, options))
        else:
            if args.d4rl_path is None:
                raise SystemExit("`d4rl` needs --d4rl_path")
            print(import_d4rl(args.d4rl_path, args.d4rl_task, args.out, options))
        return
    try:
        names = resolve(args.name)
    except KeyError as e:  # an unknown name: list the valid ones, before any work starts
        raise SystemExit(f"python -m datasets_build: {e.args[0]}; imports: {list(OFFLINE_IMPORTS)}") from None
    for name in names:
        start = time.perf_counter()
        folder = DATASETS[name].build(args.out, options)
        print(f"{name}: {folder} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
