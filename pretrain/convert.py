"""Checkpoint conversion for evaluation (issue 6): DeepSpeed checkpoint -> Hugging Face folder, and back.

    python -m pretrain.convert --checkpoint RUN_DIR[/TAG] --out HF_DIR [--dtype fp32|bf16] [--max-shard-size 2GB]
    python -m pretrain.convert --to-ressformer --checkpoint HF_DIR --out INIT_DIR     # for continued pretraining

Design choices
- One CPU process reads every rank's files. Only safe loaders touch the files: `safetensors`, and
  `torch.load(weights_only=True)` for DeepSpeed's `.pt` files. The few non-tensor globals DeepSpeed pickles
  into optimizer files (a loss-scaler object, the ZeRO-stage enum, a fragment-address record) are mapped
  to inert local placeholders with `torch.serialization.safe_globals([(placeholder, "deepspeed...Name")])`:
  no DeepSpeed code runs while unpickling and nothing else is allowlisted.
- Weights are the fp32 master copies in the ZeRO optimizer partitions (the module copy may be bf16):
  ZeRO-1/2 `single_partition_of_fp32_groups` (one flat vector per param group and rank, cut by the
  `param_shapes` record and `param_alignment_paddings`), ZeRO-3 `fp32_flat_groups` (each parameter split
  into ceil(numel / world) slices, one per rank, in `param_shapes` order). The same layout
  `deepspeed.utils.zero_to_fp32` reads, re-implemented here because that script unpickles with
  weights_only=False and has no expert support.
- Completeness is checked, never assumed: every rank's file must be present and readable (a truncated
  file names itself), the world size recorded in the model-state files and in each optimizer file must
  equal the number of files, every flat partition must be consumed exactly, and the result must hold
  exactly the keys and shapes of the model built (on the meta device) from the checkpoint's own model
  config. Any gap raises `CheckpointError` naming what is missing.
- Expert shards, mapped to our fused `[E, 2F, D]` / `[E, D, F]` params by E2's layout functions
  (`pretrain.expert_parallel.from_native_layout` / `from_autoep_layout`, one copy of that mapping):
  * native DeepSpeed MoE (ZeRO-1/2, `native_moe` block in the saved DeepSpeed config): expert param groups
    are partitioned over the expert-data-parallel ranks {r : r % ep_size == e} of each EP rank e (their
    `partition_count` is world / ep_size), so each EP rank's local experts are rebuilt from its own ranks;
    every `layer_{L}_expert_{E}_mp_rank_00_model_states.pt` must exist and agree with its fp32 master.
  * AutoEP ZeRO-3 (the `ds_autoep_layers` record in each rank's model-state file): expert groups
    (`experts.w1/w2/w3`, local shapes) are ZeRO-3-partitioned over the expert-data-parallel ranks of each
    EP rank (placement read from the record, contiguous experts per EP rank checked); other groups over all
    ranks. `zero_to_fp32` refuses these checkpoints.
  Expert files without a native-MoE record are refused (unknown layout), never skipped.
- Export: safetensors shards (`huggingface_hub.split_torch_state_dict_into_shards`, index json above one
  shard), `config.json` (RessformerConfig with the verbatim ModelConfig dict), `generation_config.json`,
  the tokenizer (sentencepiece model + remote-code RessformerTokenizer) and the model code: the files of
  pretrain/hf plus every `ressformer/**/*.py` copied as `ressformer_<name>.py` (subpackages flattened:
  `kernels/asam_triton.py` -> `ressformer_kernels_asam_triton.py`) with `from ressformer.x.y import` rewritten to
  `from .ressformer_x_y import`, so transformers' remote-code loader finds all of it in the
  folder and no ressformer install is needed. Tied embeddings are stored once (`lm_head.weight` dropped,
  `tie_word_embeddings` set), the transformers convention. `use_cache` is on: generate() decodes with the
  model's cache (pretrain/hf/modeling_ressformer.py).
- BOS is EOS in the export (tokenizer `bos_token`, `bos_token_id` of config.json / generation_config.json):
  pretraining documents end with EOS and none starts with BOS, so a text starts, as every document after the
  first did, after an EOS. lm-eval prefixes its loglikelihood windows with the tokenizer's BOS (HFLM
  `prefix_token_id`), so its default run conditions on EOS with no extra flag; generate() without a prompt starts
  from EOS. Nothing adds the token to encoded text (`add_bos_token` False).
- Reverse (`--to-ressformer`): HF folder -> `model.safetensors` with our keys and the stored dtype,
  `model_config.yaml`, `tokenizer/`: `load_init_state(dir)` returns (ModelConfig, state_dict) for the
  trainer's `initialize(..., init_state=)`. HF -> ours -> HF is bitwise. The folder may also be one that
  transformers' `save_pretrained` wrote from a loaded export (the tokenizer's save keeps both of its files).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
HF_CODE_DIR = Path(__file__).resolve().parent / "hf"
COMPLETE = "COMPLETE"  # the trainer's completeness marker (pretrain/trainer.py)
INIT_WEIGHTS = "model.safetensors"
INIT_CONFIG = "model_config.yaml"
TOKENIZER_FILES = ("tokenizer.model", "ressformer_tokenizer.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be converted completely (missing / truncated / inconsistent files)."""


# --- safe loading of DeepSpeed files --------------------------------------------------------------
class _Opaque:
    """Inert stand-in for a DeepSpeed object pickled into a checkpoint (loss scaler, fragment address)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.__dict__["state"] = state


class _IntEnum(int):
    """Stand-in for DeepSpeed's ZeroStageEnum (an int enum pickled as a call with its value)."""


_DS_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": None,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": None,
    "deepspeed.utils.tensor_fragment.fragment_address": None,
    "deepspeed.runtime.zero.config.ZeroStageEnum": _IntEnum,
}


def _safe_globals() -> list:
    out = []
    for name, cls in _DS_GLOBALS.items():
        out.append((cls or type(name.rsplit(".", 1)[1], (_Opaque,), {}), name))
    return out


def load_ds_file(path: Path) -> dict:
    """torch.load(weights_only=True) with the DeepSpeed placeholders; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, unknown global
        raise CheckpointError(f"cannot read {path} ({path.stat().st_size} bytes): {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}. The file is truncated, corrupt or not a DeepSpeed "
                              f"checkpoint file: copy it again or convert an earlier complete tag") from e


# --- locating a checkpoint ------------------------------------------------------------------------
def resolve_tag(path: str | Path) -> Path:
    """RUN_DIR -> its newest complete tag (the one `latest` names if complete); TAG -> itself if complete."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(p)!r} is not a folder: give RUN_DIR or RUN_DIR/TAG")
    if any(p.glob("*model_states.pt")):
        if not (p / COMPLETE).is_file():
            raise CheckpointError(f"{p} has no {COMPLETE} marker: its save did not finish on every rank; "
                                  f"convert an earlier tag (RUN_DIR picks the newest complete one)")
        return p
    tags = [d for d in p.iterdir() if d.is_dir() and (d / COMPLETE).is_file() and any(d.glob("*model_states.pt"))]
    if not tags:
        raise CheckpointError(f"no complete checkpoint (a sub-folder holding *_model_states.pt and {COMPLETE}) "
                              f"in {p}")
    latest = p / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if (p / name / COMPLETE).is_file():
            return p / name

    def step_of(d: Path) -> tuple:
        m = re.search(r"(\d+)$", d.name)
        return (int(m.group(1)) if m else -1, d.stat().st_mtime)

    return max(tags, key=step_of)


def _rank_files(tag: Path, pattern: str, what: str) -> dict[int, Path]:
    rx = re.compile(pattern)
    out = {}
    for f in tag.iterdir():
        m = rx.fullmatch(f.name)
        if m:
            out[int(m.group(1))] = f
    return out


def _expect_ranks(files: dict[int, Path], world: int, name_fmt: str, tag: Path, record: str) -> list[Path]:
    missing = [name_fmt.format(r) for r in range(world) if r not in files]
    extra = sorted(r for r in files if r >= world)
    if missing:
        raise CheckpointError(f"{tag}: the checkpoint records data-parallel world size {world} ({record}) but "
                              f"these rank files are missing: {missing}. Copy them from the training run's "
                              f"storage, or convert an earlier complete tag")
    if extra:
        raise CheckpointError(f"{tag}: files for ranks {extra} exist but the checkpoint records world size "
                              f"{world} ({record}): the record or the folder was altered (mixed saves?)")
    return [files[r] for r in range(world)]


# --- reconstruction -------------------------------------------------------------------------------
def _shapes(param_shapes) -> list[dict[str, torch.Size]]:
    groups = param_shapes if isinstance(param_shapes, list) else [param_shapes]
    return [{k: torch.Size(v) for k, v in g.items()} for g in groups]


def _cut_group(full: torch.Tensor, shapes: dict[str, torch.Size], pads: list[int], n_parts: int, where: str) -> dict:
    """Cut one param group's merged flat fp32 vector into its parameters (the ZeRO-1/2 layout)."""
    out, off = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        if off + n > full.numel():
            raise CheckpointError(f"{where}: {name} {tuple(shape)} needs elements [{off}, {off + n}) but the "
                                  f"{n_parts} partitions hold only {full.numel()}: a partition is missing or the "
                                  f"world size record is wrong")
        out[name] = full[off:off + n].view(shape).clone()
        off += n + pads[i]
    align = 2 * n_parts  # DeepSpeed pads each group's flat buffer to a multiple of 2 * partitions
    if math.ceil(off / align) * align != math.ceil(full.numel() / align) * align:
        raise CheckpointError(f"{where}: the recorded shapes use {off} elements but the partitions hold "
                              f"{full.numel()}: world size or shapes do not match the files")
    return out


def _merge_zero12(optim: list[dict], groups: list[dict[str, torch.Size]], world: int, tag: Path,
                  ep_size: int = 1) -> tuple[dict, list[dict]]:
    """-> (replicated params, [expert params of EP rank e (local names)] for e < ep_size).

    A param group whose partition_count equals the world size is partitioned over all ranks (rank order);
    a native-MoE expert group (partition_count = world / ep_size) is partitioned over the expert-data-parallel
    ranks {r : r % ep_size == e} of each EP rank e, and each EP rank holds different experts.
    """
    flats = [o["optimizer_state_dict"]["single_partition_of_fp32_groups"] for o in optim]
    osd0 = optim[0]["optimizer_state_dict"]
    paddings = osd0.get("param_alignment_paddings")
    pcs = osd0.get("partition_count")
    pcs = pcs if isinstance(pcs, list) else [pcs] * len(groups)
    if any(len(f) != len(groups) for f in flats) or len(pcs) != len(groups):
        raise CheckpointError(f"{tag}: optimizer files hold {[len(f) for f in flats]} param groups, the model "
                              f"state records {len(groups)}")
    sd, experts = {}, [{} for _ in range(ep_size)]
    for g, shapes in enumerate(groups):
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        pc = int(pcs[g])
        if pc == world:
            sd.update(_cut_group(torch.cat([f[g].float() for f in flats]), shapes, pads, pc, f"{tag} group {g}"))
        elif ep_size > 1 and pc * ep_size == world:
            for e in range(ep_size):
                ranks = [r for r in range(world) if r % ep_size == e]
                full = torch.cat([flats[r][g].float() for r in ranks])
                experts[e].update(_cut_group(full, shapes, pads, pc, f"{tag} expert group {g}, EP rank {e}"))
        else:
            raise CheckpointError(f"{tag}: param group {g} is partitioned over {pc} ranks, neither the world size "
                                  f"{world} nor world / ep_size ({ep_size}): inconsistent world size records")
    return sd, experts


def _native_expert_files(tag: Path, m0: dict, num_experts: int) -> list[Path]:
    """Every `layer_{L}_expert_{E}_mp_rank_00_model_states.pt` must exist (L < MoE layers, E < num_experts)."""
    files = {(int(m.group(1)), int(m.group(2))): f for f in tag.iterdir()
             if (m := re.fullmatch(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt", f.name))}
    n_layers = len({k.split(".mlp.")[0] for k in m0["module"] if ".mlp.moe.deepspeed_moe.gate.wg." in k})
    missing = [f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(n_layers)
               for e in range(num_experts) if (l, e) not in files]
    if missing:
        raise CheckpointError(f"{tag}: native-MoE expert files missing ({len(missing)} of {n_layers * num_experts}): "
                              f"{missing[:8]}. Every expert of every MoE layer must be present")
    return [files[k] for k in sorted(files)]


def _cut_zero3(parts: list[torch.Tensor], shapes: dict[str, torch.Size], where: str) -> dict:
    """ZeRO-3 layout: each parameter is split into ceil(numel / n) elements per rank, in `shapes` order."""
    n = len(parts)
    parts = [t.float().reshape(-1) for t in parts]
    sizes = [t.numel() for t in parts]
    if len(set(sizes)) != 1:
        raise CheckpointError(f"{where}: rank partitions have unequal sizes {sizes}: a rank file is truncated or "
                              f"comes from another save")
    out, off = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / n)
        if off + part > sizes[0]:
            raise CheckpointError(f"{where}: {name} {tuple(shape)} needs per-rank elements [{off}, {off + part}) but "
                                  f"each partition holds {sizes[0]}: world size {n} does not match the files")
        out[name] = torch.cat([t[off:off + part] for t in parts])[:numel].view(shape).clone()
        off += part
    if off != sizes[0]:
        raise CheckpointError(f"{where}: the recorded shapes use {off} of the {sizes[0]} elements per partition: "
                              f"world size {n} or shapes do not match the files")
    return out


_AUTOEP_EXPERT = re.compile(r".*\.experts\.w[123]")


def _autoep_ranks(models: list[dict], tag: Path) -> list[dict] | None:
    """Per rank {ep_rank, edp_rank, edp_world, ep_size, n_local} from DeepSpeed's `ds_autoep_layers` record."""
    if not any(m.get("ds_autoep_layers") for m in models):
        return None
    out = []
    for r, m in enumerate(models):
        layers = m.get("ds_autoep_layers") or []
        if not layers:
            raise CheckpointError(f"{tag}: rank {r}'s model-state file lacks the ds_autoep_layers record rank 0 has")
        recs = {(L["ep_rank"], L["expert_data_parallel_rank"], L["expert_data_parallel_world_size"], L["ep_size"],
                 L["num_local_experts"], L["global_expert_start"], L.get("checkpoint_format")) for L in layers}
        if len(recs) != 1:
            raise CheckpointError(f"{tag}: rank {r}: AutoEP layers disagree on the expert placement {sorted(recs)}")
        ep_rank, edp_rank, edp_world, ep_size, n_local, start, fmt = recs.pop()
        if fmt != "zero3_partitioned" or start != ep_rank * n_local:
            raise CheckpointError(f"{tag}: rank {r}: unsupported AutoEP checkpoint layout (format {fmt!r}, first "
                                  f"expert {start} for EP rank {ep_rank} of {n_local} local experts)")
        out.append({"ep_rank": ep_rank, "edp_rank": edp_rank, "edp_world": edp_world, "ep_size": ep_size,
                    "n_local": n_local})
    return out


def _merge_zero3(optim: list[dict], models: list[dict], world: int, tag: Path) -> tuple[dict, list[dict] | None]:
    """-> (replicated params, per-EP-rank AutoEP expert shards or None), group by group."""
    groups = _shapes(models[0]["param_shapes"])
    for r, m in enumerate(models[1:], 1):
        if _shapes(m["param_shapes"]) != groups:
            raise CheckpointError(f"{tag}: rank {r}'s param_shapes differ from rank 0's: files from different saves")
    flats = [o["optimizer_state_dict"]["fp32_flat_groups"] for o in optim]
    if any(len(f) != len(groups) for f in flats):
        raise CheckpointError(f"{tag}: optimizer files hold {[len(f) for f in flats]} param groups, the model "
                              f"state records {len(groups)}")
    placement = _autoep_ranks(models, tag)
    sd = {}
    experts = None if placement is None else [{} for _ in range(placement[0]["ep_size"])]
    for g, shapes in enumerate(groups):
        is_expert = [bool(_AUTOEP_EXPERT.fullmatch(n)) for n in shapes]
        if placement is None or not any(is_expert):
            sd.update(_cut_zero3([f[g] for f in flats], shapes, f"{tag} group {g}"))
            continue
        if not all(is_expert):
            raise CheckpointError(f"{tag}: param group {g} mixes AutoEP expert and other params")
        for e in range(len(experts)):
            ranks = sorted((r for r in range(world) if placement[r]["ep_rank"] == e),
                           key=lambda r: placement[r]["edp_rank"])
            want = placement[0]["edp_world"]
            if len(ranks) != want or [placement[r]["edp_rank"] for r in ranks] != list(range(want)):
                raise CheckpointError(f"{tag}: the experts of EP rank {e} should be partitioned over {want} ranks but "
                                      f"the files hold them on ranks {ranks}: expert shards are missing")
            experts[e].update(_cut_zero3([flats[r][g] for r in ranks], shapes, f"{tag} expert group {g}, EP rank {e}"))
    frozen = models[0].get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        frags = [m["frozen_param_fragments"][name].reshape(-1).float() for m in models]
        sd[name] = torch.cat(frags)[:math.prod(shape)].view(torch.Size(shape)).clone()
    return sd, experts


def _refuse_expert_shards(tag: Path, first_model_state: dict) -> None:
    """Expert files without the native-MoE record in the DeepSpeed config: layout unknown, refuse."""
    expert_files = sorted(tag.glob("layer_*_expert_*_mp_rank_*_model_states.pt"))
    if expert_files:
        raise CheckpointError(f"{tag} holds {len(expert_files)} native DeepSpeed MoE expert files "
                              f"({expert_files[0].name}, ...) but its DeepSpeed config has no enabled 'native_moe' "
                              f"block (pretrain.expert_parallel): the expert layout is unknown, refusing to write a "
                              f"model with missing experts")


def _gather_native(tag: Path, m0: dict, sd: dict, experts: list[dict], model_cfg: dict) -> dict:
    """Native DeepSpeed-MoE (ZeRO-1/2): fp32 expert masters of every EP rank -> our fused expert params.

    The expert files are required too (one per layer and global expert): their weights (training dtype) must
    agree with the fp32 masters to bf16 precision, which catches files from another save.
    """
    from pretrain.expert_parallel import from_native_layout

    num_experts = int(model_cfg["moe"]["num_experts"])
    files = _native_expert_files(tag, m0, num_experts)
    n_local = num_experts // len(experts)
    rx = re.compile(r"(.*deepspeed_experts\.)(\d+)(\..*)")
    for f in files:
        for k, v in load_ds_file(f).items():
            m = rx.fullmatch(k)
            e_global = int(m.group(2))
            local = f"{m.group(1)}{e_global % n_local}{m.group(3)}"
            master = experts[e_global // n_local].get(local)
            if master is None:
                raise CheckpointError(f"{f}: {k} has no fp32 master in the optimizer partitions of EP rank "
                                      f"{e_global // n_local} (local name {local})")
            if master.shape != v.shape or not torch.allclose(master, v.float(), rtol=1e-2, atol=1e-2):
                raise CheckpointError(f"{f}: {k} disagrees with its fp32 master in the optimizer partitions: the "
                                      f"expert file comes from another save")
    return from_native_layout([{**sd, **experts[0]}] + experts[1:])


def read_deepspeed_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (fp32 state_dict with our keys, model-config dict, info) for RUN_DIR or RUN_DIR/TAG."""
    tag = resolve_tag(path)
    mp = sorted(tag.glob("*mp_rank_*_model_states.pt"))
    tp = {re.search(r"mp_rank_(\d+)", f.name).group(1) for f in mp if not f.name.startswith("layer_")}
    if tp - {"00"}:
        raise CheckpointError(f"{tag}: model-parallel ranks {sorted(tp)} found; this model has no tensor "
                              f"parallelism, only mp_rank_00 is supported")
    zero3_models = _rank_files(tag, r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt", "model states")
    if zero3_models:
        m0 = load_ds_file(zero3_models.get(0, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    else:
        m0 = load_ds_file(tag / "mp_rank_00_model_states.pt")
    model_cfg = m0.get("model_config")
    if model_cfg is None and (tag / "run_config.json").is_file():
        model_cfg = json.loads((tag / "run_config.json").read_text()).get("model_config")
    if model_cfg is None:
        raise CheckpointError(f"{tag}: no 'model_config' in the client state nor in run_config.json: not a "
                              f"checkpoint written by pretrain/main.py")
    stage = int(((m0.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    world = int(m0.get("dp_world_size", 1))
    record = f"dp_world_size in the model-state file, stage {stage}"
    native = ((m0.get("ds_config") or {}).get("native_moe") or {})
    ep_size = int(native.get("ep_size", 1)) if native.get("enabled") else 1
    if not native.get("enabled"):
        _refuse_expert_shards(tag, m0)

    if stage == 0:
        sd = {k: v.float().clone() for k, v in m0["module"].items()}
    else:
        ofiles = _expect_ranks(_rank_files(tag, r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt", "optim"), world,
                               "zero_pp_rank_{}_mp_rank_00_optim_states.pt", tag, record)
        optim = [load_ds_file(f) for f in ofiles]
        for f, o in zip(ofiles, optim):
            osd = o.get("optimizer_state_dict", {})
            pc = osd.get("partition_count")
            pcs = pc if isinstance(pc, list) else [pc]
            if any(int(p) != world and int(p) * ep_size != world for p in pcs) or int(pcs[0]) != world:
                raise CheckpointError(f"{f} records partition_count={pc} but the checkpoint's world size record "
                                      f"is {world} ({record}): files from saves with different world sizes")
            if int(osd.get("zero_stage", stage)) != stage:
                raise CheckpointError(f"{f} records zero_stage={int(osd['zero_stage'])}, the model state says {stage}")
        if stage in (1, 2):
            sd, experts = _merge_zero12(optim, _shapes(m0["param_shapes"]), world, tag, ep_size)
            if native.get("enabled"):
                sd = _gather_native(tag, m0, sd, experts, model_cfg)
        elif stage == 3:
            mfiles = _expect_ranks(zero3_models, world, "zero_pp_rank_{}_mp_rank_00_model_states.pt", tag, record)
            models = [m0] + [load_ds_file(f) for f in mfiles[1:]]
            for f, m in zip(mfiles, models):
                if int(m.get("dp_world_size", world)) != world:
                    raise CheckpointError(f"{f} records dp_world_size={m['dp_world_size']}, rank 0 records {world}")
            sd, experts = _merge_zero3(optim, models, world, tag)
            if experts is not None:
                from pretrain.expert_parallel import from_autoep_layout

                for alias, src in (m0.get("shared_params") or {}).items():
                    sd.pop(alias, None)
                sd = from_autoep_layout([{**sd, **experts[0]}] + experts[1:])
        else:
            raise CheckpointError(f"{tag}: unknown ZeRO stage {stage}")
        for name in m0.get("buffer_names") or []:
            if name in (m0.get("module") or {}):
                sd[name] = m0["module"][name].clone()
        for alias, src in (m0.get("shared_params") or {}).items():
            if src in sd:
                sd[alias] = sd[src]
    info = {"tag": str(tag), "zero_stage": stage, "world_size": world, "ds_version": m0.get("ds_version"),
            "step": m0.get("step"), "run_config": m0.get("run_config")}
    return sd, model_cfg, info


# --- validation against the model -------------------------------------------------------------------
def expected_state(model_cfg) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """Keys -> shapes of the model built from `model_cfg` on the meta device, and tied aliases {alias: source}."""
    from ressformer import build_model
    from ressformer.config import ModelConfig

    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    with torch.device("meta"):
        m = build_model(cfg)
    sd = m.state_dict(keep_vars=True)
    first, tied = {}, {}
    for k, v in sd.items():
        if id(v) in first:
            tied[k] = first[id(v)]
        else:
            first[id(v)] = k
    return {k: v.shape for k, v in sd.items()}, tied


def check_complete(sd: dict[str, torch.Tensor], model_cfg, where: str) -> dict[str, torch.Tensor]:
    """Exactly the model's keys and shapes, or CheckpointError naming the difference."""
    shapes, tied = expected_state(model_cfg)
    for alias, src in tied.items():
        if alias not in sd and src in sd:
            sd[alias] = sd[src]
    missing = [k for k in shapes if k not in sd]
    extra = [k for k in sd if k not in shapes]
    bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(s)}" for k, s in shapes.items() if k in sd and sd[k].shape != s]
    if missing or extra or bad:
        experts = sorted({k.rsplit(".mlp.", 1)[0] for k in missing if ".mlp." in k})
        raise CheckpointError(
            f"{where} does not match the model its config describes: {len(missing)} missing "
            f"{missing[:12]}{' ...' if len(missing) > 12 else ''}"
            + (f" (MoE / MLP weights of {experts} absent: expert shards not found)" if experts else "")
            + f"; {len(extra)} unexpected {extra[:8]}; {len(bad)} shape mismatches {bad[:8]}")
    return {k: sd[k] for k in shapes}


# --- Hugging Face export ----------------------------------------------------------------------------
_IMPORT_RX = re.compile(r"^(\s*)(from|import)\s+(ressformer|pretrain)\b(\S*)(.*)$")


def rewrite_imports(src: str, filename: str) -> str:
    """`from ressformer.x import` -> `from .ressformer_x import`; `from pretrain.hf.y import` -> `from .y import`."""
    out = []
    for line in src.splitlines(keepends=True):
        m = _IMPORT_RX.match(line)
        if m:
            indent, kw, pkg, sub, rest = m.groups()
            if kw == "from" and pkg == "ressformer" and sub == "" and rest.lstrip().startswith("import"):
                line = f"{indent}from .ressformer_package{rest}\n"
            elif kw == "from" and pkg == "ressformer" and re.fullmatch(r"(\.\w+)+", sub):
                line = f"{indent}from .{_flat_name(sub[1:].split('.'))[:-3]}{rest}\n"
            elif kw == "from" and pkg == "pretrain" and re.fullmatch(r"\.hf\.\w+", sub):
                line = f"{indent}from .{sub[4:]}{rest}\n"
            else:
                raise ValueError(f"{filename}: cannot rewrite import line {line.strip()!r} for the export folder: "
                                 f"use `from ressformer.<module> import <name>` in the model package")
        out.append(line)
    return "".join(out)


def _flat_name(parts: list[str]) -> str:
    """Module path inside ressformer -> its file in the flat export folder: [] (the package) ->
    ressformer_package.py, ["config"] -> ressformer_config.py, ["kernels", "asam_triton"] ->
    ressformer_kernels_asam_triton.py (a subpackage's __init__: ressformer_kernels.py)."""
    return "ressformer_" + ("_".join(parts) if parts else "package") + ".py"


def write_code(out: Path) -> list[str]:
    """Copy the model code (pretrain/hf + ressformer/**/*.py, imports made relative) into `out`."""
    import ressformer

    written = []
    pkg = Path(ressformer.__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        name = _flat_name([p for p in f.relative_to(pkg).with_suffix("").parts if p != "__init__"])
        (out / name).write_text(rewrite_imports(f.read_text(), str(f)))
        written.append(name)
    for name in ("configuration_ressformer.py", "modeling_ressformer.py", "tokenization_ressformer.py"):
        (out / name).write_text(rewrite_imports((HF_CODE_DIR / name).read_text(), name))
        written.append(name)
    return written


def write_tokenizer(tok_dir: Path, out: Path) -> None:
    """sentencepiece files + remote-code RessformerTokenizer config (AutoTokenizer, trust_remote_code=True)."""
    if str(REPO) not in sys.path:  # the repo's tokenizer package (not part of the export)
        sys.path.append(str(REPO))
    from tokenizer import Tokenizer

    tok = Tokenizer(tok_dir)  # validates the folder (model and metadata agree)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / name, out / name)
    piece = tok.id_to_piece
    cfg = {"tokenizer_class": "RessformerTokenizer",
           "auto_map": {"AutoTokenizer": ["tokenization_ressformer.RessformerTokenizer", None]},
           "vocab_file": "tokenizer.model", "bos_token": piece(tok.eos_id), "eos_token": piece(tok.eos_id),
           "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id), "add_bos_token": False,
           "add_eos_token": False, "split_special_tokens": True, "padding_side": "right",
           "model_max_length": 10 ** 9, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))


def _parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", s.upper())
    if not m:
        raise ValueError(f"--max-shard-size {s!r}: write e.g. 2GB, 500MB or a byte count")
    mult = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * mult)


def export_hf(sd: dict[str, torch.Tensor], model_cfg, out: str | Path, dtype: str = "fp32",
              max_shard_size: str | int = "2GB", tokenizer_dir: str | Path | None = None,
              num_steps: int | None = None) -> Path:
    """Write a transformers folder for `sd` (our keys, complete) and `model_cfg`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from ressformer.config import ModelConfig

    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype={dtype!r}: choose fp32 or bf16")
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    sd = check_complete(dict(sd), cfg, "state dict to export")
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # tied: stored once, re-tied by transformers (tie_word_embeddings)
    sd = {k: v.detach().to(tdtype).contiguous().clone() for k, v in sd.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=_parse_size(max_shard_size))
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    write_code(out)
    hf_cfg = {"architectures": ["RessformerForCausalLM"], "model_type": "ressformer",
              "auto_map": {"AutoConfig": "configuration_ressformer.RessformerConfig",
                           "AutoModelForCausalLM": "modeling_ressformer.RessformerForCausalLM"},
              "ressformer": cfg.to_dict(), "num_steps": num_steps, "dtype": "float32" if dtype == "fp32" else "bfloat16",
              "tie_word_embeddings": bool(cfg.tie_embeddings), "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_heads,
              "max_position_embeddings": cfg.max_seq_len, "use_cache": True}
    gen = {"use_cache": True, "do_sample": False}
    if tokenizer_dir is not None:
        write_tokenizer(Path(tokenizer_dir), out)
        meta = json.loads((Path(tokenizer_dir) / "ressformer_tokenizer.json").read_text())
        for k, src in (("bos", "eos"), ("eos", "eos"), ("pad", "pad")):  # BOS is EOS (module docstring)
            hf_cfg[f"{k}_token_id"] = gen[f"{k}_token_id"] = meta[f"{src}_id"]
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


# --- HF -> ours -------------------------------------------------------------------------------------
def read_safetensors_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    if index.is_file():
        wmap = json.loads(index.read_text())["weight_map"]
        files = sorted(set(wmap.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise CheckpointError(f"{d}: shards {missing} named in model.safetensors.index.json are missing")
    elif (d / "model.safetensors").is_file():
        wmap, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{d} holds no model.safetensors nor model.safetensors.index.json")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(d / f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {d / f}: {type(e).__name__}: {e} (truncated or corrupt)") from e
    if wmap is not None:
        absent = [k for k in wmap if k not in sd]
        if absent:
            raise CheckpointError(f"{d}: tensors {absent[:8]} listed in the index are not in their shard files")
    return sd


def read_hf(hf_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict, int | None]:
    """-> (state_dict with our keys, model-config dict, num_steps) from an exported folder."""
    d = Path(hf_dir)
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("model_type") != "ressformer" or "ressformer" not in cfg:
        raise CheckpointError(f"{d}/config.json is not a ReSSFormer export (model_type={cfg.get('model_type')!r})")
    sd = check_complete(read_safetensors_dir(d), cfg["ressformer"], str(d))
    return sd, cfg["ressformer"], cfg.get("num_steps")


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Write OUT/model.safetensors (our keys, stored dtype), OUT/model_config.yaml and OUT/tokenizer/."""
    from safetensors.torch import save_file

    from ressformer.config import ModelConfig

    sd, mcfg, _ = read_hf(hf_dir)
    present = [n for n in TOKENIZER_FILES if (Path(hf_dir) / n).is_file()]
    if present and len(present) < len(TOKENIZER_FILES):
        missing = sorted(set(TOKENIZER_FILES) - set(present))
        raise CheckpointError(f"{hf_dir} holds {present} but not {missing}: the tokenizer cannot be rebuilt; copy "
                              f"{missing} from the original export (or remove {present} to convert without one)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, tied = expected_state(mcfg)
    save_file({k: v.contiguous() for k, v in sd.items() if k not in tied}, str(out / INIT_WEIGHTS),
              metadata={"format": "pt"})
    ModelConfig.from_dict(mcfg).to_yaml(out / INIT_CONFIG)
    if present:
        (out / "tokenizer").mkdir(exist_ok=True)
        for n in TOKENIZER_FILES:
            shutil.copyfile(Path(hf_dir) / n, out / "tokenizer" / n)
    return out


def load_init_state(init_dir: str | Path):
    """(ModelConfig, state_dict) from an `--to-ressformer` folder: pass to trainer.initialize(init_state=)."""
    from safetensors.torch import load_file

    from ressformer.config import ModelConfig

    d = Path(init_dir)
    cfg = ModelConfig.from_yaml(d / INIT_CONFIG)
    sd = check_complete(load_file(str(d / INIT_WEIGHTS)), cfg, str(d))
    return cfg, sd


def read_any(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """A DeepSpeed RUN_DIR/TAG or an `--to-ressformer` folder -> (state_dict, model-config dict, info)."""
    p = Path(path)
    if (p / INIT_CONFIG).is_file() and (p / INIT_WEIGHTS).is_file():
        cfg, sd = load_init_state(p)
        return sd, cfg.to_dict(), {"tag": str(p), "zero_stage": None}
    sd, mcfg, info = read_deepspeed_checkpoint(p)
    return check_complete(sd, mcfg, info["tag"]), mcfg, info


def _find_tokenizer(info: dict, path: Path) -> Path | None:
    cands = []
    if (path / "tokenizer").is_dir():
        cands.append(path / "tokenizer")
    tok = (((info.get("run_config") or {}).get("data")) or {}).get("tokenizer")
    if tok:
        cands += [Path(tok), REPO / tok]
    for c in cands:
        if all((c / n).is_file() for n in TOKENIZER_FILES):
            return c
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="RUN_DIR (newest complete tag), RUN_DIR/TAG, an --to-ressformer folder, or (with "
                         "--to-ressformer) an HF folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype of the HF export")
    ap.add_argument("--max-shard-size", default="2GB", help="safetensors shard size limit (e.g. 2GB, 500MB)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder (default: the run config's data.tokenizer, or CHECKPOINT/tokenizer)")
    ap.add_argument("--no-tokenizer", action="store_true", help="export without tokenizer files")
    ap.add_argument("--num-steps", type=int, default=None,
                    help="default recurrent steps K of the exported model (default: the training r2mu.steps)")
    ap.add_argument("--to-ressformer", action="store_true",
                    help="reverse direction: HF folder -> model.safetensors + model_config.yaml for continued "
                         "pretraining")
    a = ap.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    try:
        if a.to_ressformer:
            out = import_hf(a.checkpoint, a.out)
            tok = "tokenizer/" if (out / "tokenizer").is_dir() else f"no tokenizer ({a.checkpoint} has none)"
            print(f"[convert] wrote {out}/{INIT_WEIGHTS}, {INIT_CONFIG} and {tok}")
            return 0
        sd, mcfg, info = read_any(a.checkpoint)
        tok = None
        if not a.no_tokenizer:
            tok = Path(a.tokenizer) if a.tokenizer else _find_tokenizer(info, Path(a.checkpoint))
            if tok is None:
                raise CheckpointError("no tokenizer folder found (run config data.tokenizer): pass --tokenizer DIR "
                                      "or --no-tokenizer")
        out = export_hf(sd, mcfg, a.out, dtype=a.dtype, max_shard_size=a.max_shard_size, tokenizer_dir=tok,
                        num_steps=a.num_steps)
    except CheckpointError as e:
        print(f"[convert] error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in sd.values())
    print(f"[convert] {info['tag']} (ZeRO stage {info['zero_stage']}, world {info.get('world_size')}): "
          f"{len(sd)} tensors, {n} elements -> {out} ({a.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
