"""Each rank's heartbeat and collective timeout.

A daemon thread writes `rank{R}.beat` in the launcher's run folder (LLAMAC_DIST_RUN_DIR) every
second, so the launcher sees a rank that stopped (SIGSTOP, a frozen machine) and which one. While
training it also checks that steps keep completing: a step that waits longer than
LLAMAC_DIST_TIMEOUT in a collective (its peer died or hung; NCCL would wait forever) ends this
rank with one line, written where the launcher reads it.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from pathlib import Path

BEAT_SECONDS = 1.0


def run_dir() -> Path | None:
    value = os.environ.get("LLAMAC_DIST_RUN_DIR")
    return Path(value) if value else None


def beat_path(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.beat"


def error_path(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.error"


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def stop_path(folder: Path) -> Path:
    return folder / "stop"


def is_teardown() -> bool:
    """Whether a stop signal is the end of the job rather than a request to save and stop: under a
    launcher, a request comes with its stop file (mpirun's SIGTERM to the survivors has none)."""
    folder = run_dir()
    return folder is not None and not stop_path(folder).exists()


def report_failure(group, line: str):
    """The one line that says why this rank stops: into the run folder when a launcher watches
    (it prints it), else on stderr. Then end the job: MPI_Abort, or this process alone (its
    launcher, torchrun or ours, ends the rest)."""
    folder = run_dir()
    if folder is not None:
        try:
            _write_atomic(error_path(folder, group.rank), line + "\n")
        except OSError:
            folder = None
    if folder is None:
        print(f"error: {line}", file=sys.stderr, flush=True)
    abort = getattr(group, "abort", None)
    sys.stderr.flush()
    if abort is not None and group.backend == "mpi":
        abort(1)
    os._exit(1)


class Watchdog:
    def __init__(self, group, timeout: float):
        self.group, self.timeout = group, float(timeout)
        self.folder = run_dir()
        self.step = 0
        self.last = time.monotonic()
        self.armed = False
        self.stopped = threading.Event()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._beat()
            atexit.register(self._gone)     # a rank that ended well is not a rank that stopped
        self.thread = threading.Thread(target=self._run, name="llamac-watchdog", daemon=True)
        self.thread.start()

    def arm(self):
        """Start timing steps (training has begun: every rank is past its setup)."""
        self.last, self.armed = time.monotonic(), True

    def disarm(self):
        self.armed = False

    def progress(self, step: int):
        self.step, self.last = step, time.monotonic()

    def _beat(self):
        try:
            _write_atomic(beat_path(self.folder, self.group.rank),
                          json.dumps({"pid": os.getpid(), "step": self.step, "time": time.time()}))
        except OSError:
            pass

    def _run(self):
        while not self.stopped.wait(BEAT_SECONDS):
            if self.folder is not None:
                self._beat()
            if self.armed and time.monotonic() - self.last > self.timeout:
                report_failure(self.group, f"rank {self.group.rank}: no training step completed in "
                                           f"{self.timeout:.0f} s after step {self.step} (a collective waits for "
                                           "a rank that died or hung; LLAMAC_DIST_TIMEOUT)")

    def _gone(self):
        self.stopped.set()
        try:
            beat_path(self.folder, self.group.rank).unlink()
        except OSError:
            pass

    def stop(self):
        self.stopped.set()
