"""Read W&B offline runs from disk and merge the segments that requeues leave behind.

Each attempt of a requeued task that runs W&B offline writes its own folder,
``RUN/wandb/offline-run-DATE_TIME-ID[-N]/run-ID.wandb``, all with the same run id.
An attempt killed at step 212 after a checkpoint at step 200 leaves rows 201-212
that the next attempt logs again. :func:`merge_segments` keeps, for every
optimizer step (``trainer/step``), the row of the newest segment that logged it.

The ``.wandb`` file uses the LevelDB log format. A 7-byte header (``:W&B``,
magic 0xBEE1 little-endian, version 0) is followed by 32 KiB blocks of chunks.
Each chunk starts with a CRC-32 (zlib) of type byte plus payload, a 2-byte
length and a type byte (1 full, 2 first, 3 middle, 4 last). A payload is one ``wandb.proto`` Record.
wandb 0.31 ships no Python reader, so this module contains one; it was checked
against files written by wandb 0.31.0.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kitsjobs.tracking.trackers import STEP_METRIC

logger = logging.getLogger(__name__)

_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class OfflineFileError(ValueError):
    """A ``.wandb`` file that is not in W&B's offline format."""


def iter_record_bytes(path: Path) -> Iterator[bytes]:
    """Yield the payload of every complete record of a ``.wandb`` file, in order.

    A torn or corrupt tail (a task killed while wandb was writing) ends the
    iteration with a warning naming the file and the offset.

    Raises:
        OfflineFileError: if the file does not start with the W&B header.
    """
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise OfflineFileError(f"{path} is too short to be a W&B offline file")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC or version != 0:
        raise OfflineFileError(f"{path} is not a W&B offline file (header {data[:7]!r})")

    offset = _FILE_HEADER.size
    pending = bytearray()
    while offset + _CHUNK_HEADER.size <= len(data):
        block_left = _BLOCK_SIZE - offset % _BLOCK_SIZE
        if block_left < _CHUNK_HEADER.size:
            offset += block_left  # the block's zero padding
            continue
        checksum, length, chunk_type = _CHUNK_HEADER.unpack_from(data, offset)
        start = offset + _CHUNK_HEADER.size
        payload = data[start:start + length]
        if len(payload) < length or zlib.crc32(bytes([chunk_type]) + payload) != checksum:
            logger.warning("%s: incomplete or corrupt record at byte %d; reading stops there", path, offset)
            return
        offset = start + length
        if chunk_type == _FULL:
            yield payload
        elif chunk_type == _FIRST:
            pending = bytearray(payload)
        elif chunk_type == _MIDDLE:
            pending += payload
        elif chunk_type == _LAST:
            pending += payload
            yield bytes(pending)
            pending = bytearray()


def iter_records(path: Path) -> Iterator[Any]:
    """Yield every record of a ``.wandb`` file as a ``wandb.proto`` Record message."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_record_bytes(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


@dataclass
class OfflineSegment:
    """Contents one attempt of a task wrote to one offline run folder.

    Attributes:
        folder: the ``offline-run-*`` folder.
        run_id: the W&B run id.
        start_time_s: Unix time the attempt started.
        project, entity, group, name: run settings as logged ("" when unset).
        tags: run tags.
        config: the run config, values decoded from JSON.
        rows: history rows in logging order, values decoded from JSON; nested
            keys are joined with "/".
        summary: summary values set explicitly by the run.
        exit_code: exit code of the attempt's closing record; None while wandb
            is still writing the file or when the attempt was killed.
    """

    folder: Path
    run_id: str
    start_time_s: float = 0.0
    project: str = ""
    entity: str = ""
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: Optional[int] = None

    @property
    def wandb_file(self) -> Path:
        """The segment's ``run-ID.wandb`` file."""
        return self.folder / f"run-{self.run_id}.wandb"

    @property
    def is_synced(self) -> bool:
        """Whether ``wandb sync`` has uploaded this segment (it leaves ``run-ID.wandb.synced``)."""
        return self.wandb_file.with_name(self.wandb_file.name + ".synced").exists()


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _config_value(value_json: str) -> Any:
    value = json.loads(value_json)
    # wandb stores each top-level config key as {"value": ..., "desc": ...}.
    if isinstance(value, dict) and "value" in value:
        return value["value"]
    return value


def read_segment(folder: Path) -> OfflineSegment:
    """Read the run settings, config, history and summary of one offline run folder.

    Raises:
        OfflineFileError: if the folder contains no ``run-*.wandb`` file or it is not valid.
    """
    folder = Path(folder)
    files = sorted(folder.glob("run-*.wandb"))
    if not files:
        raise OfflineFileError(f"{folder} contains no run-*.wandb file")
    segment = OfflineSegment(folder=folder, run_id=files[0].stem[len("run-"):])
    for record in iter_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _read_run_record(segment, record.run)
        elif kind == "config":
            for update in record.config.update:
                segment.config[_item_key(update)] = _config_value(update.value_json)
        elif kind == "history":
            segment.rows.append({_item_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for update in record.summary.update:
                segment.summary[_item_key(update)] = json.loads(update.value_json)
        elif kind == "exit":
            segment.exit_code = int(record.exit.exit_code)
    return segment


def _read_run_record(segment: OfflineSegment, run: Any) -> None:
    segment.run_id = run.run_id or segment.run_id
    segment.start_time_s = run.start_time.seconds + run.start_time.nanos / 1e9
    segment.project, segment.entity = run.project, run.entity
    segment.group, segment.name = run.run_group, run.display_name
    segment.tags = list(run.tags)
    for update in run.config.update:
        segment.config[_item_key(update)] = _config_value(update.value_json)


def find_offline_runs(sweep_dir: Path) -> dict[str, list[OfflineSegment]]:
    """Find the offline W&B runs of a sweep (or of one run folder), grouped by run id.

    Looks in ``SWEEP_DIR/*/wandb/offline-run-*`` and ``SWEEP_DIR/wandb/offline-run-*``.
    A folder that cannot be read is skipped with a warning.

    Returns:
        Run id to its segments, oldest attempt first.
    """
    sweep_dir = Path(sweep_dir)
    folders = sorted({*sweep_dir.glob("*/wandb/offline-run-*"), *sweep_dir.glob("wandb/offline-run-*")})
    runs: dict[str, list[OfflineSegment]] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        try:
            segment = read_segment(folder)
        except OfflineFileError as error:
            logger.warning("skipping %s: %s", folder, error)
            continue
        runs.setdefault(segment.run_id, []).append(segment)
    for segments in runs.values():
        segments.sort(key=lambda segment: (segment.start_time_s, segment.folder.name))
    return runs


def merge_segments(segments: list[OfflineSegment]) -> list[dict[str, Any]]:
    """Merge the history of a run's segments into one row per logging call, without repeats.

    A segment starts where its attempt resumed, so its first ``trainer/step``
    replaces every row of older segments at that step or later. Rows without
    ``trainer/step`` are kept in their segment's order.

    Args:
        segments: one run's segments, oldest first.

    Returns:
        The merged rows, sorted by ``trainer/step``, W&B's own keys (``_step``,
        ``_runtime``, ``_timestamp``) removed.
    """
    merged: list[dict[str, Any]] = []
    for segment in segments:
        rows = [{key: value for key, value in row.items() if not key.startswith("_")} for row in segment.rows]
        steps = [row[STEP_METRIC] for row in rows if STEP_METRIC in row]
        if steps:
            first_step = min(steps)
            merged = [row for row in merged if row.get(STEP_METRIC, -1) < first_step]
        merged.extend(rows)
    return sorted(merged, key=lambda row: row.get(STEP_METRIC, -1))


def newest_value(segments: list[OfflineSegment], attribute: str) -> Optional[Any]:
    """Return the newest segment's non-empty value of a run setting (``project``, ``group``, ...)."""
    for segment in reversed(segments):
        value = getattr(segment, attribute)
        if value:
            return value
    return None
