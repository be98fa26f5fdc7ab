"""Slurm launch, proven on a real Slurm: slurm/pretrain_debug.sh and slurm/pretrain_1b.sh run on a
two-node test cluster (tests/slurm/setup.sh: munged, slurmctld, slurmd n1 + n2 on 127.0.0.1), one CPU rank
per node, gloo.

* Unit tests of pretrain/slurm_env.py (the SLURM_* -> torch.distributed mapping) need no cluster.
* The cluster is brought up once per module and torn down afterwards. Tests skip, saying why, only when
  Slurm cannot be had: not installed and not root (so `setup.sh install` cannot apt-get it).
* Jobs are polled with `scontrol show job -o` (the cluster keeps finished jobs for MinJobAge=3600 s; there
  is no slurmdbd for sacct).
* The preemption test sends USR1 to the batch shell (`scancel --signal=USR1 --batch`), as
  `#SBATCH --signal=B:USR1@N` does before the time limit. Slurm 22.05 holds a requeued batch job for ~2
  minutes (Reason=BeginTime); the test shortens that wait (`_release_requeue_hold`): once both nodes are
  idle again it sets the start a few seconds ahead. Releasing it at once raced with slurmd, which refuses
  a relaunch of the same job id in the second its old credential was revoked (the job then ends FAILED).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "tests" / "slurm" / "setup.sh"
PY = sys.executable
sys.path.insert(0, str(REPO))

from pretrain import slurm_env  # noqa: E402

# --- trainer contract (pretrain/main.py) ----------------------------------------------------------
METRICS = "metrics.jsonl"  # one JSON per logged step: {"step": int, "loss": float, ...}
FINISHED = "FINISHED"  # written only when every step completed
DEBUG_ARGS = "--set log_every=1"  # trainer overrides used by every test job (log every step)


# --- unit tests: no cluster -------------------------------------------------------------------------
def test_rank_env_maps_slurm_variables():
    env = {"SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_TASKS_PER_NODE": "8(x2)"}
    assert slurm_env.rank_env(env) == {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    env["SLURM_NTASKS_PER_NODE"] = "4"
    assert slurm_env.rank_env(env)["LOCAL_WORLD_SIZE"] == "4"
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        slurm_env.rank_env({"SLURM_NTASKS": "2"})


def test_master_port_is_stable_and_in_range():
    assert slurm_env.master_port("12345") == slurm_env.master_port(12345)  # the same job id, the same port
    ports = {slurm_env.master_port(j) for j in range(1, 5000)}
    assert min(ports) >= 20000 and max(ports) < 40000 and len(ports) == 4999
    assert slurm_env.master_port("777_3") == slurm_env.master_port(777)  # array job ids
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        slurm_env.master_port("")


def test_parse_node_addr():
    out = "NodeName=n1 Arch=x86_64 CoresPerSocket=1 NodeAddr=127.0.0.1 NodeHostName=vm Version=22.05.8"
    assert slurm_env.parse_node_addr(out, "n1") == "127.0.0.1"
    assert slurm_env.parse_node_addr("NodeName=gpu7 NodeHostName=gpu7.cluster", "gpu7") == "gpu7.cluster"
    assert slurm_env.parse_node_addr("NodeName=x", "x") == "x"


def test_explicit_master_env_wins():
    env = {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert slurm_env.master_env(env) == {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}


def _launch_with_stub_srun(tmp_path, script: str, env: dict) -> tuple[list[str], str]:
    """Run slurm/SCRIPT outside Slurm with a `srun` stub on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    record = tmp_path / "srun_args"
    (bin_dir / "srun").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {record}\n')
    (bin_dir / "srun").chmod(0o755)
    full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", REPO=str(REPO), MASTER_ADDR="127.0.0.1",
                MASTER_PORT="29999", SLURM_JOB_NUM_NODES="2", **env)
    for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        full.pop(k, None)
    p = subprocess.run(["bash", str(REPO / "slurm" / script)], env=full, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return (record.read_text().splitlines() if record.exists() else None), p.stdout


@pytest.mark.parametrize("script,defaults", [
    ("pretrain_1b.sh", {"per_node": "8", "config": "pretrain/configs/1b_long.yaml",
                        "ds": "ds_configs/zero3_autoep_ep8.json"}),
    ("pretrain_debug.sh", {"per_node": "1", "config": "pretrain/configs/debug.yaml", "ds": "ds_configs/zero1.json"})])
def test_scripts_launch_the_trainer_with_their_defaults_and_overrides(tmp_path, script, defaults):
    args, out = _launch_with_stub_srun(tmp_path / "a", script, {"RUN_DIR": str(tmp_path / "run_a")})
    assert f"--ntasks-per-node={defaults['per_node']}" in args and f"--ntasks={2 * int(defaults['per_node'])}" in args
    assert args[args.index("--config") + 1] == defaults["config"] and args[args.index("--ds_config") + 1] == defaults["ds"]
    assert args[-2:] == ["--resume", "auto"] and f"run_dir={tmp_path / 'run_a'}" in args
    assert "not under Slurm: rerun the same command to resume" in out  # stopped (stub) before FINISHED
    over = {"GPUS_PER_NODE": "3", "CONFIG": "c.yaml", "DS_CONFIG": "d.json", "DATA": "/data/p", "RUN_DIR": str(tmp_path / "r"),
            "WANDB_PROJECT": "proj", "EXTRA_ARGS": "--set steps=7 --set micro_batch=1"}
    args, _ = _launch_with_stub_srun(tmp_path / "b", script, over)
    assert "--ntasks-per-node=3" in args and "--ntasks=6" in args
    assert args[args.index("--config") + 1] == "c.yaml" and args[args.index("--ds_config") + 1] == "d.json"
    for want in (f"run_dir={tmp_path / 'r'}", "data.blend=[[1.0, /data/p]]", "wandb.project=proj", "steps=7",
                 "micro_batch=1"):
        assert want in args, (want, args)
    (tmp_path / "r" / "FINISHED").write_text("step 7\n")  # a finished run is never started again
    (tmp_path / "b" / "srun_args").unlink()
    args, out = _launch_with_stub_srun(tmp_path / "b", script, over)
    assert args is None and "the run is complete, nothing to do" in out


# --- the cluster --------------------------------------------------------------------------------------
def _why_no_slurm() -> str | None:
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if have:
        return None
    if os.geteuid() != 0:
        return ("Slurm is not installed and this is not root, so tests/slurm/setup.sh cannot apt-get "
                "slurm-wlm munge; install them (as root: bash tests/slurm/setup.sh install) to run these tests")
    r = subprocess.run(["bash", str(SETUP), "install"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"installing Slurm failed (bash tests/slurm/setup.sh install, rc={r.returncode}): {r.stderr[-500:]}"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _why_no_slurm()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmctld/slurmd as root (SlurmUser=root); run the tests as root")
    d = tmp_path_factory.mktemp("slurm_cluster")
    env = dict(os.environ, SLURMCTLD_PORT="16917", SLURMD_PORT1="16921", SLURMD_PORT2="16922")
    r = subprocess.run(["bash", str(SETUP), "up", str(d)], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        subprocess.run(["bash", str(SETUP), "down", str(d)], capture_output=True, timeout=120)
        pytest.fail(f"tests/slurm/setup.sh up failed (rc={r.returncode}):\n{r.stdout}\n{r.stderr}")
    conf = str(d / "slurm.conf")
    try:
        yield {"dir": d, "conf": conf}
    finally:
        subprocess.run(["bash", str(SETUP), "down", str(d)], capture_output=True, timeout=120)


@pytest.fixture(autouse=True)
def _empty_queue_after(request):
    """A test that fails mid-job must not leave its job on the nodes for the next test to queue behind."""
    yield
    if "cluster" not in request.fixturenames:
        return
    cluster = request.getfixturevalue("cluster")
    env = _slurm_env(cluster)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env, timeout=30).stdout.split()
    if not jobs:
        return
    subprocess.run(["scancel", *jobs], env=env, timeout=30)
    t0 = time.time()
    while time.time() - t0 < 60:
        if not subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env,
                              timeout=30).stdout.split():
            break
        time.sleep(0.5)


def _slurm_env(cluster, **extra) -> dict:
    env = dict(os.environ)
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))]:
        del env[k]  # a test run inside an allocation must not leak its own job into the submitted ones
    env.update(SLURM_CONF=cluster["conf"], PYTHON=PY, DS_ACCELERATOR="cpu", WANDB_MODE="offline",
               OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _sbatch(cluster, script: str, log: Path, *opts: str, **env) -> str:
    cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={log}", *opts, str(REPO / script)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_slurm_env(cluster, **env), timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def _job(cluster, job_id: str) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                       env=_slurm_env(cluster), timeout=30)
    assert r.returncode == 0, f"scontrol show job {job_id}: {r.stderr}"
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _wait(cluster, job_id: str, log: Path, until, timeout: float, what: str) -> dict:
    t0 = time.time()
    while True:
        info = _job(cluster, job_id)
        if until(info):
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            pytest.fail(f"job {job_id} ended {info.get('JobState')} waiting for {what}; log:\n{_tail(log)}"
                        f"{_daemon_logs(cluster, job_id, info)}")
        if time.time() - t0 > timeout:
            subprocess.run(["scancel", job_id], env=_slurm_env(cluster), timeout=30)
            pytest.fail(f"job {job_id} not {what} within {timeout:.0f} s (state {info.get('JobState')}, "
                        f"reason {info.get('Reason')}); log:\n{_tail(log)}{_daemon_logs(cluster, job_id, info)}")
        time.sleep(1.0)


def _daemon_logs(cluster, job_id: str, info: dict) -> str:
    """What the controller and the node daemons said about a job (for failure messages)."""
    keys = ("JobState", "Reason", "ExitCode", "DerivedExitCode", "Restarts", "NodeList", "BatchHost")
    out = ["", "job: " + " ".join(f"{k}={info.get(k)}" for k in keys)]
    pat = re.compile(rf"\b(JobId=|job_?id[ =]|StepId=|job ){job_id}\b|\b{job_id}\.(batch|\d+)", re.I)
    for f in sorted((Path(cluster["dir"]) / "log").glob("slurm*.log")):
        lines = [ln for ln in f.read_text(errors="replace").splitlines() if pat.search(ln)]
        out.append(f"--- {f.name} ({len(lines)} lines about job {job_id}, last 25):")
        out += lines[-25:]
    return "\n".join(out)


def _release_requeue_hold(cluster, job_id: str) -> None:
    """Start a requeued job soon instead of after Slurm's ~2 min hold, once its old instance has left the nodes."""
    t0 = time.time()
    while time.time() - t0 < 60:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                           env=_slurm_env(cluster), timeout=30)
        if r.stdout.count(" idle") == 2:
            break
        time.sleep(0.5)
    time.sleep(2)  # a relaunch in the same second as the old credential's revocation is refused by slurmd
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+2"], env=_slurm_env(cluster), timeout=30)


def _tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


def _completed(info: dict) -> bool:
    return info.get("JobState") == "COMPLETED"


def _metrics(run_dir: Path) -> list[dict]:
    p = run_dir / METRICS
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def _train_steps(run_dir: Path) -> list[dict]:
    return [m for m in _metrics(run_dir) if "loss" in m and "step" in m]


def _checkpoint_step(run_dir: Path) -> int | None:
    """Step of the latest DeepSpeed checkpoint under run_dir (its `latest` file names the tag)."""
    steps = []
    for latest in run_dir.rglob("latest"):
        m = re.search(r"(\d+)", latest.read_text())
        if m and any(p.is_dir() for p in latest.parent.iterdir()):
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_node_job_gets_ranks_from_slurm(cluster, tmp_path):
    """An sbatch job whose two srun tasks print the torch.distributed variables slurm_env gives them."""
    script = tmp_path / "env.sh"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1\n"
                      f'eval "$({PY} -m pretrain.slurm_env master)"\n'
                      f"srun {PY} -m pretrain.slurm_env exec -- {PY} -c "
                      "\"import os, socket; print('RANKINFO', *(os.environ[k] for k in "
                      "('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'SLURMD_NODENAME')))\"\n")
    log = tmp_path / "env.out"
    r = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", f"--output={log}", str(script)],
                       capture_output=True, text=True, env=_slurm_env(cluster), timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    _wait(cluster, job, log, _completed, 90, "COMPLETED")
    rows = sorted(line.split()[1:] for line in log.read_text().splitlines() if line.startswith("RANKINFO"))
    port = str(slurm_env.master_port(job))
    assert rows == [["0", "0", "2", "127.0.0.1", port, "n1"], ["1", "0", "2", "127.0.0.1", port, "n2"]], log.read_text()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """The real trainer, its debug run config and a data prefix made from the shipped corpus (returned)."""
    missing = [p for p in ("pretrain/main.py", "pretrain/configs/debug.yaml") if not (REPO / p).exists()]
    try:
        from ressformer import build_model
        from ressformer.config import ModelConfig

        build_model(ModelConfig.from_preset("debug"))
    except ImportError as e:
        missing.append(f"ressformer model ({e})")
    if missing:
        pytest.skip(f"{missing} not in the checkout yet: the end-to-end Slurm jobs launch the real trainer "
                    "(the launcher itself is covered by test_launcher_requeue_contract_with_stand_in_trainer)")
    from pretrain.data import DEFAULT_CORPUS
    from tokenizer.preprocess import preprocess
    from tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("slurm_data")
    tok = train_tokenizer([DEFAULT_CORPUS], root / "tok", vocab_size=512)
    preprocess(tok.path, [DEFAULT_CORPUS], root / "shakespeare", num_proc=1, progress=False)
    return {"prefix": str(root / "shakespeare"), "tok": str(tok.path)}


def _check_finished_run(run_dir: Path, target: int, log: Path) -> list[dict]:
    rows = _train_steps(run_dir)
    assert rows, f"no training rows in {run_dir / METRICS}; log:\n{_tail(log)}"
    assert (run_dir / FINISHED).exists(), f"{run_dir / FINISHED} missing; log:\n{_tail(log)}"
    assert rows[-1]["step"] == target, f"last logged step {rows[-1]['step']} != steps={target}"
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first - 0.1, f"loss did not go down: first {first:.4f} -> last {last:.4f}"
    assert _checkpoint_step(run_dir) == target, f"no checkpoint of step {target} under {run_dir}: " \
                                                f"{sorted(p.name for p in run_dir.iterdir())}"
    return rows


# The uninterrupted run the fault tests compare their losses with (same arguments but the fault settings).
DEBUG_JOB_STEPS = 30
DEBUG_JOB_ARGS = f"--set steps={DEBUG_JOB_STEPS} --set save_every=4 {DEBUG_ARGS}"


@pytest.fixture(scope="module")
def debug_job(cluster, trainer, tmp_path_factory) -> dict:
    """One 30-step run of slurm/pretrain_debug.sh, submitted with slurm/eval_checkpoint.sh as a job that depends on
    it: test_pretrain_debug_script checks both, the hung-rank test takes its losses as the uninterrupted reference."""
    tmp = tmp_path_factory.mktemp("debug_job")
    run_dir, log, ev_log = tmp / "run", tmp / "debug.out", tmp / "eval.out"
    job = _sbatch(cluster, "slurm/pretrain_debug.sh", log, RUN_DIR=run_dir, DATA=trainer["prefix"],
                  EXTRA_ARGS=f"{DEBUG_JOB_ARGS} --set data.tokenizer={trainer['tok']}")
    # downstream evaluation as a dependent job of its own (slurm/eval_checkpoint.sh, CPU node: no GPU asked)
    ev = _sbatch(cluster, "slurm/eval_checkpoint.sh", ev_log, f"--dependency=afterok:{job}", "--gpus-per-node=0",
                 "--cpus-per-task=1", RUN_DIR=run_dir, TASKS="paper:set@8", LIMIT=4)
    return {"run_dir": run_dir, "log": log, "job": job, "ev": ev, "ev_log": ev_log}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pretrain_debug_script(cluster, trainer, debug_job):
    run_dir, log, steps, job = debug_job["run_dir"], debug_job["log"], DEBUG_JOB_STEPS, debug_job["job"]
    ev, ev_log = debug_job["ev"], debug_job["ev_log"]
    info = _wait(cluster, job, log, _completed, 200, "COMPLETED")
    assert info.get("Restarts") == "0" and info.get("NumNodes") == "2"
    _check_finished_run(run_dir, steps, log)
    assert "MASTER_ADDR=127.0.0.1" in log.read_text()
    ev_info = _wait(cluster, ev, ev_log, _completed, 120, "COMPLETED")
    assert ev_info["StartTime"] >= info["EndTime"], (ev_info["StartTime"], info["EndTime"])
    res = json.loads((run_dir / "eval_tasks" / f"step_{steps:08d}.json").read_text())
    assert res["step"] == steps and 0 <= res["eval_tasks/paper:set@8/acc"] <= 1, res
    assert [m for m in _metrics(run_dir) if "eval_tasks/seconds" in m] == [res]
    # A finished run is a no-op when submitted again (FINISHED marker), and is not requeued.
    job2 = _sbatch(cluster, "slurm/pretrain_debug.sh", log, RUN_DIR=run_dir, DATA=trainer["prefix"],
                   EXTRA_ARGS=f"{DEBUG_JOB_ARGS} --set data.tokenizer={trainer['tok']}")
    info2 = _wait(cluster, job2, log, _completed, 60, "COMPLETED")
    assert info2.get("Restarts") == "0" and "the run is complete, nothing to do" in log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pretrain_1b_script_scaled_to_debug(cluster, trainer, tmp_path):
    """The 1B script itself, with its GPU defaults overridden the documented way (variables + sbatch options), on
    plain ZeRO-3 (the AutoEP layout it defaults to: test_pretrain_1b_script_runs_the_paper_model_with_autoep), with
    sequence parallelism across the two nodes (SP=2: each node's rank holds half of every sample, the attention
    all-to-alls go between the nodes)."""
    run_dir, log, steps = tmp_path / "run", tmp_path / "1b.out", 20
    job = _sbatch(cluster, "slurm/pretrain_1b.sh", log, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                  "--cpus-per-task=1", "--time=00:10:00",
                  RUN_DIR=run_dir, GPUS_PER_NODE=1, CONFIG="pretrain/configs/debug.yaml", DATA=trainer["prefix"],
                  DS_CONFIG="ds_configs/zero3.json", WANDB_PROJECT="", SP=2,
                  EXTRA_ARGS=f"--set steps={steps} {DEBUG_ARGS} --set data.tokenizer={trainer['tok']}")
    info = _wait(cluster, job, log, _completed, 200, "COMPLETED")
    assert info.get("NumNodes") == "2" and info.get("NumTasks") == "2"
    text = log.read_text()
    assert "--ds_config ds_configs/zero3.json" in text, "the 1B script must launch with the DS_CONFIG given"
    assert "--set sequence_parallel_size=2" in text and '"sequence_parallel_size": 2' in text, _tail(log)
    rows = _check_finished_run(run_dir, steps, log)
    # one sample per step per sequence-parallel group: the one group of the two ranks reads micro_batch samples
    run = json.loads((run_dir / "run_info.json").read_text())["run_config"]
    assert rows[-1]["tokens_seen"] == steps * run["micro_batch"] * run["grad_accum"] * run["seq_len"], rows[-1]


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_pretrain_1b_script_runs_the_paper_model_with_autoep(cluster, trainer, tmp_path):
    """slurm/pretrain_1b.sh end to end in its flagship layout at debug size: the debug paper model (per-query top-k,
    sparsemax, routed experts, R2MU memory, SOES; pretrain/configs/debug_autoep.yaml) under ZeRO-3 + AutoEP
    (ds_configs/zero3_autoep.json, autoep_size 2) with activation checkpointing every unit, one CPU rank on each of
    the 2 nodes (DS_ACCELERATOR=cpu from _slurm_env)."""
    run_dir, log, steps = tmp_path / "run", tmp_path / "1b_autoep.out", 12
    job = _sbatch(cluster, "slurm/pretrain_1b.sh", log, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                  "--cpus-per-task=1", "--time=00:10:00",
                  RUN_DIR=run_dir, GPUS_PER_NODE=1, CONFIG="pretrain/configs/debug_autoep.yaml",
                  DS_CONFIG="ds_configs/zero3_autoep.json", DATA=trainer["prefix"], WANDB_PROJECT="",
                  EXTRA_ARGS=f"--set steps={steps} {DEBUG_ARGS} --set data.tokenizer={trainer['tok']}")
    info = _wait(cluster, job, log, _completed, 300, "COMPLETED")
    assert info.get("NumNodes") == "2" and info.get("NumTasks") == "2" and info.get("Restarts") == "0"
    text = log.read_bytes().decode(errors="replace")  # two ranks' progress bars may split a character
    assert "--ds_config ds_configs/zero3_autoep.json --config pretrain/configs/debug_autoep.yaml" in text
    _check_finished_run(run_dir, steps, log)
    manifest = json.loads(sorted(run_dir.glob("step_*/manifest.json"))[-1].read_text())
    assert manifest["layout"] == {"world_size": 2, "zero_stage": 3, "ep_backend": "autoep", "ep_size": 2}


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_usr1_saves_requeues_and_resumes(cluster, trainer, tmp_path):
    run_dir, log, steps = tmp_path / "run", tmp_path / "usr1.out", 30
    job = _sbatch(cluster, "slurm/pretrain_debug.sh", log, RUN_DIR=run_dir, DATA=trainer["prefix"],
                  EXTRA_ARGS=f"--set steps={steps} {DEBUG_ARGS} --set data.tokenizer={trainer['tok']}")
    # Mid-run: wait for a few real training steps, then preempt the way --signal=B:USR1@N does.
    t0 = time.time()
    while len(_train_steps(run_dir)) < 5:
        info = _job(cluster, job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{info.get('JobState')}:\n{_tail(log)}"
        assert time.time() - t0 < 150, f"no 5 training steps after 150 s; log:\n{_tail(log)}"
        time.sleep(0.5)
    r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True,
                       env=_slurm_env(cluster), timeout=30)
    assert r.returncode == 0, r.stderr
    info = _wait(cluster, job, log, lambda i: i.get("Restarts") == "1", 120, "requeued")
    # The first run is over: what it logged and saved is final now.
    saved = _checkpoint_step(run_dir)
    before = _train_steps(run_dir)
    assert saved is not None and 5 <= saved < steps, f"checkpoint step {saved} after USR1; log:\n{_tail(log)}"
    assert not (run_dir / FINISHED).exists()
    assert before[-1]["step"] >= saved
    if info.get("JobState") == "PENDING":  # Slurm's requeue hold (BeginTime, ~2 min): shorten it
        _release_requeue_hold(cluster, job)
    info = _wait(cluster, job, log, _completed, 200, "COMPLETED after the requeue")
    assert info.get("Restarts") == "1", f"requeued more than once: {info.get('Restarts')}"
    text = log.read_text()
    assert "got SIGUSR1" in text and f"scontrol requeue {job}" in text and "restarts=1" in text
    after = _train_steps(run_dir)[len(before):]
    assert after, f"the requeued job logged no steps; log:\n{_tail(log)}"
    assert after[0]["step"] == saved + 1, f"resumed at step {after[0]['step']}, checkpoint was step {saved}"
    assert [m["step"] for m in after] == list(range(saved + 1, steps + 1))
    assert (run_dir / FINISHED).exists() and _checkpoint_step(run_dir) == steps
    assert after[-1]["loss"] < before[0]["loss"] - 0.1


# --- the launcher's own contract, with a stand-in trainer -----------------------------------------------
# The stand-in keeps pretrain/main.py's contract (CLI, RANK/WORLD_SIZE from the environment, metrics.jsonl,
# save-and-exit-0 on USR1/TERM, FINISHED only at the last step, --resume auto) in a dozen lines, so the
# signal -> forward -> save -> requeue -> resume path of slurm/_launch.sh is tested on Slurm in seconds and
# independently of the real trainer (tested end to end above).
STAND_IN = r"""
import argparse, json, os, signal, sys, time
ap = argparse.ArgumentParser()
for a in ("--ds_config", "--config", "--resume"):
    ap.add_argument(a)
ap.add_argument("--set", action="append", default=[])
a = ap.parse_args()
s = dict(x.split("=", 1) for x in a.set)
rd, steps, rank = s["run_dir"], int(s["steps"]), int(os.environ["RANK"])
assert os.environ["WORLD_SIZE"] == "2" and os.environ["MASTER_ADDR"] == "127.0.0.1", dict(os.environ)
crash = os.environ.get("STAND_IN_CRASH", "")  # STEP:RANK:once|always: that rank dies (exit 1) at that step
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
ck = os.path.join(rd, f"ckpt{rank}")
start = int(open(ck).read()) if a.resume == "auto" and os.path.exists(ck) else 0
for step in range(start + 1, steps + 1):
    time.sleep(0.3)
    if crash:
        c_step, c_rank, mode = crash.split(":")
        marker = os.path.join(rd, "crashed")
        if (step, rank) == (int(c_step), int(c_rank)) and (mode == "always" or not os.path.exists(marker)):
            open(marker, "w").write("1")
            os._exit(1)
    open(ck, "w").write(str(step))
    if rank == 0:
        with open(os.path.join(rd, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 10.0 / step}) + "\n")
        if step % 5 == 0:  # a checkpoint tag, as the trainer leaves them (the launcher's crash policy reads them)
            os.makedirs(os.path.join(rd, f"step_{step:08d}"), exist_ok=True)
            open(os.path.join(rd, f"step_{step:08d}", "COMPLETE"), "w").write("1")
    if stop:
        print(f"rank {rank} saved step {step}", flush=True)
        sys.exit(0)
if rank == 0:
    open(os.path.join(rd, "FINISHED"), "w").write("done")
"""


def _stand_in_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    (repo / "pretrain").mkdir(parents=True)
    (repo / "slurm").symlink_to(REPO / "slurm")
    for name in ("slurm_env.py", "launch_policy.py"):
        (repo / "pretrain" / name).symlink_to(REPO / "pretrain" / name)
    (repo / "pretrain" / "main.py").write_text(STAND_IN)
    return repo


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_launcher_requeue_contract_with_stand_in_trainer(cluster, tmp_path):
    repo = _stand_in_repo(tmp_path)
    run_dir, log, steps = tmp_path / "run", tmp_path / "stand_in.out", 40
    job = _sbatch(cluster, "slurm/pretrain_debug.sh", log, f"--chdir={repo}", REPO=repo, RUN_DIR=run_dir,
                  EXTRA_ARGS=f"--set steps={steps}")
    t0 = time.time()
    while len(_metrics(run_dir)) < 3:
        assert time.time() - t0 < 60, f"stand-in logged no steps; log:\n{_tail(log)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=_slurm_env(cluster), timeout=30)
    info = _wait(cluster, job, log, lambda i: i.get("Restarts") == "1", 60, "requeued")
    saved = [int((run_dir / f"ckpt{r}").read_text()) for r in (0, 1)]
    n_before = len(_metrics(run_dir))
    assert saved[0] == n_before < steps and 1 <= saved[1] < steps, (saved, n_before)
    if info.get("JobState") == "PENDING":
        _release_requeue_hold(cluster, job)
    info = _wait(cluster, job, log, _completed, 90, "COMPLETED after the requeue")
    assert info.get("Restarts") == "1"
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, steps + 1))  # resumed at saved + 1, no gap
    text = log.read_text()
    assert "got SIGUSR1" in text and f"scontrol requeue {job}" in text and "restarts=1" in text
    assert "rank 0 saved step" in text and "rank 1 saved step" in text  # srun delivered USR1 to both ranks
    assert "run finished" in text and text.count("scontrol requeue") == 1  # a finished job does not requeue


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_crash_is_requeued_once_and_the_same_step_failing_twice_stops(cluster, tmp_path):
    """A rank killed (exit 1, as kill -9 looks to srun) is a crash: requeued within MAX_CRASH_RESTARTS, resumed,
    every step once. A rank that dies at the same step again before any new checkpoint stops the job: not requeued a
    second time."""
    repo = _stand_in_repo(tmp_path)
    runs = {}
    for mode in ("once", "always"):
        run_dir, log = tmp_path / f"run_{mode}", tmp_path / f"crash_{mode}.out"
        job = _sbatch(cluster, "slurm/pretrain_debug.sh", log, f"--chdir={repo}", REPO=repo, RUN_DIR=run_dir,
                      EXTRA_ARGS="--set steps=20", STAND_IN_CRASH=f"12:1:{mode}")
        info = _wait(cluster, job, log, lambda i: i.get("Restarts") == "1", 90, "requeued after the crash")
        if info.get("JobState") == "PENDING":
            _release_requeue_hold(cluster, job)
        runs[mode] = (job, run_dir, log)
    job, run_dir, log = runs["once"]
    info = _wait(cluster, job, log, _completed, 120, "COMPLETED after the crash restart")
    text = log.read_text()
    assert info.get("Restarts") == "1" and "crash restart 1 of 3, resuming from step_00000010" in text, _tail(log)
    assert "srun: error: n2" in text and "on n2" in text  # the node of the rank that died is named
    assert "not excluding n2: the cluster would keep 1 node(s) for a job of 2" in text
    assert sorted({m["step"] for m in _metrics(run_dir)}) == list(range(1, 21)) and (run_dir / FINISHED).exists()
    job, run_dir, log = runs["always"]
    t0 = time.time()
    while _job(cluster, job).get("JobState") not in ("FAILED", "COMPLETED") and time.time() - t0 < 120:
        time.sleep(1)
    info = _job(cluster, job)
    text = log.read_text()
    assert info.get("JobState") == "FAILED" and info.get("Restarts") == "1", (info.get("JobState"), _tail(log))
    assert "the same step failed twice in a row" in text and text.count("scontrol requeue") == 1, _tail(log)
    assert not (run_dir / FINISHED).exists()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_hung_rank_ends_the_job_fast_and_the_requeued_job_continues_exactly(cluster, trainer, debug_job, tmp_path):
    """SIGSTOP to one rank of the real trainer: the other rank's watchdog (faults.step_timeout_s=12) dumps its stacks,
    names the stopped rank and its node, exits 4; the launcher requeues (the 2-node test cluster cannot spare n2, and
    says so), the job resumes from the last checkpoint and its losses equal the uninterrupted run's (debug_job)."""
    args = f"{DEBUG_JOB_ARGS} --set data.tokenizer={trainer['tok']}"
    _wait(cluster, debug_job["job"], debug_job["log"], _completed, 200, "COMPLETED")
    ref = {m["step"]: m["loss"] for m in _train_steps(debug_job["run_dir"])}
    assert sorted(ref) == list(range(1, DEBUG_JOB_STEPS + 1)), ref
    run_dir, log = tmp_path / "run", tmp_path / "hang.out"
    job = _sbatch(cluster, "slurm/pretrain_debug.sh", log, RUN_DIR=run_dir, DATA=trainer["prefix"],
                  EXTRA_ARGS=f"{args} --set faults.step_timeout_s=12")
    t0 = time.time()
    while len(_train_steps(run_dir)) < 9:
        assert _job(cluster, job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _tail(log)
        assert time.time() - t0 < 150, f"no 9 training steps after 150 s; log:\n{_tail(log)}"
        time.sleep(0.3)
    victim = _task_pid(job, rank=1)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.time()
    info = _wait(cluster, job, log, lambda i: i.get("Restarts") == "1", 120, "requeued after the hang")
    assert time.time() - stopped < 12 + 60, "the job took too long to end after the hang"
    hang = json.loads((run_dir / "hang" / "rank0.json").read_text())
    assert [(p["rank"], p["node"]) for p in hang["stopped_reporting"]] == [(1, "n2")], hang
    assert (run_dir / "hang" / "rank0.stacks.txt").read_text().count("Thread") >= 2
    text = log.read_text()
    assert "[watchdog] rank 0" in text and "rank 1 on n2" in text and "exiting 4" in text, _tail(log)
    assert "not excluding n2" in text and "crash restart 1 of 3" in text
    if info.get("JobState") == "PENDING":
        _release_requeue_hold(cluster, job)
    _wait(cluster, job, log, _completed, 200, "COMPLETED after the requeue")
    got = {m["step"]: m["loss"] for m in _train_steps(run_dir)}  # the resumed part replaced the lost one
    assert sorted(got) == sorted(ref) and all(got[s] == ref[s] for s in ref), (got, ref)


def _task_pid(job: str, rank: int) -> int:
    """The pid of the trainer process of `rank` in Slurm job `job` (both test nodes run on this host)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("RANK") == str(rank) and "pretrain/main.py" in " ".join(
                p.info["cmdline"] or []):
            return p.info["pid"]
    raise AssertionError(f"no trainer process of rank {rank} in job {job}")
