"""The consolidated model folder: one fp32 safetensors file, its model config and its tokenizer.

    DIR/model.safetensors   every tensor under the training model's keys (tied aliases stored once), fp32
    DIR/model_config.yaml   ModelConfig.to_yaml
    DIR/tokenizer/          tokenizer.model + ressformer_tokenizer.json (absent when the run had none)

The trainer writes one into every checkpoint tag (`pretrain.checkpoint.writer`), `pretrain.convert --to-ressformer`
writes one from a Hugging Face export; `init_from`, `pretrain.convert`, `pretrain.evaluate` and the benches
read it with `load_model_dir`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

WEIGHTS = "model.safetensors"
CONFIG = "model_config.yaml"
TOKENIZER = "tokenizer"
TOKENIZER_FILES = ("tokenizer.model", "ressformer_tokenizer.json")


class ModelDirError(RuntimeError):
    """A model folder that is missing, incomplete or does not match its own config."""


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / WEIGHTS).is_file() and (p / CONFIG).is_file()


class ModelKeys(NamedTuple):
    """The keys of the model a config describes (built once on the meta device, `model_keys`)."""

    shapes: dict[str, torch.Size]  # state_dict key -> shape (parameters, tied aliases and buffers)
    tied: dict[str, str]  # {alias: source} for the parameters the model ties (the alias is not stored)
    params: dict[str, torch.Size]  # named_parameters() -> shape (each tied parameter once)


@functools.lru_cache(maxsize=8)
def _model_keys(cfg_json: str) -> ModelKeys:
    from ressformer import build_model
    from ressformer.config import ModelConfig

    with torch.device("meta"):
        m = build_model(ModelConfig.from_dict(json.loads(cfg_json)))
    first, tied, shapes = {}, {}, {}
    for k, v in m.state_dict(keep_vars=True).items():
        shapes[k] = v.shape
        if id(v) in first:
            tied[k] = first[id(v)]
        else:
            first[id(v)] = k
    return ModelKeys(shapes, tied, {n: p.shape for n, p in m.named_parameters()})


def model_keys(cfg) -> ModelKeys:
    """Keys and shapes of the model `cfg` (a ModelConfig) describes: the one place that builds a model to learn them
    (cached per config)."""
    return _model_keys(json.dumps(cfg.to_dict(), sort_keys=True))


def tied_aliases(cfg) -> dict[str, str]:
    """{alias: source} for parameters the model ties (the alias is not stored)."""
    return model_keys(cfg).tied


def save_model_dir(path: str | Path, state_dict: dict[str, torch.Tensor], cfg,
                   tokenizer_dir: str | Path | None = None) -> Path:
    """Write `state_dict` (our keys, complete) + `cfg` (+ a copy of the tokenizer files) into `path`.

    Files are written under temporary names and renamed, so a reader never sees half a file."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tied = tied_aliases(cfg)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k not in tied}
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    tmp = out / f".{CONFIG}.tmp"
    cfg.to_yaml(tmp)
    os.replace(tmp, out / CONFIG)
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        missing = [n for n in TOKENIZER_FILES if not (src / n).is_file()]
        if missing:
            raise ModelDirError(f"tokenizer folder {src} lacks {missing}: give the folder `python -m tokenizer.train` "
                                f"wrote")
        (out / TOKENIZER).mkdir(exist_ok=True)
        for n in TOKENIZER_FILES:
            shutil.copyfile(src / n, out / TOKENIZER / n)
    return out


def load_model_dir(path: str | Path):
    """-> (ModelConfig, state_dict with exactly the model's keys). Missing, unexpected or misshaped tensors and
    unreadable files raise ModelDirError naming them."""
    from safetensors.torch import load_file

    from ressformer.config import ModelConfig

    d = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (d / name).is_file():
            raise ModelDirError(f"{d} is not a model folder: {name} is missing (write one with `python -m "
                                f"pretrain.convert --to-ressformer`, or give a checkpoint tag folder)")
    try:
        cfg = ModelConfig.from_yaml(d / CONFIG)
    except Exception as e:
        raise ModelDirError(f"cannot read {d / CONFIG}: {type(e).__name__}: {e}") from e
    try:
        sd = load_file(str(d / WEIGHTS))
    except Exception as e:
        raise ModelDirError(f"cannot read {d / WEIGHTS} ({(d / WEIGHTS).stat().st_size} bytes): "
                            f"{type(e).__name__}: {e}. The file is truncated or corrupt") from e
    return cfg, check_state(sd, cfg, str(d / WEIGHTS))


def check_state(sd: dict[str, torch.Tensor], cfg, where: str) -> dict[str, torch.Tensor]:
    """Exactly the keys and shapes of the model `cfg` describes (tied aliases filled in), or ModelDirError."""
    shapes, tied, _ = model_keys(cfg)
    sd = dict(sd)
    for alias, src in tied.items():
        if alias not in sd and src in sd:
            sd[alias] = sd[src]
    missing = [k for k in shapes if k not in sd]
    extra = [k for k in sd if k not in shapes]
    bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(s)}" for k, s in shapes.items() if k in sd and sd[k].shape != s]
    if missing or extra or bad:
        raise ModelDirError(f"{where} does not match the model its config describes: {len(missing)} missing "
                            f"{missing[:12]}; {len(extra)} unexpected {extra[:8]}; {len(bad)} shape mismatches "
                            f"{bad[:8]}")
    return {k: sd[k] for k in shapes}
