"""Data parallel on the CPU: MPI ranks against one process (loss curves, ZeRO-1, resume across rank
counts, SFT's token-weighted loss), the launcher's handling of a killed or stopped rank, the
one-line errors, and the pieces: the launch environment, the rendezvous store, the gradient hook
and the bucket plan."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llamac.dist import env
from llamac.dist.reducer import plan_buckets
from llamac.dist.store import TCPStore
from llamac.engine.tensor import Tensor, grad_ready
from llamac.errors import LlamacError

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "recipes" / "pretrain" / "debug.yaml"
SFT_DEBUG = ROOT / "recipes" / "sft" / "debug.yaml"
STEPS = ["--set", "train.max_steps=20", "--set", "train.ckpt_every=10", "--set", "train.keep_checkpoints=0",
         "--set", "train.sample_tokens=0", "--set", "train.eval_every=10"]


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LLAMAC_DIST_RUN_DIR")


def run(*args, env_extra=None, timeout=240, launcher=None):
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environ.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([*(launcher or []), sys.executable, "-m", "llamac", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=environ, cwd=ROOT)


def records(out_dir: Path):
    return [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def curve(out_dir: Path):
    """(step, train loss) and (step, validation loss) of a run, in order."""
    rs = records(out_dir)
    return ([(r["step"], r["loss"]) for r in rs if "loss" in r], [(r["step"], r["val_loss"]) for r in rs if "val_loss" in r])


def assert_same_curve(a: Path, b: Path, rtol=1e-5):
    (train_a, val_a), (train_b, val_b) = curve(a), curve(b)
    assert [s for s, _ in train_a] == [s for s, _ in train_b] and [s for s, _ in val_a] == [s for s, _ in val_b]
    np.testing.assert_allclose([v for _, v in train_a], [v for _, v in train_b], rtol=rtol)
    np.testing.assert_allclose([v for _, v in val_a], [v for _, v in val_b], rtol=rtol)
    assert train_a[-1][1] < train_a[0][1] - 0.5        # it trained


def drop_last_checkpoint(src: Path, dst: Path):
    """A copy of a finished run as it stood after its step-10 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_00000020")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, shard_dir):
    """The debug recipe for 20 steps in one process: the reference curve, with checkpoints at 10 and 20."""
    out = tmp_path_factory.mktemp("dp") / "one"
    done = run("pretrain", DEBUG, "--set", f"out_dir={out}", "--set", f"data.shard_dir={shard_dir}", *STEPS)
    assert done.returncode == 0, done.stderr
    return out


def test_two_mpi_ranks_train_the_curve_of_one_process(tmp_path, shard_dir, one_process):
    # mpirun started by hand, as on a cluster: the ranks find each other through MPI alone
    out = tmp_path / "mpirun"
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "LLAMAC_CPU_THREADS": "1"}
    mpirun = [str(Path(sys.executable).parent / "mpirun") if (Path(sys.executable).parent / "mpirun").is_file()
              else shutil.which("mpirun"), "-n", "2", "--oversubscribe", "--bind-to", "none"]
    done = run("pretrain", DEBUG, "--set", f"out_dir={out}", "--set", f"data.shard_dir={shard_dir}", *STEPS,
               env_extra=root, launcher=mpirun)
    assert done.returncode == 0, done.stderr
    assert "2 ranks (mpi)" in done.stderr
    assert_same_curve(one_process, out)
    state = json.loads((out / "checkpoints" / "step_00000020" / "state.json").read_text())
    assert state["data_parallel"] == {"world_size": 2, "zero": 0}


def test_zero1_in_small_buckets_trains_the_same_curve(tmp_path, shard_dir, one_process):
    out = tmp_path / "zero1"
    # 50 kB buckets: the 0.13M-parameter model's gradients go out in several reductions during the backward
    done = run("pretrain", DEBUG, "--procs", 2, "--set", f"out_dir={out}", "--set", f"data.shard_dir={shard_dir}",
               *STEPS, "--set", "train.zero=1", env_extra={"LLAMAC_DP_BUCKET_MB": "0.05"})
    assert done.returncode == 0, done.stderr
    assert_same_curve(one_process, out)
    # the checkpoint holds the whole optimizer state, gathered from both ranks' halves
    from llamac.train.checkpoint import load_safetensors
    ours, _ = load_safetensors(out / "checkpoints" / "step_00000020" / "optimizer.safetensors")
    ref, _ = load_safetensors(one_process / "checkpoints" / "step_00000020" / "optimizer.safetensors")
    assert set(ours) == set(ref)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-3, atol=1e-7, err_msg=name)


def test_a_two_rank_checkpoint_resumes_on_one_and_back(tmp_path, shard_dir, one_process):
    two = tmp_path / "two"
    done = run("pretrain", DEBUG, "--procs", 2, "--set", f"out_dir={two}", "--set", f"data.shard_dir={shard_dir}", *STEPS)
    assert done.returncode == 0, done.stderr
    # written by 2 ranks, resumed by 1 process
    drop_last_checkpoint(two, tmp_path / "two_then_one")
    resumed = run("pretrain", DEBUG, "--set", f"out_dir={tmp_path / 'two_then_one'}", "--set",
                  f"data.shard_dir={shard_dir}", *STEPS)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step_00000010" in resumed.stderr
    assert_same_curve(one_process, tmp_path / "two_then_one")
    # written by 1 process, resumed by 2 ranks with the optimizer state sharded
    drop_last_checkpoint(one_process, tmp_path / "one_then_two")
    resumed = run("pretrain", DEBUG, "--procs", 2, "--set", f"out_dir={tmp_path / 'one_then_two'}", "--set",
                  f"data.shard_dir={shard_dir}", *STEPS, "--set", "train.zero=1")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_curve(one_process, tmp_path / "one_then_two")


def test_sft_ranks_weigh_their_loss_tokens_as_one_process(tmp_path, one_process):
    common = ["--from", one_process, "--set", "train.max_steps=10", "--set", "sft.eval_tasks=0",
              "--set", "train.eval_every=5", "--set", "train.ckpt_every=0", "--set", "data.val_fraction=0.02"]
    one = run("sft", SFT_DEBUG, "--set", f"out_dir={tmp_path / 'one'}", *common)
    assert one.returncode == 0, one.stderr
    two = run("sft", SFT_DEBUG, "--procs", 2, "--set", f"out_dir={tmp_path / 'two'}", *common)
    assert two.returncode == 0, two.stderr
    (train_a, val_a), (train_b, val_b) = curve(tmp_path / "one"), curve(tmp_path / "two")
    np.testing.assert_allclose([v for _, v in train_a], [v for _, v in train_b], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in val_a], [v for _, v in val_b], rtol=1e-5)


def _rank_pid(folder: Path, rank: int, deadline: float) -> int:
    beat = folder / f"rank{rank}.beat"
    while time.time() < deadline:
        try:
            state = json.loads(beat.read_text())
            if state["step"] >= 3:          # training: past the setup
                return state["pid"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never reported training")


def _start_long_run(tmp_path, shard_dir, env_extra=None):
    out = tmp_path / "long"
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "llamac", "pretrain", str(DEBUG), "--procs", "2",
                             "--set", f"out_dir={out}", "--set", f"data.shard_dir={shard_dir}",
                             "--set", "train.max_steps=1000000", "--set", "train.eval_every=0",
                             "--set", "train.ckpt_every=0"], env=environ, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out / ".ranks"


def _error_lines(stderr: str):
    # ranks' output reaches the same stream through mpirun and may leave a line unfinished (a space,
    # a NUL) just before the launcher's message
    return [ln.strip(" \x00") for ln in stderr.splitlines() if ln.strip(" \x00").startswith("error:")]


def test_a_killed_rank_ends_the_job_with_one_line(tmp_path, shard_dir):
    proc, folder = _start_long_run(tmp_path, shard_dir)
    try:
        os.kill(_rank_pid(folder, 1, time.time() + 120), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert _error_lines(stderr) == [stderr.strip().splitlines()[-1]]
    assert "rank 1" in _error_lines(stderr)[0] and "SIGKILL" in _error_lines(stderr)[0], stderr[-2000:]
    assert "prterun" not in stderr and "Traceback" not in stderr


def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path, shard_dir):
    proc, folder = _start_long_run(tmp_path, shard_dir, {"LLAMAC_DIST_TIMEOUT": "6"})
    pid = None
    try:
        pid = _rank_pid(folder, 1, time.time() + 120)
        os.kill(pid, signal.SIGSTOP)        # alive, but it will never reach the next collective
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 1
    lines = _error_lines(stderr)
    # The launcher's heartbeat check names rank 1; when rank 0's own collective timeout fires first,
    # the line is rank 0's (it names the timeout, not yet the rank that stopped: a known race)
    assert len(lines) == 1 and ("rank 1 stopped responding" in lines[0] or "LLAMAC_DIST_TIMEOUT" in lines[0]), \
        stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0"], "--gpus must be at least 1, got 0"),
    (["--procs", "0"], "--procs must be at least 1, got 0"),
    (["--procs", "3"], "train.batch_size (8) must be divisible by the number of ranks (3)"),
    (["--procs", "2", "--set", "train.zero=2"], "recipe key 'train.zero' must be in [0, 1]"),
    (["--gpus", "1", "--procs", "1"], "--gpus and --procs exclude each other"),
])
def test_bad_launch_values_are_one_line_errors(tmp_path, shard_dir, args, message):
    done = run("pretrain", DEBUG, "--set", f"out_dir={tmp_path}", "--set", f"data.shard_dir={shard_dir}", *args,
               timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert message in lines[0]


def test_gpus_without_a_gpu_and_cpu_ranks_without_mpi_are_one_line_errors(tmp_path, shard_dir):
    from llamac.engine import backend
    if backend.cuda_available():
        pytest.skip("this machine has a GPU")
    done = run("pretrain", DEBUG, "--gpus", 1, "--set", f"out_dir={tmp_path}", timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "no usable CUDA GPU" in done.stderr
    # torchrun-style variables cannot join CPU ranks: they are MPI's
    done = run("pretrain", DEBUG, "--set", f"out_dir={tmp_path}", "--set", f"data.shard_dir={shard_dir}",
               env_extra={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"},
               timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("error:")
    assert "on the CPU the ranks are MPI processes" in done.stderr


# ---------------------------------------------------------------- the pieces

def test_the_launch_environment_of_torchrun_slurm_and_mpi():
    got = env.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert got == env.Launch(3, 8, 1, "node0", 29500, "env")
    got = env.from_env({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                        "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert got == env.Launch(5, 16, 1, "n1", 1234, "slurm")
    got = env.from_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                        "PMIX_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4"})
    assert got == env.Launch(1, 2, 1, source="mpi")
    assert env.from_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == env.Launch()    # a one-task step
    assert env.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == env.Launch()     # a batch script itself
    assert not env.from_env({}).launched
    for bad, message in [({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside the world of 2 ranks"),
                         ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK must be an integer"),
                         ({"WORLD_SIZE": "2"}, "RANK is not set"),
                         ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port")]:
        with pytest.raises(LlamacError, match=message):
            env.from_env(bad)


def test_the_store_hands_rank_0s_value_to_the_others_and_times_out():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = TCPStore("127.0.0.1", port, is_server=True, timeout=5)
    got = {}

    def client(r):
        got[r] = TCPStore("127.0.0.1", port, is_server=False, timeout=5).get("uid")
    threads = [threading.Thread(target=client, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)                     # the clients wait on the server for a key not yet set
    server.set("uid", "[1, -2, 3]")
    for t in threads:
        t.join(10)
    assert got == {0: "[1, -2, 3]", 1: "[1, -2, 3]", 2: "[1, -2, 3]"}
    with pytest.raises(LlamacError, match="had no 'missing' after 0 s"):
        TCPStore("127.0.0.1", port, is_server=False, timeout=5).get("missing", timeout=0.3)
    server.close()
    with pytest.raises(LlamacError, match="cannot reach the rendezvous"):
        TCPStore("127.0.0.1", port, is_server=False, timeout=0.5).get("uid")


def _graph(params, recomputed: bool):
    """a and b are each read twice; c once, inside a recomputed block or not."""
    from llamac.engine.functional import recompute
    a, b, c = params
    h = a * b + a
    h = recompute(lambda t: t * c * t, h, [c]) if recomputed else h * c * h
    return (h * b).sum()


@pytest.mark.parametrize("recomputed", [False, True])
def test_grad_ready_reports_each_leaf_once_with_its_final_gradient(recomputed):
    rng = np.random.default_rng(0)
    make = lambda: [Tensor(rng.standard_normal((3, 4)), requires_grad=True, dtype="float64") for _ in range(3)]  # noqa: E731
    params = make()
    plain = [Tensor(p.data.copy(), requires_grad=True) for p in params]
    _graph(plain, recomputed).backward()
    seen = []
    with grad_ready(lambda t: seen.append((t, t.grad.copy()))):
        _graph(params, recomputed).backward()
    assert sorted(id(t) for t, _ in seen) == sorted(id(p) for p in params)     # once each
    for t, at_report in seen:
        np.testing.assert_array_equal(at_report, t.grad)                        # final when reported
    for p, q in zip(params, plain):
        np.testing.assert_array_equal(p.grad, q.grad)                           # the hook changes nothing
    # c's only reader runs first in the backward: it is reported before a and b, read further down
    assert seen[0][0] is params[2]


def test_the_buckets_run_backwards_by_dtype_and_pad_to_the_world():
    ps = [Tensor(np.zeros(n, np.float32)) for n in (10, 7, 5, 3)] + [Tensor(np.zeros(4, np.float64))]
    buckets = plan_buckets(ps, world_size=4, bucket_bytes=40)
    assert [[i for i, _, _ in b.entries] for b in buckets] == [[4], [3, 2, 1], [0]]
    assert [(b.numel, b.padded, b.shard) for b in buckets] == [(4, 4, 1), (15, 16, 4), (10, 12, 3)]
    assert buckets[1].entries == [(3, 0, 3), (2, 3, 5), (1, 8, 7)]


def test_bench_dp_reports_scaling_and_zero1_halves_the_state_per_rank():
    from llamac.bench.dp import bench_dp
    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=None, vocab_size=512, seq_len=32,
                 batch_size=4)
    rows = bench_dp("cpu", shapes={"mini": shape}, counts=[1, 2], steps=2, warmup=1)
    assert [(r["ranks"], r["zero"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    one, two, two_zero = rows
    assert one["scaling_efficiency"] == 1.0
    assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / 2 / one["tokens_per_s"], rel=1e-2)
    # m and v in fp32: 8 bytes a parameter on one rank, half of them (and a bucket's padding) on each of two
    assert two["optimizer_state_MB"] == one["optimizer_state_MB"]
    assert two_zero["optimizer_state_MB"] == pytest.approx(one["optimizer_state_MB"] / 2, abs=1e-3)
