"""Time to queue a 64-task sweep on Slurm, sbatch calls, and ``--help`` time.

Compares kitsjobs' ``launcher=slurm`` with hydra-submitit-launcher on the same sweep
(``seed=range(64)``, the smoke experiment) and the same cluster. hydra-submitit-launcher is not
a kitsjobs dependency: install it into a separate folder and pass that folder, e.g.

    pip install --no-deps --target /tmp/hsl hydra-submitit-launcher==1.2.0
    python benchmarks/bench_launch.py --submitit-launcher-path /tmp/hsl

Each measurement starts the command and polls ``squeue`` every 0.05 s until all 64 tasks of the
job name are listed, then cancels them. hydra-submitit-launcher blocks until its tasks end, so
its process is stopped once they are queued. sbatch calls are counted by a wrapper placed first
on PATH. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK_COUNT = 64
POLL_INTERVAL_S = 0.05
QUEUE_TIMEOUT_S = 120.0
SWEEP_ARGS = ["-m", f"seed=range({TASK_COUNT})", "experiment=smoke", "data.root=/nonexistent"]


@dataclass
class Measurement:
    """One sweep submission."""

    name: str
    queued_s: float  # from command start until squeue lists every task
    command_s: float | None  # until the command returned; None when it was stopped
    sbatch_calls: int


def write_sbatch_wrapper(folder: Path, counter: Path) -> None:
    """Write FOLDER/sbatch that appends one line to ``counter`` and runs the real sbatch."""
    real = shutil.which("sbatch")
    if real is None:
        sys.exit("error: sbatch not found on PATH; run this benchmark on a Slurm cluster (make slurm-up)")
    wrapper = folder / "sbatch"
    wrapper.write_text(f'#!/bin/sh\necho call >> "{counter}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)


def count_queued(job_name: str) -> int:
    output = subprocess.run(["squeue", "--noheader", "--array", f"--name={job_name}", "--format=%i"],
                            capture_output=True, text=True, timeout=30, check=False).stdout
    return len(output.split())


def cancel(job_name: str) -> None:
    subprocess.run(["scancel", f"--name={job_name}"], capture_output=True, timeout=30, check=False)


def measure(name: str, args: list[str], env: dict[str, str], job_name: str, work: Path) -> Measurement:
    """Run one sweep command and time it until all tasks are queued."""
    counter = work / f"sbatch_calls_{job_name}"
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "kitsjobs.launch", *args], cwd=work, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    queued_s = command_s = None
    try:
        while time.monotonic() - started < QUEUE_TIMEOUT_S:
            if command_s is None and process.poll() is not None:
                command_s = time.monotonic() - started
                if process.returncode != 0:
                    sys.exit(f"error: {name} failed: {process.stderr.read() if process.stderr else ''}")
            if count_queued(job_name) >= TASK_COUNT:
                queued_s = time.monotonic() - started
                break
            time.sleep(POLL_INTERVAL_S)
    finally:
        cancel(job_name)
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
    if queued_s is None:
        sys.exit(f"error: {name}: {TASK_COUNT} tasks not queued within {QUEUE_TIMEOUT_S:.0f} s")
    calls = len(counter.read_text().splitlines()) if counter.exists() else 0
    counter.unlink(missing_ok=True)
    return Measurement(name, queued_s, command_s, calls)


def kitsjobs_args(job_name: str, sweep_dir: Path) -> list[str]:
    return [*SWEEP_ARGS, "launcher=slurm", "slurm=ippmed-a40", "slurm.timeout_min=10",
            f"launcher.job_name={job_name}", f"hydra.sweep.dir={sweep_dir}"]


def submitit_launcher_args(job_name: str, sweep_dir: Path) -> list[str]:
    """The same sweep and resources through hydra-submitit-launcher's submitit_slurm launcher."""
    return [*SWEEP_ARGS, "hydra/launcher=submitit_slurm", "hydra.launcher.partition=IPPMED-A40",
            "hydra.launcher.qos=ippmed-qos", "hydra.launcher.account=ippmed", "hydra.launcher.gres=gpu:a40:1",
            "hydra.launcher.cpus_per_task=8", "hydra.launcher.mem_gb=16", "hydra.launcher.timeout_min=10",
            "hydra.launcher.array_parallelism=4", f"hydra.launcher.name={job_name}", f"hydra.sweep.dir={sweep_dir}"]


def time_help(repeats: int) -> float:
    """Return the median wall time of ``python -m kitsjobs.launch --help`` in seconds."""
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "kitsjobs.launch", "--help"], cwd=REPO, capture_output=True,
                       timeout=60, check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def main() -> None:
    """Run the measurements and print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submitit-launcher-path", type=Path, default=None,
                        help="folder where hydra-submitit-launcher was installed with pip --target; "
                             "without it only kitsjobs is measured")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (median reported)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_launch_") as temporary:
        work = Path(temporary)
        wrappers = work / "bin"
        wrappers.mkdir()
        base_env = {**os.environ, "KITSJOBS_SLURM_TEMPLATES": str(REPO / "slurm_templates"),
                    "PATH": f"{wrappers}{os.pathsep}{os.environ['PATH']}"}

        runs: dict[str, list[Measurement]] = {"kitsjobs": [], "hydra-submitit-launcher": []}
        for repeat in range(args.repeats):
            job_name = f"bench-{uuid.uuid4().hex[:8]}"
            write_sbatch_wrapper(wrappers, work / f"sbatch_calls_{job_name}")
            runs["kitsjobs"].append(measure("kitsjobs", kitsjobs_args(job_name, work / f"k{repeat}"),
                                            base_env, job_name, work))
            if args.submitit_launcher_path is not None:
                job_name = f"bench-{uuid.uuid4().hex[:8]}"
                write_sbatch_wrapper(wrappers, work / f"sbatch_calls_{job_name}")
                env = {**base_env, "PYTHONPATH": str(args.submitit_launcher_path)}
                runs["hydra-submitit-launcher"].append(
                    measure("hydra-submitit-launcher", submitit_launcher_args(job_name, work / f"h{repeat}"),
                            env, job_name, work))
        help_s = time_help(args.repeats)

    print_table(runs, help_s)


def print_table(runs: dict[str, list[Measurement]], help_s: float) -> None:
    kitsjobs_queued = statistics.median(m.queued_s for m in runs["kitsjobs"])
    print(f"| measure ({TASK_COUNT}-task sweep, median of {len(runs['kitsjobs'])}) | kitsjobs | "
          "hydra-submitit-launcher 1.2.0 | ratio |")
    print("| --- | --- | --- | --- |")
    other = runs["hydra-submitit-launcher"]
    if other:
        other_queued = statistics.median(m.queued_s for m in other)
        print(f"| command start to all tasks queued (s) | {kitsjobs_queued:.2f} | {other_queued:.2f} | "
              f"{other_queued / kitsjobs_queued:.1f}x |")
        print(f"| sbatch calls | {runs['kitsjobs'][0].sbatch_calls} | {other[0].sbatch_calls} | |")
    else:
        print(f"| command start to all tasks queued (s) | {kitsjobs_queued:.2f} | not run | |")
        print(f"| sbatch calls | {runs['kitsjobs'][0].sbatch_calls} | not run | |")
    command_times = [m.command_s for m in runs["kitsjobs"] if m.command_s is not None]
    if command_times:
        print(f"| kitsjobs command returned (s) | {statistics.median(command_times):.2f} | | |")
    print(f"| `python -m kitsjobs.launch --help` (s) | {help_s:.2f} | | |")


if __name__ == "__main__":
    main()
