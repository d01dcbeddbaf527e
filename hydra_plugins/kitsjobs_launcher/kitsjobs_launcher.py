"""Register kitsjobs' sweep launcher with Hydra as ``hydra/launcher=kitsjobs``."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from kitsjobs.launcher import KitsjobsLauncherConf, SweepLauncher


class KitsjobsLauncher(SweepLauncher):
    """kitsjobs.launcher.SweepLauncher, importable from where Hydra looks for launchers."""


ConfigStore.instance().store(group="hydra/launcher", name="kitsjobs", node=KitsjobsLauncherConf)
