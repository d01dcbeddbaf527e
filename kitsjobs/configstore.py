"""Registration of the typed schema in Hydra's ConfigStore.

conf/config.yaml lists ``base_config`` first in its defaults, so every YAML preset
is merged onto the dataclasses of kitsjobs.config: an unknown key or a value of
the wrong type fails when Hydra composes the config, before any work starts.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from kitsjobs.config import Config


def register_configs() -> None:
    """Store the schema under the name ``base_config`` (safe to call twice)."""
    ConfigStore.instance().store(name="base_config", node=Config)
