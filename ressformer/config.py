"""Model configuration: one typed, self-validating dataclass per concern, and named presets.

`ModelConfig` owns every architectural choice of both architectures built by this package:
`arch: ressformer` (R2MU recurrence + ASAM sparse attention + MoE + SOES latent graph) and
`arch: transformer` (the dense pre-norm RoPE baseline every ReSSFormer result is compared with).
Sub-configs map one-to-one onto the paper's components so an ablation is one field:

    r2mu.enabled       R2MU (sec. 3.1): False -> a stack of `r2mu.steps` distinct blocks (no weight sharing,
                       no memory) with the same per-token compute
    r2mu.memory        token-level cache + gated segment summary on/off
    asam.activation    softmax | sparsemax | entmax15 (sec. 3.2, activation sparsity)
    asam.topk          keys per query, 0 = all visible keys (sec. 3.2, token-level sparsity)
    moe.num_experts    1 = dense SwiGLU FFN; > 1 = top-k routed MoE (sec. 3.2, expert-level sparsity)
    soes.enabled       content-induced latent token graph + smoothness penalty (sec. 3.3)

Everything is a plain string / number / bool so a config round-trips through YAML unchanged.
`python -m ressformer.describe NAME` prints a resolved preset with its parameter and FLOP counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ARCHS = ("ressformer", "transformer")
ACTIVATIONS = ("softmax", "sparsemax", "entmax15")
ATTN_IMPLS = ("reference", "chunked", "block")
BLOCK_SELECT = ("query", "chunk")
K_SAMPLING = ("fixed", "uniform", "poisson")
SOES_GRAPHS = ("attention", "bilinear")
POSITIONS = ("rope", "none")


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"invalid config value {name}={value!r}: {allowed}")


@dataclass
class R2MUConfig:
    """Recurrent Reasoning & Memory Unit (paper sec. 3.1)."""

    enabled: bool = True  # False: `steps` distinct blocks instead of one shared block (ablation)
    steps: int = 4  # K, recurrent applications of the shared block at training time
    n_prelude: int = 0  # extension (not in the paper): non-shared blocks before the loop
    n_coda: int = 0  # extension (not in the paper): non-shared blocks after the loop
    step_sampling: str = "fixed"  # fixed (paper) | extension: uniform (K ~ U[min_steps, max_steps]) |
    #                               poisson (mean `steps`, clipped to [min_steps, max_steps])
    min_steps: int = 1
    max_steps: int = 8
    memory: bool = True  # token-level cache + segment-level summary
    cache_window: int = 64  # token cache: each query reads the previous step's states of its last `cache_window` tokens
    segment_len: int = 64  # segment summary: one summary per segment of this many tokens
    summary_slots: int = 4  # m, slots per segment summary

    def validate(self, p: str = "r2mu") -> None:
        _check(self.steps >= 1, f"{p}.steps", self.steps, "must be >= 1")
        _check(self.n_prelude >= 0, f"{p}.n_prelude", self.n_prelude, "must be >= 0")
        _check(self.n_coda >= 0, f"{p}.n_coda", self.n_coda, "must be >= 0")
        _check(self.step_sampling in K_SAMPLING, f"{p}.step_sampling", self.step_sampling, f"one of {K_SAMPLING}")
        _check(1 <= self.min_steps <= self.max_steps, f"{p}.min_steps", (self.min_steps, self.max_steps),
               "need 1 <= min_steps <= max_steps")
        _check(self.cache_window >= 1, f"{p}.cache_window", self.cache_window, "must be >= 1")
        _check(self.segment_len >= 1, f"{p}.segment_len", self.segment_len, "must be >= 1")
        _check(self.summary_slots >= 1, f"{p}.summary_slots", self.summary_slots, "must be >= 1")


@dataclass
class ASAMConfig:
    """Adaptive Sparse Attention Module (paper sec. 3.2), token- and activation-level sparsity."""

    activation: str = "sparsemax"  # sparsemax (paper) | extension: softmax | entmax15
    topk: int = 32  # keys per query; 0 = every visible key
    impl: str = "chunked"  # reference (T x T, for tests) | chunked (exact, memory linear in T) |
    #                        block (extension: block pre-selection, then exact top-k inside the kept blocks)
    chunk_size: int = 128  # queries per chunk in the chunked / block paths
    block_size: int = 64  # key block size for block selection
    blocks_per_query: int = 8  # key blocks each query selects (plus the local blocks of its chunk); SOES too
    block_select: str = "query"  # query: each query picks its own blocks | chunk (extension): a chunk's earliest
    #                              query picks for the whole chunk (bounded union, long context; see attention.py)

    def validate(self, p: str = "asam") -> None:
        _check(self.activation in ACTIVATIONS, f"{p}.activation", self.activation, f"one of {ACTIVATIONS}")
        _check(self.topk >= 0, f"{p}.topk", self.topk, "must be >= 0 (0 = dense)")
        _check(self.impl in ATTN_IMPLS, f"{p}.impl", self.impl, f"one of {ATTN_IMPLS}")
        _check(self.chunk_size >= 1, f"{p}.chunk_size", self.chunk_size, "must be >= 1")
        _check(self.block_size >= 1, f"{p}.block_size", self.block_size, "must be >= 1")
        _check(self.blocks_per_query >= 1, f"{p}.blocks_per_query", self.blocks_per_query, "must be >= 1")
        _check(self.block_select in BLOCK_SELECT, f"{p}.block_select", self.block_select, f"one of {BLOCK_SELECT}")


@dataclass
class MoEConfig:
    """Expert-level sparsity (paper sec. 3.2): top-k routed SwiGLU experts."""

    num_experts: int = 4  # 1 = dense SwiGLU FFN (ablation)
    experts_per_token: int = 2
    shared_experts: int = 0  # always-on dense SwiGLU experts added to the routed output
    aux_loss_coef: float = 0.01  # switch-style load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight

    @property
    def enabled(self) -> bool:
        return self.num_experts > 1

    def validate(self, p: str = "moe") -> None:
        _check(self.num_experts >= 1, f"{p}.num_experts", self.num_experts, "must be >= 1 (1 = dense FFN)")
        _check(1 <= self.experts_per_token <= self.num_experts or self.num_experts == 1,
               f"{p}.experts_per_token", self.experts_per_token, f"must be in [1, num_experts={self.num_experts}]")
        _check(self.shared_experts >= 0, f"{p}.shared_experts", self.shared_experts, "must be >= 0")
        _check(self.aux_loss_coef >= 0, f"{p}.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        _check(self.z_loss_coef >= 0, f"{p}.z_loss_coef", self.z_loss_coef, "must be >= 0")


@dataclass
class SOESConfig:
    """Self-Organizing Encoder Structure (paper sec. 3.3): content-induced latent token graph."""

    enabled: bool = True
    graph: str = "attention"  # attention: A^(t) = the head-averaged sparse attention pattern of step t-1 (paper's
    #                           reading, structure.py) | bilinear: a separate low-rank content scorer
    rank: int = 16  # bilinear only: low-rank dimension of the edge score
    degree: int = 8  # m, out-edges kept per token
    smooth_coef: float = 0.01  # weight of L_smooth = sum_t ||A_t - A_{t-1}||_F^2 (mean over tokens)

    def validate(self, p: str = "soes") -> None:
        _check(self.graph in SOES_GRAPHS, f"{p}.graph", self.graph, f"one of {SOES_GRAPHS}")
        _check(self.rank >= 1, f"{p}.rank", self.rank, "must be >= 1")
        _check(self.degree >= 1, f"{p}.degree", self.degree, "must be >= 1")
        _check(self.smooth_coef >= 0, f"{p}.smooth_coef", self.smooth_coef, "must be >= 0")


_SUB = {"r2mu": R2MUConfig, "asam": ASAMConfig, "moe": MoEConfig, "soes": SOESConfig}
TRANSFORMER_ONLY = ("n_layers", "position", "rope_theta")  # read by the dense baseline alone


@dataclass
class ModelConfig:
    arch: str = "ressformer"  # ressformer | transformer
    vocab_size: int = 512
    d_model: int = 64
    n_heads: int = 4
    ffn_hidden: int = 0  # SwiGLU hidden size per expert; 0 = round(8/3 * d_model) to a multiple of 64
    n_layers: int = 4  # transformer only: distinct layers
    causal: bool = True  # False = bidirectional encoder mode (no causal mask)
    max_seq_len: int = 256  # transformer: RoPE cache size; both: the training length the presets were made for
    position: str = "rope"  # transformer only: rope | none (NoPE baseline); ReSSFormer has no positional encoding
    rope_theta: float = 10000.0  # transformer only
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    r2mu: R2MUConfig = field(default_factory=R2MUConfig)
    asam: ASAMConfig = field(default_factory=ASAMConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    soes: SOESConfig = field(default_factory=SOESConfig)

    def __post_init__(self) -> None:
        for name, cls in _SUB.items():
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, _from_dict(cls, v, name))
        if self.ffn_hidden == 0:
            self.ffn_hidden = max(64, int(round(8 / 3 * self.d_model / 64)) * 64)
        self.validate()

    # --- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        _check(self.arch in ARCHS, "arch", self.arch, f"one of {ARCHS}")
        _check(self.vocab_size >= 2, "vocab_size", self.vocab_size, "must be >= 2")
        _check(self.d_model >= 1, "d_model", self.d_model, "must be >= 1")
        _check(self.n_heads >= 1 and self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
               f"must divide d_model={self.d_model}")
        _check(self.ffn_hidden >= 1, "ffn_hidden", self.ffn_hidden, "must be >= 1 (0 = auto)")
        _check(self.n_layers >= 1, "n_layers", self.n_layers, "must be >= 1")
        _check(self.max_seq_len >= 1, "max_seq_len", self.max_seq_len, "must be >= 1")
        _check(self.position in POSITIONS, "position", self.position, f"one of {POSITIONS}")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        _check(self.init_std > 0, "init_std", self.init_std, "must be > 0")
        if self.arch == "transformer" and self.position == "rope":
            _check(self.head_dim % 2 == 0, "d_model/n_heads", self.head_dim, "RoPE needs an even head dim")
        for name in _SUB:
            getattr(self, name).validate(name)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, except the dense baseline's own (n_layers, position, rope_theta) in a ReSSFormer's dict: it has
        one shared block and no positional encoding, and its saved config should not say otherwise. `from_dict`
        fills absent fields with their defaults and accepts configs that carry them."""
        d = dataclasses.asdict(self)
        if self.arch != "transformer":
            for k in TRANSFORMER_ONLY:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d, "")

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> "ModelConfig":
        import yaml

        s = str(path_or_text)
        text = Path(s).read_text() if isinstance(path_or_text, Path) or ("\n" not in s and s.endswith((".yaml", ".yml"))) else s
        d = yaml.safe_load(text)
        if not isinstance(d, dict):
            raise ValueError(f"model config YAML must be a mapping, got {type(d).__name__} from {path_or_text!r}")
        return cls.from_dict(d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
        d = dataclasses.asdict(PRESETS[name]())  # every field: an override may switch arch
        return cls.from_dict(apply_overrides(d, overrides))

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with dotted-key overrides applied, e.g. replace(**{"asam.topk": 8})."""
        return ModelConfig.from_dict(apply_overrides(dataclasses.asdict(self), overrides))


def _from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}: "
                         f"allowed keys here are {sorted(known)}")
    kwargs = {}
    for k, v in d.items():
        sub = _SUB.get(k) if cls is ModelConfig else None
        if sub is not None and isinstance(v, dict):
            kwargs[k] = _from_dict(sub, v, k)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def parse_sets(items: list[str] | None, example: str = "asam.topk=8") -> dict[str, Any]:
    """["a.b=VALUE", ...] (command-line --set) -> {"a.b": VALUE parsed as YAML}; the one parser of every CLI.

    `example` is the KEY=VALUE the error message shows for an item without "=".
    """
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: write key=value, e.g. --set {example}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply {"a.b": v} overrides to a nested dict (copied). Unknown keys raise ValueError."""
    import copy

    out = copy.deepcopy(d)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unknown config key {key!r} (no {'.'.join(parts[:i + 1])!r}); "
                                 f"known keys at that level: {sorted(node) if isinstance(node, dict) else []}")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


# --- presets ------------------------------------------------------------------------------------
# The paper's network (sec. 3): embeddings -> one shared block x K with the R2MU memory -> norm -> head, ASAM =
# per-query top-k + sparsemax + routed MoE experts, SOES graph from the attention pattern, no prelude / coda.
# Names give *total* parameters (embeddings and every expert included); `python -m ressformer.describe NAME`
# prints total, active-per-token and FLOPs. Per-token compute is that of K applications of the active block.


def _debug() -> ModelConfig:
    return ModelConfig(
        arch="ressformer", vocab_size=512, d_model=64, n_heads=4, ffn_hidden=128, max_seq_len=128,
        r2mu=R2MUConfig(steps=4, cache_window=16, segment_len=16, summary_slots=2),
        asam=ASAMConfig(activation="sparsemax", topk=16, impl="chunked", chunk_size=32, block_size=16,
                        blocks_per_query=4),
        moe=MoEConfig(num_experts=4, experts_per_token=2),
        soes=SOESConfig(graph="attention", rank=8, degree=4),
    )


def _debug_transformer() -> ModelConfig:
    return ModelConfig(arch="transformer", vocab_size=512, d_model=64, n_heads=4, ffn_hidden=128, n_layers=5,
                       max_seq_len=128, moe=MoEConfig(num_experts=1))


def _125m() -> ModelConfig:
    return ModelConfig(
        arch="ressformer", vocab_size=32000, d_model=768, n_heads=12, ffn_hidden=2048, max_seq_len=2048,
        r2mu=R2MUConfig(steps=12, cache_window=256, segment_len=256, summary_slots=8),
        asam=ASAMConfig(topk=128, chunk_size=256, block_size=128, blocks_per_query=8),
        moe=MoEConfig(num_experts=16, experts_per_token=2), soes=SOESConfig(degree=16),
    )


def _350m() -> ModelConfig:
    return ModelConfig(
        arch="ressformer", vocab_size=32000, d_model=1024, n_heads=16, ffn_hidden=2816, max_seq_len=2048,
        r2mu=R2MUConfig(steps=16, cache_window=256, segment_len=256, summary_slots=8),
        asam=ASAMConfig(topk=128, chunk_size=256, block_size=128, blocks_per_query=8),
        moe=MoEConfig(num_experts=32, experts_per_token=2), soes=SOESConfig(degree=16),
    )


def _1b() -> ModelConfig:
    return ModelConfig(
        arch="ressformer", vocab_size=32000, d_model=2048, n_heads=16, ffn_hidden=2816, max_seq_len=4096,
        r2mu=R2MUConfig(steps=16, cache_window=512, segment_len=512, summary_slots=16),
        asam=ASAMConfig(topk=256, chunk_size=512, block_size=128, blocks_per_query=16),
        moe=MoEConfig(num_experts=48, experts_per_token=2), soes=SOESConfig(degree=16),
    )


def _1b_long() -> ModelConfig:
    """The 1B paper model at 32k context (exact per-query top-k, chunked: attention memory linear in T)."""
    return _1b().replace(**{"max_seq_len": 32768, "asam.chunk_size": 1024})


def _1b_transformer() -> ModelConfig:
    return ModelConfig(arch="transformer", vocab_size=32000, d_model=2048, n_heads=16, ffn_hidden=5632,
                       n_layers=16, max_seq_len=4096, moe=MoEConfig(num_experts=1))


PRESETS = {
    "debug": _debug,
    "debug-transformer": _debug_transformer,
    "125m": _125m,
    "350m": _350m,
    "1b": _1b,
    "1b-long": _1b_long,
    "1b-transformer": _1b_transformer,
}

