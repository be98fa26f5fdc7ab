"""pretrain.distributed.setup_distributed on the CPU accelerator builds no DeepSpeed op and maps no /dev/shm segment.

DeepSpeed's TorchBackend JIT-compiles `deepspeed_shm_comm` at init on CPU and writes a 66 MiB /dev/shm file per
rank that is never unlinked; a build killed midway leaves a lock on which every later run waits forever (the
hang that took down every multi-rank test of a CI run). Training never uses the op (see
distributed.skip_deepspeed_shm_allreduce)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dist import REPO, base_env

SCRIPT = """
import torch, torch.distributed as dist
from pretrain import distributed
distributed.setup_distributed()
t = torch.ones(2)
dist.all_reduce(t)
print("world", dist.get_world_size(), t.tolist())
distributed.teardown_distributed()  # as the trainer does: exiting under a live gloo group can abort (SIGABRT)
"""


@pytest.mark.timeout(120)
def test_setup_distributed_builds_no_deepspeed_op_and_leaks_no_shm(tmp_path):
    ext = tmp_path / "torch_extensions"
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    env = dict(base_env(), TORCH_EXTENSIONS_DIR=str(ext), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "world 1 [1.0, 1.0]" in p.stdout
    assert "built successfully" not in out, out[-3000:]
    assert not ext.exists() or not any(ext.rglob("*.so")), sorted(map(str, ext.rglob("*")))
    after = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    assert after == before, sorted(map(str, after - before))

