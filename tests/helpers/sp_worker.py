"""One rank of the sequence-parallel parity check (tests/pretrain/test_sequence_parallel.py).

argv: OUT CASES_JSON [P] (a case's "fused_loss": liger's fused LM loss, which needs TRITON_INTERPRET=1 on CPU; P:
the sequence-parallel size, default the world size; world / P data-parallel groups of 2 rows each). Every rank builds
the same model, runs each case once as one process on its group's rows (the data-parallel reference) and once on its
shard of every sequence (ressformer.sequence_parallel with pretrain.sequence_parallel.UlyssesShards over its group of
P consecutive ranks), activation checkpointing on, gradients averaged over all ranks; takes three AdamW steps each
way, and compares: the loss, aux losses and diagnostics of the first step, the loss of every step, and every
gradient of the first step. Rank 0 writes the worst rank's {case: {"step0_rel", "loss_rel", "grad_rel",
"worst_grad", "keys", "loss"}} to OUT.
"""

import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ressformer.kernels as kernels  # noqa: E402
from pretrain import distributed  # noqa: E402
from pretrain.sequence_parallel import UlyssesShards, sequence_group  # noqa: E402
from ressformer import ModelConfig, build_model  # noqa: E402
from ressformer.sequence_parallel import shard, shift_labels  # noqa: E402

CKPT = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def batch(cfg, T: int, answer_only: bool, group: int):
    """The two rows of data-parallel group `group` of a global batch of 2 per group."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (2 * (group + 1), T), generator=g)[2 * group:]
    labels = ids.clone()
    if answer_only:  # a prompt of 40 tokens is not scored, nor a span at the end of the second row
        labels[:, :40] = -100
        labels[1, T - 20:] = -100
    return ids, labels


def run(case: dict, sp, group: int) -> tuple[list[dict], dict]:
    """Three AdamW steps of the case's model on data-parallel group `group`'s rows, every gradient the mean over
    all ranks (data parallelism: the group's P ranks hold P times their share each, or all the same gradient
    without sp); -> per-step {name: value} and the first step's gradients."""
    cfg = ModelConfig.from_preset("debug", **case.get("overrides", {}))
    kernels.set_lm_loss_kernel("liger" if case.get("fused_loss") else "auto")  # liger: in the Triton interpreter
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.set_checkpointing(CKPT)
    model.set_sequence_parallel(sp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels = batch(cfg, case["T"], case.get("answer_only", False), group)
    if sp is None:
        inp, lab = ids, labels
    else:
        inp, lab = shard(ids, sp.size, sp.rank), shard(shift_labels(labels), sp.size, sp.rank)
    steps, grads = [], None
    for _ in range(3):
        opt.zero_grad()
        out = model(inp, labels=lab, num_steps=case.get("K"))
        out.loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        rec = {"loss": out.loss.detach(), "lm_loss": out.lm_loss.detach()}
        rec.update({k: v.detach().float() for k, v in out.aux.items()})
        steps.append(rec)
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return steps, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def main(out: str, cases_json: str, size: str = "0") -> None:
    distributed.setup_distributed()
    P = int(size) or dist.get_world_size()
    sp = UlyssesShards(sequence_group(P))
    group = dist.get_rank() // P
    torch.set_num_threads(1)
    results = {}
    for name, case in json.loads(cases_json).items():
        ref_steps, ref_grads = run(case, None, group)
        sp_steps, sp_grads = run(case, sp, group)
        assert set(sp_grads) == set(ref_grads), set(sp_grads) ^ set(ref_grads)
        worst = max(ref_grads, key=lambda n: rel(sp_grads[n], ref_grads[n]))
        results[name] = {
            # the first step: every loss and diagnostic
            "step0_rel": max(rel(sp_steps[0][k], ref_steps[0][k]) for k in ref_steps[0]),
            # the loss of each step (after AdamW updates, whose normalisation magnifies rounding in tiny gradients,
            # and a routing or key choice that rounding flips moves the loss by a step)
            "loss_rel": max(rel(s[k], r[k]) for s, r in zip(sp_steps, ref_steps) for k in ("loss", "lm_loss")),
            "grad_rel": rel(sp_grads[worst], ref_grads[worst]), "worst_grad": worst,
            "keys": sorted(ref_steps[0]), "loss": float(ref_steps[0]["loss"])}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, results)
    if dist.get_rank() == 0:
        worst = {name: max((r[name] for r in every), key=lambda r: (r["step0_rel"], r["loss_rel"], r["grad_rel"]))
                 for name in results}
        Path(out).write_text(json.dumps(worst, indent=1))
    distributed.teardown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
