"""Admin templates, resource requests and the array throttle, without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from kitsjobs.config import LauncherConfig, SlurmConfig
from kitsjobs.errors import UserError
from kitsjobs.slurm import cluster
from kitsjobs.slurm.checks import check_against_template
from kitsjobs.slurm.request import array_throttle, build_request
from kitsjobs.slurm.submission import check_script_values, executor_parameters
from kitsjobs.slurm.templates import load_template

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "slurm_templates"


def write_template(folder: Path, text: str, name: str = "site") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder


MINIMAL = """partition: gpu
gpu_quota_per_user: 4
max_gpus_per_job: 4
cpus_per_gpu: 8
mem_gb_per_gpu: 16
default_time_min: 60
max_time_min: 120
"""


def test_shipped_templates_parse() -> None:
    a40 = load_template(TEMPLATES, "ippmed-a40")
    assert a40.partition == "IPPMED-A40"
    assert a40.gres_type == "a40"
    assert a40.gpu_quota_per_user == 4
    assert a40.signal == "USR2"
    assert a40.signal_delay_s == 90
    assert a40.requeue is True
    assert a40.max_requeues == 3
    debug = load_template(TEMPLATES, "debug")
    assert debug.partition == "debug"
    assert debug.max_time_min <= 60


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    folder = write_template(tmp_path, MINIMAL + "gpus_per_node: 4\n")
    with pytest.raises(UserError) as error:
        load_template(folder, "site")
    message = str(error.value)
    assert "site.yaml" in message
    assert "gpus_per_node" in message
    assert "\n" not in message


@pytest.mark.parametrize("line, key", [
    ("cpus_per_gpu: eight", "cpus_per_gpu"),
    ("requeue: 1", "requeue"),
    ("max_gpus_per_job: true", "max_gpus_per_job"),
    ("setup: module load cuda", "setup"),
    ("signal: KILL", "signal"),
    ("partition: 'gpu; rm -rf ~'", "partition"),
])
def test_wrong_value_names_key(tmp_path: Path, line: str, key: str) -> None:
    lines = [row for row in MINIMAL.splitlines() if not row.startswith(key + ":")]
    folder = write_template(tmp_path, "\n".join(lines + [line]) + "\n")
    with pytest.raises(UserError) as error:
        load_template(folder, "site")
    assert f"'{key}'" in str(error.value)
    assert "site.yaml" in str(error.value)


def test_missing_key_and_missing_template(tmp_path: Path) -> None:
    folder = write_template(tmp_path, MINIMAL.replace("partition: gpu\n", ""))
    with pytest.raises(UserError, match="missing key.*partition"):
        load_template(folder, "site")
    with pytest.raises(UserError, match="'nope' not found.*available: \\['site'\\]"):
        load_template(folder, "nope")
    with pytest.raises(UserError, match="invalid slurm.template"):
        load_template(folder, "../site")


def test_request_defaults_scale_with_gpus() -> None:
    template = load_template(TEMPLATES, "ippmed-a40")
    request = build_request(SlurmConfig(gpus_per_task=2), template)
    assert request.cpus_per_task == 2 * template.cpus_per_gpu
    assert request.mem_mb == int(2 * template.mem_gb_per_gpu * 1024)
    assert request.time_min == template.default_time_min


def test_half_gigabyte_renders_as_megabytes() -> None:
    template = load_template(TEMPLATES, "ippmed-a40")
    request = build_request(SlurmConfig(gpus_per_task=1, mem_gb=0.5), template)
    assert request.mem_mb == 512
    params = executor_parameters(template, request, LauncherConfig(name="slurm"), throttle=4)
    assert params["mem"] == "512M"
    assert params["gres"] == "gpu:a40:1"
    assert params["additional_parameters"] == {"signal": "USR2@90", "requeue": True}


@pytest.mark.parametrize("gpus, max_parallel, tasks, expected", [
    (2, None, 4, 2),   # quota 4 / 2 GPUs per task
    (1, None, 8, 4),
    (1, None, 3, 3),   # never more than the task count
    (1, 2, 8, 2),      # the user lowers it
    (4, None, 8, 1),
])
def test_throttle_follows_quota(gpus: int, max_parallel: int | None, tasks: int, expected: int) -> None:
    template = load_template(TEMPLATES, "ippmed-a40")
    request = build_request(SlurmConfig(gpus_per_task=gpus), template)
    launcher = LauncherConfig(name="slurm", max_parallel=max_parallel)
    assert array_throttle(request, template, launcher, tasks) == expected


def test_throttle_never_above_quota() -> None:
    template = load_template(TEMPLATES, "ippmed-a40")
    request = build_request(SlurmConfig(gpus_per_task=2), template)
    with pytest.raises(UserError, match="launcher.max_parallel=3 is above.*max_parallel=2 or less"):
        array_throttle(request, template, LauncherConfig(name="slurm", max_parallel=3), 8)


@pytest.mark.parametrize("slurm, match", [
    (SlurmConfig(gpus_per_task=5), "above max_gpus_per_job=4"),
    (SlurmConfig(timeout_min=3000), "slurm.timeout_min=3000 is above max_time_min=2880"),
])
def test_template_limits_reject(slurm: SlurmConfig, match: str) -> None:
    template = load_template(TEMPLATES, "ippmed-a40")
    with pytest.raises(UserError, match=match):
        check_against_template(build_request(slurm, template), template)


@pytest.mark.parametrize("name", ["x; rm -rf ~", "$(touch marker)", "a`b`", "name\nx", ""])
def test_job_name_with_shell_characters_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="invalid launcher.job_name"):
        check_script_values(tmp_path, LauncherConfig(name="slurm", job_name=name))


def test_sweep_dir_with_percent_rejected(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="contains '%'"):
        check_script_values(tmp_path / "100%", LauncherConfig(name="slurm"))


def test_array_suffixes_expand() -> None:
    assert cluster._expand_task_ids("3") == [3]
    assert cluster._expand_task_ids("[2-5%2]") == [2, 3, 4, 5]
    assert cluster._expand_task_ids("[1,4-6]") == [1, 4, 5, 6]


def test_node_gres_parsing() -> None:
    node = cluster.NodeFacts(mem_mb=128000, cpus=32, gres="gpu:a40:4(S:0-1)")
    assert node.gpu_types() == {"a40"}
    assert node.gpu_count() == 4
    assert cluster.NodeFacts(1, 1, "(null)").gpu_count() == 0
    assert cluster._gpu_count_in_tres("cpu=8,gres/gpu=4") == 4
    assert cluster._gpu_count_in_tres("gres/gpu:a40=2") == 2
    assert cluster._gpu_count_in_tres("") is None
