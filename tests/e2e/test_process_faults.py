"""Faults that reach a job's processes, on 2 real gloo ranks through the `deepspeed` launcher and the trainer CLI
(tests.helpers.job): SIGTERM to the process group (wandb offline) and to the launcher alone, a signal to one
process, SIGUSR1 to one rank, wandb online without credentials, a converter reading while the job saves every step
with keep_last 1, a stopped rank (the watchdog names it and ends the job) and a straggler (named in the metrics,
warned about; the same run checks the profiler's traces). The run-folder faults are in test_run_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.dist import REPO, base_env
from tests.helpers.job import cmd, losses, run, tags

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400), pytest.mark.usefixtures("default_data")]


def _no_processes_left(pgid: int, timeout: float = 60) -> bool:
    import psutil

    t0 = time.time()
    while time.time() - t0 < timeout:
        alive = [q for q in psutil.process_iter(["pid"]) if _pgid(q.pid) == pgid]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _start_and_wait_for_step(d, *extra, env=None, ranks=2):
    p = subprocess.Popen(cmd(d, "--set", "steps=400", "--set", "save_every=1000", *extra, ranks=ranks), cwd=REPO,
                         env=env or base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    t0 = time.time()
    while not (d / "metrics.jsonl").is_file() or len((d / "metrics.jsonl").read_text().splitlines()) < 3:
        assert p.poll() is None and time.time() - t0 < 200, p.stdout.read()[-3000:]
        time.sleep(0.05)
    return p


def test_sigterm_to_the_process_group_with_wandb_offline_saves_once(tmp_path):
    d = tmp_path / "r"
    env = dict(base_env(), WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    p = _start_and_wait_for_step(d, env=env)
    os.killpg(p.pid, signal.SIGTERM)  # what scancel and timeout do: the launcher, the ranks, wandb's service
    out, _ = p.communicate(timeout=120)
    assert _no_processes_left(p.pid), "processes of the job outlived it"
    assert "saved step" in out and "Traceback" not in out, out[-4000:]
    done = tags(d)
    assert len(done) == 1 and not (d / "FINISHED").exists(), done
    assert list((d / "wandb").glob("offline-run-*")), "wandb's offline files are missing"
    step = int(done[0][5:])
    assert max(json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()) == step


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGINT and SIGUSR1 set the same flag (pretrain/signals.py)
def test_a_signal_to_one_process_with_wandb_offline_exits_zero(tmp_path, sig):
    d = tmp_path / "r"
    env = dict(base_env(), WANDB_MODE="offline", WANDB_SILENT="true")
    p = _start_and_wait_for_step(d, env=env, ranks=1)
    os.killpg(p.pid, sig)  # the trainer and wandb's service, as Slurm signals a job step (SIGINT: Ctrl-C)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "saved step" in out and "Traceback" not in out, out[-4000:]
    assert len(tags(d)) == 1 and not (d / "FINISHED").exists()


def test_sigusr1_to_one_rank_stops_every_rank_after_one_save(tmp_path):
    import psutil

    d = tmp_path / "r"
    p = _start_and_wait_for_step(d)
    ranks = [q for q in psutil.Process(p.pid).children(recursive=True) if "--local_rank=1" in " ".join(q.cmdline())]
    assert len(ranks) == 1
    ranks[0].send_signal(signal.SIGUSR1)  # Slurm's --signal=USR1@T reaches the tasks, here only one of them
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "saved step" in out, out[-3000:]
    assert len(tags(d)) == 1 and not (d / "FINISHED").exists()


def test_sigterm_to_the_launcher_alone_leaves_no_ranks(tmp_path):
    d = tmp_path / "r"
    p = _start_and_wait_for_step(d)
    p.send_signal(signal.SIGTERM)  # the `deepspeed` runner dies; its launcher child and the ranks remain
    p.communicate(timeout=60)
    assert _no_processes_left(p.pid, timeout=90), "ranks kept running after the launcher died"
    assert len(tags(d)) == 1 and not (d / "FINISHED").exists()


def test_wandb_online_without_credentials_does_not_stop_training(tmp_path):
    d = tmp_path / "r"
    env = dict(base_env(), WANDB_MODE="online", WANDB_API_KEY="", WANDB_DIR=str(tmp_path))
    p = run(d, "--set", "steps=3", env=env, ranks=1)
    assert "wandb init failed" in p.stderr and (d / "FINISHED").is_file(), (p.stdout + p.stderr)[-3000:]
    assert sorted(losses(d)) == [1, 2, 3]  # every record in metrics.jsonl


def test_converting_while_the_job_saves_every_step_with_keep_last_1(tmp_path):
    """pretrain.convert holds the tag it reads (tags.reading); the job's keep_last leaves it until a later save."""
    d = tmp_path / "r"
    job = subprocess.Popen(cmd(d, "--set", "steps=20", "--set", "save_every=1", "--set", "keep_last=1"), cwd=REPO,
                           env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        t0 = time.time()
        while not tags(d):
            assert job.poll() is None and time.time() - t0 < 200, job.stdout.read()[-3000:]
            time.sleep(0.05)
        done = []
        while job.poll() is None and len(done) < 3:
            c = subprocess.run([sys.executable, "-m", "pretrain.convert", "--checkpoint", str(d), "--out",
                                str(tmp_path / f"hf{len(done)}")], cwd=REPO, env=base_env(), capture_output=True,
                               text=True, timeout=300)
            assert c.returncode == 0, (c.stdout + c.stderr)[-3000:]
            done.append(c.stdout)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0 and done, out[-3000:]
    assert tags(d) == ["step_00000020"], tags(d)  # the tags held by readers went at a later save or the run's end


def test_a_stopped_rank_ends_the_job_within_the_timeout_and_is_named(tmp_path):
    """SIGSTOP to rank 1 (a hung driver, a frozen node): rank 0 waits in a collective until its watchdog (step_timeout_s
    10) dumps its stacks, names rank 1 as stopped, and exits 4; the launcher then ends the stopped rank too."""
    import psutil

    d = tmp_path / "r"
    p = _start_and_wait_for_step(d, "--set", "faults.step_timeout_s=10")
    while len((d / "metrics.jsonl").read_text().splitlines()) < 6:  # past the first steps: the limit is 10 s now
        assert p.poll() is None
        time.sleep(0.1)
    rank1 = next(q for q in psutil.Process(p.pid).children(recursive=True) if "--local_rank=1" in " ".join(q.cmdline()))
    rank1.send_signal(signal.SIGSTOP)
    t0 = time.time()
    out, _ = p.communicate(timeout=200)
    ended = time.time() - t0
    assert p.returncode == 4, (p.returncode, out[-3000:])
    assert "[watchdog] rank 0" in out and "ranks that stopped reporting: rank 1" in out, out[-3000:]
    dump = json.loads((d / "hang" / "rank0.json").read_text())
    # The watchdog fires within the limit (+ one heartbeat interval + a busy machine's slack); the job then ends
    # after deepspeed's launcher has waited its 30 s for the stopped rank to take SIGTERM before it kills it.
    fired = dump["time"] - t0
    assert fired < 10 + 30 and ended < fired + 30 + 60, (fired, ended)
    assert [x["rank"] for x in dump["stopped_reporting"]] == [1] and dump["phase"] in ("forward", "backward",
                                                                                        "optimizer", "data", "log")
    stacks = (d / "hang" / "rank0.stacks.txt").read_text()  # every thread's stack: the main one and the watchdog's
    assert stacks.count("Thread 0x") >= 2 and "pretrain/monitor.py" in stacks and "pretrain/trainer.py" in stacks
    assert _no_processes_left(p.pid, timeout=60), "the stopped rank outlived the job"


def test_a_straggler_is_named_in_metrics_and_warned_about(tmp_path):
    """(The same run profiles steps 3-4 on both ranks: the traces hold the loop's phases as named ranges.)"""
    d = tmp_path / "r"
    p = run(d, "--set", "steps=8", "--set", "log_every=2", "--set", "faults.straggler_windows=2",
            "--set", "profile={enabled: true, wait: 1, warmup: 1, active: 2, ranks: []}",
            env=dict(base_env(), FAULT="slow:2.0:1"), script="tests/helpers/fault_worker.py")
    for r in (0, 1):
        trace = json.loads((d / "profile" / f"rank{r}_step4.pt.trace.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"phase/data", "phase/forward", "phase/backward", "phase/optimizer"} <= names, sorted(names)[:50]
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in recs if "ranks/slow_rank" in r]
    assert len(windows) == 4 and all(r["ranks/slow_rank"] == 1 and r["ranks/slow_phase"] == "data" for r in windows), [
        {k: v for k, v in r.items() if k.startswith("ranks/slow_")} for r in windows]
    assert all(r["ranks/slow_ratio"] > 1.3 and r["ranks/fast_rank"] == 0 for r in windows)
    msg = p.stdout + p.stderr
    assert "rank 1 on" in msg and "has been the slow rank for 2 windows" in msg and "its data phase" in msg, msg[-3000:]
