"""One rank of the ZeRO parity check (tests/pretrain/test_engine.py). Reads a torch file with the initial
state, the global batch and a list of cases; for each case runs one DeepSpeed step on this rank's slice and
rank 0 writes {case: {"loss", "state"}} (gathered full parameters after the step) to OUT. With "seed_init"
(a run config and a DeepSpeed config) it also builds that model from its seed the trainer's way and writes
{"seed_init": {"state", "gathered"}}: the full initial parameters and the numel of every GatheredParameters
call made while building."""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import distributed, engine as engines
from pretrain.ds_config import build_ds_config, zero_stage  # noqa: E402
from pretrain.config import RunConfig  # noqa: E402


def main(inp: str, out: str) -> None:
    import deepspeed

    spec = torch.load(inp, weights_only=False)
    distributed.setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    if spec.get("seed_init"):
        run = RunConfig.from_dict(spec["seed_init"]["run"])
        ds = build_ds_config(json.loads(spec["seed_init"]["ds_json"]), run, world)
        gathered, real = [], deepspeed.zero.GatheredParameters

        def counting(params, *a, **kw):
            gathered.append(sum(p.ds_numel for p in params))
            return real(params, *a, **kw)

        deepspeed.zero.GatheredParameters = counting
        try:
            model = engines.build_model_for(run, ds)
        finally:
            deepspeed.zero.GatheredParameters = real
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results["seed_init"] = {"state": state, "gathered": gathered}
    for case in spec["cases"]:
        run = RunConfig.from_dict(case["run"])
        engine, _, _, ds = engines.build_engine(run, json.loads(case["ds_json"]), init_state=spec["state"])
        ids = spec["input_ids"].chunk(world)[rank]  # (B/world, T)
        o = engine(ids, labels=ids, num_steps=case["num_steps"])
        engine.backward(o.loss)
        engine.step()
        loss = distributed.all_mean(o.loss.item())
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params) if zero_stage(ds) == 3 else contextlib.nullcontext():
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        results[case["name"]] = {"loss": loss, "state": state}
        engine.destroy()
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    distributed.teardown_distributed()  # every rank together (a rank exiting under a live gloo group can abort)


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests.helpers.dist dumps stacks of a hung rank
    main(sys.argv[1], sys.argv[2])
