"""Builders that turn environments, image sets and text into 🤗 datasets (see ``python -m datasets_build --help``).

Public entry points: :func:`load_episodes` / :func:`iter_episodes` for control data and
:mod:`datasets_build.registry` for named datasets and mixtures.
"""

from datasets_build.episodes import iter_episodes, load_episodes

__all__ = ["iter_episodes", "load_episodes"]
