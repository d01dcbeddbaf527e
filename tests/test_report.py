"""The sweep report, built from run folders alone (no W&B, no Slurm)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kitsjobs.metrics import METRIC_COLUMNS
from kitsjobs.report import main as report_main
from kitsjobs.report import write_report
from kitsjobs.tracking.runs import find_runs


def write_run(folder: Path, overrides: list[str], scores: list[float], max_steps: int = 40,
              finished: bool = True) -> None:
    """Write a run folder as a task leaves it: overrides, config, history and (if finished) metrics."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": max_steps}}))
    lines = []
    for index, score in enumerate(scores, start=1):
        step = index * 10
        lines.append({"step": step, "loss": 2.0 / index, "lr": 1e-3, "val_dice": score})
    (folder / "history.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "{torn")
    if finished:
        mean = {column: 0.5 for column in METRIC_COLUMNS}
        (folder / "metrics.json").write_text(json.dumps({"mean": mean, "cases": {}}))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep_dir = tmp_path / "multirun" / "lr-sweep"
    write_run(sweep_dir / "0", ["optim.lr=0.001"], [0.40, 0.55, 0.60, 0.58])
    write_run(sweep_dir / "1", ["optim.lr=0.0003"], [0.50, 0.71, 0.69, 0.70])
    write_run(sweep_dir / "2", ["optim.lr=0.01"], [0.10, 0.20], finished=False)
    manifest = {"tasks": [{"index": i, "overrides": [f"task={i}"], "folder": str(i)} for i in range(4)]}
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest))
    return sweep_dir


def test_runs_status_from_files(sweep: Path) -> None:
    runs = find_runs(sweep)
    assert [run.name for run in runs] == ["0", "1", "2", "3"]
    assert [run.status for run in runs] == ["finished", "finished", "stopped at step 20", "not started"]
    assert runs[1].overrides == ["task=1"]
    assert runs[1].best() == (20, 0.71)
    assert runs[1].final("val_dice") == 0.70


def test_report_table_marks_best(sweep: Path) -> None:
    path = write_report(sweep)
    text = path.read_text()
    assert path == sweep / "report.md"
    assert "Best run: **1** (task=1), validation Dice 0.7100 at step 20." in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 5
    assert rows[2].startswith("| **1** (best) | task=1 | finished | 40 | 0.7100 (20) | 0.7000 | 0.5000 | 0.5000")
    assert "| 2 | task=2 | stopped at step 20 | 20 | 0.2000 (20) | 0.2000 | 1.0000 |" in rows[3]
    assert "| 3 | task=3 | not started | 0 |" in rows[4]
    assert "![learning curves](report/learning_curves.png)" in text


def test_report_figure_is_png(sweep: Path) -> None:
    write_report(sweep)
    figure = Image.open(sweep / "report" / "learning_curves.png")
    assert figure.format == "PNG"
    pixels = np.asarray(figure.convert("RGB"))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 800
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_report_without_manifest_reads_folders(sweep: Path) -> None:
    (sweep / "sweep.json").unlink()
    runs = find_runs(sweep)
    assert [run.name for run in runs] == ["0", "1", "2"]
    assert runs[0].overrides == ["optim.lr=0.001"]


def test_report_bad_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "sweep folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    assert "contains no run folder" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.md").exists()
