"""The record of an experiment (docs/design.md §7): the output folder, held by one process at a time, and its
runs.jsonl, one line per finished run, written as soon as the run ends and read back so that no run is lost,
counted twice or taken from other settings; and the writers of the reports, whose errors name the file."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np

from .config import identity

RUNS_FILE, LOCK_FILE = "runs.jsonl", ".lock"
# What every line of runs.jsonl holds, at least: the run's identity, its settings and what the reports read.
RECORD_FIELDS = ("method", "hparams", "resolved", "seed", "settings", "val_accuracy", "test_accuracy",
                 "test_macro_f1", "train_accuracy", "step_time_ms")


class FolderInUse(OSError):
    """Another process holds the output folder."""


@contextlib.contextmanager
def file_errors(path: str):
    """Re-raise an OSError of writing `path` with the file named (a full disk's ENOSPC does not name it)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or isinstance(e, FolderInUse):
            raise
        raise OSError(e.errno, f"cannot write {path!r}: {e.strerror or e}") from e


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_text(path: str, text: str) -> None:
    """`text` as the UTF-8 file `path`; errors name the file."""
    with file_errors(path), open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON (NaN allowed, numpy scalars as numbers); errors name the file."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_rows(path: str, rows: list[dict]) -> None:
    """rows (dicts with the same keys) as a CSV file; errors name the file."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(path, out.getvalue())


def check_writable(folder: str) -> None:
    """Create `folder` if needed and write a file into it: an OSError naming it now, not after the training."""
    with file_errors(folder):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass


def run_key(method: str, resolved: dict, seed: int) -> str:
    """The identity of a run in runs.jsonl: method, resolved hyperparameters (config.resolve), seed."""
    return json.dumps([method, identity(resolved), seed])


class RunLog:
    """runs.jsonl of an output folder, held by this process alone inside `with RunLog(folder, settings)`.

    Entering locks the folder (an advisory flock on OUTPUT/.lock, which the kernel releases however the
    process ends, so a killed run never leaves it locked; a second process gets FolderInUse naming the
    holder), reads the finished runs into `records` and opens the file for appending, so that an unwritable
    folder is reported before any training. Reading:
    - a last line cut short (a run killed while its line was written) is cut off the file and reported;
      that run is done again. A complete last record without its newline is kept.
    - any other line that is not a complete record is a ValueError naming the file and the line;
    - a run made with other `settings` (another model, data, epochs, ...) is a ValueError naming them: an
      output folder holds the runs of one set of settings;
    - a run recorded twice (same method, resolved hyperparameters and seed) counts once, with a warning.
    """

    def __init__(self, folder: str, settings: dict, log=print):
        self.folder, self.settings, self.log = folder, settings, log
        self.path = os.path.join(folder, RUNS_FILE)
        self.records: list[dict] = []

    def __enter__(self) -> RunLog:
        import fcntl
        check_writable(self.folder)
        lock_path = os.path.join(self.folder, LOCK_FILE)
        with file_errors(lock_path):
            self._lock = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "a process that left no note"
            self._lock.close()
            raise FolderInUse(f"the output folder {self.folder!r} is in use by {holder}; wait for it to end or "
                              "choose another output folder") from None
        try:
            self._lock.truncate(0)
            self._lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                             f" ({' '.join(sys.argv)})\n")
            self._lock.flush()
            self.records = self._read()
            with file_errors(self.path):
                self._out = open(self.path, "ab")
        except BaseException:
            self._lock.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._out.close()
        self._lock.close()   # releases the flock

    def append(self, record: dict) -> None:
        """Write `record` as one line and sync it to the disk at once; errors name the file."""
        with file_errors(self.path):
            self._out.write((json.dumps(record, default=_json_default) + "\n").encode("utf-8"))
            self._out.flush()
            os.fsync(self._out.fileno())
        self.records.append(record)

    def _read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with file_errors(self.path), open(self.path, "rb") as f:
            raw = f.read()
        lines = raw.split(b"\n")
        tail = lines.pop()   # what follows the last newline: b"" unless the last line lacks it
        if tail.strip():
            if self._parse(tail, len(lines) + 1, strict=False) is None:
                with file_errors(self.path), open(self.path, "r+b") as f:
                    f.truncate(len(raw) - len(tail))
                self.log(f"warning: cut an incomplete last line ({len(tail)} bytes) off {self.path}: a run "
                         "stopped while writing it; that run is done again")
            else:
                lines.append(tail)
                with file_errors(self.path), open(self.path, "ab") as f:
                    f.write(b"\n")   # so that the next run's line starts a line of its own
        records, first_line = [], {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = self._parse(line, number)
            key = run_key(record["method"], record["resolved"], record["seed"])
            if key in first_line:
                self.log(f"warning: {self.path} line {number} records the run of line {first_line[key]} again "
                         f"({record['method']} {json.dumps(record['hparams'], sort_keys=True)} seed "
                         f"{record['seed']}); it counts once")
                continue
            first_line[key] = number
            records.append(record)
        return records

    def _parse(self, line: bytes, number: int, strict: bool = True) -> dict | None:
        """The record on line `number`; a line that is not one raises, or gives None when not `strict`."""
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not a run record"
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            record, problem = None, f"not valid JSON ({e})"
        if problem is None:
            missing = [k for k in RECORD_FIELDS if k not in record]
            if missing:
                problem = (f"a record without {missing} (not written by this version of lnsr-fast: choose another "
                           "output folder)")
        if problem is not None:
            if not strict:
                return None
            raise ValueError(f"{self.path!r} line {number} is {problem}")
        changed = {k: (record["settings"].get(k), v) for k, v in self.settings.items()
                   if record["settings"].get(k) != v}
        if changed:
            raise ValueError(f"{self.path!r} line {number} is a run made with other settings ("
                             + ", ".join(f"{k} {old!r} there, {new!r} now" for k, (old, new) in changed.items())
                             + "); run these settings in another output folder")
        return record


def write_reports(folder: str, *, title: str, description: str, summary: list[dict], resolved: dict[str, dict],
                  metrics: dict, grid: list[dict] | None = None, split: str = "test") -> None:
    """summary.md (the description, the summary table, every hyperparameter each method trained with, and
    the grid when there is one), summary.csv, grid.csv and metrics.json in `folder`."""
    from .statistics import markdown_grid, markdown_summary

    listed = "\n".join(f"- {m}: " + (", ".join(f"{k}={v}" for k, v in hp.items()) or "none")
                       for m, hp in resolved.items())
    text = (f"# {title}\n\n{description}\n\n{markdown_summary(summary, split)}\n\n## Hyperparameters\n\n"
            "Every hyperparameter each method trained with: its defaults (lnsr_fast.methods.defaults) with the "
            f"chosen values over them; the noise seed is the run's seed.\n\n{listed}\n")
    if grid:
        text += f"\n## Grid (validation accuracy, selection seeds)\n\n{markdown_grid(grid)}\n"
        write_rows(os.path.join(folder, "grid.csv"), grid)
    write_text(os.path.join(folder, "summary.md"), text)
    write_rows(os.path.join(folder, "summary.csv"), summary)
    write_json(os.path.join(folder, "metrics.json"), metrics)


def read_experiment(folder: str) -> dict:
    """The output folder of a finished experiment, read without taking it (an experiment may be running in it):
    {"corpus", "data_seed", "settings", "data", "chosen", "records"} from its metrics.json and runs.jsonl. A last
    line still being written is left out; a run recorded twice counts once; any other line that is no record
    is a ValueError naming the file and the line."""
    metrics_path, runs_path = os.path.join(folder, "metrics.json"), os.path.join(folder, RUNS_FILE)
    try:
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
        with open(runs_path, "rb") as f:
            lines = f.read().split(b"\n")[:-1]   # what follows the last newline is still being written
    except FileNotFoundError as e:
        raise ValueError(f"{e.filename} does not exist: {folder!r} holds no finished experiment") from None
    records = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
            if record is not None:
                records.setdefault(run_key(record["method"], record["resolved"], record["seed"]), record)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{runs_path!r} line {number} is no run record ({e})") from None
    settings = metrics["settings"]
    return {"corpus": metrics["data"]["corpus"], "data_seed": settings["data_seed"], "settings": settings,
            "data": metrics["data"], "chosen": {m: v["chosen"] for m, v in metrics["methods"].items()},
            "records": list(records.values())}
