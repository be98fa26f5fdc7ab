"""One rank of the export-vs-engine check (tests/pretrain/test_convert.py). Reads a torch file {"input_ids", "cases"}; for
each case {name, tag, run, ds_json} builds the trainer's engine for that run config and DeepSpeed JSON, loads the
tag with DeepSpeed's own `engine.load_checkpoint` (optimizer state included, as a resume does) and computes the
logits of the whole batch in eval mode. Rank 0 writes {name: logits (B, T, V)} to OUT.

Every rank feeds the same batch: ZeRO-3 gathers parameters and the expert-parallel backends exchange tokens
collectively, so all ranks run the forward; the logits of the batch are then one model's, whatever the layout."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import distributed, engine as engines  # noqa: E402
from pretrain.config import RunConfig  # noqa: E402


def main(inp: str, out: str) -> None:
    spec = torch.load(inp, weights_only=False)
    distributed.setup_distributed()
    results = {}
    for case in spec["cases"]:
        tag = Path(case["tag"])
        engine, _, _, _ = engines.build_engine(RunConfig.from_dict(case["run"]), json.loads(case["ds_json"]))
        path, _ = engine.load_checkpoint(str(tag.parent), tag=tag.name)
        if path is None:
            raise RuntimeError(f"engine.load_checkpoint found nothing to load in {tag}")
        engine.eval()
        with torch.no_grad():
            logits = engine(spec["input_ids"].to(engine.device)).logits
        results[case["name"]] = logits.float().cpu()
        engine.destroy()
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    distributed.teardown_distributed()  # every rank together (a rank exiting under a live gloo group can abort)


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests.helpers.dist dumps stacks of a hung rank
    main(sys.argv[1], sys.argv[2])
