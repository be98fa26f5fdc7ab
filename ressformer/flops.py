"""Analytic parameter and FLOP counts for both architectures (ReSSFormer and the dense baseline).

count_params(cfg) -> {"total", "active", "embedding"}
    Exact: equals sum(p.numel()) of the built model (tests check it for several configs).
    active    = parameters one token touches: every dense weight, the router, `experts_per_token` of
                the `num_experts` routed experts per MoE layer, the shared experts. The shared R2MU
                core counts once (parameters, not compute).
    embedding = the input embedding table (the tied lm_head is the same tensor).

flops_per_token(cfg, seq_len) -> float
    Training FLOPs per token of one forward + backward pass, counted as 2 FLOPs per multiply-accumulate
    of every matmul the implementation actually runs (elementwise ops, norms, softmax / sparsemax
    are not counted, as in the PaLM / Chinchilla convention). A matmul whose inputs carry gradients
    costs 3x its forward (forward, grad wrt input, grad wrt weight); a matmul run under no_grad (the
    top-k / block selection scores of ASAM and the SOES graph) costs 1x. Covered terms:
      * projections: q, o on the T tokens; k, v on the T tokens and on the memory keys (cache + summaries)
      * attention scores and probability x value products, per impl (see `_attention_macs`)
      * SOES graph: src/dst projections, no-grad top-m selection scores, grad-carrying scores of the m edges
      * FFN: dense SwiGLU, or router + experts_per_token experts + shared experts
      * R2MU: K core steps; memory pooling (scores and weighted sums) and the overwrite gate
      * lm_head (the embedding lookup is free)
    Tests compare against torch.utils.flop_counter.FlopCounterMode on small configs (within 10 %).

matched_dense(cfg, seq_len) -> ModelConfig
    The dense Transformer of cfg's width whose training FLOPs per token at seq_len equal cfg's.
"""

from __future__ import annotations

import math

from ressformer.config import ModelConfig, MoEConfig


# --- parameters ---------------------------------------------------------------------------------
def _mlp_params(cfg: ModelConfig, active: bool) -> int:
    d, f, m = cfg.d_model, cfg.ffn_hidden, cfg.moe
    if m.num_experts == 1:
        return 3 * d * f  # gate_up_proj (2F x D) + down_proj (D x F)
    n_exp = m.experts_per_token if active else m.num_experts
    shared = 3 * d * f * m.shared_experts  # one DenseMLP of hidden F * shared_experts
    return d * m.num_experts + n_exp * 3 * d * f + shared


def _block_params(cfg: ModelConfig, active: bool, recurrent: bool = True) -> int:
    d = cfg.d_model
    n = 2 * d + 4 * d * d + _mlp_params(cfg, active)  # two RMSNorms, q/k/v/o
    if cfg.arch == "ressformer" and cfg.soes.enabled:
        bilinear = cfg.soes.graph == "bilinear"
        if bilinear:
            n += 2 * d * cfg.soes.rank  # LatentGraph src_proj, dst_proj
        if bilinear or recurrent:
            n += cfg.n_heads  # ASAMAttention.graph_scale (H,): the attention graph reaches loop blocks only
    return n


def _memory_params(cfg: ModelConfig) -> int:
    d, m = cfg.d_model, cfg.r2mu.summary_slots
    return m * d + d + (2 * d + 1)  # slot_queries, pool_norm, gate (weight + bias)


def _n_blocks(cfg: ModelConfig) -> tuple[int, int]:
    """(blocks of the recurrence, other blocks): the transformer's layers count as the latter."""
    if cfg.arch == "transformer":
        return 0, cfg.n_layers
    r = cfg.r2mu
    return (1 if r.enabled else r.steps), r.n_prelude + r.n_coda


def count_params(cfg: ModelConfig) -> dict[str, int]:
    d, v = cfg.d_model, cfg.vocab_size
    emb = v * d
    head = 0 if cfg.tie_embeddings else v * d
    out = {}
    for key, active in (("total", False), ("active", True)):
        n_loop, n_plain = _n_blocks(cfg)
        n = emb + head + d + n_loop * _block_params(cfg, active) + n_plain * _block_params(cfg, active, False)
        if cfg.arch == "ressformer" and cfg.r2mu.enabled and cfg.r2mu.memory:
            n += _memory_params(cfg)
        out[key] = n
    out["embedding"] = emb
    return out


# --- FLOPs --------------------------------------------------------------------------------------
def _attention_macs(cfg: ModelConfig, T: int, n_mem: int, attend: str = "auto",
                    documents: bool = False, key_runs: bool = True) -> tuple[float, float]:
    """(grad-carrying MACs, no-grad MACs) of ASAM scores + P@V for one block call, per token.

    Summed over heads (H * head_dim = D). Tk = T + n_mem keys (n_mem: R2MU's token cache of T entries, then the
    summaries). attend: the top-k pass counted, as attention.sparse_attention's `attend` ("gather": the kept keys
    only, what the Triton kernel computes). documents: document masking (block ASAM's candidates per document,
    `_block_kept_keys`). key_runs: a causal chunk computes only over the keys it can see (ASAMAttention.key_runs,
    the model's full forward); False: over every key (sequence parallelism).
    """
    from ressformer.attention import dense_topk_pays

    a, d = cfg.asam, cfg.d_model
    tk = T + n_mem
    if a.impl == "reference":
        return 2.0 * tk * d, 0.0  # full (T x Tk) scores and a dense (T x Tk) @ (Tk x D) product

    def macs(n: int, sel: float) -> tuple[float, float]:  # per query over n candidates
        if a.topk == 0 or a.topk >= n or dense_topk_pays(n, a.topk, cfg.head_dim, attend):
            return 2.0 * n * d, sel  # every candidate with grad (top-k: selected from those same scores)
        return 2.0 * a.topk * d, sel + n * d  # no-grad selection scores over the candidates, then topk gathered keys

    if a.impl == "block":  # block summaries scored without grad, then the chunk's kept blocks
        return macs(_block_kept_keys(cfg, T, n_mem, documents), math.ceil(tk / a.block_size) * d)
    if not cfg.causal or not key_runs:
        return macs(tk, 0.0)
    # causal chunked: a chunk [s0, s1) computes over the tokens before s1, the token cache entries in
    # [s0 - cache_window + 1, s1) and every summary (ASAMAttention.key_runs), each chunk its own count
    chunks = []  # (candidates, queries)
    for s0 in range(0, T, a.chunk_size):
        s1 = min(T, s0 + a.chunk_size)
        chunks.append((s1 + (s1 - max(0, s0 - cfg.r2mu.cache_window + 1) + n_mem - T if n_mem else 0), s1 - s0))
    widest = max(n for n, _ in chunks)  # decides the top-k pass of every chunk (attention.sparse_attention)
    dense = 0 < a.topk < widest and dense_topk_pays(widest, a.topk, cfg.head_dim, attend)
    grad = nograd = 0.0
    for n, c in chunks:
        g, ng = (2.0 * n * d, 0.0) if dense else macs(n, 0.0)
        grad, nograd = grad + g * c / T, nograd + ng * c / T
    return grad, nograd


def _block_kept_keys(cfg: ModelConfig, T: int, n_mem: int = 0, documents: bool = False) -> int:
    """Candidate keys a query chunk computes over in block mode, T tokens and n_mem R2MU memory keys (token cache and
    summaries): the static block count the model pads every chunk to (selection.max_kept_blocks: the blocks
    overlapping the chunk's positions, attention.local_block_bound, + blocks_per_query chosen, by the chunk's
    earliest query or, with block_select=query, by each of its chunk_size queries; at most all blocks), in keys.
    documents (selection.document_block_candidates): the first document's blocks, a chunk of queries straddling two
    chunks of its positions (two choosers under block_select=chunk), + the later documents' spans of every run."""
    from ressformer.attention import document_runs, local_block_bound

    a = cfg.asam
    bs = a.block_size
    memory = n_mem > 0
    if documents:
        runs = document_runs(cfg, T, n_mem)
        nb = sum(math.ceil(n / bs) for n, _ in runs)
        local, choosers, spans = local_block_bound(cfg, memory, 2 * a.chunk_size), 2, sum(s for _, s in runs)
    else:
        nb = math.ceil((T + n_mem) / bs)
        local, choosers, spans = local_block_bound(cfg, memory, a.chunk_size), 1, 0
    if local is None:
        return nb * bs + spans
    n_top = min(nb, a.blocks_per_query)
    return min(nb, local + n_top * (choosers if a.block_select == "chunk" else a.chunk_size)) * bs + spans


def _graph_macs(cfg: ModelConfig, T: int, documents: bool = False) -> tuple[float, float]:
    if not cfg.soes.enabled or cfg.arch != "ressformer" or cfg.soes.graph == "attention":
        return 0.0, 0.0  # the attention-pattern graph reuses ASAM's probabilities: no matmul of its own
    r, m = cfg.soes.rank, min(cfg.soes.degree, T)
    a = cfg.asam
    if a.impl == "block":  # neighbours chosen inside kept token blocks, like ASAM's block path
        kept = _block_kept_keys(cfg, T, documents=documents)
        return 2.0 * cfg.d_model * r + m * r, float((math.ceil(T / a.block_size) + kept) * r)
    return 2.0 * cfg.d_model * r + m * r, float(T * r)


def _mlp_macs(cfg: ModelConfig) -> float:
    return float(_mlp_params(cfg, active=True))  # one MAC per active weight per token


def _block_macs(cfg: ModelConfig, T: int, n_mem: int, attend: str, documents: bool = False,
                key_runs: bool = True) -> tuple[float, float]:
    d = cfg.d_model
    g = 2.0 * d * d + 2.0 * d * d * (T + n_mem) / T  # q, o on tokens; k, v on tokens + memory
    ag, an = _attention_macs(cfg, T, n_mem, attend, documents, key_runs) if cfg.arch == "ressformer" \
        else (float(T + 1) * d, 0.0)
    gg, gn = _graph_macs(cfg, T, documents)
    return g + ag + gg + _mlp_macs(cfg), an + gn


def flops_per_token(cfg: ModelConfig, seq_len: int, num_steps: int | None = None, causal_skip: bool = False,
                    attend: str = "auto", documents: bool = False, key_runs: bool = True) -> float:
    """Training (fwd + bwd) FLOPs per token at sequence length seq_len (K = num_steps or r2mu.steps).

    ASAM's top-k pass as `attend` says (attention.sparse_attention's argument): "auto", what the PyTorch path
    runs (dense over a chunk's candidates when attention.dense_topk_pays, else the gathered kept keys); "gather",
    the kept keys only: what the Triton kernel computes on a GPU, and the sparse algorithm's own count. A causal
    query chunk computes over the keys it can see (ASAMAttention.key_runs); key_runs=False: over every key, as
    under sequence parallelism.

    The dense baseline's causal attention: the full T x T product (what SDPA computes on CPU), or with
    causal_skip=True the (T + 1) / 2 keys per query a FlashAttention-style kernel computes on a GPU.

    documents: document masking (data.document_mask), which changes block ASAM's candidates (`_block_kept_keys`).
    """
    if seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len={seq_len} must be >= 1")
    T, d = seq_len, cfg.d_model
    grad, nograd = float(cfg.vocab_size * d), 0.0  # lm_head
    if cfg.arch == "transformer":
        keys = (T + 1) / 2 if causal_skip and cfg.causal else T
        bg = 2.0 * d * d * 2 + 2.0 * keys * d + _mlp_macs(cfg)
        return 6.0 * (grad + cfg.n_layers * bg)
    r = cfg.r2mu
    K = r.steps if num_steps is None else num_steps
    plain_g, plain_n = _block_macs(cfg, T, 0, attend, documents, key_runs)
    n_plain = r.n_prelude + r.n_coda
    grad += n_plain * plain_g
    nograd += n_plain * plain_n
    mem_on = r.enabled and r.memory
    for t in range(K):
        n_mem = 0
        if mem_on and K > 1:
            n_seg = T // r.segment_len if cfg.causal else 1
            n_sum = n_seg * r.summary_slots
            covered = n_seg * r.segment_len if cfg.causal else T
            grad += 2.0 * r.summary_slots * d * covered / T  # pooling scores + weighted sums
            if t >= 1:
                grad += n_sum * 2 * d / T  # overwrite gate
                n_mem = T + n_sum
        bg, bn = _block_macs(cfg, T, n_mem, attend, documents, key_runs)
        grad += bg
        nograd += bn
    return 6.0 * grad + 2.0 * nograd


def matched_dense(cfg: ModelConfig, seq_len: int, max_layers: int = 256) -> ModelConfig:
    """The dense Transformer of cfg's width (vocab, d_model, heads, FFN) whose depth gives the training FLOPs per
    token closest to cfg's at seq_len; its causal attention counted at (T + 1) / 2 keys per query (causal_skip),
    cfg's top-k attention at its kept keys (attend="gather": the sparse algorithm's FLOPs, what the Triton kernel
    computes, whichever path a CPU takes)."""
    dense = ModelConfig(arch="transformer", vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads,
                        ffn_hidden=cfg.ffn_hidden, max_seq_len=cfg.max_seq_len, moe=MoEConfig(num_experts=1))
    target = flops_per_token(cfg, seq_len, attend="gather")
    n = min(range(1, max_layers + 1),
            key=lambda k: abs(flops_per_token(dense.replace(n_layers=k), seq_len, causal_skip=True) - target))
    return dense.replace(n_layers=n)
