"""Sequence parallelism on CPU: activation memory per rank and step time, P = 1 against P = 2 at the same T.

    python bench/sequence_parallel.py [--preset debug] [--seq-lens 1024 4096 8192] [--batch 1] [--repeats 2]

For each T: one process runs the whole sequence (P = 1); two gloo ranks (this script again, as workers with the
launcher's environment variables) run half of it each through ressformer.sequence_parallel with
pretrain.sequence_parallel.UlyssesShards. Printed per T and P: the activation bytes kept for backward per rank
(bench/act_memory.saved_bytes: the unique storages autograd saves, activation checkpointing off and on), the median
seconds of one forward + backward per rank, and the ratios P = 2 / P = 1. Both ranks share this machine's cores, so
on a 2-core VM the time ratio says what the exchange and the split cost, not what two GPUs would gain.

At T >= 16k set MALLOC_MMAP_THRESHOLD_=1048576, as bench/long_context.py does. glibc's adaptive mmap threshold
otherwise keeps freed activations in the process: the P = 1 process reached 15 GB RSS at T = 16384, against
3.3 GB with the threshold pinned.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from act_memory import saved_bytes  # noqa: E402
from ressformer import ModelConfig, build_model  # noqa: E402
from ressformer.sequence_parallel import shard, shift_labels  # noqa: E402


def measure(preset: str, T: int, batch: int, repeats: int, sp) -> dict:
    cfg = ModelConfig.from_preset(preset, max_seq_len=max(T, ModelConfig.from_preset(preset).max_seq_len))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.set_sequence_parallel(sp)
    ids = torch.randint(0, cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(1))
    labels = ids
    if sp is not None:
        ids, labels = shard(ids, sp.size, sp.rank), shard(shift_labels(ids), sp.size, sp.rank)
    K = cfg.r2mu.steps
    mem = {c: saved_bytes(model, ids, K, c, labels=labels) for c in (False, True)}
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(ids, labels=labels).loss.backward()
        times.append(time.perf_counter() - t0)
    return {"saved_off": mem[False], "saved_on": mem[True], "seconds": statistics.median(times)}


def worker(args) -> None:
    from pretrain import distributed
    from pretrain.sequence_parallel import UlyssesShards

    distributed.setup_distributed()
    torch.set_num_threads(1)
    sp = UlyssesShards()
    res = measure(args.preset, args.seq, args.batch, args.repeats, sp)
    if sp.rank == 0:
        print("RESULT " + json.dumps(res), flush=True)
    distributed.teardown_distributed()


def two_ranks(args, T: int) -> dict:
    from pretrain.distributed import free_port

    port, procs = free_port(), []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--preset", args.preset, "--seq", str(T),
                                       "--batch", str(args.batch), "--repeats", str(args.repeats)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a rank failed:\n" + "\n----\n".join(o[-3000:] for o in outs))
    return json.loads(next(x for x in outs[0].splitlines() if x.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(1)
    mib = 2.0 ** 20
    print(f"{args.preset} preset, batch {args.batch}, activation MiB kept for backward per rank (checkpointing off / "
          f"on) and seconds per forward + backward per rank; one thread per rank")
    print(f"{'T':>7} {'P=1 off':>9} {'P=2 off':>9} {'ratio':>6} {'P=1 on':>8} {'P=2 on':>8} {'ratio':>6} "
          f"{'P=1 s':>7} {'P=2 s':>7} {'ratio':>6}")
    for T in args.seq_lens:
        one = measure(args.preset, T, args.batch, args.repeats, None)
        two = two_ranks(args, T)
        print(f"{T:>7} {one['saved_off'] / mib:9.1f} {two['saved_off'] / mib:9.1f} "
              f"{two['saved_off'] / one['saved_off']:6.2f} {one['saved_on'] / mib:8.1f} {two['saved_on'] / mib:8.1f} "
              f"{two['saved_on'] / one['saved_on']:6.2f} {one['seconds']:7.2f} {two['seconds']:7.2f} "
              f"{two['seconds'] / one['seconds']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
