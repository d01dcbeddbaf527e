"""Compose the config of every task of a sweep, once per distinct set of group choices.

Hydra composes each task from scratch (defaults tree, YAML merges, schema checks),
about 0.1 to 0.3 s a task on 2 cores, so a 64-task sweep spent most of its
submission time there. Tasks that differ only in values (``optim.lr=...``,
``seed=...``) share one composition here: the composition of the task's group
overrides (``model=unet``, ``+experiment=smoke``) is cached, copied, and the value
overrides are applied to the copy the way Hydra applies command-line overrides
after composition. The result equals Hydra's own ``load_sweep_config``
(tests/test_compose.py checks it key by key).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

# NOTE: ConfigLoaderImpl._apply_overrides_to_config and get_overrides_dirname are
# Hydra 1.3 internals (hydra-core is pinned below 1.4 in setup.cfg); the equality
# test in tests/test_compose.py fails if their behaviour changes.
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict


class TaskComposer:
    """Build each task's composed config from its overrides, reusing shared compositions.

    Args:
        sweep_config: the config Hydra composed for the whole sweep.
        hydra_context: Hydra's context, whose config loader composes.
    """

    def __init__(self, sweep_config: DictConfig, hydra_context: HydraContext) -> None:
        self.sweep_config = sweep_config
        self.loader = hydra_context.config_loader
        self.parser = OverridesParser.create()
        self._compositions: dict[tuple[str, ...], DictConfig] = {}
        self._tasks: dict[tuple[tuple[str, ...], int], DictConfig] = {}
        # Per set of group overrides: one working copy and the keys its last task overrode.
        self._working: dict[tuple[str, ...], tuple[DictConfig, frozenset[str]]] = {}
        self._parsed: dict[str, Override] = {}

    def compose(self, overrides: Sequence[str], index: int) -> DictConfig:
        """Return the config of the task with these overrides and index in the sweep.

        The sweeper's validation and the launcher ask for the same tasks; the second
        request returns the config built by the first.
        """
        task_key = (tuple(overrides), index)
        if task_key not in self._tasks:
            self._tasks[task_key] = self._compose(overrides, index)
        return self._tasks[task_key]

    def compose_transient(self, overrides: Sequence[str], index: int) -> DictConfig:
        """Return the task's config in a working copy that the next call may change.

        For callers that use each config at once and keep nothing of it (the Slurm
        launcher resolves it to plain data). Tasks of a grid sweep set the same keys,
        each to its own value, so one working copy per set of group choices serves them
        all, which saves a deep copy per task. A task that adds or deletes keys, sets
        Hydra's own keys, or sets other keys than the previous one gets a fresh copy.
        """
        parsed = self._parse(overrides)
        group_overrides, value_overrides = self._split(parsed)
        key = self._base_key(group_overrides)
        changed = frozenset(o.key_or_group for o in value_overrides)
        # A dict value is merged into the node, so keys of an earlier task's dict could stay.
        shareable = all(o.type == OverrideType.CHANGE and not o.is_hydra_override()
                        and not isinstance(o.value(), dict) for o in value_overrides)
        working = self._working.get(key)
        if working is None or not shareable or working[1] != changed:
            working = (copy.deepcopy(self._compositions[key]), changed)
            self._working[key] = working if shareable else (working[0], frozenset({"<fresh copy>"}))
        task_config = working[0]
        self._apply(task_config, parsed, value_overrides, index)
        return task_config

    def _parse(self, overrides: Sequence[str]) -> list[Override]:
        # The same override strings (launcher=slurm, data.root=...) recur in every task,
        # and Hydra's grammar-based parser costs about a millisecond each.
        parsed = []
        for line in overrides:
            if line not in self._parsed:
                self._parsed[line] = self.parser.parse_overrides([line])[0]
            parsed.append(self._parsed[line])
        return parsed

    def _split(self, parsed: list[Override]) -> tuple[list[Override], list[Override]]:
        group_overrides = [o for o in parsed if self._is_group_override(o)]
        value_overrides = [o for o in parsed if not self._is_group_override(o)]
        return group_overrides, value_overrides

    def _base_key(self, group_overrides: list[Override]) -> tuple[str, ...]:
        key = tuple(o.input_line for o in group_overrides)
        if key not in self._compositions:
            self._compositions[key] = self.loader.load_sweep_config(self.sweep_config, list(key))
        return key

    def _apply(self, task_config: DictConfig, parsed: list[Override], value_overrides: list[Override],
               index: int) -> None:
        ConfigLoaderImpl._apply_overrides_to_config(value_overrides, task_config)
        OmegaConf.copy_cache(from_config=self.sweep_config, to_config=task_config)
        self._record_overrides(task_config, parsed, value_overrides, index)

    def _compose(self, overrides: Sequence[str], index: int) -> DictConfig:
        parsed = self._parse(overrides)
        group_overrides, value_overrides = self._split(parsed)
        key = self._base_key(group_overrides)
        task_config = copy.deepcopy(self._compositions[key])

        self._apply(task_config, parsed, value_overrides, index)
        return task_config

    def _is_group_override(self, override: Override) -> bool:
        if override.is_hydra_override() and "/" not in override.key_or_group:
            return False
        return override.package is not None or self.loader.repository.group_exists(override.key_or_group)

    @staticmethod
    def _record_overrides(task_config: DictConfig, parsed: list[Override],
                          value_overrides: list[Override], index: int) -> None:
        # What Hydra's own composition stores about the overrides of a task.
        app_overrides = [o for o in parsed if not o.is_hydra_override()]
        job = task_config.hydra.job
        with open_dict(task_config):
            task_config.hydra.overrides.task = [o.input_line for o in app_overrides]
            task_config.hydra.overrides.hydra = list(task_config.hydra.overrides.hydra) + [
                o.input_line for o in value_overrides
                if o.is_hydra_override() and o.input_line not in task_config.hydra.overrides.hydra
            ]
            job.override_dirname = get_overrides_dirname(
                overrides=app_overrides,
                kv_sep=job.config.override_dirname.kv_sep,
                item_sep=job.config.override_dirname.item_sep,
                exclude_keys=job.config.override_dirname.exclude_keys,
            )
            job.id = index
            job.num = index
