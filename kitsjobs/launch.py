"""Hydra entry point: ``python -m kitsjobs.launch [-m] [OVERRIDES]``.

Composes conf/config.yaml onto the typed schema, resolves it to plain data on
this machine, then runs one task per config. Torch and MONAI are imported only
when a task starts, so ``--help`` and submission stay fast.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kitsjobs.config import Config, invalid_values
from kitsjobs.configstore import UNIQUE_DIR_RESOLVER, register_configs
from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)

register_configs()


def resolve_config(cfg: DictConfig) -> Config:
    """Resolve every interpolation now and return the typed, Hydra-free config.

    Raises:
        UserError: if a mandatory value such as ``data.root`` is missing, an
            interpolation cannot be resolved, or a number is outside its valid range
            (kitsjobs.config.VALUE_RULES).
    """
    reject_unknown_keys(cfg)
    try:
        # Section by section, so that a config still holding Hydra's own node
        # (as the Slurm launcher composes it) resolves without a copy.
        values = {}
        for section in dataclasses.fields(Config):
            node = cfg[section.name]
            values[section.name] = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
        config = Config(**values)
    except MissingMandatoryValue as error:
        key = error.full_key or "a mandatory value"
        raise UserError(
            f"{key} is not set; pass it on the command line, e.g. {key}=/path/to/dataset"
        ) from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "the config"
        raise UserError(f"invalid value for {key}: {error.msg}") from None
    if not isinstance(config, Config):
        raise TypeError(f"the composed config is a {type(config).__name__}, expected Config")
    if config.model.spacing_mm is None and config.data.spacing_mm is not None:
        # Unless model.spacing_mm is set, the dynunet planner uses the spacing the cases are resampled to.
        config.model.spacing_mm = list(config.data.spacing_mm)
    problems = invalid_values(config)
    if problems:
        raise UserError(problems[0])
    return config


def reject_unknown_keys(cfg: DictConfig) -> None:
    """Reject keys that ``+key=value`` or ``++key=value`` added outside the typed schema.

    Hydra lets ``+`` add a key to a typed section; converting to the dataclass would
    then drop it silently, so a misspelt ``+trainer.max_stepz=4`` would train with the
    default.

    Raises:
        UserError: naming the first unknown key and the valid keys of its section.
    """
    sections = {section.name: section for section in dataclasses.fields(Config)}
    for key in cfg.keys():
        if key != "hydra" and key not in sections:
            raise UserError(f"unknown config key '{key}'; valid top-level keys: {', '.join(sorted(sections))}")
    for name, section in sections.items():
        node = cfg.get(name)
        if not isinstance(node, DictConfig):
            continue
        schema = section.default_factory  # type: ignore[misc]
        valid = {field.name for field in dataclasses.fields(schema)}
        unknown = sorted(str(key) for key in node.keys() if key not in valid)
        if unknown:
            raise UserError(
                f"unknown config key '{name}.{unknown[0]}'; valid keys in '{name}': {', '.join(sorted(valid))}; "
                "fix the spelling (python -m kitsjobs.launch --cfg job shows the config)"
            )


def remove_untouched_run_dir(run_dir: Path) -> None:
    """Delete a run folder that contains only what Hydra wrote before the task started.

    A folder with anything else in it (checkpoints, predictions of an earlier
    run) is left as it is.
    """
    hydra_files = {".hydra", "launch.log", "config.yaml"}
    run_dir = run_dir.absolute()
    if not run_dir.is_dir() or {path.name for path in run_dir.iterdir()} - hydra_files:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if parent == Path.cwd() or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


def reject_folder_inside_dataset(config: Config, folder: Path, key: str) -> None:
    """Reject an output folder that is data.root or inside it (symbolic links resolved).

    Raises:
        UserError: naming ``key``, both folders and the fix.
    """
    if not config.data.root:
        return
    root = Path(config.data.root).expanduser().resolve()
    target = folder.expanduser().resolve()
    if target == root or root in target.parents:
        where = "is the dataset folder" if target == root else "is inside the dataset folder"
        raise UserError(f"{key}={folder} {where} data.root={config.data.root}, which is never written; "
                        f"pass a {key} outside it")


def reject_file_as_folder(folder: Path, key: str) -> None:
    """Reject an output folder path that names an existing file.

    Raises:
        UserError: naming ``key`` and the file.
    """
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{key}={folder} is a file, not a folder; pass a folder path (new or empty)")


def reject_slurm_single_run(config: Config, mode: RunMode | None) -> None:
    """Reject launcher=slurm without -m: the Slurm launcher submits sweeps only.

    Raises:
        UserError: launcher.name is slurm and ``mode`` is not MULTIRUN.
    """
    if config.launcher.name == "slurm" and mode != RunMode.MULTIRUN:
        raise UserError("launcher=slurm submits sweeps: add -m (one config is a sweep of one task), "
                        "or use launcher=local to run here")


def check_sweep_task(task_config: DictConfig, sweep_dir: Path, overrides: Sequence[str]) -> None:
    """Resolve one task of a sweep and check its values and that the sweep folder is outside data.root.

    Raises:
        UserError: the first problem, prefixed with the task's overrides.
    """
    try:
        config = resolve_config(task_config)
        reject_folder_inside_dataset(config, sweep_dir, "hydra.sweep.dir")
    except UserError as error:
        shown = " ".join(overrides) or "no overrides"
        raise UserError(f"task [{shown}]: {error}") from None


class RunStartChecks(Callback):
    """Hydra callback that checks a single run's config and folder before Hydra writes into it.

    Hydra calls ``on_run_start`` after composing the config and before it creates the
    run folder, its .hydra/ files and launch.log, so a rejected run leaves an existing
    folder untouched. ``run_cli`` adds it to the command line as RUN_CHECKS_OVERRIDE.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """End a run that main() would reject with one line and exit status 2, before Hydra writes.

        Raises:
            SystemExit: status 2, after printing the UserError's message.
        """
        raw_dir = str(OmegaConf.to_container(config.hydra.run, resolve=False)["dir"])  # type: ignore[index]
        # The default folder is created when the value is resolved, so it is removed again on rejection.
        created_here = UNIQUE_DIR_RESOLVER in raw_dir
        HydraConfig.instance().set_config(config)
        run_dir = Path(str(config.hydra.run.dir))
        try:
            reject_file_as_folder(run_dir, "hydra.run.dir")
            resolved = resolve_config(config)
            reject_slurm_single_run(resolved, RunMode.RUN)
            reject_folder_inside_dataset(resolved, run_dir, "hydra.run.dir")
            from kitsjobs.job import check_run_folder

            check_run_folder(resolved, run_dir.absolute())
        except UserError as error:
            if created_here:
                remove_untouched_run_dir(run_dir)
            # Hydra 1.3 turns an Exception raised by a callback into a warning and goes on,
            # so the rejection ends the command here; SystemExit passes through Hydra.
            sys.exit(_report(str(error)))


RUN_CHECKS_OVERRIDE = "+hydra.callbacks.kitsjobs_run_checks._target_=kitsjobs.launch.RunStartChecks"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one task in Hydra's output folder and return its mean validation Dice.

    A UserError ends a single run with one line on stderr and exit status 2;
    in a sweep it is raised so that the launcher records the task as failed.
    """
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    try:
        config = resolve_config(cfg)
        reject_slurm_single_run(config, hydra_config.mode)

        from kitsjobs.job import run_task

        return run_task(config, run_dir)
    except UserError as error:
        if hydra_config.mode == RunMode.MULTIRUN:
            raise
        # The console shows the one-line message below; the run's log file keeps it too.
        logger.debug("rejected: %s", error)
        # A folder given with hydra.run.dir is put back by run_cli's RunFolderSnapshot instead.
        if UNIQUE_DIR_RESOLVER in str(OmegaConf.to_container(hydra_config.run, resolve=False)["dir"]):
            remove_untouched_run_dir(run_dir)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

HELP_TEXT = """usage: python -m kitsjobs.launch [-m] [--dry-run] [--wait] [KEY=VALUE ...]

Train, predict and score KiTS23 segmentation models: one run, or with -m one run per
combination of the comma-separated values (a sweep).

options:
  -m, --multirun   sweep: one task per combination of values, run by launcher=local or
                   submitted as one Slurm array by launcher=slurm
  --dry-run        with launcher=slurm, print the sbatch script and submit nothing
  --wait           with launcher=slurm, block until every task ended and list the failed ones
  --cfg job        print the composed config and exit (add --resolve to resolve it)
  --hydra-help     Hydra's own options (output folders, logging)

config groups (GROUP=OPTION):
{groups}
examples:
  python -m kitsjobs.launch experiment=smoke
  python -m kitsjobs.launch experiment=baseline data.root=/data/kits23
  python -m kitsjobs.launch -m model=unet,segresnet optim.lr=1e-3,3e-4 launcher=slurm slurm=ippmed-a40

Every key is typed: python -m kitsjobs.launch --cfg job lists them with their values."""


def format_help(conf_dir: Path = CONF_DIR) -> str:
    """Return the command's help: flags, config groups and their options, examples.

    Hydra's own --help lists every group by composing the config once per option,
    which takes about a second; reading the conf/ folder takes milliseconds.
    """
    lines = []
    for group in sorted(path for path in conf_dir.iterdir() if path.is_dir()):
        options = sorted(option.stem for option in group.glob("*.yaml"))
        lines.append(f"  {group.name + ':':12} {', '.join(options)}")
    return HELP_TEXT.format(groups="\n".join(lines) + "\n")


def translate_flags(argv: list[str]) -> list[str]:
    """Turn the ``--dry-run`` and ``--wait`` flags into their launcher overrides."""
    flags = {"--dry-run": "launcher.dry_run=true", "--wait": "launcher.wait=true"}
    return [flags.get(argument, argument) for argument in argv]


# --- One-line errors for config mistakes --------------------------------------

# Failures of the environment, not of kitsjobs: a full disk or quota, a read-only or
# forbidden folder. They end a command with one line naming the path.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
SWEEP_DIR_OVERRIDE = re.compile(r"\+{0,2}hydra\.sweep\.dir=(.*)")


def run_cli(entry: Callable[[], Any], argv: Sequence[str]) -> None:
    """Run the Hydra entry point; end a config mistake with one line and exit status 2.

    Hydra 1.3 prints a multi-line report for composition errors and exits with 1
    unless HYDRA_FULL_ERROR=1, in which case it re-raises the exception. It is set
    here while the command runs so that the exception reaches this function. A user
    who sets HYDRA_FULL_ERROR=1 gets Hydra's full traceback as before.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        entry()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    snapshot = snapshot_run_folder(argv)
    try:
        reject_existing_sweep_dir(argv)
        entry()
    except SystemExit as exit_request:
        # A rejected run (status 2) leaves the run folder as it found it, although Hydra
        # wrote its .hydra/ files and log, and the task its first files, before the rejection.
        if exit_request.code == 2 and snapshot is not None:
            snapshot.restore()
        raise
    except (HydraException, OmegaConfBaseException, UserError) as error:
        if snapshot is not None:
            snapshot.restore()
        sys.exit(_report(describe_config_error(error)))
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        sys.exit(_report(f"cannot write {error.filename or 'the output folder'}: {error.strerror}; "
                         "free disk space or choose a writable folder with hydra.run.dir or hydra.sweep.dir"))
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


RUN_DIR_OVERRIDE = re.compile(r"\+{0,2}hydra\.run\.dir=(.*)")
RUN_LOG_FILE = "launch.log"


@dataclasses.dataclass
class RunFolderSnapshot:
    """The state of the folder named by hydra.run.dir before the command, to put back after a rejection.

    A rejection found after Hydra started the run, such as a dataset error, leaves .hydra/,
    launch.log and the task's first files behind. ``restore`` removes what this command added
    and writes back what it changed.
    """

    folder: Path
    existed: bool
    entries: frozenset[str]
    hydra_files: dict[str, bytes]
    log_size: int | None

    def restore(self) -> None:
        """Remove the run-start files this command added, restore .hydra/ and cut the log back."""
        if not self.folder.is_dir():
            if self.existed:
                self.folder.mkdir(parents=True, exist_ok=True)
            return
        for name in RUN_START_FILES - self.entries:
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
        hydra_dir = self.folder / ".hydra"
        for name, content in self.hydra_files.items():
            (hydra_dir / name).write_bytes(content)
        log = self.folder / RUN_LOG_FILE
        if self.log_size is not None and log.exists():
            with log.open("r+b") as file:
                file.truncate(self.log_size)
        if not self.existed:
            remove_untouched_run_dir(self.folder)


# Entries that Hydra writes into a run folder before the task starts, and the task's first files.
RUN_START_FILES = frozenset({".hydra", RUN_LOG_FILE, "config.yaml", "split.json", "logs"})


def snapshot_run_folder(argv: Sequence[str]) -> RunFolderSnapshot | None:
    """Save the state of the folder named by hydra.run.dir: its entries, .hydra/ files and log size."""
    if "-m" in argv or "--multirun" in argv:
        return None
    for argument in argv:
        match = RUN_DIR_OVERRIDE.fullmatch(argument)
        if match is None or "${" in match.group(1):
            continue
        folder = Path(match.group(1)).expanduser()
        if not folder.is_dir():
            return RunFolderSnapshot(folder, False, frozenset(), {}, None)
        hydra_dir = folder / ".hydra"
        files = {}
        if hydra_dir.is_dir():
            files = {path.name: path.read_bytes() for path in hydra_dir.iterdir() if path.is_file()}
        log = folder / RUN_LOG_FILE
        entries = frozenset(path.name for path in folder.iterdir())
        return RunFolderSnapshot(folder, True, entries, files, log.stat().st_size if log.exists() else None)
    return None


def _report(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def reject_existing_sweep_dir(argv: Sequence[str]) -> None:
    """Reject a sweep (``-m``) into a folder given with hydra.sweep.dir that is not empty.

    Runs before Hydra, which would otherwise overwrite the folder's multirun.yaml.

    Raises:
        UserError: the folder exists and contains files, or is a file.
    """
    if "-m" not in argv and "--multirun" not in argv:
        return
    for argument in argv:
        match = SWEEP_DIR_OVERRIDE.fullmatch(argument)
        if match is None or "${" in match.group(1):
            continue
        folder = Path(match.group(1)).expanduser()
        reject_file_as_folder(folder, "hydra.sweep.dir")
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(f"sweep folder {folder} already exists and is not empty; pass a new "
                            "hydra.sweep.dir, or leave it out for a new dated folder")


def describe_config_error(error: BaseException) -> str:
    """Turn a Hydra or OmegaConf composition error into one line naming the key and the choices."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not an option of config group '{group}'; choose one of: {', '.join(error.options)}"
    if isinstance(error, OverrideParseException):
        return (f"cannot parse override '{error.override}': {_first_line(error.message)}; "
                "quote values with spaces or shell characters, e.g. key='a b'")
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return _describe_key_error(cause)
    return _first_line(str(error))


def _describe_key_error(error: OmegaConfBaseException) -> str:
    full_key = str(error.full_key)
    parent, _, leaf = full_key.rpartition(".")
    fields = _schema_fields(getattr(error, "object_type", None))
    if leaf not in fields:
        where = f"in '{parent}'" if parent else "at the top level"
        return (f"unknown config key '{full_key}'; valid keys {where}: {', '.join(sorted(fields)) or '(none)'}; "
                "fix the spelling (python -m kitsjobs.launch --cfg job shows the config)")
    message = _first_line(str(getattr(error, "msg", "") or error))
    return f"invalid value for {full_key}: {message}; expected {fields[leaf]}"


def _schema_fields(object_type: Any) -> dict[str, str]:
    """Map the field names of a schema dataclass to their annotated types, as text."""
    if not (isinstance(object_type, type) and dataclasses.is_dataclass(object_type)):
        return {}
    return {field.name: str(field.type) for field in dataclasses.fields(object_type)}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid config"


if __name__ == "__main__":
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(format_help())
        sys.exit(0)
    sys.argv[1:] = translate_flags(sys.argv[1:])
    if "-m" not in sys.argv[1:] and "--multirun" not in sys.argv[1:]:
        sys.argv.append(RUN_CHECKS_OVERRIDE)
    run_cli(main, sys.argv[1:])
