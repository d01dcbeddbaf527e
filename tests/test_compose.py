"""Shared compositions give each sweep task exactly the config Hydra would compose."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from omegaconf import OmegaConf

import kitsjobs.launch  # noqa: F401  (registers the schema)
from kitsjobs.compose import TaskComposer

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def composer_and_loader() -> tuple[TaskComposer, ConfigLoaderImpl, object]:
    Plugins.instance()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    sweep_config = loader.load_configuration(
        "config", overrides=["hydra.sweep.dir=/tmp/sweep-under-test"], run_mode=RunMode.MULTIRUN
    )
    context = HydraContext(config_loader=loader, callbacks=Callbacks(sweep_config))
    return TaskComposer(sweep_config, context), loader, sweep_config


@pytest.mark.parametrize("overrides", [
    ["model=unet", "optim.lr=0.001", "seed=3"],
    ["model=segresnet", "optim.lr=0.0003", "seed=3"],
    ["experiment=smoke", "data.patch_size=[8,16,16]", "trainer.max_steps=5"],
    ["model=dynunet", "data.patch_size=[32,64,64]"],
    ["launcher=slurm", "slurm=debug", "slurm.mem_gb=0.5", "hydra.job.chdir=false"],
])
def test_task_config_equals_hydra_composition(composer_and_loader, overrides: list[str]) -> None:
    composer, loader, sweep_config = composer_and_loader
    ours = composer.compose(overrides, 5)
    hydra = loader.load_sweep_config(sweep_config, overrides)
    ours_plain = OmegaConf.to_container(ours, resolve=False)
    hydra_plain = OmegaConf.to_container(hydra, resolve=False)
    assert ours_plain["hydra"]["job"].pop("num") == 5
    assert ours_plain["hydra"]["job"].pop("id") == "5"
    hydra_plain["hydra"]["job"].pop("num", None)
    hydra_plain["hydra"]["job"].pop("id", None)
    for section in ours_plain:
        assert ours_plain[section] == hydra_plain[section], section
    assert set(ours_plain) == set(hydra_plain)


def test_tasks_sharing_group_choices_compose_once(composer_and_loader, monkeypatch) -> None:
    composer, loader, _ = composer_and_loader
    calls = []
    original = loader.load_sweep_config
    monkeypatch.setattr(loader, "load_sweep_config", lambda config, overrides: calls.append(overrides) or original(config, overrides))
    for index, lr in enumerate(("0.1", "0.2", "0.3")):
        task = composer.compose(["model=segresnet", "optim=adamw", f"optim.lr={lr}"], 100 + index)
        assert task.optim.lr == float(lr)
        assert task.model.name == "segresnet"
    assert calls == [["model=segresnet", "optim=adamw"]]


def test_unknown_value_key_is_rejected(composer_and_loader) -> None:
    composer, _, _ = composer_and_loader
    with pytest.raises(Exception, match="no_such_key"):
        composer.compose(["optim.no_such_key=1"], 0)


def test_transient_copies_equal_hydra_task_by_task(composer_and_loader) -> None:
    composer, loader, sweep_config = composer_and_loader
    sweep = [
        ["model=unet", "optim.lr=0.1", "seed=1"],
        ["model=unet", "optim.lr=0.2", "seed=2"],
        ["model=unet", "seed=3"],
        ["model=unet", "+trainer.extra=1", "seed=4"],
        ["model=unet", "optim.lr=0.3", "seed=5"],
    ]
    for index, overrides in enumerate(sweep):
        ours = OmegaConf.to_container(composer.compose_transient(overrides, index), resolve=False)
        hydra = OmegaConf.to_container(loader.load_sweep_config(sweep_config, overrides), resolve=False)
        for plain in (ours, hydra):
            plain["hydra"]["job"].pop("num", None)
            plain["hydra"]["job"].pop("id", None)
        assert ours == hydra, overrides
