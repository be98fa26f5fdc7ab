"""Run configuration of the pretraining engine (`pretrain/main.py`): one validated dataclass.

Design choices
- Flat top-level fields (the schema `pretrain/configs/*.yaml`, `pretrain.memory_estimate` and the Slurm
  scripts already read): `model` is a preset name (or a full model-config dict), `model_overrides` holds
  dotted model keys (`asam.topk: 8`), `data` is `pretrain.data.DataConfig`'s dict.
- The model config is resolved once, at construction (`model_config()` returns it): a bad preset, override
  or seq_len fails before anything is built.
- `--set key=value` overrides any field (parsed by `ressformer.config.parse_sets`, values as YAML);
  `--set model.asam.topk=8` goes into `model_overrides` when `model` is a preset name or YAML path. Unknown
  keys raise ValueError naming the allowed ones.
- The DeepSpeed batch fields are derived here, never duplicated: train_batch_size = micro_batch *
  grad_accum * world_size (`ds_batch_fields`); a JSON that sets them to something else is an error.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ressformer.config import ModelConfig, apply_overrides, parse_sets

_AC_KEYS = {"enabled", "every"}
_WANDB_KEYS = {"mode", "project", "name"}


@dataclass
class RunConfig:
    model: Any = "debug"  # preset name, a model-config YAML path, or a full ModelConfig dict
    model_overrides: dict = field(default_factory=dict)  # {"asam.topk": 8, ...}
    data: dict = field(default_factory=dict)  # pretrain.data.DataConfig fields
    run_dir: str = "runs/debug"
    seq_len: int = 128
    micro_batch: int = 4
    grad_accum: int = 1
    steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    decay: str = "cosine"  # cosine | linear (to min_lr at `steps`)
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only; norms, biases, embeddings get 0
    grad_clip: float = 1.0  # 0 = off
    seed: int = 1234
    activation_checkpointing: dict = field(default_factory=lambda: {"enabled": False, "every": 1})
    # torch.compile (inductor) each unit the model repeats, in place (ressformer CausalLM.compile_units: every block,
    # the R2MU memory); checkpoints are unchanged. The first step compiles (tens of seconds on CPU). Not with
    # expert parallelism (AutoEP, native MoE).
    compile: bool = False
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 50
    eval_iters: int = 4
    keep_last: int = 2
    # Every Nth checkpoint also holds the consolidated fp32 model (model.safetensors, model_config.yaml,
    # tokenizer/) that pretrain.convert, init_from and pretrain.evaluate read; 0 = only the final one. It costs
    # one gather of every parameter (an all-gather per parameter under ZeRO-3) and 4 bytes per parameter on disk.
    save_model_every: int = 1
    precision: str = "auto"  # auto (bf16 on a GPU with bf16, fp32 on CPU) | fp32 | bf16
    nan_max_consecutive: int = 5  # stop after this many skipped non-finite steps in a row
    wandb: dict = field(default_factory=lambda: {"mode": "offline", "project": "ressformer", "name": None})
    # Continued pretraining: start from the weights of a model folder (a checkpoint tag, or a `python -m
    # pretrain.convert --to-ressformer` folder); its model_config.yaml must equal this run's model config. A
    # checkpoint found by --resume wins.
    init_from: str | None = None

    def __post_init__(self) -> None:
        def need(cond, name, fix):
            if not cond:
                raise ValueError(f"run config {name}={getattr(self, name)!r}: {fix}")

        for n in ("lr", "min_lr", "eps", "weight_decay", "grad_clip"):  # YAML reads 1e-3 (no dot) as a string
            try:
                setattr(self, n, float(getattr(self, n)))
            except (TypeError, ValueError):
                raise ValueError(f"run config {n}={getattr(self, n)!r} is not a number") from None
        for n in ("seq_len", "micro_batch", "grad_accum", "steps", "log_every", "save_every", "eval_every",
                  "keep_last", "nan_max_consecutive"):
            need(isinstance(getattr(self, n), int) and getattr(self, n) >= 1, n, "must be an integer >= 1")
        need(isinstance(self.eval_iters, int) and self.eval_iters >= 0, "eval_iters", "must be an integer >= 0")
        need(isinstance(self.save_model_every, int) and self.save_model_every >= 0, "save_model_every",
             "must be an integer >= 0 (0: only the final checkpoint holds model.safetensors)")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, "lr", f"need lr > 0 and 0 <= min_lr ({self.min_lr}) <= lr")
        need(self.decay in ("cosine", "linear"), "decay", "choose cosine or linear")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        need(self.weight_decay >= 0 and self.grad_clip >= 0 and self.eps > 0, "weight_decay",
             "weight_decay and grad_clip must be >= 0, eps > 0")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "choose auto, fp32 or bf16")
        need(isinstance(self.compile, bool), "compile", "true or false")
        need(isinstance(self.model, (str, dict)), "model", "give a preset name, a model-config YAML path or a dict")
        ac = self.activation_checkpointing
        need(isinstance(ac, dict) and set(ac) <= _AC_KEYS and int(ac.get("every", 1)) >= 1,
             "activation_checkpointing", f"a dict with keys {sorted(_AC_KEYS)} and every >= 1")
        self.activation_checkpointing = {"enabled": bool(ac.get("enabled", False)), "every": int(ac.get("every", 1))}
        wb = self.wandb
        need(isinstance(wb, dict) and set(wb) <= _WANDB_KEYS, "wandb", f"a dict with keys {sorted(_WANDB_KEYS)}")
        self.wandb = {"mode": "offline", "project": "ressformer", "name": None, **wb}
        need(self.wandb["mode"] in ("offline", "online", "disabled"), "wandb", "mode: offline | online | disabled")
        need(self.init_from is None or isinstance(self.init_from, str), "init_from",
             "give the folder written by `python -m pretrain.convert --to-ressformer` (or leave it unset)")
        self._model_config = self._resolve_model()  # not a field: equality and to_dict see only the inputs

    def _resolve_model(self) -> ModelConfig:
        if isinstance(self.model, dict):
            base = ModelConfig.from_dict(self.model)
        elif self.model.endswith((".yaml", ".yml")):  # e.g. the model_config.yaml of an init_from folder
            if not Path(self.model).is_file():
                raise ValueError(f"run config model={self.model!r}: no such model-config YAML file")
            base = ModelConfig.from_yaml(self.model)
        else:
            base = ModelConfig.from_preset(self.model)
        if self.model_overrides:
            base = ModelConfig.from_dict(apply_overrides(base.to_dict(), dict(self.model_overrides)))
        if self.seq_len > base.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model max_seq_len={base.max_seq_len}: lower seq_len or "
                             f"set model_overrides max_seq_len")
        return base

    # --- derived -------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        """The model config: `model` (preset, YAML path or dict) with `model_overrides` applied."""
        return self._model_config

    def data_config(self):
        from pretrain.data import DataConfig

        return DataConfig.from_dict(self.data)

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch * self.grad_accum * world_size

    def ds_batch_fields(self, world_size: int) -> dict[str, int]:
        return {"train_batch_size": self.global_batch(world_size),
                "train_micro_batch_size_per_gpu": self.micro_batch,
                "gradient_accumulation_steps": self.grad_accum}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown run config keys {sorted(unknown)}: allowed keys are {sorted(allowed)}")
        return cls(**copy.deepcopy(d))


def load_run_config(path: str | Path | None, sets: list[str] | None = None) -> RunConfig:
    """Read the YAML at `path` (None = defaults) and apply `--set` overrides."""
    d = {}
    if path is not None:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: the run config must be a YAML mapping, got {type(d).__name__}")
    allowed = {f.name for f in fields(RunConfig)}
    for key, value in parse_sets(sets, example="steps=40 or --set model.asam.topk=8").items():
        head, _, rest = key.partition(".")
        if head not in allowed:
            raise ValueError(f"--set {key}: unknown run config key {head!r}; allowed keys are {sorted(allowed)}")
        if not rest:
            d[head] = value
        elif head == "model_overrides" or (head == "model" and isinstance(d.get("model", "debug"), str)):
            d["model_overrides"] = {**(d.get("model_overrides") or {}), rest: value}  # flat dotted model keys
        else:  # a nested field: data, wandb, activation_checkpointing, or a model given as a dict
            *parents, leaf = rest.split(".")
            node = d.setdefault(head, {})
            for p in parents:
                node = node.setdefault(p, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {head}={d[head]!r} has no mapping to hold {rest!r}")
            node[leaf] = value
    return RunConfig.from_dict(d)
