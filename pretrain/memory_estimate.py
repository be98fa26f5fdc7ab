"""Per-GPU training memory of a ReSSFormer / baseline run, computed from the model's own numbers.

    python -m pretrain.memory_estimate --preset 1b-long --seq-len 32768 --micro-batch 1 --world-size 32
    python -m pretrain.memory_estimate --preset 1b-long --set asam.topk=0 --ckpt-every 1 --zero-stage 3
    python -m pretrain.memory_estimate --config pretrain/configs/1b_long.yaml --world-size 32

Parameter counts come from `ressformer.flops.count_params` (exact, tested against the built model); the
number of keys each query attends to from the same formulas `ressformer.flops` uses for FLOPs; the
checkpoint units from the model's `set_checkpointing` contract (one unit = a prelude block, one whole
R2MU step, or a coda block). Terms, in bytes per GPU:

  model_states   ZeRO mixed-precision Adam: 2 (bf16 weights) + 2 (grads) + 12 (fp32 master, m, v) bytes per
                 parameter (Rajbhandari et al. 2020, sec. 3), divided by the data-parallel world size for
                 every part ZeRO partitions (stage 1: optimizer; 2: + grads; 3: + weights).
  zero3_gathered weights ZeRO-3 gathers for compute, bf16, plus their bf16 gradients before reduce-scatter:
                 min(stage3_max_live_parameters, total params) (DeepSpeed default 1e9, i.e. the whole 1B model).
  checkpoints    the input of every `ckpt_every`-th unit kept through the forward, bf16 (B, T, D); an R2MU step
                 also keeps H^(t-1) (the token cache) when the previous unit is not stored, and S^(t-1).
                 Without checkpointing every unit keeps its full activations instead.
  unit_recompute activations one unit keeps for its backward while it is recomputed (the largest unit, an R2MU
                 step reading its memory): norms, q/k/v (+ k/v of the memory keys), attention scores (fp32)
                 and probabilities (bf16) for every (query, key) pair that carries a gradient, the gathered keys
                 and values when ASAM takes top-k per query (chunked / block impl), SOES graph projections,
                 SwiGLU (gate/up, silu, product) for the routed experts_per_token + shared experts.
  logits         (B, T, V) bf16 lm_head output, its fp32 log-softmax kept by cross-entropy and the fp32 gradient:
                 10 bytes per logit; at T = 32k and V = 32k this alone is ~10 GiB, hence micro batch 1.

Not counted: the CUDA context and NCCL buffers (~1-2 GiB) and allocator fragmentation; `with_slack` adds 20 %
+ 2 GiB for them. An estimate to choose settings with, not a measurement: check with
`torch.cuda.max_memory_allocated()` on the first steps of a real run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field


from ressformer.config import ModelConfig, parse_sets
from ressformer.flops import _attention_macs, count_params

GiB = 1024**3


@dataclass
class MemoryEstimate:
    terms: dict[str, float] = field(default_factory=dict)  # bytes per GPU
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def with_slack(self) -> float:
        return 1.2 * self.total + 2 * GiB

    def table(self) -> str:
        rows = [f"{k:<15} {v / GiB:8.2f} GiB  {self.notes.get(k, '')}" for k, v in self.terms.items()]
        rows.append(f"{'total':<15} {self.total / GiB:8.2f} GiB")
        rows.append(f"{'with slack':<15} {self.with_slack / GiB:8.2f} GiB  (x1.2 + 2 GiB: CUDA context, NCCL, fragmentation)")
        return "\n".join(rows)


def _memory_tokens(cfg: ModelConfig, T: int) -> int:
    """Memory keys an R2MU step t >= 1 reads: the token cache H^(t-1) (T states) + segment summaries."""
    r = cfg.r2mu
    if cfg.arch != "ressformer" or not (r.enabled and r.memory):
        return 0
    n_seg = T // r.segment_len if cfg.causal else 1
    return T + n_seg * r.summary_slots


def _unit_activation_elems(cfg: ModelConfig, T: int, n_mem: int) -> tuple[float, float]:
    """(bf16 elements, fp32 elements) one block keeps for backward, per token."""
    d, f, h = cfg.d_model, cfg.ffn_hidden, cfg.n_heads
    half = 2.0 * d  # two RMSNorm outputs
    half += 3.0 * d + 2.0 * d * n_mem / T  # q, k, v on tokens; k, v on memory keys
    half += d  # attention output (o_proj input)
    if cfg.arch == "ressformer":
        grad_macs, _ = _attention_macs(cfg, T, n_mem)
        keys = grad_macs / (2.0 * d)  # (query, key) pairs per query that carry a gradient
        if cfg.asam.topk > 0 and cfg.asam.impl != "reference":
            half += 2.0 * keys * d  # gathered top-k keys and values, (T, k, D) each
    else:
        keys = (T + 1) / 2.0  # causal dense attention, average visible keys
    fp32 = h * keys  # scores
    half += h * keys  # probabilities
    if cfg.arch == "ressformer" and cfg.soes.enabled:
        half += 2.0 * cfg.soes.rank + 2.0 * min(cfg.soes.degree, T)  # src/dst projections, edge weights
    m = cfg.moe
    n_ffn = m.experts_per_token + m.shared_experts if m.num_experts > 1 else 1
    half += n_ffn * (d + 4.0 * f)  # expert input, gate_up (2F), silu(gate) (F), silu*up (F)
    if m.num_experts > 1:
        fp32 += m.num_experts  # router logits / probabilities
    return half, fp32


def estimate_memory(cfg: ModelConfig, *, seq_len: int, micro_batch: int = 1, world_size: int = 1,
                    zero_stage: int = 3, ckpt_every: int | None = 1, num_steps: int | None = None,
                    max_live_parameters: float = 1e9) -> MemoryEstimate:
    """Bytes per GPU of one training micro-step (see the module docstring for each term)."""
    if seq_len < 1 or micro_batch < 1 or world_size < 1:
        raise ValueError(f"estimate_memory: seq_len={seq_len}, micro_batch={micro_batch}, world_size={world_size} "
                         "must all be >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"estimate_memory: zero_stage={zero_stage} must be 0, 1, 2 or 3")
    if ckpt_every is not None and ckpt_every < 1:
        raise ValueError(f"estimate_memory: ckpt_every={ckpt_every} must be >= 1 (None = no checkpointing)")
    est = MemoryEstimate()
    T, B, D = seq_len, micro_batch, cfg.d_model
    P = count_params(cfg)["total"]

    weights, grads, optim = 2.0 * P, 2.0 * P, 12.0 * P
    n = world_size
    est.terms["model_states"] = (weights / (n if zero_stage >= 3 else 1) + grads / (n if zero_stage >= 2 else 1)
                                 + optim / (n if zero_stage >= 1 else 1))
    est.notes["model_states"] = f"{P / 1e9:.3f} B params x 16 B, ZeRO-{zero_stage} over {n} GPUs"
    if zero_stage == 3:
        live = min(max_live_parameters, P)
        est.terms["zero3_gathered"] = 4.0 * live
        est.notes["zero3_gathered"] = f"{live / 1e9:.3f} B live params gathered (bf16 weight + grad)"

    if cfg.arch == "ressformer":
        r = cfg.r2mu
        K = r.steps if num_steps is None else num_steps
        units = [0] * r.n_prelude + [_memory_tokens(cfg, T) if (t >= 1 and K > 1) else 0 for t in range(K)] \
            + [0] * r.n_coda
        recurrent = set(range(r.n_prelude, r.n_prelude + K))
        n_sum = (T // r.segment_len if cfg.causal else 1) * r.summary_slots if (r.enabled and r.memory) else 0
    else:
        units = [0] * cfg.n_layers
        recurrent, n_sum = set(), 0
    per_unit = [_unit_activation_elems(cfg, T, n_mem) for n_mem in units]
    unit_bytes = [B * T * (2.0 * h + 4.0 * f) for h, f in per_unit]
    if ckpt_every is None:
        est.terms["activations"] = float(sum(unit_bytes))
        est.notes["activations"] = f"{len(units)} units, no checkpointing"
    else:
        stored = 0.0
        n_stored = 0
        for i in range(len(units)):
            if i % ckpt_every:
                continue
            n_stored += 1
            stored += 2.0 * B * T * D  # unit input h, bf16
            if i in recurrent:
                if ckpt_every > 1 and i > min(recurrent):
                    stored += 2.0 * B * T * D  # H^(t-1): not another checkpoint's input
                stored += 2.0 * B * n_sum * D  # S^(t-1)
        # Units between checkpoints run normally and keep everything until backward reaches them.
        kept = sum(b for i, b in enumerate(unit_bytes) if i % ckpt_every)
        est.terms["checkpoints"] = stored + kept
        est.notes["checkpoints"] = f"{n_stored} of {len(units)} unit inputs kept (every {ckpt_every})"
        est.terms["unit_recompute"] = max(unit_bytes)
        est.notes["unit_recompute"] = "largest unit's activations during its recompute + backward"
    est.terms["logits"] = 10.0 * B * T * cfg.vocab_size
    est.notes["logits"] = f"B*T*V = {B}*{T}*{cfg.vocab_size} x 10 B"
    return est


def run_config_settings(path: str) -> dict:
    """Model + memory-relevant settings of a run config YAML, read by the trainer's own loader
    (pretrain.config.load_run_config: model preset + model_overrides, seq_len, micro_batch, checkpointing)."""
    from pretrain.config import load_run_config

    run = load_run_config(path)
    ac = run.activation_checkpointing
    return {"cfg": run.model_config(), "seq_len": run.seq_len, "micro_batch": run.micro_batch,
            "ckpt_every": ac["every"] if ac["enabled"] else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.memory_estimate",
                                 description="Per-GPU training memory from the model's parameter and key counts.")
    ap.add_argument("--config", default=None, help="run config YAML (model, seq_len, micro_batch, checkpointing)")
    ap.add_argument("--preset", default="1b-long", help="model preset (ressformer.config.PRESETS)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model field override")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: max_seq_len)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--world-size", type=int, default=32, help="data-parallel GPUs (ZeRO partitions over them)")
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--ckpt-every", type=int, default=1, help="checkpoint every N units; 0 = off")
    ap.add_argument("--num-steps", type=int, default=None, help="R2MU steps K (default: r2mu.steps)")
    ap.add_argument("--max-live-parameters", type=float, default=1e9, help="DeepSpeed stage3_max_live_parameters")
    args = ap.parse_args(argv)
    try:
        sets = parse_sets(args.set)
    except ValueError as e:
        ap.error(str(e))
    if args.config:
        run = run_config_settings(args.config)
        cfg = run["cfg"].replace(**sets)
        seq, mb, every, name = args.seq_len or run["seq_len"], run["micro_batch"], run["ckpt_every"], args.config
    else:
        cfg = ModelConfig.from_preset(args.preset, **sets)
        seq, mb, every, name = args.seq_len or cfg.max_seq_len, args.micro_batch, args.ckpt_every or None, args.preset
    est = estimate_memory(cfg, seq_len=seq, micro_batch=mb, world_size=args.world_size,
                          zero_stage=args.zero_stage, ckpt_every=every,
                          num_steps=args.num_steps, max_live_parameters=args.max_live_parameters)
    sys.stdout.write(f"# {name} {' '.join(args.set)} T={seq} micro_batch={mb} "
                     f"world_size={args.world_size} ZeRO-{args.zero_stage} ckpt_every={every}\n")
    sys.stdout.write(est.table() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
