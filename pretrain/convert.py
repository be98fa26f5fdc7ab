"""Packaging of a trained model: model folder -> Hugging Face folder, and back.

    python -m pretrain.convert --checkpoint RUN_DIR[/TAG] --out HF_DIR [--dtype fp32|bf16] [--max-shard-size 2GB]
    python -m pretrain.convert --to-ressformer --checkpoint HF_DIR --out MODEL_DIR    # for continued pretraining

Design choices
- The input is a model folder (`pretrain.model_dir`: model.safetensors + model_config.yaml + tokenizer/): the
  one the trainer writes into every checkpoint tag, or one `--to-ressformer` wrote. `--checkpoint` takes RUN_DIR
  (its newest complete tag: a sub-folder holding COMPLETE whose files match its manifest), RUN_DIR/TAG
  (refused without COMPLETE) or a model folder. A complete tag without model.safetensors (written before tags
  carried one) is read from DeepSpeed's shard files by `pretrain.checkpoint.ds_recovery`, which one printed line says;
  `--from-shards` forces that reader (a damaged model.safetensors). Errors name the file and the fix, before
  anything is written.
- Export = transformers' own path: `RessformerForCausalLM` (pretrain/hf) built from the `RessformerConfig` of
  the ModelConfig, registered for AutoConfig / AutoModelForCausalLM, the state dict loaded with strict key
  checking, then `save_pretrained(max_shard_size=)`: safetensors shards + index, config.json (with auto_map),
  generation_config.json. Tied embeddings are stored once (`lm_head.weight` dropped, `tie_word_embeddings`),
  the transformers convention. `use_cache` is on: generate() decodes with the model's cache. Loading the
  export refuses missing, unexpected or misshaped tensors (`RessformerForCausalLM.from_pretrained`).
- Model code: the files of pretrain/hf plus every `ressformer/**/*.py` copied as `ressformer_<name>.py`
  (subpackages flattened: `kernels/asam_triton.py` -> `ressformer_kernels_asam_triton.py`) with
  `from ressformer.x.y import` rewritten to `from .ressformer_x_y import`, so transformers' remote-code loader
  finds all of it in the folder and no ressformer install is needed (`trust_remote_code=True`). They replace
  the verbatim copies save_pretrained makes of the registered classes' files.
- Tokenizer: the sentencepiece model + remote-code RessformerTokenizer. BOS is EOS in the export (tokenizer
  `bos_token`, `bos_token_id` of config.json / generation_config.json): pretraining documents end with EOS and
  none starts with BOS, so a text starts, as every document after the first did, after an EOS. lm-eval prefixes
  its loglikelihood windows with the tokenizer's BOS (HFLM `prefix_token_id`), so its default run conditions on
  EOS with no extra flag; generate() without a prompt starts from EOS. Nothing adds the token to encoded text
  (`add_bos_token` False).
- Reverse (`--to-ressformer`): HF folder -> model folder (`save_model_dir`, fp32), which `init_from` and
  `load_init_state(dir)` -> (ModelConfig, state_dict) read. HF -> ours -> HF is bitwise (bf16 included). The HF
  folder may also be one that transformers' `save_pretrained` wrote from a loaded export (the tokenizer's save
  keeps both of its files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from pretrain.checkpoint.ds_recovery import (CheckpointError, check_complete, has_shards, newest_complete_tag,
                                             read_deepspeed_checkpoint)
from pretrain.checkpoint.tags import (COMPLETE, LEGACY_RUN_STATE, MANIFEST, MODEL_FILES, RUN_STATE, TagGone,
                                      complete_tags, has_run_state, is_complete, reading, tag_step)
from pretrain.checkpoint.verify import verify_tag
from pretrain.model_dir import (CONFIG, TOKENIZER, TOKENIZER_FILES, WEIGHTS, ModelDirError, is_model_dir,
                                load_model_dir, save_model_dir)

REPO = Path(__file__).resolve().parent.parent
HF_CODE_DIR = Path(__file__).resolve().parent / "hf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- locating the model -----------------------------------------------------------------------------
def locate(path: str | Path, from_shards: bool = False) -> tuple[Path, bool, bool]:
    """-> (folder, whether it is a model folder, whether it is a checkpoint tag). RUN_DIR -> its newest complete tag
    whose files match its manifest (only the DeepSpeed files with `from_shards`); a tag (holding COMPLETE, DeepSpeed
    files or named step_N) must be complete and match; any other model folder is taken as it is."""
    skip = MODEL_FILES if from_shards else ()
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(p)!r} is not a folder: give RUN_DIR, RUN_DIR/TAG or a model "
                              f"folder")
    if (p / COMPLETE).is_file() or has_shards(p) or tag_step(p) is not None:
        if not (p / COMPLETE).is_file():
            raise CheckpointError(f"{p} has no {COMPLETE} marker: its save did not finish; convert an earlier tag "
                                  f"(RUN_DIR picks the newest complete one)")
        bad = verify_tag(p, skip=skip) if _manifest_format(p) else None
        if bad:
            hint = " or recover the weights from the DeepSpeed files with --from-shards" \
                if not from_shards and WEIGHTS in bad else ""
            raise CheckpointError(f"{bad}: convert an earlier tag (RUN_DIR picks the newest usable one){hint}")
        tag = p
    elif is_model_dir(p):
        return p, True, False
    else:
        tag = newest_complete_tag(p, lambda d: is_model_dir(d) or has_shards(d), f"{WEIGHTS} or *_model_states.pt")
        while _manifest_format(tag) and (bad := verify_tag(tag, skip=skip)):  # the run's fallback rule
            print(f"[convert] skipping {tag.name}: {bad}", file=sys.stderr)
            older = [t for t in complete_tags(p) if tag_step(t) < tag_step(tag) and (is_model_dir(t) or has_shards(t))]
            if not older:
                raise CheckpointError(f"no usable checkpoint in {p}: {bad}")
            tag = older[-1]
    if is_model_dir(tag):
        return tag, True, True
    if has_shards(tag):
        return tag, False, True
    raise CheckpointError(f"{tag} holds neither a model folder ({WEIGHTS} + {CONFIG}) nor DeepSpeed shard files")


def _manifest_format(tag: Path) -> bool:
    """A tag written with a manifest (it has one, or run_state.json says it should): verified before reading."""
    return (tag / MANIFEST).is_file() or has_run_state(tag)


def _run_config(tag: Path) -> dict | None:
    """The run config a tag's client-state file records (run_state.json; run_config.json in older tags)."""
    for name in (RUN_STATE, LEGACY_RUN_STATE):
        if (tag / name).is_file():
            return json.loads((tag / name).read_text()).get("run_config")
    return None


@contextlib.contextmanager
def opened(path: str | Path, from_shards: bool = False):
    """`locate(path)` -> (folder, is_model), with a checkpoint tag held against removal by the job writing its run
    folder (`tags.reading`: keep_last leaves it until a later save) while the block reads it. A tag that went
    away before the lock was taken is chosen again (a run folder) or named (a tag asked for by path)."""
    p = Path(path)
    for attempt in range(3):
        folder, is_model, is_tag = locate(p, from_shards)
        # (whether it is a tag comes from locate: a tag removed since has lost COMPLETE, and is not a model folder)
        if not is_tag:
            yield folder, is_model
            return
        held = reading(folder)
        try:
            held.__enter__()
        except TagGone as e:
            if folder == p or attempt == 2:
                raise CheckpointError(str(e)) from None
            continue
        try:
            yield folder, is_model
        except (FileNotFoundError, ModelDirError, CheckpointError) as e:
            if not is_complete(folder):  # no file locks here: removed under us
                raise CheckpointError(str(TagGone(folder))) from e
            raise
        finally:
            held.__exit__(None, None, None)
        return


def read_any(path: str | Path, from_shards: bool = False) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """RUN_DIR, RUN_DIR/TAG or a model folder -> (state_dict, model-config dict, info). info["source"] is
    "model folder", or "deepspeed shards" when the tag holds no model folder or `from_shards` is set."""
    with opened(path, from_shards) as (folder, is_model):
        return _read(folder, is_model, from_shards)


def _read(folder: Path, is_model: bool, from_shards: bool) -> tuple[dict[str, torch.Tensor], dict, dict]:
    if is_model and not from_shards:
        cfg, sd = load_model_dir(folder)
        return sd, cfg.to_dict(), {"tag": str(folder), "source": "model folder", "zero_stage": None,
                                   "world_size": None, "run_config": _run_config(folder)}
    sd, mcfg, info = read_deepspeed_checkpoint(folder)
    return check_complete(sd, mcfg, info["tag"]), mcfg, {**info, "source": "deepspeed shards"}


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



def tokenizer_config(tok_dir: Path) -> dict:
    """tokenizer_config.json of an export of the sentencepiece folder `tok_dir` (the remote-code RessformerTokenizer;
    pretrain.eval_tasks builds the same tokenizer in memory from it)."""
    if str(REPO) not in sys.path:  # the repo's tokenizer package (not part of the export)
        sys.path.append(str(REPO))
    from tokenizer import Tokenizer

    tok = Tokenizer(tok_dir)  # validates the folder (model and metadata agree)
    piece = tok.id_to_piece
    return {"tokenizer_class": "RessformerTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_ressformer.RessformerTokenizer", None]},
            "vocab_file": "tokenizer.model", "bos_token": piece(tok.eos_id), "eos_token": piece(tok.eos_id),
            "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id), "add_bos_token": False,
            "add_eos_token": False, "split_special_tokens": True, "padding_side": "right",
            "model_max_length": 10 ** 9, "clean_up_tokenization_spaces": False}


def write_tokenizer(tok_dir: Path, out: Path) -> None:
    """sentencepiece files + remote-code RessformerTokenizer config (AutoTokenizer, trust_remote_code=True)."""
    cfg = tokenizer_config(tok_dir)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / name, out / name)
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



def hf_model(sd: dict[str, torch.Tensor], cfg, num_steps: int | None = None, token_ids: dict | None = None):
    """RessformerForCausalLM holding `sd` (strict: exactly the model's keys), its classes registered for the auto
    classes so that save_pretrained writes their auto_map."""
    from transformers import GenerationConfig

    from pretrain.hf.configuration_ressformer import RessformerConfig
    from pretrain.hf.modeling_ressformer import RessformerForCausalLM

    RessformerConfig.register_for_auto_class()
    RessformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    ids = token_ids or {}
    model = RessformerForCausalLM(RessformerConfig(ressformer=cfg.to_dict(), num_steps=num_steps, use_cache=True,
                                                   **ids))
    model.load_state_dict(sd, strict=True)
    model.generation_config = GenerationConfig(use_cache=True, do_sample=False, **ids)
    return model.eval()


def export_hf(sd: dict[str, torch.Tensor], model_cfg, out: str | Path, dtype: str = "fp32",
              max_shard_size: str | int = "2GB", tokenizer_dir: str | Path | None = None,
              num_steps: int | None = None) -> Path:
    """Write a transformers folder for `sd` (our keys, complete) and `model_cfg` (ModelConfig or its dict)."""
    from ressformer.config import ModelConfig

    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose fp32 or bf16")
    sd = check_complete(sd, cfg, "state dict to export")
    ids = None
    if tokenizer_dir is not None:
        meta = json.loads((Path(tokenizer_dir) / "ressformer_tokenizer.json").read_text())
        ids = {"bos_token_id": meta["eos_id"], "eos_token_id": meta["eos_id"], "pad_token_id": meta["pad_id"]}
    model = hf_model(sd, cfg, num_steps, ids).to(DTYPES[dtype])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        write_tokenizer(Path(tokenizer_dir), out)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # save_pretrained leaves a previous export's single file or index in place
    model.save_pretrained(out, max_shard_size=_parse_size(max_shard_size))
    write_code(out)  # replaces save_pretrained's verbatim copies of the class files (absolute imports)
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
    """HF folder -> model folder OUT (model.safetensors in fp32, model_config.yaml, tokenizer/ when present)."""
    from ressformer.config import ModelConfig

    sd, mcfg, _ = read_hf(hf_dir)
    present = [n for n in TOKENIZER_FILES if (Path(hf_dir) / n).is_file()]
    if present and len(present) < len(TOKENIZER_FILES):
        missing = sorted(set(TOKENIZER_FILES) - set(present))
        raise CheckpointError(f"{hf_dir} holds {present} but not {missing}: the tokenizer cannot be rebuilt; copy "
                              f"{missing} from the original export (or remove {present} to convert without one)")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # bf16 -> fp32 is exact
    return save_model_dir(out, sd, ModelConfig.from_dict(mcfg), tokenizer_dir=hf_dir if present else None)


def load_init_state(init_dir: str | Path):
    """(ModelConfig, state_dict) of a model folder (`--to-ressformer` output or a checkpoint tag), for the
    trainer's `build_engine(..., init_state=)`: `pretrain.model_dir.load_model_dir`."""
    return load_model_dir(init_dir)


def _find_tokenizer(info: dict, folder: Path) -> Path | None:
    cands = [folder / TOKENIZER]
    tok = (((info.get("run_config") or {}).get("data")) or {}).get("tokenizer")
    if tok:
        cands += [Path(tok), REPO / tok]
    for c in cands:
        if all((c / n).is_file() for n in TOKENIZER_FILES):
            return c
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.split("\n\nDesign")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="RUN_DIR (newest complete tag), RUN_DIR/TAG, a model folder, or (with --to-ressformer) an "
                         "HF folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights dtype of the HF export")
    ap.add_argument("--max-shard-size", default="2GB", help="safetensors shard size limit (e.g. 2GB, 500MB)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder (default: the model folder's tokenizer/, else the run config's "
                         "data.tokenizer)")
    ap.add_argument("--no-tokenizer", action="store_true", help="export without tokenizer files")
    ap.add_argument("--num-steps", type=int, default=None,
                    help="default recurrent steps K of the exported model (default: the training r2mu.steps)")
    ap.add_argument("--from-shards", action="store_true",
                    help="rebuild the weights from the tag's DeepSpeed shard files even when it holds "
                         "model.safetensors (pretrain.checkpoint.ds_recovery; for a damaged model.safetensors)")
    ap.add_argument("--to-ressformer", action="store_true",
                    help="reverse direction: HF folder -> model folder (model.safetensors + model_config.yaml + "
                         "tokenizer/) for continued pretraining")
    a = ap.parse_args(argv)
    try:
        shard = _parse_size(a.max_shard_size)
    except ValueError as e:
        ap.error(str(e))
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    try:
        if a.to_ressformer:
            out = import_hf(a.checkpoint, a.out)
            tok = f"{TOKENIZER}/" if (out / TOKENIZER).is_dir() else f"no tokenizer ({a.checkpoint} has none)"
            print(f"[convert] wrote {out}/{WEIGHTS}, {CONFIG} and {tok}")
            return 0
        with opened(a.checkpoint, a.from_shards) as (folder, is_model):  # the tag stays while it is read
            if not is_model:
                print(f"[convert] {folder} holds no {WEIGHTS} (saved before checkpoints carried the model folder): "
                      f"rebuilding the weights from its DeepSpeed shard files (pretrain.checkpoint.ds_recovery)",
                      flush=True)
            try:
                sd, mcfg, info = _read(folder, is_model, a.from_shards)
            except ModelDirError as e:
                fix = " Pass --from-shards to rebuild the weights from its DeepSpeed shard files." * has_shards(folder)
                raise CheckpointError(f"{e}{fix}") from e
            tok = None
            if not a.no_tokenizer:
                tok = Path(a.tokenizer) if a.tokenizer else _find_tokenizer(info, folder)
                if tok is None:
                    raise CheckpointError(f"no tokenizer folder found ({folder / TOKENIZER}, run config "
                                          f"data.tokenizer): pass --tokenizer DIR or --no-tokenizer")
            out = export_hf(sd, mcfg, a.out, dtype=a.dtype, max_shard_size=shard, tokenizer_dir=tok,
                            num_steps=a.num_steps)
    except (CheckpointError, ModelDirError) as e:
        print(f"[convert] error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in sd.values())
    src = ("model folder" if info["source"] == "model folder" else
           f"DeepSpeed shards, ZeRO stage {info['zero_stage']}, world {info.get('world_size')}")
    print(f"[convert] {info['tag']} ({src}): {len(sd)} tensors, {n} elements -> {out} ({a.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
