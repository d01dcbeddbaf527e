"""Admin templates: one plain YAML file per partition or profile in a templates folder.

A template states what the cluster allows (partition, QoS, account, GPU type, CPUs and memory
per GPU, time limits, GPU quota) and what runs before each job (setup lines). The keys are the
fields of ``SlurmTemplate``; slurm_templates/README.md documents them for admins.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)

# Template names become file names; nothing that could climb out of the folder.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Signals sbatch's --signal accepts by name for the warning before the time limit.
ALLOWED_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP")
# Signals a cluster may preempt with before SIGKILL (slurm.conf GraceTime).
PREEMPT_SIGNALS = ("TERM", "INT")


@dataclass(frozen=True)
class SlurmTemplate:
    """Limits and settings of one partition or profile, as an admin wrote them."""

    # Slurm partition the jobs go to (sbatch --partition).
    partition: str
    # Per-user GPU quota of the QoS; the array throttle is this divided by GPUs per task.
    gpu_quota_per_user: int
    # Largest GPU count one job may request.
    max_gpus_per_job: int
    # CPUs and memory granted per requested GPU, used when the experiment sets none.
    cpus_per_gpu: int
    mem_gb_per_gpu: float
    # Time limit used when the experiment sets none, and the largest allowed one, in minutes.
    default_time_min: int
    max_time_min: int
    # QoS and account (sbatch --qos, --account); null leaves Slurm's defaults.
    qos: Optional[str] = None
    account: Optional[str] = None
    # GRES GPU type, as in gres.conf (gpu:TYPE:COUNT); null requests untyped GPUs.
    gres_type: Optional[str] = None
    # Shell lines run in the batch script before the task (module load, environment activation).
    setup: list[str] = field(default_factory=list)
    # Whether Slurm may requeue a task (preemption, time limit with a checkpoint).
    requeue: bool = False
    # Signal sent signal_delay_s seconds before the time limit, so a task can checkpoint.
    signal: str = "USR2"
    signal_delay_s: int = 90
    # Signal of a preemption that Slurm follows with SIGKILL after preempt_grace_s seconds
    # (TERM on clusters that preempt without warning); null leaves it to submitit (logged, ignored).
    preempt_signal: Optional[str] = None
    preempt_grace_s: int = 0
    # Restarts (SLURM_RESTART_COUNT) past which a task fails instead of running again.
    max_requeues: int = 3
    # File the template was read from, for messages; not a YAML key.
    source: str = ""


def template_path(templates_dir: str | Path, name: str) -> Path:
    """Return the path of template ``name`` (``TEMPLATES_DIR/NAME.yaml``).

    Raises:
        UserError: if the name is not a plain file name or the file does not exist.
    """
    folder = Path(templates_dir).expanduser()
    if not _NAME_PATTERN.match(name):
        raise UserError(f"invalid slurm.template '{name}': use a file name from {folder} without .yaml")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise UserError(
            f"Slurm template '{name}' not found in {folder}; available: {available or 'none'}; "
            "set slurm.template or slurm.templates_dir (or KITSJOBS_SLURM_TEMPLATES)"
        )
    return path


def load_template(templates_dir: str | Path, name: str) -> SlurmTemplate:
    """Read and validate template ``name`` from ``templates_dir``.

    Raises:
        UserError: the file is missing, is not a YAML mapping, has an unknown or missing key,
            or a value of the wrong type or out of range; the message names the file and key.
    """
    path = template_path(templates_dir, name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys to values, got {type(raw).__name__}")
    return parse_template(raw, str(path))


def parse_template(raw: dict[str, Any], source: str) -> SlurmTemplate:
    """Build a SlurmTemplate from a parsed YAML mapping.

    Raises:
        UserError: naming ``source`` and the first bad key, with the valid keys or type.
    """
    fields = {f.name: f for f in dataclasses.fields(SlurmTemplate) if f.name != "source"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    missing = [name for name in required if name not in raw]
    if missing:
        raise UserError(f"{source}: missing key(s) {missing}; see slurm_templates/README.md")

    values = {key: _check_type(source, key, value) for key, value in raw.items()}
    template = SlurmTemplate(**values, source=source)
    _check_ranges(template)
    return template


_EXPECTED_TYPES: dict[str, tuple[type, ...]] = {
    "partition": (str,),
    "gpu_quota_per_user": (int,),
    "max_gpus_per_job": (int,),
    "cpus_per_gpu": (int,),
    "mem_gb_per_gpu": (int, float),
    "default_time_min": (int,),
    "max_time_min": (int,),
    "qos": (str, type(None)),
    "account": (str, type(None)),
    "gres_type": (str, type(None)),
    "setup": (list,),
    "requeue": (bool,),
    "signal": (str,),
    "signal_delay_s": (int,),
    "preempt_signal": (str, type(None)),
    "preempt_grace_s": (int,),
    "max_requeues": (int,),
}


def _check_type(source: str, key: str, value: Any) -> Any:
    expected = _EXPECTED_TYPES[key]
    # YAML booleans are ints in Python; only "requeue" may be one.
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in expected) or not isinstance(value, expected):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
        raise UserError(f"{source}: key '{key}' must be {names}, got {value!r}")
    if key == "setup":
        for line in value:
            if not isinstance(line, str) or "\n" in line or "\0" in line:
                raise UserError(f"{source}: key 'setup' must be a list of one-line strings, got {line!r}")
        return list(value)
    if isinstance(value, str) and any(ch in value for ch in "\n\r\0"):
        raise UserError(f"{source}: key '{key}' must fit on one line, got {value!r}")
    return value


def _check_ranges(template: SlurmTemplate) -> None:
    source = template.source
    positive = ("gpu_quota_per_user", "max_gpus_per_job", "cpus_per_gpu", "default_time_min", "max_time_min")
    for key in positive:
        if getattr(template, key) < 1:
            raise UserError(f"{source}: key '{key}' must be 1 or more, got {getattr(template, key)}")
    if template.mem_gb_per_gpu <= 0:
        raise UserError(f"{source}: key 'mem_gb_per_gpu' must be above 0, got {template.mem_gb_per_gpu}")
    if template.default_time_min > template.max_time_min:
        raise UserError(
            f"{source}: default_time_min ({template.default_time_min}) is above max_time_min "
            f"({template.max_time_min}); lower default_time_min"
        )
    if template.signal not in ALLOWED_SIGNALS:
        raise UserError(f"{source}: key 'signal' must be one of {list(ALLOWED_SIGNALS)}, got {template.signal!r}")
    if template.signal_delay_s < 0:
        raise UserError(f"{source}: key 'signal_delay_s' must be 0 or more, got {template.signal_delay_s}")
    if template.preempt_signal is not None and template.preempt_signal not in PREEMPT_SIGNALS:
        raise UserError(f"{source}: key 'preempt_signal' must be one of {list(PREEMPT_SIGNALS)} or null, "
                        f"got {template.preempt_signal!r}")
    if template.preempt_signal is not None and template.preempt_signal == template.signal:
        raise UserError(f"{source}: keys 'signal' and 'preempt_signal' are both {template.signal}; "
                        "give the preemption another signal or set preempt_signal: null")
    for key in ("preempt_grace_s", "max_requeues"):
        if getattr(template, key) < 0:
            raise UserError(f"{source}: key '{key}' must be 0 or more, got {getattr(template, key)}")
    for key in ("partition", "qos", "account", "gres_type"):
        value = getattr(template, key)
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", value):
            raise UserError(f"{source}: key '{key}' may contain only letters, digits and _.+-, got {value!r}")
