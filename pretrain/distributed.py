"""torch.distributed for the pretraining job: the process group, and the few collectives the run uses besides
DeepSpeed's.

- `setup_distributed` starts the group through DeepSpeed from the launcher's environment (srun, deepspeed,
  torchrun), or as world size 1 on a free local port for one process without a launcher. On CPU it keeps DeepSpeed
  from building its shared-memory all-reduce op first (`skip_deepspeed_shm_allreduce`).
- Every helper also works without a process group (tools and tests call the same code in one process): rank 0
  of a world of 1.
- `on_rank0(fn)` is how the job does a rank-0-only chore (a file of the run folder) without leaving the other
  ranks waiting forever when it fails: the error is broadcast and raised on every rank alike.
- `local_group()` gives a one-process gloo group to code that needs one (megatron-core's dataset builders) when no
  job started it.
- Host-side messages (flags, numbers, Python objects) go over gloo: the job's own group when it is gloo (CPU), a
  second gloo group beside NCCL on GPUs (`control_group`), since NCCL moves CUDA tensors only.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch
import torch.distributed as dist

_CONTROL = None  # the gloo group for host-side messages when the job's backend is not gloo (NCCL)
_SOLO = False  # inside `solo()`: this rank works alone, the helpers below act as in a one-process job


def _joined() -> bool:
    return dist.is_initialized() and not _SOLO


@contextlib.contextmanager
def solo():
    """Run a block on one rank of a launched job (rank 0's evaluation while the others wait) with the helpers of this
    module (rank, world_size, barrier, all_gather_object, any_rank, on_rank0, ...) acting as in a one-process job,
    so that code written for every rank (a checkpoint's collective verification) does not wait for peers that are
    not there."""
    global _SOLO
    before, _SOLO = _SOLO, True
    try:
        yield
    finally:
        _SOLO = before


def control_group():
    """The group the host-side collectives below use: CPU tensors and Python objects go over gloo even when the
    job's default backend is NCCL (which takes CUDA tensors only). None: the default group (already gloo)."""
    return _CONTROL


def rank() -> int:
    return dist.get_rank() if _joined() else 0


def world_size() -> int:
    return dist.get_world_size() if _joined() else 1


def barrier() -> None:
    if _joined():
        dist.barrier(group=_CONTROL)


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not _joined():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_CONTROL)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def all_mean(x: float) -> float:
    """The mean over ranks of a host number (float64 all-reduce)."""
    if not _joined():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, group=_CONTROL)
    return t.item() / world_size()


def all_means(values: list) -> list[float]:
    """The mean over ranks of each value (host numbers or device scalars), read from the device once and reduced in
    one all-reduce."""
    if not values:
        return []
    xs = [torch.as_tensor(v).detach().reshape(()).double() for v in values]
    dev = next((x.device for x in xs if x.device.type != "cpu"), xs[0].device)
    t = torch.stack([x.to(dev) for x in xs]).cpu()  # (n,) the one device -> host copy
    if _joined():
        dist.all_reduce(t, group=_CONTROL)
        t /= world_size()
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on some rank."""
    return any_ranks(flag)[0]


def any_ranks(*flags: bool) -> tuple[bool, ...]:
    """`any_rank` of several flags in one all-reduce."""
    if not _joined():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return tuple(bool(v) for v in t.tolist())


def on_rank0(fn, *args, errors: tuple[type[BaseException], ...] = (), wrap=None):
    """Collective: run `fn(*args)` on rank 0 only. An exception of a type in `errors` is re-raised on every rank
    (as `wrap(message)` when `wrap` is given, else as the same type with the same message), so no rank is left
    waiting for rank 0. Returns fn's result on rank 0, None elsewhere."""
    out, err = None, None
    if rank() == 0:
        try:
            out = fn(*args)
        except errors as e:
            err = (type(e), str(e))
    err = broadcast_object(err)
    if err is not None:
        kind, msg = err
        raise (wrap or kind)(msg)
    return out


# --- the process group ---------------------------------------------------------------------------------------
def skip_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed from JIT-building and mapping its CPU shared-memory all-reduce op at init.

    On the CPU accelerator `deepspeed.comm.TorchBackend.__init__` compiles `deepspeed_shm_comm` (about 50 s with
    gcc on 2 cores, again for every venv path) and each rank then writes a 66 MiB file to /dev/shm that is never
    unlinked. The op serves only `inference_all_reduce`, which training never calls (gradients go through
    torch.distributed), and it costs three ways: a build killed midway leaves a `lock` file in
    ~/.cache/torch_extensions on which every later run waits forever; the leaked files fill /dev/shm run after
    run; and where /dev/shm is small (containers default to 64 MiB) a rank's segment cannot be created while its
    peer spins on `shm_open` waiting for it, a silent hang. Marking the op incompatible in DeepSpeed's cached
    compatibility table (`deepspeed.ops.__compatible_ops__`, which it documents as editable) makes
    `build_shm_op()` return None and the backend use plain torch.distributed for everything.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def free_port() -> int:
    """A free TCP port on localhost (for a rendezvous without a launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(timeout_s: float | None = None) -> None:
    """torch.distributed through DeepSpeed: the launcher's (srun, deepspeed) environment, or world size 1 on a
    free local port for a single process without one. `timeout_s`: how long a collective may wait for a peer
    before it fails (torch's default, 10 or 30 minutes by backend, when None). With NCCL, a gloo group for host-side
    messages is created too (`control_group`)."""
    global _CONTROL
    import deepspeed

    skip_deepspeed_shm_allreduce()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        backend = "gloo" if not torch.cuda.is_available() else "nccl"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun --max-restarts: the agent's store outlives a restart, so the peers' addresses of the attempt
            # that died are still in it. Each attempt rendezvouses under a prefix of its own (deepspeed then adopts
            # the initialised group).
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  int(os.environ["WORLD_SIZE"]), is_master=False, **kw)
            dist.init_process_group(backend, store=dist.PrefixStore(f"ressformer/attempt_{restart}", store),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), **kw)
        deepspeed.init_distributed(dist_backend=backend, **kw)
        if dist.get_backend() != "gloo":
            _CONTROL = dist.new_group(backend="gloo", **kw)


def teardown_distributed() -> None:
    """Leave the process group (every rank together: a rank exiting under a live gloo group can abort its peer)."""
    global _CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


@contextlib.contextmanager
def local_group():
    """megatron-core's builders order the ranks of a process group themselves (rank 0 builds the index cache, a
    barrier, then the other ranks read it) and ask for the rank when they build a blend. A launched job has the
    group; elsewhere (tools, tests) a one-process gloo group stands in while they run."""
    import tempfile

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/pg", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
