"""Per-GPU training memory of a ReSSFormer / baseline run, computed from the model's own numbers.

    python -m pretrain.memory_estimate --config pretrain/configs/1b_long.yaml \
        --ds-config ds_configs/zero3_autoep_ep8.json --world-size 32
    python -m pretrain.memory_estimate --preset 1b-long --asam-kernel off --fused-loss off   # the PyTorch paths
    python -m pretrain.memory_estimate --preset 1b-long --set model.asam.topk=0 --ckpt-every 1 --zero-stage 3

The estimate is for a bf16 GPU run. Document masking (data.document_mask, `documents=True`) changes block ASAM's
candidate keys per query chunk (ressformer.flops._block_kept_keys). Two kernels, which ressformer.kernels picks by
itself on CUDA, change what it keeps: the Triton ASAM kernel (`--asam-kernel`, auto = on when the model takes the
gathered top-k path) and liger's fused LM head + cross-entropy (`--fused-loss`, auto = on). Parameter counts come from
`ressformer.flops.count_params`, the checkpoint units from the model's `set_checkpointing` contract (a prelude
block, one whole R2MU step, or a coda block). Terms, in bytes per GPU (B micro batch, T tokens, D width, H heads,
F expert hidden, V vocabulary, E experts, P parameters, k = asam.topk, m = soes.degree, c = asam.chunk_size,
Tk = T + memory keys):

  model_states   16 B per parameter, ZeRO mixed-precision Adam: 2 (bf16 weights) + 2 (grads) + 12 (fp32 master,
                 m, v) (Rajbhandari et al. 2020, sec. 3), / world size for what ZeRO partitions (stage 1: optimizer;
                 2: + grads; 3: + weights). AutoEP: an expert lives on 1 of ep ranks, partitioned over the other
                 world / ep: the same 1 / world.
  zero3_gathered 4 B x min(stage3_max_live_parameters, P - P_experts + P_experts / ep): gathered bf16 weights and
                 their bf16 gradients; under AutoEP a rank gathers only its E / ep experts.
  checkpoints    per stored unit: its input 2BTD; an R2MU step also S^(t-1) (2D per summary entry), H^(t-1) when the
                 previous unit is not stored, its SOES graph (12m per token: int64 idx + fp32 val) and the
                 smoothness loss's (B, T, m, m) fp32 match (4m^2 per token); every MoE call's router logits, returned
                 to the aux losses (10E per token). Units between stored ones keep what they save (`unit_kept`).
  unit_recompute the largest unit's recompute + backward: its saved tensors `unit_kept` x BT, at the peak
                 max(saved before the attention + `selection`, all saved + `backward`). Saved, bytes per token:
                   norms        (8D + 4) per normalised row: x, x after attention, the memory states (PyTorch's
                                composite rms_norm: fp32 input + fp32 normalised row; a fused CUDA one keeps less)
                   memory_pool  16D + 4 + 4 summary_slots per pooled token + 8D per summary entry (R2MU pool + gate)
                   projections  2D q_proj input + 2D Tk/T k/v_proj input (with memory) + 4D Tk/T k, v + 2D o_proj input
                   attention    PyTorch top-k: 8kD (gathered keys and values as fp32 copies) + 4D (fp32 q) + 13Hk
                                (fp32 probabilities, mask, int64 indices). Triton kernel: 2D (q) + 12Hk (int64
                                indices, fp32 probabilities); no gathered (T, k, D) keys / values, no T x T scores.
                                PyTorch dense top-k (at most k x head_dim candidates n per chunk, ASAM's CPU
                                choice): 4D (fp32 q) + 8D Tk/T (fp32 k, v, once; they replace the projections'
                                4D Tk/T) + n/B (the shared mask; block: Hn) + 12Hk (int64 slots, fp32 kept
                                probabilities) + 4Hn (the (c, n) fp32 probabilities).
                                Dense chunks (topk 0): only each chunk's checkpoint inputs
                   graph_bias   9Hm + 4m: the SOES graph's slot indices and mask (top-k path)
                   pattern      25Hk + 13m + 20: attention.pattern_edges making the next graph (sort order, run ids,
                                values); the dense top-k pass of a causal chunked unit (key_runs): 4 s1 + 17m + 24
                                for a chunk ending at s1 (the head mean over its token columns, top-m indices)
                   ffn          per routed slot 6D + 8F + 16 (input, gate/up, silu, product, weighted output, ids),
                                per token 2D + 4E + 12 top_k + 4 (router); dense SwiGLU 2D + 8F. ressformer.moe's
                                layer; AutoEP's replacement keeps the same kinds of tensors, not measured
                 transients per micro batch: `selection` (chunked top-k, no grad): 3 fp32 (B, H, c, Tk) score
                 buffers with a graph (2 without) + fp32 keys 4BTkD. `backward`: PyTorch top-k 6kD BT (fp32 + bf16
                 gradient of the gathered keys); kernel 12 B Tk D (fp32 dk / dv and their casts) + 2BTD (dq)
                 + 4HkBT (graph bias gradient); dense top-k: `selection` without the keys, `backward` one fp32
                 (B, H, c, n) gradient + 8 B Tk D (fp32 dk / dv); dense chunks (n candidates) one recomputed
                 chunk: 24 BHcn + its SOES pattern (block 40 BHcn, chunked 8 Bcn) + 8BnD, block + 8 B Tk D: the
                 roughest (within 25 %).
  logits         PyTorch: 10 B per logit ((B, T, V) bf16 logits, the fp32 log-softmax and its gradient). Fused
                 (liger): 2BTD (the gradient of h, computed in the forward) + 4VD (fp32 lm_head gradient) + 4BT
                 (per-token loss) + one bf16 chunk of logits, chunk = next_pow2(BT / ceil(V / D)) tokens. Both:
                 the final norm, (8D + 4) BT. The terms are added, though the logits' peak comes before the units'.
  sp_exchange    sequence parallelism over P GPUs (`--sequence-parallel`, the run config's sequence_parallel_size):
                 a GPU keeps its T/P tokens' tensors and, in attention, H/P heads over all T, so every term above
                 is the whole sequence's / P (the units, the checkpoints, the logits of T/P tokens; model states
                 unchanged); this term adds the all-to-alls' bf16 send and receive buffers of q, k, v, the memory
                 keys and values and the output (2 x 2B(4T + 2 Tmem)D / P) and the next step's SOES graph rows
                 gathered over all T (12m per token of the whole sequence).

Not counted: the CUDA context and NCCL buffers (~1-2 GiB), AutoEP's all-to-all buffers and allocator
fragmentation; `with_slack` adds 20 % + 2 GiB for them. tests/pretrain/test_memory_estimate.py checks the saved bytes and
the unit peaks against a bf16 run on CPU (the kernel path with the kernel in the Triton interpreter). No GPU peak was
measured yet: `python bench/memory_check.py` runs the trainer for a few steps and puts its
`torch.cuda.max_memory_allocated()` beside this estimate.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from ressformer.config import ModelConfig
from ressformer.flops import _block_kept_keys, count_params
from ressformer.kernels import lm_loss_chunk_rows

GiB = 1024**3
SWITCHES = ("auto", "on", "off")


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


# --- the units and what they keep --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One checkpoint unit: a prelude / coda block, or R2MU step t."""

    n_mem: int = 0  # memory keys its attention reads (token cache + summaries)
    summary: bool = False  # pools S^(t) (R2MU memory with K > 1)
    n_sum: int = 0  # summary entries of the sequence
    graph_in: bool = False  # a SOES graph biases its attention
    pattern: bool = False  # it makes the next step's graph from its attention probabilities
    recurrent: bool = False
    documents: bool = False  # document masking (block ASAM's candidates per document)


def units(cfg: ModelConfig, T: int, num_steps: int | None = None, documents: bool = False) -> list[Unit]:
    """The checkpoint units of one forward, in order (documents: under document masking)."""
    if cfg.arch != "ressformer":
        return [Unit() for _ in range(cfg.n_layers)]
    r, s = cfg.r2mu, cfg.soes
    K = r.steps if num_steps is None else num_steps
    memory = r.enabled and r.memory
    n_sum = (T // r.segment_len if cfg.causal else 1) * r.summary_slots if memory else 0
    bilinear = s.enabled and s.graph == "bilinear"
    steps = [Unit(n_mem=T + n_sum if (memory and t >= 1) else 0, summary=memory and K > 1, n_sum=n_sum,
                  graph_in=bilinear or (s.enabled and t >= 1), pattern=s.enabled and s.graph == "attention",
                  recurrent=True, documents=documents) for t in range(K)]
    plain = Unit(graph_in=bilinear, documents=documents)
    return [plain] * r.n_prelude + steps + [plain] * r.n_coda


def _runs_apply(cfg: ModelConfig, key_runs: bool) -> bool:
    """Whether ASAMAttention.key_runs shapes the unit's chunks: causal chunked attention over the tokens first, each
    chunk's candidates its own (`asam_chunks`), the widest chunk deciding the top-k pass of the call."""
    return cfg.asam.impl == "chunked" and cfg.causal and key_runs


def asam_chunks(cfg: ModelConfig, T: int, n_mem: int, asam_kernel: bool = True,
                key_runs: bool = True, documents: bool = False) -> list[tuple[str, int, int]]:
    """[(path, keys per query, queries)] of ASAM's query chunks in a unit. path: reference | gathered (top-k of the
    candidates; the Triton kernel's path) | dense_topk (without the kernel, few candidates per kept key:
    attention.dense_topk_pays; the keys are the candidates) | dense_chunks. A causal chunked unit's chunk [s0, s1)
    computes over the tokens before s1, the token cache entries of [s0 - cache_window + 1, s1) and every summary
    (ASAMAttention.key_runs), so its candidates change from chunk to chunk; the widest decides the top-k pass.
    key_runs=False: every chunk over every key (sequence parallelism's attention). documents: under document masking
    (block ASAM's candidates per document)."""
    from ressformer.attention import dense_topk_pays

    a, tk = cfg.asam, T + n_mem
    if a.impl == "reference":
        return [("reference", tk, T)]

    def path(n: int) -> tuple[str, int]:
        if a.topk == 0 or a.topk >= n:
            return "dense_chunks", n
        if not asam_kernel and dense_topk_pays(n, a.topk, cfg.head_dim, "auto"):
            return "dense_topk", n
        return "gathered", a.topk

    chunks = []  # (candidates, queries)
    for s0 in range(0, T, a.chunk_size):
        s1 = min(T, s0 + a.chunk_size)
        if a.impl == "block":
            n = _block_kept_keys(cfg, T, n_mem, documents)
        elif not cfg.causal or not key_runs:
            n = tk
        else:
            n = s1 + (s1 - max(0, s0 - cfg.r2mu.cache_window + 1) + n_mem - T if n_mem else 0)
        chunks.append((n, s1 - s0))
    if _runs_apply(cfg, key_runs):  # the widest chunk decides the top-k pass of the call
        widest = max(n for n, _ in chunks)
        if 0 < a.topk < widest and not asam_kernel and dense_topk_pays(widest, a.topk, cfg.head_dim, "auto"):
            return [("dense_topk", n, c) for n, c in chunks]
        return [("dense_chunks", n, c) if a.topk == 0 or a.topk >= n else ("gathered", a.topk, c) for n, c in chunks]
    return [(*path(n), c) for n, c in chunks]


def asam_path(cfg: ModelConfig, T: int, n_mem: int, asam_kernel: bool = True) -> tuple[str, int]:
    """(path, keys per query) of the unit's last query chunk (the one with the most candidates): `asam_chunks`."""
    return asam_chunks(cfg, T, n_mem, asam_kernel)[-1][:2]


def unit_kept(cfg: ModelConfig, T: int, u: Unit, *, asam_kernel: bool, micro_batch: int = 1,
              key_runs: bool = True) -> dict[str, float]:
    """Bytes per token one unit saves for its backward (bf16 activations), by part (module docstring); ASAM's parts
    summed over its query chunks (`asam_chunks`), each per query of the chunk."""
    D, H, F, m = cfg.d_model, cfg.n_heads, cfg.ffn_hidden, cfg.soes.degree
    tk = (T + u.n_mem) / T
    out = {"norms": (8.0 * D + 4) * (2 + u.n_mem / T)}
    if u.summary:
        r = cfg.r2mu
        covered = 1.0 if not cfg.causal else (T // r.segment_len) * r.segment_len / T
        out["memory_pool"] = covered * (16.0 * D + 4 + 4 * r.summary_slots) + 8.0 * D * u.n_sum / T
    out["projections"] = 2.0 * D + (2.0 * D * tk if u.n_mem else 0.0) + 4.0 * D * tk + 2.0 * D
    if cfg.arch == "ressformer":
        chunks = asam_chunks(cfg, T, u.n_mem, asam_kernel, key_runs, u.documents)
        paths = {path for path, _, _ in chunks}
        block, k = cfg.asam.impl == "block", cfg.asam.topk
        attention = graph_bias = pattern = 0.0
        if "dense_topk" in paths and not block:  # fp32 k, v made once per call, the chunks' candidates slices
            attention += 8.0 * D * tk
            if paths == {"dense_topk"}:  # ... and then nothing keeps the bf16 k, v
                out["projections"] -= 4.0 * D * tk
        runs = _runs_apply(cfg, key_runs)  # the dense top-k pass's pattern: the head mean over the token columns
        s1 = 0
        for path, n, c in chunks:
            w, s1 = c / T, s1 + c
            if path == "gathered":
                attention += w * (2.0 * D + 12.0 * H * n if asam_kernel else 8.0 * n * D + 4.0 * D + 13.0 * H * n)
                graph_bias += w * (9.0 * H * m + 4.0 * m)
            elif path == "dense_topk":  # fp32 q; block: fp32 k, v of the chunk's candidates; the mask; the kept
                # slots (int64) and their probabilities; the (c, n) fp32 probabilities
                kv = 8.0 * D * n / min(cfg.asam.chunk_size, T) if block else 0.0
                attention += w * (4.0 * D + kv + (H * n if block else n / micro_batch) + 12.0 * H * min(k, n)
                                  + 4.0 * H * n)
                graph_bias += w * ((8.0 * H * m if block else 8.0 * m) + 4.0 * m)  # edge key index / slots, values
            elif path == "dense_chunks":  # the chunks' checkpoint inputs: q, the keys / values and mask of each chunk
                attention += w * (2.0 * D + (4.0 * D * n / min(cfg.asam.chunk_size, T) + H * n if block
                                             else n / micro_batch))
                graph_bias += w * ((12.0 if block else 4.0) * H * m + 4.0 * m)  # edge slots (block), edge values
            else:  # reference: (B, H, T, Tk) fp32 scores and probabilities, fp32 q / k / v
                attention += 8.0 * H * n + 4.0 * D * (1 + 2 * tk)
            if u.pattern and path == "dense_topk" and runs:  # the head mean of the chunk's s1 token columns,
                # top-m of them: the mean (fp32, kept by the gather of the m values), the indices
                pattern += w * (4.0 * max(s1, m) + 17.0 * m + 24)
            elif u.pattern and path in ("gathered", "dense_topk"):
                pattern += w * (25.0 * H * min(k, n) + 13.0 * m + 20)
        out["attention"] = attention
        if u.graph_in and paths != {"reference"}:
            out["graph_bias"] = graph_bias
        if u.graph_in and cfg.soes.graph == "bilinear":  # LatentGraph: src / dst projections, edge scores
            out["graph_bias"] = out.get("graph_bias", 0.0) + 4.0 * cfg.soes.rank + 12.0 * m
        if pattern:
            out["pattern"] = pattern
    else:  # dense baseline: causal attention, fp32 scores and bf16 probabilities over (T + 1) / 2 keys
        out["attention"] = 2.0 * D + 6.0 * H * (T + 1) / 2
    e = cfg.moe
    if e.num_experts > 1:
        ke = e.experts_per_token
        out["ffn"] = ke * (6.0 * D + 8.0 * F + 16) + 2.0 * D + 4.0 * e.num_experts + 12.0 * ke + 4
        out["ffn"] += 8.0 * F * e.shared_experts
    else:
        out["ffn"] = 2.0 * D + 8.0 * F
    return out


def unit_transient(cfg: ModelConfig, T: int, u: Unit, *, asam_kernel: bool, micro_batch: int = 1,
                   key_runs: bool = True) -> dict[str, float]:
    """Bytes (per micro batch) a unit holds briefly on top of what it keeps, during its recompute / backward: the
    largest of its query chunks' (`asam_chunks`)."""
    if cfg.arch != "ressformer":
        return {}
    B, D, H = micro_batch, cfg.d_model, cfg.n_heads
    Tk = T + u.n_mem
    chunks = asam_chunks(cfg, T, u.n_mem, asam_kernel, key_runs, u.documents)
    gathered_queries = sum(c for path, _, c in chunks if path == "gathered")  # their backward is one pass
    out: dict[str, float] = {}

    def keep(**parts: float) -> None:
        for key, v in parts.items():
            out[key] = max(out.get(key, 0.0), v)

    start = 0
    for path, n, c in chunks:
        s0, s1 = start, start + c  # this chunk's queries
        start = s1
        if path == "gathered":
            if cfg.asam.impl == "block":
                cand = _block_kept_keys(cfg, T, u.n_mem, u.documents)
            elif not cfg.causal or not key_runs:
                cand = Tk
            else:  # this chunk's candidates (the path keeps topk of them)
                cand = s1 + (s1 - max(0, s0 - cfg.r2mu.cache_window + 1) + u.n_mem - T if u.n_mem else 0)
            # fp32 scores (+ bias), the tie-broken top-k's int32 key beside them (selection.topk_first), the keys
            sel = 4.0 * B * H * c * cand * (3 if u.graph_in else 2) + 4.0 * B * H * c * cand + 4.0 * B * cand * D
            if asam_kernel:
                bwd = 12.0 * B * Tk * D + 2.0 * B * T * D + (4.0 * B * H * n * T if u.graph_in else 0.0)
            else:
                bwd = 6.0 * B * gathered_queries * n * D
            keep(selection=sel, backward=bwd)
        elif path == "dense_topk":  # one chunk: its fp32 scores (+ bias, masked), the tie-broken top-k's int32 key;
            # in backward the (c, n) fp32 gradients (probabilities -> kept scores -> masked scores), one more at a
            # time than the chunk's kept probabilities, which its backward frees, and the fp32 dk / dv every chunk
            # adds to
            c_n = 4.0 * B * H * c * n
            keep(selection=c_n * (3 if u.graph_in else 2) + c_n, backward=c_n + 8.0 * B * Tk * D)
        elif path == "dense_chunks":  # one recomputed chunk (scores, bias, masked scores, probabilities, their
            # gradients; the SOES pattern over its H x n probabilities) + fp32 candidate keys / values; block: the
            # k / v gradients the chunks' gathers scatter into
            block = cfg.asam.impl == "block"
            pattern = 0.0
            if u.pattern:  # block: pattern_edges over H x n per query; chunked: the head mean, top-m of n
                pattern = 40.0 * B * H * c * n if block else 8.0 * B * c * n
            keep(backward=24.0 * B * H * c * n + pattern + 8.0 * B * n * D + (8.0 * B * Tk * D if block else 0.0))
    return out


def unit_bytes(cfg: ModelConfig, T: int, u: Unit, *, asam_kernel: bool, micro_batch: int = 1,
               key_runs: bool = True) -> tuple[float, float]:
    """(kept bytes, peak bytes) of one unit's recompute + backward for a micro batch. The selection runs after the
    norms, memory pooling and projections are saved and before the rest; the backward transients come with all."""
    parts = unit_kept(cfg, T, u, asam_kernel=asam_kernel, micro_batch=micro_batch, key_runs=key_runs)
    per_token = micro_batch * T
    kept = sum(parts.values()) * per_token
    before = sum(parts.get(k, 0.0) for k in ("norms", "memory_pool", "projections")) * per_token
    trans = unit_transient(cfg, T, u, asam_kernel=asam_kernel, micro_batch=micro_batch, key_runs=key_runs)
    return kept, max(before + trans.get("selection", 0.0), kept + trans.get("backward", 0.0))


def logits_bytes(cfg: ModelConfig, T: int, micro_batch: int = 1, *, fused_loss: bool) -> float:
    """The LM head and loss (module docstring), with the final norm."""
    BT, D, V = micro_batch * T, cfg.d_model, cfg.vocab_size
    norm = (8.0 * D + 4) * BT
    if not fused_loss:
        return 10.0 * BT * V + norm
    chunk = lm_loss_chunk_rows(BT, V, D)
    return 2.0 * BT * D + 4.0 * V * D + 4.0 * BT + 2.0 * chunk * V + norm


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of the routed experts (what AutoEP spreads over ep ranks)."""
    e = cfg.moe
    if e.num_experts == 1:
        return 0
    n_blocks = (1 if cfg.r2mu.enabled else cfg.r2mu.steps) + cfg.r2mu.n_prelude + cfg.r2mu.n_coda \
        if cfg.arch == "ressformer" else cfg.n_layers
    return n_blocks * e.num_experts * 3 * cfg.d_model * cfg.ffn_hidden


def resolve_kernels(cfg: ModelConfig, asam_kernel: str = "auto", fused_loss: str = "auto",
                    seq_len: int | None = None) -> tuple[bool, bool]:
    """(Triton ASAM kernel on, fused LM loss on) for a CUDA run: auto = on where ressformer.kernels uses them
    (the ASAM kernel: the gathered top-k path, up to its MAX_SLOTS keys per query)."""
    for name, v in (("asam_kernel", asam_kernel), ("fused_loss", fused_loss)):
        if v not in SWITCHES:
            raise ValueError(f"{name}={v!r}: choose one of {SWITCHES}")
    T = seq_len or cfg.max_seq_len
    gathered = cfg.arch == "ressformer" and any(asam_path(cfg, T, u.n_mem)[0] == "gathered" for u in units(cfg, T))
    kernel = asam_kernel == "on" or (asam_kernel == "auto" and gathered)
    if kernel and gathered:
        from ressformer.kernels.asam_triton import MAX_SLOTS

        if cfg.asam.topk > MAX_SLOTS:
            raise ValueError(f"asam.topk={cfg.asam.topk} exceeds the Triton kernel's {MAX_SLOTS} keys per query: "
                             "lower asam.topk or estimate the PyTorch path (--asam-kernel off)")
    return kernel, fused_loss != "off"


def estimate_memory(cfg: ModelConfig, *, seq_len: int, micro_batch: int = 1, world_size: int = 1,
                    zero_stage: int = 3, ckpt_every: int | None = 1, num_steps: int | None = None,
                    max_live_parameters: float = 1e9, ep_size: int = 1, asam_kernel: bool = False,
                    fused_loss: bool = False, sequence_parallel: int = 1, documents: bool = False) -> MemoryEstimate:
    """Bytes per GPU of one training micro-step (see the module docstring for each term); documents: under document
    masking (data.document_mask)."""
    if sequence_parallel > 1:
        from ressformer.sequence_parallel import sequence_parallel_error, shard_error

        err = sequence_parallel_error(cfg, sequence_parallel) or shard_error(cfg, seq_len, sequence_parallel)
        if err is None and world_size % sequence_parallel:
            err = f"sequence_parallel={sequence_parallel} must divide world_size={world_size}"
        if err:
            raise ValueError(f"estimate_memory: {err}")
    if seq_len < 1 or micro_batch < 1 or world_size < 1 or ep_size < 1:
        raise ValueError(f"estimate_memory: seq_len={seq_len}, micro_batch={micro_batch}, world_size={world_size}, "
                         f"ep_size={ep_size} must all be >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"estimate_memory: zero_stage={zero_stage} must be 0, 1, 2 or 3")
    if ckpt_every is not None and ckpt_every < 1:
        raise ValueError(f"estimate_memory: ckpt_every={ckpt_every} must be >= 1 (None = no checkpointing)")
    if ep_size > 1 and (cfg.moe.num_experts % ep_size or world_size % ep_size):
        raise ValueError(f"estimate_memory: ep_size={ep_size} must divide moe.num_experts={cfg.moe.num_experts} "
                         f"and world_size={world_size}")
    est = MemoryEstimate()
    T, B, D = seq_len, micro_batch, cfg.d_model
    P = count_params(cfg)["total"]

    weights, grads, optim = 2.0 * P, 2.0 * P, 12.0 * P
    n = world_size
    est.terms["model_states"] = (weights / (n if zero_stage >= 3 else 1) + grads / (n if zero_stage >= 2 else 1)
                                 + optim / (n if zero_stage >= 1 else 1))
    est.notes["model_states"] = f"{P / 1e9:.3f} B params x 16 B, ZeRO-{zero_stage} over {n} GPUs"
    if zero_stage == 3:
        Pe = expert_params(cfg)
        live = min(max_live_parameters, P - Pe + Pe / ep_size)
        est.terms["zero3_gathered"] = 4.0 * live
        ep = f", experts / {ep_size} (AutoEP)" if ep_size > 1 else ""
        est.notes["zero3_gathered"] = f"{live / 1e9:.3f} B live params gathered (bf16 weight + grad){ep}"

    us = units(cfg, T, num_steps, documents)
    sp = sequence_parallel
    # Sequence parallelism: a rank keeps its T/P tokens' tensors and, inside attention, H/P heads over all T
    # queries: every per-token and per-(token, head) term is the whole sequence's / P.
    per_unit = [tuple(x / sp for x in unit_bytes(cfg, T, u, asam_kernel=asam_kernel, micro_batch=B, key_runs=sp == 1))
                for u in us]  # (sequence parallelism: every chunk over every key)
    m, E = cfg.soes.degree, cfg.moe.num_experts
    # Outside the units: what each returns and the losses read (graphs, smoothness match, router logits).
    extra = sum((12.0 * m + 4.0 * m * m) * B * T for u in us if u.pattern) / sp
    extra += (10.0 * E * B * T) * len(us) / sp if E > 1 else 0.0
    if ckpt_every is None:
        est.terms["activations"] = sum(k for k, _ in per_unit) + max(p - k for k, p in per_unit) + extra
        est.notes["activations"] = f"{len(us)} units, no checkpointing"
    else:
        stored, n_stored = 0.0, 0
        first_step = next((i for i, u in enumerate(us) if u.recurrent), None)
        for i, u in enumerate(us):
            if i % ckpt_every:
                continue
            n_stored += 1
            stored += 2.0 * B * T * D / sp  # unit input h, bf16
            if u.recurrent:
                if ckpt_every > 1 and i != first_step:
                    stored += 2.0 * B * T * D / sp  # H^(t-1): not another checkpoint's input
                stored += 2.0 * B * u.n_sum * D / sp  # S^(t-1)
        # Units between checkpoints run normally and keep everything until backward reaches them.
        kept = sum(k for i, (k, _) in enumerate(per_unit) if i % ckpt_every)
        est.terms["checkpoints"] = stored + kept + extra
        est.notes["checkpoints"] = f"{n_stored} of {len(us)} unit inputs kept (every {ckpt_every})"
        est.terms["unit_recompute"] = max(p for _, p in per_unit)
        path = "Triton ASAM kernel" if asam_kernel else "PyTorch ASAM"
        est.notes["unit_recompute"] = f"largest unit's saved tensors + transients in recompute / backward ({path})"
    Tl = T // sp
    est.terms["logits"] = logits_bytes(cfg, Tl, B, fused_loss=fused_loss)
    est.notes["logits"] = ("fused LM loss: grad of h + fp32 grad of lm_head + one logits chunk" if fused_loss
                           else f"B*T*V = {B}*{Tl}*{cfg.vocab_size} x 10 B")
    if sp > 1:
        # the all-to-alls' send and receive buffers (bf16) of q, k, v, the memory keys and values and the output of
        # one attention call, and the next step's graph rows gathered over the whole sequence (int64 + fp32)
        tk = max(u.n_mem for u in us) if us else 0
        est.terms["sp_exchange"] = 2.0 * 2.0 * B * (4 * T + 2 * tk) * D / sp + (12.0 * m * B * T if any(
            u.pattern for u in us) else 0.0)
        est.notes["sp_exchange"] = f"Ulysses over {sp} GPUs ({T // sp} tokens each): all-to-all buffers, graph rows"
    return est


# --- inputs from the run's files -----------------------------------------------------------------------------------
def run_settings(run) -> dict:
    """Model + memory-relevant settings of a RunConfig: model config, seq_len, micro_batch, checkpointing."""
    ac = run.activation_checkpointing
    return {"cfg": run.model_config(), "seq_len": run.seq_len, "micro_batch": run.micro_batch,
            "sequence_parallel": run.sequence_parallel_size, "documents": run.data.document_mask,
            "ckpt_every": ac.every if ac.enabled else None}


def run_config_settings(path: str | None, sets: list[str] | None = None) -> dict:
    """`run_settings` of a run config YAML with `pretrain/main.py --set` overrides, read by the trainer's own
    loader (pretrain.config.load_run_config)."""
    from pretrain.config import load_run_config

    return run_settings(load_run_config(path, sets))


def ds_config_settings(path: str) -> dict:
    """ZeRO stage, stage3_max_live_parameters and the AutoEP size of a DeepSpeed JSON (pretrain.ds_config)."""
    from pretrain.ds_config import ds_settings, load_ds_json

    return ds_settings(load_ds_json(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.memory_estimate",
                                 description="Per-GPU training memory from the model's parameter and key counts.")
    ap.add_argument("--config", default=None, help="run config YAML (model, seq_len, micro_batch, checkpointing)")
    ap.add_argument("--ds-config", default=None, help="DeepSpeed JSON (ZeRO stage, max live parameters, AutoEP size)")
    ap.add_argument("--preset", default="1b-long", help="model preset (ressformer.config.PRESETS), without --config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override as in pretrain/main.py: model.asam.topk=8, seq_len=4096, micro_batch=2")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per sample (default: the config's seq_len; with --preset the model's max_seq_len)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the config's micro_batch, else 1")
    ap.add_argument("--world-size", type=int, default=32,
                    help="GPUs of the job (ZeRO partitions over all of them, sequence-parallel ones included)")
    ap.add_argument("--zero-stage", type=int, default=None, help="default: the DeepSpeed JSON's, else 3")
    ap.add_argument("--ckpt-every", type=int, default=None,
                    help="checkpoint every N units; 0 = off (default: the config's activation_checkpointing, else 1)")
    ap.add_argument("--num-steps", type=int, default=None, help="R2MU steps K (default: r2mu.steps)")
    ap.add_argument("--max-live-parameters", type=float, default=None,
                    help="DeepSpeed stage3_max_live_parameters (default: the JSON's, else 1e9)")
    ap.add_argument("--ep-size", type=int, default=None, help="AutoEP size (default: the JSON's, else 1)")
    ap.add_argument("--asam-kernel", choices=SWITCHES, default="auto",
                    help="Triton ASAM kernel of a CUDA run (auto: on for the gathered top-k path)")
    ap.add_argument("--fused-loss", choices=SWITCHES, default="auto", help="liger fused LM loss (auto: on)")
    ap.add_argument("--sequence-parallel", type=int, default=None,
                    help="Ulysses sequence-parallel size P (default: the config's sequence_parallel_size)")
    args = ap.parse_args(argv)
    try:
        if args.config:
            run = run_config_settings(args.config, args.set)
            name = args.config
        else:  # the preset at its full context, one sample, every unit checkpointed, then the --set overrides
            max_len = ModelConfig.from_preset(args.preset).max_seq_len
            run = run_config_settings(None, [f"model={args.preset}", f"seq_len={max_len}", "micro_batch=1",
                                             "activation_checkpointing.enabled=true", *args.set])
            name = args.preset
    except ValueError as e:
        ap.error(str(e))
    cfg = run["cfg"]
    seq = args.seq_len or run["seq_len"]
    mb = args.micro_batch or run["micro_batch"]
    every = run["ckpt_every"] if args.ckpt_every is None else (args.ckpt_every or None)
    try:
        ds = ds_config_settings(args.ds_config) if args.ds_config else {}
    except ValueError as e:
        ap.error(str(e))
    stage = args.zero_stage if args.zero_stage is not None else ds.get("zero_stage", 3)
    live = args.max_live_parameters if args.max_live_parameters is not None else ds.get("max_live_parameters", 1e9)
    ep = args.ep_size if args.ep_size is not None else ds.get("ep_size", 1)
    sp = args.sequence_parallel or run["sequence_parallel"]
    try:
        kernel, fused = resolve_kernels(cfg, args.asam_kernel, args.fused_loss, seq)
        est = estimate_memory(cfg, seq_len=seq, micro_batch=mb, world_size=args.world_size, zero_stage=stage,
                              ckpt_every=every, num_steps=args.num_steps, max_live_parameters=live, ep_size=ep,
                              asam_kernel=kernel, fused_loss=fused, sequence_parallel=sp, documents=run["documents"])
    except ValueError as e:
        ap.error(str(e))
    sys.stdout.write(f"# {name} {' '.join(args.set)} T={seq} micro_batch={mb} world_size={args.world_size} "
                     f"ZeRO-{stage} ep={ep} sp={sp} ckpt_every={every} asam_kernel={'on' if kernel else 'off'} "
                     f"fused_loss={'on' if fused else 'off'}\n")
    sys.stdout.write(est.table() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
