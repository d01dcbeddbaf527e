"""Upload a sweep's offline W&B runs: ``python -m kitsjobs.sync SWEEP_DIR [--dry-run]``.

Run it on a machine with internet access (the login node) after the tasks ran
offline on compute nodes. A run written in one attempt is uploaded with
``wandb sync`` as it is. A run that requeues split into several offline folders
is first rebuilt as one offline run (``RUN/wandb_merged/``) whose history has
every optimizer step once, and that run is what gets uploaded. The rebuilt
history takes the training values from ``RUN/history.jsonl`` (which the Trainer
truncates to the checkpoint on resume, so it contains each step once) and the
validation images from the W&B segments. The same rebuild happens for a single
segment that lacks steps of history.jsonl: an attempt ended by SIGKILL loses
the rows wandb had not yet written (10 to 20 rows in a test with wandb 0.31). Uploaded folders are marked with wandb's
``run-ID.wandb.synced`` file and skipped by the next call.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kitsjobs.cli import user_path
from kitsjobs.errors import UserError
from kitsjobs.tracking.offline import OfflineSegment, find_offline_runs, merge_segments, newest_value, read_segment
from kitsjobs.tracking.runs import read_history
from kitsjobs.tracking.trackers import IMAGE_FOLDER, STEP_METRIC, wandb_key

logger = logging.getLogger(__name__)

MERGED_FOLDER = "wandb_merged"


@dataclass
class SyncPlan:
    """What uploading one W&B run involves.

    Attributes:
        run_id: the W&B run id.
        run_dir: the task folder holding ``wandb/``.
        segments: the run's offline folders, oldest attempt first.
        rows: the history to upload, one row per logging call.
        missing_steps: steps of history.jsonl that no segment holds.
    """

    run_id: str
    run_dir: Path
    segments: list[OfflineSegment]
    rows: list[dict[str, Any]]
    missing_steps: list[int]

    @property
    def is_synced(self) -> bool:
        """Whether every segment is already uploaded."""
        return all(segment.is_synced for segment in self.segments)

    @property
    def needs_merge(self) -> bool:
        """Whether the run must be rebuilt: written by several attempts, or lacking steps."""
        return len(self.segments) > 1 or bool(self.missing_steps)

    def describe(self) -> str:
        """Describe the plan in one line: run id, folder, segments, merged steps, state."""
        steps = [row[STEP_METRIC] for row in self.rows if STEP_METRIC in row]
        span = f"steps {min(steps)}-{max(steps)}" if steps else "no steps"
        state = "already synced" if self.is_synced else (
            f"merge {len(self.segments)} segment(s) and history.jsonl ({len(self.missing_steps)} step(s) "
            "missing from the W&B files), then upload" if self.needs_merge else "upload")
        return (f"{self.run_id}  {self.run_dir}  {len(self.segments)} segment(s), {len(self.rows)} history "
                f"row(s), {span}: {state}")


def plan_sync(sweep_dir: Path) -> list[SyncPlan]:
    """List the offline W&B runs under a sweep (or run) folder with their merged history.

    Raises:
        UserError: if ``sweep_dir`` is not a folder.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder {sweep_dir} not found; pass the folder that contains the task folders, "
                        "e.g. multirun/2026-01-31/12-00-00")
    plans = []
    for run_id, segments in sorted(find_offline_runs(sweep_dir).items()):
        run_dir = segments[0].folder.parent.parent
        rows, missing_steps = merge_with_history(merge_segments(segments), run_dir / "history.jsonl")
        plans.append(SyncPlan(run_id, run_dir, segments, rows, missing_steps))
    return plans


def merge_with_history(segment_rows: list[dict[str, Any]], history_path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Combine the merged W&B rows of a run with its history.jsonl.

    Returns:
        The rows to upload and the history steps missing from ``segment_rows``.
        Without history.jsonl the rows are ``segment_rows``. With it, the
        training values come from history.jsonl (W&B names, see ``wandb_key``)
        and only the image rows come from ``segment_rows``.
    """
    history = read_history(history_path)
    if not history:
        return segment_rows, []
    logged_steps = {row.get(STEP_METRIC) for row in segment_rows}
    missing_steps = [int(line["step"]) for line in history if line["step"] not in logged_steps]
    rows = [{STEP_METRIC: int(line["step"]), **{wandb_key(key): value for key, value in line.items() if key != "step"}}
            for line in history]
    last_step = rows[-1][STEP_METRIC]
    images = [row for row in segment_rows
              if any(key.startswith("val_images/") for key in row) and row.get(STEP_METRIC, 0) <= last_step]
    merged = sorted(images + rows, key=lambda row: row[STEP_METRIC])
    return merged, missing_steps


def write_merged_run(plan: SyncPlan) -> Path:
    """Write the merged history of a multi-segment run as one offline run in ``RUN/wandb_merged/``.

    The merged run keeps the run id, project, entity, group, name, tags and
    config of the newest segment; validation images are taken again from
    ``RUN/images/``. An earlier merged folder of the run is replaced.

    Returns:
        The merged run's ``offline-run-*`` folder.
    """
    import wandb

    segments = plan.segments
    staging = plan.run_dir / MERGED_FOLDER
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = {key: value for key, value in segments[-1].config.items() if not key.startswith("_")}
    run = wandb.init(
        project=newest_value(segments, "project") or None,
        entity=newest_value(segments, "entity") or None,
        id=plan.run_id,
        name=newest_value(segments, "name") or None,
        group=newest_value(segments, "group") or None,
        tags=newest_value(segments, "tags") or None,
        job_type="train",
        config=config,
        dir=str(staging),
        mode="offline",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    try:
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        for row in plan.rows:
            run.log(_with_images(row, plan.run_dir))
        final = {key: value for key, value in segments[-1].summary.items() if key.startswith("final/")}
        run.summary.update(final)
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder


def _with_images(row: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Replace a row's logged image lists by ``wandb.Image`` objects read again from ``RUN/images/``.

    The offline history stores an image list under flattened keys such as
    ``val_images/CASE/filenames``. The PNG files of CASE at that step are found
    by the names that :class:`LocalTracker` gives them.
    """
    import wandb

    result = {key: value for key, value in row.items() if not key.startswith("val_images/")}
    case_names = sorted({key.split("/")[1] for key in row if key.startswith("val_images/")})
    for case_name in case_names:
        pattern = f"step{int(row[STEP_METRIC]):07d}_{case_name}_z*.png"
        paths = sorted((run_dir / IMAGE_FOLDER).glob(pattern))
        if not paths:
            logger.warning("%s: no %s in %s; those images are not uploaded", run_dir, pattern, IMAGE_FOLDER)
            continue
        result[f"val_images/{case_name}"] = [
            wandb.Image(str(path), caption=f"{case_name} {path.stem.rsplit('_', 1)[-1]}") for path in paths
        ]
    return result


def upload(folder: Path, project: Optional[str], entity: Optional[str]) -> bool:
    """Upload one offline run folder with ``wandb sync``; return whether it succeeded.

    The API key comes from the environment or ``wandb login`` as for any wandb
    command; it is never passed on the command line or logged.
    """
    # --include-synced: the caller decided to upload, so a marker left by an
    # earlier, partly failed call must not make wandb skip the folder.
    command = [sys.executable, "-m", "wandb", "sync", "--yes", "--include-synced"]
    if project:
        command += ["--project", project]
    if entity:
        command += ["--entity", entity]
    command.append(str(folder))
    logger.info("uploading %s", folder)
    result = subprocess.run(command, env=os.environ.copy(), check=False)
    if result.returncode != 0:
        logger.error("wandb sync failed for %s (exit status %d)", folder, result.returncode)
        return False
    return True


def mark_synced(segment: OfflineSegment) -> None:
    """Create wandb's ``run-ID.wandb.synced`` marker next to a segment's ``.wandb`` file."""
    segment.wandb_file.with_name(segment.wandb_file.name + ".synced").touch()


def sync_plan(plan: SyncPlan, project: Optional[str], entity: Optional[str]) -> bool:
    """Merge a run's segments when needed, upload the result and mark the segments synced.

    Returns:
        Whether the upload succeeded.
    """
    if not plan.needs_merge:
        return upload(plan.segments[0].folder, project, entity)
    merged_folder = write_merged_run(plan)
    merged_rows = len(read_segment(merged_folder).rows)
    logger.info("%s: merged %d segments into %s (%d history rows)",
                plan.run_id, len(plan.segments), merged_folder, merged_rows)
    if not upload(merged_folder, project, entity):
        return False
    # The segments' data went up through the merged run; a later call skips them.
    for segment in plan.segments:
        mark_synced(segment)
    return True


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse the command line of ``python -m kitsjobs.sync``."""
    parser = argparse.ArgumentParser(
        prog="python -m kitsjobs.sync",
        description="Upload the offline W&B runs of a sweep, merging the segments of requeued tasks.",
    )
    parser.add_argument("sweep_dir", type=user_path, help="sweep folder (multirun/DATE/TIME) or one run folder")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; write nothing")
    parser.add_argument("--project", help="W&B project to upload to instead of the one each run logged")
    parser.add_argument("--entity", help="W&B entity to upload to instead of the one each run logged")
    parser.add_argument("--include-synced", action="store_true", help="upload runs already marked as synced")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; return 0 when every run was uploaded, 1 when one failed, 2 on bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        plans = plan_sync(args.sweep_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not plans:
        print(f"no offline W&B runs under {args.sweep_dir} (looked in */wandb/offline-run-*)")
        return 0

    failed = []
    for plan in plans:
        print(plan.describe())
        if args.dry_run or (plan.is_synced and not args.include_synced):
            continue
        if not sync_plan(plan, args.project, args.entity):
            failed.append(plan.run_id)
    if failed:
        print(f"error: {len(failed)} of {len(plans)} run(s) failed to upload: {', '.join(failed)}; "
              "check `wandb login` and the network, then run the command again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
