"""Register kitsjobs' launcher and sweeper with Hydra (``hydra/launcher=kitsjobs``, ``hydra/sweeper=kitsjobs``)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from kitsjobs.launcher import ComposingSweeper, KitsjobsLauncherConf, KitsjobsSweeperConf, SweepLauncher


class KitsjobsLauncher(SweepLauncher):
    """kitsjobs.launcher.SweepLauncher, importable from where Hydra looks for launchers."""


class KitsjobsSweeper(ComposingSweeper):
    """kitsjobs.launcher.ComposingSweeper, importable from where Hydra looks for sweepers."""


ConfigStore.instance().store(group="hydra/launcher", name="kitsjobs", node=KitsjobsLauncherConf)
ConfigStore.instance().store(group="hydra/sweeper", name="kitsjobs", node=KitsjobsSweeperConf)
