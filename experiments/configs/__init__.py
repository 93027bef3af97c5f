"""Named configurations of the experiments: ``experiments/configs/<name>.py`` per experiment.

Each file defines ``get_config(name=None) -> ml_collections.ConfigDict``: ``"default"`` when
``name`` is ``None``, ``"smoke"`` (seconds, for the tests), and one preset per README row. The
command line selects one as ``--config experiments/configs/<name>.py:<preset>``
(ml_collections ``config_flags``); `get` does the same from Python.
"""

from __future__ import annotations

import importlib

import ml_collections

__all__ = ["get"]


def get(experiment: str, preset: str | None = None) -> ml_collections.ConfigDict:
    """``experiments/configs/<experiment>.py``'s ``get_config(preset)``."""
    module = importlib.import_module(f"experiments.configs.{experiment}")
    return module.get_config(preset)
