"""Recovery of fp32 weights from DeepSpeed's own checkpoint shard files.

For checkpoints written before tags carried the consolidated model folder (`pretrain.model_dir`), and for a tag
whose `model.safetensors` is damaged: `python -m pretrain.convert` falls back to this reader when a complete tag
holds no model.safetensors, and `--from-shards` forces it. Resuming reads it too, for tags written before
manifests: `legacy_check` opens their DeepSpeed files with the safe loader and `legacy_layout` reads the world size,
ZeRO stage and expert-parallel layout they were written with (`pretrain.checkpoint.verify`). Everything that parses
DeepSpeed's private file layout (deepspeed 0.19.8) lives here, apart from the packaging in `pretrain.convert`.

    read_deepspeed_checkpoint(RUN_DIR or RUN_DIR/TAG) -> (fp32 state_dict with our keys, model-config dict, info)

Design choices
- One CPU process reads every rank's files. Only safe loaders touch the files: `torch.load(weights_only=True)`
  for DeepSpeed's `.pt` files. The few non-tensor globals DeepSpeed pickles into optimizer files (a loss-scaler
  object, the ZeRO-stage enum, a fragment-address record) are mapped to inert local placeholders with
  `torch.serialization.safe_globals([(placeholder, "deepspeed...Name")])`: no DeepSpeed code runs while
  unpickling and nothing else is allowlisted.
- Weights are the fp32 master copies in the ZeRO optimizer partitions (the module copy may be bf16):
  ZeRO-1/2 `single_partition_of_fp32_groups` (one flat vector per param group and rank, cut by the
  `param_shapes` record and `param_alignment_paddings`), ZeRO-3 `fp32_flat_groups` (each parameter split
  into ceil(numel / world) slices, one per rank, in `param_shapes` order). The same layout
  `deepspeed.utils.zero_to_fp32` reads, re-implemented here because that script unpickles with
  weights_only=False and has no expert support.
- Completeness is checked, never assumed: every rank's file must be present and readable (a truncated or empty
  file names itself), the world size recorded in the model-state files and in each optimizer file must
  equal the number of files, every flat partition must be consumed exactly, and `check_complete` requires
  exactly the keys and shapes of the model built (on the meta device) from the checkpoint's own model
  config. Any gap raises `CheckpointError` naming what is missing.
- Expert shards, mapped to our fused `[E, 2F, D]` / `[E, D, F]` params by the layout functions of
  `pretrain.expert_parallel` (`from_native_layout` / `from_autoep_layout`, one copy of that mapping):
  * native DeepSpeed MoE (ZeRO-1/2, `native_moe` block in the saved DeepSpeed config): expert param groups
    are partitioned over the expert-data-parallel ranks {r : r % ep_size == e} of each EP rank e (their
    `partition_count` is world / ep_size), so each EP rank's local experts are rebuilt from its own ranks;
    every `layer_{L}_expert_{E}_mp_rank_00_model_states.pt` must exist and agree with its fp32 master.
  * AutoEP ZeRO-3 (the `ds_autoep_layers` record in each rank's model-state file): expert groups
    (`experts.w1/w2/w3`, local shapes) are ZeRO-3-partitioned over the expert-data-parallel ranks of each
    EP rank (placement read from the record, contiguous experts per EP rank checked); other groups over all
    ranks. `zero_to_fp32` refuses these checkpoints.
  Expert files without a native-MoE record are refused (unknown layout), never skipped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from pretrain.checkpoint.tags import COMPLETE, LEGACY_RUN_STATE, complete_tags
from pretrain.ds_config import zero_stage


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
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"cannot read {path}: the file is empty (0 bytes), its save was cut short: copy it "
                              f"again or convert an earlier complete tag")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, unknown global
        first = (str(e).splitlines() or [""])[0][:300]  # some errors (EOFError) carry no message
        raise CheckpointError(f"cannot read {path} ({size} bytes): {type(e).__name__}: {first}. The file is "
                              f"truncated, corrupt or not a DeepSpeed checkpoint file: copy it again or convert an "
                              f"earlier complete tag") from e


# --- locating a checkpoint ------------------------------------------------------------------------
def resolve_tag(path: str | Path) -> Path:
    """RUN_DIR -> its newest complete tag holding DeepSpeed files; TAG -> itself if complete."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(p)!r} is not a folder: give RUN_DIR or RUN_DIR/TAG")
    if has_shards(p):
        if not (p / COMPLETE).is_file():
            raise CheckpointError(f"{p} has no {COMPLETE} marker: its save did not finish on every rank; "
                                  f"convert an earlier tag (RUN_DIR picks the newest complete one)")
        return p
    return newest_complete_tag(p, has_shards, "*_model_states.pt")


def has_shards(tag: Path) -> bool:
    """Whether `tag` holds DeepSpeed model-state files."""
    return any(Path(tag).glob("*model_states.pt"))


def newest_complete_tag(run_dir: Path, holds, what: str) -> Path:
    """The complete tag of `run_dir` with the highest step for which `holds(tag)` is true; `what` names what
    `holds` looks for in the error."""
    tags = [t for t in complete_tags(run_dir) if holds(t)]
    if not tags:
        raise CheckpointError(f"no complete checkpoint (a step_* sub-folder holding {what} and {COMPLETE}) in "
                              f"{run_dir}")
    return tags[-1]


def _rank_files(tag: Path, pattern: str) -> dict[int, Path]:
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


def _refuse_expert_shards(tag: Path) -> None:
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
    zero3_models = _rank_files(tag, r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt")
    if zero3_models:
        m0 = load_ds_file(zero3_models.get(0, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    else:
        m0 = load_ds_file(tag / "mp_rank_00_model_states.pt")
    model_cfg = m0.get("model_config")
    if model_cfg is None and (tag / LEGACY_RUN_STATE).is_file():
        model_cfg = json.loads((tag / LEGACY_RUN_STATE).read_text()).get("model_config")
    if model_cfg is None:
        raise CheckpointError(f"{tag}: no 'model_config' in the client state nor in run_config.json: not a "
                              f"checkpoint written by pretrain/main.py")
    stage = zero_stage(m0.get("ds_config") or {})
    world = int(m0.get("dp_world_size", 1))
    record = f"dp_world_size in the model-state file, stage {stage}"
    native = ((m0.get("ds_config") or {}).get("native_moe") or {})
    ep_size = int(native.get("ep_size", 1)) if native.get("enabled") else 1
    if not native.get("enabled"):
        _refuse_expert_shards(tag)

    if stage == 0:
        sd = {k: v.float().clone() for k, v in m0["module"].items()}
    else:
        ofiles = _expect_ranks(_rank_files(tag, r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt"), world,
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
def check_complete(sd: dict[str, torch.Tensor], model_cfg, where: str) -> dict[str, torch.Tensor]:
    """Exactly the model's keys and shapes (tied aliases filled in), or CheckpointError naming the difference;
    missing MoE / MLP weights are pointed at absent expert shards."""
    from pretrain.model_dir import ModelDirError, check_state, model_keys
    from ressformer.config import ModelConfig

    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    try:
        return check_state(sd, cfg, where)
    except ModelDirError as e:
        keys = model_keys(cfg).shapes
        experts = sorted({k.rsplit(".mlp.", 1)[0] for k in keys if k not in sd and ".mlp." in k})
        hint = f" (MoE / MLP weights of {experts} absent: expert shards not found)" if experts else ""
        raise CheckpointError(f"{e}{hint}") from None


# --- tags written before manifests --------------------------------------------------------------------
def legacy_check(tag: Path, rank: int = 0, world: int = 1) -> str | None:
    """A tag from before manifests: rank `rank` of `world` opens its share of the DeepSpeed files with the safe
    loader. -> None, or one line naming the unreadable file."""
    files = sorted(f for f in tag.glob("*.pt") if f.name.endswith(("model_states.pt", "optim_states.pt")))
    if not any(f.name.endswith("model_states.pt") for f in files):
        return f"{tag} holds no DeepSpeed model-state file"
    for i, f in enumerate(files):
        if i % world == rank:
            try:
                load_ds_file(f)
            except CheckpointError as e:
                return str(e)
    return None


def legacy_layout(tag: Path) -> dict | None:
    """{"world_size", "zero_stage", "ep_backend", "ep_size"} from rank 0's model-state file (None: no such file)."""
    f = next(iter(sorted(tag.glob("zero_pp_rank_0_mp_rank_00_model_states.pt"))), tag / "mp_rank_00_model_states.pt")
    if not f.is_file():
        return None
    m = load_ds_file(f)
    ds = m.get("ds_config") or {}
    ep = ds.get("expert_parallel") or {}
    nat = ds.get("native_moe") or {}
    backend = "autoep" if ep.get("enabled") else "native" if nat.get("enabled") else "none"
    return {"world_size": int(m.get("dp_world_size", 1)), "zero_stage": zero_stage(ds), "ep_backend": backend,
            "ep_size": int({"autoep": ep.get("autoep_size", 1), "native": nat.get("ep_size", 1)}.get(backend, 1))}
