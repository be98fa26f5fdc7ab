"""Run configuration of the pretraining job (`pretrain/main.py`): typed dataclasses, validated once, at construction.

    RunConfig                    the top level: model, schedule, batch, checkpoints, logging
      .data: DataConfig          (`python -m pretrain.config` lists every key with its type, default and meaning)
      .activation_checkpointing: ActivationCheckpointing
      .wandb: WandbConfig
      .faults: FaultConfig       collective timeout, hang watchdog, stragglers
      .preflight: PreflightConfig
      .profile: ProfileConfig     torch.profiler window

Design choices
- One schema for the YAML files (`pretrain/configs/*.yaml`), `--set key=value` overrides, run_state.json and
  run_info.json: `to_dict()` / `from_dict()` round-trip, nested sections as mappings.
- Every field is checked against its annotation at construction (`_check_types`): an int is an int (a YAML `true`
  is not), a float is finite (`.inf` and `.nan` are refused; YAML's `1e-3`, a string, is read as a number), a
  choice is one of its `Literal` values; then ranges (`__post_init__`). Errors name the key, the value and the fix.
- The model config is resolved once, at construction (`model_config()`): `model` is a preset name, a
  model-config YAML path or a full model-config dict, with `model_overrides` (dotted model keys) applied.
- `--set` means the same in every command that takes a run config (pretrain/main.py, pretrain.memory_estimate,
  bench/memory_check.py): run keys (`steps=40`, `data.split=90,5,5`), and model keys under `model.`
  (`model.asam.topk=8`, collected into `model_overrides` when `model` is a preset or a YAML path).
- The DeepSpeed batch fields are derived here, never duplicated: train_batch_size = micro_batch * grad_accum *
  world_size (`ds_batch_fields`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.data import DataConfig
from ressformer.config import ModelConfig, parse_sets


class ConfigError(ValueError):
    """A run-config value that cannot work, found once the job has started (data files, init_from): raised on every
    rank alike and reported like the errors found while loading the config (one line, exit status 2)."""


def _field_docs(cls) -> dict[str, str]:
    """{field: the docstring written under it} (the litgpt convention), read from the class source."""
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError):
        return {}
    body, out = tree.body[0].body, {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            out[a.target.id] = " ".join(b.value.value.split())
    return out


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(section: str, name: str, value, tp):
    """`value` checked (and normalised: numbers to float, mappings to their section) against annotation `tp`."""
    key = f"{section}{name}"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _check_value(section, name, value, rest[0])
        for a in rest:
            try:
                return _check_value(section, name, value, a)
            except ValueError:
                continue
        raise ValueError(f"run config {key}={value!r}: give one of {' | '.join(_type_name(a) for a in rest)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"run config {key}={value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"run config {key}={value!r}: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"run config {key}={value!r}: must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"run config {key}={value!r}: must be a number")
        try:
            f = float(value)  # YAML reads 1e-3 (no dot) as a string
        except (TypeError, ValueError):
            raise ValueError(f"run config {key}={value!r}: must be a number") from None
        if not math.isfinite(f):
            raise ValueError(f"run config {key}={value!r}: must be a finite number")
        return f
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"run config {key}={value!r}: must be a string")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, bool) and "enabled" in {f.name for f in fields(tp)}:
            return tp(enabled=value)  # `preflight: false`, `activation_checkpointing: true`
        if not isinstance(value, dict):
            raise ValueError(f"run config {key}={value!r}: must be a mapping of {sorted(f.name for f in fields(tp))}")
        unknown = sorted(set(value) - {f.name for f in fields(tp)})
        if unknown:
            raise ValueError(f"run config {key}: unknown keys {unknown}; allowed keys are "
                             f"{sorted(f.name for f in fields(tp))}")
        return tp(**copy.deepcopy(value))
    if origin is list and args and args[0] in (float, str):
        what = "numbers" if args[0] is float else "strings"
        if args[0] is str and isinstance(value, str):
            value = [value]  # `--set eval_tasks=paper:hops`: one item
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"run config {key}={value!r}: must be a list of {what}")
        return [_check_value(section, f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"run config {key}={value!r}: must be a mapping")
        return value
    return value


def _check_types(obj, section: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, _check_value(section, f.name, getattr(obj, f.name), hints[f.name]))


def _need(cond: bool, key: str, value, fix: str) -> None:
    if not cond:
        raise ValueError(f"run config {key}={value!r}: {fix}")


@dataclass
class ActivationCheckpointing:
    """Recompute units in backward instead of keeping their activations (torch's non-reentrant checkpoint)."""

    enabled: bool = False
    """Checkpoint the model's units: each recurrent R2MU step (and prelude / coda block, if any)."""
    every: int = 1
    """Checkpoint every N-th unit (1: all of them)."""

    def __post_init__(self) -> None:
        _check_types(self, "activation_checkpointing.")
        _need(self.every >= 1, "activation_checkpointing.every", self.every, "must be >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases logging on rank 0 (never fatal: metrics.jsonl keeps every record)."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline (files under RUN_DIR/wandb), online, or disabled; the WANDB_MODE environment variable wins."""
    project: str = "ressformer"
    """wandb project."""
    name: str | None = None
    """wandb run name (default: wandb's)."""

    def __post_init__(self) -> None:
        _check_types(self, "wandb.")


@dataclass
class FaultConfig:
    """How a job on many ranks notices a hung or slow rank (pretrain.monitor)."""

    dist_timeout_s: float = 1800.0
    """Seconds a collective waits for a peer before it fails (torch.distributed's process-group timeout)."""
    step_timeout_s: float = 0.0
    """Watchdog: a rank that completes no step within this many seconds dumps every thread's stack and its last
    phase to RUN_DIR/hang/ and exits 4, so the launcher and Slurm act. 0: max(10 x the median step, 600) once
    three steps are done. Before them, and during saves and evaluations, at least 1800."""
    straggler_ratio: float = 1.3
    """A rank whose time in a step phase exceeds this multiple of the ranks' median is the window's slow rank."""
    straggler_windows: int = 3
    """Warn when the same rank is the slow one for this many log windows in a row."""

    def __post_init__(self) -> None:
        _check_types(self, "faults.")
        _need(self.dist_timeout_s > 0, "faults.dist_timeout_s", self.dist_timeout_s, "must be > 0 seconds")
        _need(self.step_timeout_s >= 0, "faults.step_timeout_s", self.step_timeout_s, "must be >= 0 (0: automatic)")
        _need(self.straggler_ratio > 1, "faults.straggler_ratio", self.straggler_ratio, "must be > 1")
        _need(self.straggler_windows >= 1, "faults.straggler_windows", self.straggler_windows, "must be >= 1")


@dataclass
class PreflightConfig:
    """Checks of every rank's device, kernels and links before the first step (pretrain.preflight)."""

    enabled: bool = True
    """Run the preflight at the start of the job (`preflight: false` skips it); `python -m pretrain.preflight` runs
    it alone."""
    min_fraction: float = 0.7
    """A rank whose matmul TFLOP/s or all-reduce bandwidth is below this fraction of the ranks' median fails."""

    def __post_init__(self) -> None:
        _check_types(self, "preflight.")
        _need(0 < self.min_fraction <= 1, "preflight.min_fraction", self.min_fraction, "must be in (0, 1]")


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps (pretrain.profiling): traces in RUN_DIR/profile/."""

    enabled: bool = False
    """Profile this run (`profile: true` takes the defaults below)."""
    wait: int = 5
    """Steps before a window (after the start or the previous window)."""
    warmup: int = 2
    """Steps traced but discarded at the start of a window (the profiler's own start-up)."""
    active: int = 3
    """Steps recorded in a window."""
    repeat: int = 1
    """Windows in all (0: until the run ends)."""
    ranks: list = field(default_factory=lambda: [0])
    """Ranks that profile ([]: every rank)."""
    memory: bool = False
    """CUDA: record the allocation history over each window and on out-of-memory (a snapshot for memory_viz)."""

    def __post_init__(self) -> None:
        _check_types(self, "profile.")
        for n in ("wait", "warmup", "repeat"):
            _need(getattr(self, n) >= 0, f"profile.{n}", getattr(self, n), "must be >= 0")
        _need(self.active >= 1, "profile.active", self.active, "must be >= 1")
        _need(all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in self.ranks), "profile.ranks",
              self.ranks, "a list of rank numbers, e.g. [0] ([] for every rank)")


@dataclass
class RunConfig:
    """One pretraining run: what to train, on what, how long, and where its folder is."""

    model: str | dict = "debug"
    """Model preset name (ressformer.config.PRESETS), a model-config YAML path, or a full model-config mapping."""
    model_overrides: dict = field(default_factory=dict)
    """Dotted model keys applied to `model`, e.g. {asam.topk: 8} (`--set model.asam.topk=8` adds here)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the tokens come from: megatron prefixes, split, tokenizer (pretrain.data.DataConfig)."""
    run_dir: str = "runs/debug"
    """The run folder: checkpoints, metrics.jsonl, run_info.json, FINISHED (one job at a time: LOCK)."""
    seq_len: int = 128
    """Tokens per training sample (at least 2: the loss predicts token t+1 from token t)."""
    micro_batch: int = 4
    """Samples per rank per forward."""
    grad_accum: int = 1
    """Micro batches per optimizer step (global batch = micro_batch x grad_accum x world size)."""
    steps: int = 200
    """Optimizer steps of the whole run."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-4
    """Learning rate at the last step (the decay's floor)."""
    warmup_steps: int = 20
    """Linear warmup steps from lr / warmup_steps to lr."""
    decay: Literal["cosine", "linear", "wsd"] = "cosine"
    """cosine / linear: decay from lr to min_lr between warmup_steps and steps; wsd: warmup-stable-decay, lr held
    until the last decay_steps (or decay_fraction x steps) steps, then decay_shape down to min_lr."""
    decay_fraction: float = 0.2
    """wsd: the fraction of the run's steps that decay (when decay_steps is 0)."""
    decay_steps: int = 0
    """wsd: the number of steps that decay at the end of the run (0: decay_fraction x steps). A cool-down branch
    resumes a stable-phase checkpoint into a new run_dir with steps = its step + N and decay_steps = N."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    """wsd: the shape of the decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (two numbers in [0, 1))."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices; norms, biases and embeddings get 0."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0: off)."""
    seed: int = 1234
    """Seed of the initial weights, the data order and sampled K (0 <= seed < 2**32)."""
    activation_checkpointing: ActivationCheckpointing = field(default_factory=ActivationCheckpointing)
    """Recompute units in backward (enabled, every)."""
    compile: bool = False
    """torch.compile (inductor) each unit the model repeats, in place (CausalLM.compile_units: the recurrent step with
    its R2MU memory, each block); checkpoints are unchanged. The first step compiles. With expert parallelism (AutoEP,
    native MoE) the MoE layer stays eager inside the compiled step."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile's mode: reduce-overhead captures CUDA graphs (needs a step free of host syncs), max-autotune
    also searches matmul configurations."""
    compile_cpp_wrapper: bool = False
    """Inductor's C++ wrapper (torch.compile option cpp_wrapper): the code that calls the compiled kernels and library
    ops is generated as C++ instead of Python, which takes the per-call overhead out of every step. On 2 CPU threads
    the debug ReSSFormer step took 0.95x the time and the dense one 1.00x, and the first compile was no longer
    (bench/RESULTS.md). Only with compile_mode default (torch.compile takes a mode or options)."""
    sequence_parallel_size: int = 1
    """DeepSpeed-Ulysses sequence parallelism: P consecutive ranks share each sample, T/P tokens each outside
    attention, ASAM on n_heads/P heads over the whole sequence (ressformer.sequence_parallel); data parallelism runs
    over world_size / P groups, so the global batch is micro_batch x grad_accum x world_size / P samples. A training
    layout: checkpoints and the exported model are those of P = 1, and a run resumes with another P."""
    log_every: int = 10
    """Steps between metrics records (metrics.jsonl, wandb, the progress bar)."""
    save_every: int = 100
    """Steps between checkpoints (the last step and a stop signal save too)."""
    eval_every: int = 50
    """Steps between validation losses."""
    plot: bool = True
    """Draw RUN_DIR/metrics.png (python -m pretrain.plot) when the run ends (needs matplotlib)."""
    eval_iters: int = 4
    """Micro batches per rank in a validation (0: no validation)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Downstream tasks run on the consolidated model of a checkpoint during training (python -m pretrain.eval_tasks):
    'paper:NAME[@S1,S2]' (bench/paper's synthetic tasks, accuracy by input length: hops, set, table, reach, listops,
    noisy) and lm-eval task names (eval/tasks holds the offline ones). Rank 0 evaluates while the other ranks wait
    (within faults.dist_timeout_s); results go to metrics.jsonl as eval_tasks/<task>/<metric>, wandb and the plot.
    On a cluster, slurm/eval_checkpoint.sh runs them as a separate job instead."""
    eval_tasks_every: int = 1
    """Run eval_tasks at every N-th checkpoint that holds the model folder (every save_every x save_model_every x N
    steps) and at the last step."""
    eval_tasks_limit: int = 100
    """Examples per lm-eval task (0: all) and per setting of a paper task."""
    keep_last: int = 2
    """Complete checkpoints kept in the run folder (older ones are removed after each save)."""
    save_model_every: int = 1
    """Every N-th checkpoint also holds the consolidated fp32 model (model.safetensors, model_config.yaml, tokenizer/)
    that pretrain.convert, init_from and pretrain.evaluate read; 0: only the final one. It costs one gather of every
    parameter and 4 bytes per parameter on disk."""
    async_save: bool = True
    """Write a checkpoint's model folder and its manifest's hashes in a background thread of each rank while training
    goes on; the tag gets COMPLETE only when everything is on disk (a kill before leaves it incomplete and resume
    falls back). DeepSpeed's own files and the gather of the model stay on the critical path."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on a GPU with bf16, fp32 on CPU."""
    nan_max_consecutive: int = 5
    """Stop after this many micro batches in a row skipped for a non-finite loss."""
    nan_max_fraction: float = 0.01
    """Stop when more than this fraction of the run's micro batches (steps x grad_accum; at least nan_max_consecutive
    of them) were skipped for a non-finite loss in all: a storm with gaps. The training split holds spare samples
    for exactly this many skips, so the data never wraps."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (mode, project, name)."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Collective timeout, the hang watchdog and straggler detection."""
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    """Device, kernel and link checks before the first step (`preflight: false` skips them)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler traces of a window of steps (`profile: true` for the defaults)."""
    init_from: str | None = None
    """Continued pretraining: start from the weights of a model folder (a checkpoint tag, or a `python -m
    pretrain.convert --to-ressformer` folder) whose model_config.yaml equals this run's; a checkpoint found by
    --resume wins."""

    def __post_init__(self) -> None:
        _check_types(self)
        for n in ("seq_len", "micro_batch", "grad_accum", "steps", "log_every", "save_every", "eval_every",
                  "keep_last", "nan_max_consecutive"):
            _need(getattr(self, n) >= 1, n, getattr(self, n), "must be an integer >= 1")
        _need(self.seq_len >= 2, "seq_len", self.seq_len,
              "must be >= 2 (the loss predicts each token from the ones before it)")
        _need(self.eval_tasks_every >= 1, "eval_tasks_every", self.eval_tasks_every, "must be an integer >= 1")
        _need(self.eval_tasks_limit >= 0, "eval_tasks_limit", self.eval_tasks_limit, "must be >= 0 (0: all examples)")
        _need(all(isinstance(t, str) and t for t in self.eval_tasks), "eval_tasks", self.eval_tasks,
              "must be a list of task names, e.g. [paper:hops, ressformer_shakespeare_next_line]")
        for n in ("eval_iters", "warmup_steps"):
            _need(getattr(self, n) >= 0, n, getattr(self, n), "must be an integer >= 0")
        _need(self.save_model_every >= 0, "save_model_every", self.save_model_every,
              "must be an integer >= 0 (0: only the final checkpoint holds model.safetensors)")
        _need(self.lr > 0 and 0 <= self.min_lr <= self.lr, "lr", self.lr,
              f"need lr > 0 and 0 <= min_lr ({self.min_lr}) <= lr")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
              "two numbers in [0, 1), e.g. [0.9, 0.95]")
        _need(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _need(0 < self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "must be in (0, 1]")
        _need(0 <= self.decay_steps <= self.steps, "decay_steps", self.decay_steps,
              f"must be in [0, steps={self.steps}] (0: decay_fraction x steps)")
        _need(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0: off)")
        _need(self.eps > 0, "eps", self.eps, "must be > 0")
        _need(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32) (numpy's seed range)")
        _need(0 < self.nan_max_fraction <= 1, "nan_max_fraction", self.nan_max_fraction, "must be in (0, 1]")
        _need(self.sequence_parallel_size >= 1, "sequence_parallel_size", self.sequence_parallel_size,
              "must be an integer >= 1 (1: off)")
        _need(not (self.compile_cpp_wrapper and self.compile_mode != "default"), "compile_mode", self.compile_mode,
              "with compile_cpp_wrapper=true must be default: torch.compile takes a mode or options (the C++ wrapper "
              "is an option), not both; set compile_mode=default or compile_cpp_wrapper=false")
        self._model_config = self._resolve_model()  # not a field: equality and to_dict see only the inputs
        if self.sequence_parallel_size > 1:
            self._check_sequence_parallel()

    def _check_sequence_parallel(self) -> None:
        """The run-config side of sequence parallelism (`sequence_parallel_size`), before anything is built."""
        from ressformer.sequence_parallel import sequence_parallel_error, shard_error

        P, cfg = self.sequence_parallel_size, self._model_config
        err = sequence_parallel_error(cfg, P) or shard_error(cfg, self.seq_len, P)
        if err is None and self.data.document_mask:
            err = "data.document_mask=true with sequence_parallel_size > 1: not supported; set one of them off"
        if err is None and self.compile:
            err = ("compile=true with sequence_parallel_size > 1: the sequence exchange is not traced by torch.compile "
                   "here; set compile=false")
        if err:
            raise ValueError(err)

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel groups of a job of world_size ranks: world_size / sequence_parallel_size."""
        P = self.sequence_parallel_size
        if world_size % P:
            raise ValueError(f"sequence_parallel_size={P} must divide the world size {world_size}: launch a multiple "
                             f"of {P} ranks or lower sequence_parallel_size")
        return world_size // P

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
            base = base.replace(**dict(self.model_overrides))
        if self.data.document_mask and not base.causal:
            raise ValueError("data.document_mask=true needs a causal model (causal=true)")
        if self.seq_len > base.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model max_seq_len={base.max_seq_len}: lower seq_len or "
                             f"set model_overrides max_seq_len")
        return base

    # --- derived -------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        """The model config: `model` (preset, YAML path or dict) with `model_overrides` applied."""
        return self._model_config

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step on world_size ranks (each sequence-parallel group reads one per micro batch)."""
        return self.micro_batch * self.grad_accum * self.data_parallel_size(world_size)

    def ds_batch_fields(self, world_size: int) -> dict[str, int]:
        # DeepSpeed sees every rank as data-parallel (sequence parallelism is the model's: each rank's loss gives it
        # P times its share of the gradient, and DeepSpeed's mean over all ranks is the exact gradient)
        return {"train_batch_size": self.micro_batch * self.grad_accum * world_size,
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


SECTIONS = {"data": DataConfig, "activation_checkpointing": ActivationCheckpointing, "wandb": WandbConfig,
            "faults": FaultConfig, "preflight": PreflightConfig, "profile": ProfileConfig}


def load_run_config(path: str | Path | None, sets: list[str] | None = None) -> RunConfig:
    """Read the YAML at `path` (None = defaults) and apply `--set` overrides (module docstring)."""
    d = {}
    if path is not None:
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"--config {path}: no such file (the shipped run configs are in "
                             f"pretrain/configs/)") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path} is not valid YAML: {e}") from None
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
        else:  # a section (data, wandb, activation_checkpointing), or a model given as a dict
            *parents, leaf = rest.split(".")
            node = d.setdefault(head, {})
            for p in parents:
                node = node.setdefault(p, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {head}={d[head]!r} has no mapping to hold {rest!r}")
            node[leaf] = value
    return RunConfig.from_dict(d)


def describe() -> str:
    """Every run-config key with its type, default and meaning (`python -m pretrain.config`)."""
    lines = []

    def walk(cls, prefix: str) -> None:
        docs, hints = _field_docs(cls), typing.get_type_hints(cls)
        for f in fields(cls):
            tp = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(tp):
                lines.append(f"{prefix}{f.name}:  {docs.get(f.name, '')}")
                walk(tp, f"{prefix}{f.name}.")
                continue
            lines.append(f"{prefix}{f.name}: {_type_name(tp)} = {default!r}\n    {docs.get(f.name, '')}")

    walk(RunConfig, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
