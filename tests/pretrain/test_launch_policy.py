"""pretrain/launch_policy.py without Slurm: what the launcher does after srun, and whom it blames."""

from __future__ import annotations

import json
import time

from pretrain.launch_policy import blamed_nodes, decide


def _tag(run, step):
    (run / f"step_{step:08d}").mkdir(parents=True)
    (run / f"step_{step:08d}" / "COMPLETE").write_text("x")


def test_finished_preempted_and_refused_runs(tmp_path):
    assert decide(tmp_path, 0, "USR1")["action"] == "requeue"
    assert decide(tmp_path, 0, "")["action"] == "requeue"  # a clean stop before the last step
    refused = decide(tmp_path, 2, "")
    assert refused["action"] == "stop" and "exit 2" in refused["reason"]
    assert not (tmp_path / ".launch").exists()  # neither counts as a crash
    (tmp_path / "FINISHED").write_text("step 9")
    assert decide(tmp_path, 1, "")["action"] == "done"


def test_crashes_requeue_within_the_budget_and_the_same_step_twice_stops(tmp_path):
    _tag(tmp_path, 3)
    first = decide(tmp_path, 137, "", max_crash_restarts=3)
    assert first["action"] == "requeue" and "crash restart 1 of 3" in first["reason"] and "step_00000003" in first["reason"]
    again = decide(tmp_path, 1, "", max_crash_restarts=3)  # no new checkpoint since: the same step failed twice
    assert again["action"] == "stop" and "the same step failed twice" in again["reason"]
    for step in (6, 9):
        _tag(tmp_path, step)
        assert decide(tmp_path, 4, "", max_crash_restarts=3)["action"] == "requeue"
    _tag(tmp_path, 12)
    spent = decide(tmp_path, 4, "", max_crash_restarts=3)  # progress, but three restarts were made
    assert spent["action"] == "stop" and "MAX_CRASH_RESTARTS=3" in spent["reason"]
    records = json.loads((tmp_path / ".launch" / "crashes.json").read_text())
    assert [r["action"] for r in records] == ["requeue", "stop", "requeue", "requeue", "stop"]


def test_the_watchdogs_dump_names_the_node_before_sruns_first_error(tmp_path):
    log = tmp_path / "srun.log"
    log.write_text("step 5\nsrun: error: n1: task 0: Exited with exit code 4\nsrun: error: n2: task 1: Killed\n")
    assert blamed_nodes(tmp_path, log, since=0) == ["n1"]  # no dump: srun's first error
    (tmp_path / "hang").mkdir()
    (tmp_path / "hang" / "rank0.json").write_text(json.dumps(
        {"rank": 0, "stopped_reporting": [{"rank": 1, "host": "gpu-host-17", "node": "n2"}]}))
    assert blamed_nodes(tmp_path, log, since=0) == ["n2"]
    assert blamed_nodes(tmp_path, log, since=time.time() + 60) == ["n1"]  # a dump of an earlier job is ignored
    crash = decide(tmp_path, 4, "", srun_log=log)
    assert crash["action"] == "requeue" and "on n2" in crash["reason"] and crash["exclude"] == []  # no job id: no Slurm
