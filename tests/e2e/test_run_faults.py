"""Faults a cluster throws at a run folder, on 2 real gloo ranks through the `deepspeed` launcher and the trainer
CLI (tests.helpers.job: ZeRO-3, the debug model, 12 steps, a checkpoint every 3). Each test checks the behaviour and
that the loss curve after recovery equals the uninterrupted run's (`ref`): bit for bit where the layout is the same,
within fp32 tolerance where the run was resharded to another world size / ZeRO stage.

Covered: a second writer (refused while the first holds the folder), a fresh run into a used folder (refused,
then --overwrite), every kind of damage to a file of the newest checkpoints (fallback past each, the file named), a
named tag that is damaged (refused, never replaced) or older than the newest (the newer ones set aside), a kill
during a save, a NaN on the last micro batch and a NaN storm, a full disk (simulated ENOSPC on one rank, and a real
tmpfs where a mount namespace is allowed), resharding 2 -> 1 ranks with ZeRO-3 -> ZeRO-1 and back, another global
batch, sequence parallelism (a kill -9 resumed with P = 2, the run handed back to P = 1), torchrun's restarts, a
cool-down branch, and a resume with another model config. Faults that reach the job's processes (signals, a stopped
rank, a straggler) are in test_process_faults.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.dist import REPO, base_env, run_group
from tests.helpers.job import ARGS, DS, STEPS, cmd, losses, run, tags

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400), pytest.mark.usefixtures("default_data")]


def truncate_to(run_dir, step):
    """The run folder as a kill right after the save of `step` leaves it (later tags and FINISHED absent)."""
    d = Path(run_dir)
    for t in d.glob("step_*"):
        if int(t.name[5:]) > step:
            shutil.rmtree(t)
    (d / "FINISHED").unlink(missing_ok=True)


def same_after(got, ref, first, exact=True):
    for s in range(first, STEPS + 1):
        if exact:
            assert got[s] == ref[s], (s, got[s], ref[s])
        else:
            assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    run(d)
    got = losses(d)
    assert sorted(got) == list(range(1, STEPS + 1)) and (d / "FINISHED").is_file()
    assert tags(d) == [f"step_{s:08d}" for s in (3, 6, 9, 12)]
    return d, got


def copy_run(ref_dir, dst) -> Path:
    shutil.copytree(ref_dir, dst, ignore=shutil.ignore_patterns("LOCK"))
    return dst


def test_second_writer_is_refused_while_the_first_runs(ref, tmp_path):
    d = tmp_path / "r"
    first = subprocess.Popen(cmd(d), cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not (d / "metrics.jsonl").is_file() or not (d / "metrics.jsonl").read_text():
            assert first.poll() is None and time.time() - t0 < 200, "first job never logged a step"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)  # the first job holds the folder, paused mid-run
        try:
            second = run(d, "--resume", "auto", ok=False)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode != 0
    msg = second.stdout + second.stderr
    assert "is in use by pid" in msg and "LOCK" in msg, msg[-3000:]
    assert first.returncode == 0, out[-3000:]
    assert losses(d) == ref[1]  # every step once, the first job's curve untouched
    assert json.loads((d / "LOCK").read_text())["released"] is True


def test_fresh_run_into_a_used_folder_is_refused_then_overwrite(ref, tmp_path):
    d = copy_run(ref[0], tmp_path / "r")
    before = (d / "metrics.jsonl").read_text()
    p = run(d, ok=False)
    msg = p.stdout + p.stderr
    assert p.returncode == 2 and "--resume auto" in msg and "--overwrite" in msg and "step_00000012" in msg, msg[-3000:]
    assert "Traceback" not in msg and "terminate called" not in msg, msg[-3000:]  # a clean error, every rank rc 2
    assert (d / "metrics.jsonl").read_text() == before and tags(d) == tags(ref[0])
    run(d, "--overwrite")
    assert losses(d) == ref[1] and tags(d) == tags(ref[0]) and (d / "FINISHED").is_file()


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif kind == "flipped":  # same size, a few bytes inside the tensor data: loads silently without checksums
        b = bytearray(data)
        for i in range(len(b) // 2, len(b) // 2 + 16):
            b[i] ^= 0xFF
        path.write_bytes(bytes(b))
    elif kind == "missing":
        path.unlink()
    elif kind == "unmanifested":  # no manifest, and a shard damaged where only its sha256 would show it
        path.unlink()
        _damage(path.parent / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "flipped")


DAMAGE = [("truncated", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
          ("empty", "zero_pp_rank_0_mp_rank_00_model_states.pt"), ("garbage", "rng_rank1.pt"), ("flipped", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
          ("missing", "zero_pp_rank_1_mp_rank_00_model_states.pt"), ("unmanifested", "manifest.json")]


@pytest.mark.parametrize("kinds", [DAMAGE[:3], DAMAGE[3:]], ids=["truncated-empty-garbage",
                                                                 "flipped-missing-unmanifested"])
def test_damaged_newest_checkpoints_fall_back_to_the_last_good_one(ref, tmp_path, kinds):
    """Three kinds of damage per launch, one in each of the three newest tags (12, 9, 6): --resume auto names each
    skipped tag with its file, sets them aside, and continues from step 3 as the uninterrupted run did."""
    d = copy_run(ref[0], tmp_path / "r")
    truncate_to(d, 12)
    for step, (kind, name) in zip((12, 9, 6), kinds):
        _damage(d / f"step_{step:08d}" / name, kind)
    p = run(d, "--resume", "auto")
    msg = p.stdout + p.stderr
    for step, (_, name) in zip((12, 9, 6), kinds):
        assert f"skipping step_{step:08d}" in msg and name in msg, (step, name, msg[-3000:])
        assert list((d / "superseded").glob(f"*/step_{step:08d}")), "a damaged tag is set aside, not deleted"
    assert "resumed from" in msg and "step_00000003" in msg
    same_after(losses(d), ref[1], 1)  # 4..12 retrained after the trim of metrics.jsonl: every step once
    assert tags(d) == [f"step_{s:08d}" for s in (3, 6, 9, 12)]


def test_named_tag_is_never_replaced_and_an_older_one_sets_newer_aside(ref, tmp_path):
    d = copy_run(ref[0], tmp_path / "r")
    truncate_to(d, 9)
    _damage(d / "step_00000009" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "flipped")
    p = run(d, "--resume", "step_00000009", ok=False)
    msg = p.stdout + p.stderr
    assert p.returncode != 0 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in msg and "sha256" in msg, msg[-3000:]
    # a NaN storm after step 3: go back to it by name; 6 and 9 are moved aside, the run continues from 3
    run(d, "--resume", "step_00000003")
    same_after(losses(d), ref[1], 1)
    moved = sorted(p.name for p in (d / "superseded").glob("*/step_*"))
    assert moved == ["step_00000006", "step_00000009"], moved


def test_kill_during_save_resumes_from_the_previous_checkpoint(ref, tmp_path):
    d = tmp_path / "r"
    p = subprocess.Popen(cmd(d), cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    t0 = time.time()
    while not (d / "step_00000006").exists():
        assert p.poll() is None and time.time() - t0 < 200, p.stdout.read()[-3000:]
        time.sleep(0.002)
    os.killpg(p.pid, signal.SIGKILL)  # the whole job, in the middle of writing step 6
    p.wait()
    run(d, "--resume", "auto")
    same_after(losses(d), ref[1], 1)
    assert tags(d) == [f"step_{s:08d}" for s in (3, 6, 9, 12)]


def test_a_tag_written_before_manifests_still_resumes(ref, tmp_path):
    d = copy_run(ref[0], tmp_path / "r")
    truncate_to(d, 6)
    for t in d.glob("step_*"):  # the layout of earlier versions: no manifest, no model folder, run_config.json
        for name in ("manifest.json", "model.safetensors", "model_config.yaml"):
            (t / name).unlink()
        shutil.rmtree(t / "tokenizer")
        (t / "run_state.json").rename(t / "run_config.json")
    run(d, "--resume", "auto")
    same_after(losses(d), ref[1], 1)


def test_nan_in_the_last_micro_batch_does_not_end_the_run(ref, tmp_path):
    d = tmp_path / "r"
    env = dict(base_env(), FAULT=f"nan:{STEPS}:1")
    p = run(d, env=env, script="tests/helpers/fault_worker.py")
    assert (d / "FINISHED").is_file(), (p.stdout + p.stderr)[-3000:]
    got = losses(d)
    assert [got[s] for s in range(1, STEPS)] == [ref[1][s] for s in range(1, STEPS)]
    last = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    assert last["skipped_micro_batches"] == 1
    assert json.loads((d / f"step_{STEPS:08d}" / "run_state.json").read_text())["skipped_micro_batches"] == 1


def test_enospc_on_one_rank_names_the_cause_and_keeps_the_previous_checkpoint(ref, tmp_path):
    d = tmp_path / "r"
    p = run(d, env=dict(base_env(), FAULT="enospc:6:1"), script="tests/helpers/fault_worker.py", ok=False)
    msg = p.stdout + p.stderr
    assert p.returncode != 0 and "no space left on device" in msg and "step_00000006" in msg, msg[-4000:]
    assert "step_00000003 is intact" in msg
    assert tags(d) == ["step_00000003"] and not (d / "step_00000006").exists()
    run(d, "--resume", "auto")
    same_after(losses(d), ref[1], 1)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no mount namespace here (unshare -rm): the simulated ENOSPC "
                                                   "tests cover the paths")
def test_full_tmpfs_run_folder_filled_right_after_a_save(ref, tmp_path):
    d, out = tmp_path / "r", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    q = " ".join
    script = f"""
set -u
mount -t tmpfs -o size=24m tmpfs {d}
{q(map(str, cmd(d)))} > {out}/first.log 2>&1 &
job=$!
while [ ! -f {d}/step_00000003/COMPLETE ] && kill -0 $job 2>/dev/null; do sleep 0.01; done
head -c 100000000 /dev/zero > {d}/filler 2>/dev/null
wait $job; echo $? > {out}/first.rc
ls {d} > {out}/ls.txt
rm {d}/filler
{q(map(str, cmd(d, '--resume', 'auto')))} > {out}/second.log 2>&1; echo $? > {out}/second.rc
cp {d}/metrics.jsonl {out}/
"""
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=base_env(), timeout=400)
    first = (out / "first.log").read_text()
    assert (out / "first.rc").read_text().strip() == "2", first[-4000:]
    assert "no space left on device" in first and "Traceback" not in first, first[-4000:]
    assert "step_00000003" in (out / "ls.txt").read_text()
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.log").read_text()[-4000:]
    same_after(losses(out), ref[1], 1)


def test_full_disk_between_saves_stops_every_rank_with_one_line(ref, tmp_path):
    d = tmp_path / "r"
    p = run(d, env=dict(base_env(), FAULT="enospc_metrics:5:0"), script="tests/helpers/fault_worker.py", ok=False)
    msg = p.stdout + p.stderr
    assert p.returncode == 2 and "no space left on device writing" in msg and "metrics.jsonl" in msg, msg[-4000:]
    assert "Traceback" not in msg and "Connection closed" not in msg and msg.count("no space left") == 1, msg[-4000:]
    assert tags(d) == ["step_00000003"]
    run(d, "--resume", "auto")
    same_after(losses(d), ref[1], 1)


def test_nan_storm_with_gaps_stops_and_the_next_resume_names_it(ref, tmp_path):
    d = copy_run(ref[0], tmp_path / "r")
    truncate_to(d, 6)
    p = run(d, "--resume", "auto", env=dict(base_env(), FAULT="nanpattern:4:1:1"),
            script="tests/helpers/fault_worker.py", ok=False)
    msg = p.stdout + p.stderr
    assert p.returncode == 3 and "more than this run's budget of 5" in msg and "Traceback" not in msg, msg[-4000:]
    storm = json.loads((d / "nan_storm.json").read_text())
    assert storm["last_checkpoint"] == "step_00000006" and storm["step"] == 7 and storm["storms"] == 1, storm
    p = run(d, "--resume", "auto")
    msg = p.stdout + p.stderr
    assert "stopping in a NaN storm after step 7" in msg and "--resume step_00000003" in msg, msg[-3000:]
    same_after(losses(d), ref[1], 1)
    assert not (d / "nan_storm.json").exists()  # the run got past it


def _stream(n: int) -> list[int]:
    """crc32 of the first n samples of the uninterrupted run's training order (the debug config's data)."""
    import zlib

    from pretrain.config import load_run_config
    from pretrain.data import build_datasets

    run_cfg = load_run_config(REPO / "pretrain/configs/debug.yaml", ["seq_len=64"])
    train, _, _ = build_datasets(run_cfg.data, seq_len=64, seed=run_cfg.seed, num_samples=(n, 0, 0))
    return [zlib.crc32(train[i]["input_ids"].numpy().tobytes()) for i in range(n)]


@pytest.mark.parametrize("ranks,accum", [(1, 1), (2, 2)])  # global batch 4 -> 2, and 4 -> 8
def test_resume_with_another_global_batch_sees_every_sample_once_in_order(ref, tmp_path, ranks, accum):
    d, rec = copy_run(ref[0], tmp_path / "r"), tmp_path / "rec"
    truncate_to(d, 6)
    rec.mkdir()
    p = run(d, "--resume", "auto", "--set", f"grad_accum={accum}", ranks=ranks,
            env=dict(base_env(), FAULT=f"record:{rec}:-"), script="tests/helpers/fault_worker.py")
    msg = p.stdout + p.stderr
    assert "continues from its start" not in msg and "not the ones" not in msg, msg[-3000:]
    seen = [json.loads(x) for f in sorted(rec.glob("rank*.jsonl")) for x in f.read_text().splitlines()]
    gb = 2 * ranks * accum
    positions = sorted(r["position"] for r in seen)
    assert positions == list(range(24, 24 + (STEPS - 6) * gb)), positions  # each sample once, from where step 6 stopped
    stream = _stream(positions[-1] + 1)
    assert all(r["ids"] == stream[r["position"]] for r in seen), "a sample out of the uninterrupted order"


def test_resume_on_one_rank_with_zero1_and_back_to_two_with_zero3(ref, tmp_path):
    d = copy_run(ref[0], tmp_path / "r")
    truncate_to(d, 6)
    one_rank = ("--resume", "auto", "--set", "grad_accum=2")
    # SIGTERM while ds_to_universal converts step 6: a clean exit 0 with nothing new saved, no .reshard left
    q = subprocess.Popen(cmd(d, *one_rank, ranks=1, ds="ds_configs/zero1.json"), cwd=REPO, env=base_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    while not (d / ".reshard").is_dir():
        assert q.poll() is None and time.time() - t0 < 200, q.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(q.pid, signal.SIGTERM)
    out, _ = q.communicate(timeout=120)
    assert q.returncode == 0 and "while resharding step_00000006" in out and "Traceback" not in out, out[-3000:]
    assert not list((d / ".reshard").glob("step_*")) and tags(d) == [f"step_{s:08d}" for s in (3, 6)]
    p = run(d, *one_rank, ranks=1, ds="ds_configs/zero1.json")
    assert "resharding" in p.stdout + p.stderr
    got = losses(d)
    same_after(got, ref[1], 7, exact=False)
    truncate_to(d, 9)  # now a ZeRO-1 world-1 checkpoint: back to 2 ranks with ZeRO-3
    run(d, "--resume", "auto")
    same_after(losses(d), ref[1], 10, exact=False)


def test_sequence_parallel_survives_kill_9_and_hands_the_run_back(ref, tmp_path):
    """sequence_parallel_size=2 (the two ranks share each sample; grad_accum 2 keeps the global batch at 4) resumes
    the reference run's step 6 and trains as it did. The whole job is killed (SIGKILL) once step 9 is saved and step
    10 logged; the resume with P = 2 repeats the killed run's steps after 9 bit for bit, and step 9 resumes with
    P = 1 as well."""
    d = copy_run(ref[0], tmp_path / "r")
    truncate_to(d, 6)
    sp = ("--resume", "auto", "--set", "sequence_parallel_size=2", "--set", "grad_accum=2")
    p = subprocess.Popen(cmd(d, *sp), cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    t0 = time.time()
    while not ((d / "step_00000009" / "COMPLETE").is_file()
               and '{"step": 10, "loss"' in (d / "metrics.jsonl").read_text()):
        assert p.poll() is None and time.time() - t0 < 200, p.stdout.read()[-3000:]
        time.sleep(0.002)
    os.killpg(p.pid, signal.SIGKILL)  # the whole job, in step 11 or later, before the run's end
    p.wait()
    assert not (d / "FINISHED").is_file(), "the job ended before the kill: nothing was interrupted"
    killed = losses(d)
    for s in range(7, max(killed) + 1):
        assert abs(killed[s] - ref[1][s]) <= 1e-5 * abs(ref[1][s]), (s, killed[s], ref[1][s])
    run(d, *sp)
    got = losses(d)
    same_after(got, ref[1], 7, exact=False)
    assert all(got[s] == killed[s] for s in range(10, max(killed) + 1)), (got, killed)  # same layout: bit for bit
    truncate_to(d, 9)
    run(d, "--resume", "auto")
    same_after(losses(d), ref[1], 10, exact=False)


def test_resume_with_another_model_config_is_refused(ref, tmp_path):
    d = copy_run(ref[0], tmp_path / "r")
    truncate_to(d, 6)
    p = run(d, "--resume", "auto", "--set", "model.asam.topk=8", ok=False)
    msg = p.stdout + p.stderr
    assert p.returncode != 0 and "asam.topk" in msg and "init_from" in msg, msg[-3000:]


def test_torchrun_max_restarts_with_resume_auto_recovers_a_crashed_rank(ref, tmp_path):
    """Outside Slurm: `torchrun --max-restarts 1 ... --resume auto` restarts every rank after one dies, and the run
    continues from its last checkpoint as if nothing happened."""
    d = tmp_path / "r"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                "--max-restarts", "1"]
    argv = [*torchrun, "tests/helpers/fault_worker.py", "--ds_config", DS, *ARGS, "--set", f"run_dir={d}",
            "--resume", "auto"]
    p = run_group(argv, timeout=300, cwd=REPO, env=dict(base_env(), FAULT="crash:5:1"))
    assert p.returncode == 0 and (d / "crashed").exists() and (d / "FINISHED").exists(), (p.stdout + p.stderr)[-4000:]
    assert "resumed from" in p.stdout + p.stderr
    same_after(losses(d), ref[1], 1)


def test_a_cooldown_branch_from_a_stable_checkpoint_leaves_the_run_untouched(ref, tmp_path):
    """WSD: --resume another run's stable-phase tag into a new run_dir with a decay over the last steps; the branch
    continues the run exactly up to its branch point (step 6) and the original run folder does not change."""
    import hashlib

    def snapshot(d):
        return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
                if f.is_file() and f.name != "LOCK" and ".readers" not in f.name}

    before = snapshot(ref[0])
    branch = tmp_path / "cool"
    run(branch, "--resume", str(ref[0] / "step_00000006"), "--set", "decay=wsd", "--set", "steps=10",
        "--set", "decay_steps=4", "--set", "decay_shape=linear")
    assert snapshot(ref[0]) == before
    recs = {r["step"]: r for r in map(json.loads, (branch / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert sorted(recs) == [7, 8, 9, 10] and recs[7]["loss"] == ref[1][7]  # step 7: the stable lr, as the run had
    lrs = [recs[s]["lr"] for s in (7, 8, 9, 10)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0] and (branch / "FINISHED").is_file()
