"""Registration of the typed schema in Hydra's ConfigStore.

conf/config.yaml lists ``base_config`` first in its defaults, so every YAML preset
is merged onto the dataclasses of kitsjobs.config: an unknown key or a value of
the wrong type fails when Hydra composes the config, before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from kitsjobs.config import Config

# Resolver of conf/config.yaml's default run and sweep folders.
UNIQUE_DIR_RESOLVER = "kitsjobs.unique_dir"


def register_configs() -> None:
    """Store the schema under the name ``base_config`` (safe to call twice)."""
    ConfigStore.instance().store(name="base_config", node=Config)
    if not OmegaConf.has_resolver(UNIQUE_DIR_RESOLVER):
        # Cached per config, and Hydra copies the cache into every task config of a sweep,
        # so all reads of hydra.run.dir or hydra.sweep.dir in one command see one folder.
        OmegaConf.register_new_resolver(UNIQUE_DIR_RESOLVER, reserve_unique_dir, use_cache=True)


def reserve_unique_dir(path: str) -> str:
    """Create a new, empty folder ``path``, or ``path_2``, ``path_3``... when it exists.

    ``os.mkdir`` fails when the folder exists, so two commands started in the same
    second (same ``${now:...}`` path) never get the same folder.

    Returns:
        The folder created, as given or with its suffix.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    candidate, number = path, 1
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            number += 1
            candidate = f"{path}_{number}"
