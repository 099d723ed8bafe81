"""A predict run folder's bookkeeping, apart from the pipeline that fills it.

DIR/.segcli/run.json holds the settings that produced DIR; DIR/.segcli/records[.shard-I-of-N].jsonl
one line per finished input (appended as they finish, so a killed run loses nothing it finished);
DIR/summary[.shard-I-of-N].json the run's summary. A re-run reuses finished records only when the
settings are the same; shard summaries merge into DIR/summary.json. DIR/.segcli/lock*.json says
which run fills DIR now (`segcli.files.lock`): a second run into DIR is refused, shards of one split
share it.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Callable

from segcli.errors import SegcliError
from segcli.files.atomic import AppendLog, atomic_write_json, read_json_lines, remove_stale_temp_files
from segcli.files.lock import FolderLock
from segcli.files.runs import STATE_DIR, next_run_dir
from segcli.inputs.sources import Source
from segcli.version import __version__


def _writable(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # can we write here? (removed on close)
            pass
    except OSError as exc:
        raise SegcliError(f"output folder {path} cannot be created or written: {exc.strerror or exc}") from None
    return path


class RunFolder:
    """DIR of one predict run (or one shard of it): settings check, records, summary."""

    def __init__(self, output: Path | None, settings: dict, shard: tuple[int, int] | None = None,
                 overwrite: bool = False, exists: Callable[[Path], bool] | None = None):
        self.path = _writable(output or next_run_dir())
        self.real = self.path.resolve()
        self.settings, self.shard, self.overwrite = settings, shard, overwrite
        self.state = self.path / STATE_DIR
        tag = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
        self.records_file = self.state / f"records{tag}.jsonl"
        self.summary_file = self.path / f"summary{tag}.json"
        self._records: AppendLog | None = None
        self.exists = exists or Path.exists  # whether an output is still there (an object store's listing for a URL)
        what = f"predict shard {shard[0]}/{shard[1]}" if shard else "predict"
        self.lock = FolderLock(self.state, f"lock{tag}.json", what, _conflicts_with(shard))

    def open(self) -> dict[str, dict]:
        """Take the folder's lock, clean up a killed run's temp files, check the settings, start the
        record file. Returns the finished records that can be reused, by output location."""
        try:
            self.lock.acquire()
            try:
                return self._open()
            except BaseException:
                self.lock.release()
                raise
        except OSError as exc:
            raise SegcliError(f"cannot write to {self.path}: {exc.strerror or exc}") from None

    def _open(self) -> dict[str, dict]:
        remove_stale_temp_files(self.path)
        run_file = self.state / "run.json"
        previous = None
        if run_file.exists():
            try:
                previous = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = None
        if previous is not None and not self.overwrite:
            changed = [k for k in self.settings if previous.get(k) != self.settings[k]]
            if changed:
                raise SegcliError(
                    f"{self.path} holds results made with other settings ({', '.join(changed)} differ): "
                    "use --overwrite to replace them, or another --output")
        if self.overwrite or previous is None:
            self.records_file.unlink(missing_ok=True)
        atomic_write_json(run_file, self.settings)
        done: dict[str, dict] = {}
        # every shard's records count: a re-run with another shard split still reuses finished work
        for path in sorted(self.state.glob("records*.jsonl")) if not self.overwrite else [self.records_file]:
            if not path.exists():
                continue
            for record in read_json_lines(path):
                if record.get("status") == "ok":
                    done[record["output"]] = record
        self._records = AppendLog(self.records_file)
        return done

    def reusable(self, source: Source, done: dict[str, dict], outputs: dict[str, Path]) -> dict | None:
        """The finished record of `source` when all its files (`outputs`) are still there."""
        record = done.get(str(source.rel))
        if record and record.get("path") == source.recorded_path and all(self.exists(p) for p in outputs.values()):
            return record
        return None

    def record(self, record: dict) -> None:
        self._records.append(record)

    def release(self) -> None:
        """Close the record file and let other runs in (also after a failure)."""
        if self._records is not None:
            self._records.close()
        self.lock.release()

    def close(self, records: list[dict], total: int, reused: int, interrupted: bool, skipped: list[str],
              labels_json: list[dict], stopped: str | None = None) -> dict:
        """Write labels.json and the summary (raises OSError when the disk refuses); returns the summary."""
        ok = sum(1 for r in records if r["status"] == "ok")
        summary = {
            "segcli_version": __version__,
            "model": self.settings["model"],
            "labels": [entry["label"] for entry in labels_json],
            "settings": {k: v for k, v in self.settings.items() if k not in ("labels", "model")},
            "counts": {"inputs": total, "ok": ok, "failed": len(records) - ok,
                       "reused": reused, "not_done": total - len(records)},
            "interrupted": interrupted,
            "stopped": stopped,
            "shard": list(self.shard) if self.shard else None,
            "skipped_non_images": skipped,
            "images": records,
        }
        atomic_write_json(self.path / "labels.json", labels_json)
        atomic_write_json(self.summary_file, summary)
        return summary


def _conflicts_with(shard: tuple[int, int] | None):
    """Which other lock files exclude a run with `shard`: all but those of other shards of its split."""
    def conflicts(name: str) -> bool:
        other = re.fullmatch(r"lock\.shard-(\d+)-of-(\d+)\.json", name)
        return not (shard and other and int(other[2]) == shard[1])
    return conflicts


def error_record(source: Source, message: str, native: str | None = None) -> dict:
    """A failed input's record; `native`: what native code printed about it (its last 20 lines)."""
    record = {"input": source.display, "path": source.recorded_path, "output": str(source.rel),
              "status": "error", "error": message}
    if native:  # native libraries' lines, then (after a crash) faulthandler's Python stack: its ends kept
        lines = native.split("\nExtension modules:")[0].splitlines()
        lines = lines if len(lines) <= 40 else lines[:10] + ["..."] + lines[-30:]
        record["native_messages"] = [line[:300] for line in lines]
    return record


def merge_summaries(folder: Path) -> dict:
    """Fold DIR/summary.shard-I-of-N.json (all N present, same settings) into DIR/summary.json."""
    parts = sorted(folder.glob("summary.shard-*-of-*.json"))
    if not parts:
        raise SegcliError(f"{folder} has no summary.shard-I-of-N.json files to merge")
    summaries = []
    for path in parts:
        try:
            summaries.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise SegcliError(f"{path} is unreadable: {exc}") from None
    counts = {s["shard"][1] for s in summaries}
    if len(counts) != 1:
        raise SegcliError(f"{folder} mixes shard splits (N = {sorted(counts)}): merge one split at a time")
    total = counts.pop()
    missing = sorted(set(range(total)) - {s["shard"][0] for s in summaries})
    if missing:
        raise SegcliError(f"{folder}: shard(s) {', '.join(map(str, missing))} of {total} have not finished (no summary yet)")
    first = summaries[0]
    for s in summaries[1:]:
        if (s["model"], s["labels"], s["settings"]) != (first["model"], first["labels"], first["settings"]):
            raise SegcliError(f"{folder}: shards were run with different settings; not merged")
    images = sorted((r for s in summaries for r in s["images"]), key=lambda r: r["output"])
    merged = dict(first)
    merged.update({
        "counts": {k: sum(s["counts"][k] for s in summaries) for k in first["counts"]},
        "interrupted": any(s["interrupted"] for s in summaries),
        "stopped": next((s["stopped"] for s in summaries if s.get("stopped")), None),
        "shard": None,
        "merged_from": [p.name for p in parts],
        "skipped_non_images": sorted({x for s in summaries for x in s["skipped_non_images"]}),
        "images": images,
    })
    atomic_write_json(folder / "summary.json", merged)
    return merged
