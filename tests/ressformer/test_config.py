"""ModelConfig: YAML round trip of every preset, validation errors naming the field, the describe CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from ressformer.config import PRESETS, ModelConfig
from ressformer.flops import count_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip_every_preset(name, tmp_path):
    cfg = ModelConfig.from_preset(name)
    text = cfg.to_yaml()
    assert ModelConfig.from_yaml(text) == cfg
    path = tmp_path / f"{name}.yaml"
    cfg.to_yaml(path)
    again = ModelConfig.from_yaml(path)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.to_yaml() == text  # serialising twice is stable


@pytest.mark.parametrize("key,value", [
    ("d_model", 0), ("n_heads", 3), ("arch", "rnn"), ("vocab_size", 1), ("init_std", 0.0),
    ("r2mu.steps", 0), ("r2mu.step_sampling", "geometric"), ("r2mu.min_steps", 9), ("r2mu.cache_window", 0),
    ("r2mu.segment_len", 0), ("r2mu.summary_slots", 0),
    ("asam.activation", "relu"), ("asam.topk", -1), ("asam.impl", "flash"), ("asam.chunk_size", 0),
    ("asam.block_select", "head"),
    ("moe.num_experts", 0), ("moe.experts_per_token", 5), ("moe.aux_loss_coef", -1.0),
    ("soes.rank", 0), ("soes.degree", 0), ("soes.smooth_coef", -0.5),
])
def test_bad_value_raises_naming_the_field(key, value):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_preset("debug", **{key: value})
    assert key in str(e.value), f"error for {key}={value!r} does not name the field: {e.value}"


def test_unknown_keys_raise():
    d = ModelConfig.from_preset("debug").to_dict()
    d["asam"]["top_k"] = 4
    with pytest.raises(ValueError, match=r"asam\.top_k"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_preset("debug", n_layer=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("7b")
    with pytest.raises(ValueError, match="mapping"):
        ModelConfig.from_yaml("- a\n- b\n")


def test_replace_and_auto_ffn():
    cfg = ModelConfig.from_preset("debug").replace(**{"asam.topk": 0, "ffn_hidden": 0, "d_model": 96, "n_heads": 4})
    assert cfg.asam.topk == 0
    assert cfg.ffn_hidden == 256  # round(8/3 * 96 / 64) * 64


def test_cli_prints_1b_with_param_counts():
    out = subprocess.run([sys.executable, "-m", "ressformer.describe", "1b"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    cfg = ModelConfig.from_yaml("\n".join(line for line in out.splitlines() if not line.startswith("#")) + "\n")
    assert cfg == ModelConfig.from_preset("1b")
    total = int(next(line for line in out.splitlines() if "params total" in line).split(":")[1].split("(")[0]
                .replace(",", ""))
    active = int(next(line for line in out.splitlines() if "params active" in line).split(":")[1].split("(")[0]
                 .replace(",", ""))
    assert 0.9e9 <= total <= 1.4e9, total
    assert total == count_params(cfg)["total"] and active == count_params(cfg)["active"]
    assert "FLOPs/token" in out


PAPER_PRESETS = ("debug", "125m", "350m", "1b", "1b-long")


def test_preset_names_give_total_parameters():
    sizes = {n: count_params(ModelConfig.from_preset(n)) for n in PRESETS}
    for name, total in (("125m", 125e6), ("350m", 350e6), ("1b", 1e9), ("1b-long", 1e9), ("1b-transformer", 1e9)):
        assert 0.9 * total <= sizes[name]["total"] <= 1.1 * total, (name, sizes[name])
    for name in ("125m", "350m", "1b"):
        assert sizes[name]["active"] < sizes[name]["total"] / 2, (name, sizes[name])  # routed experts
    assert sizes["debug"]["total"] < 2e6


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_build_the_papers_network(name):
    """Embeddings -> one shared block x K with memory -> head; top-k + sparsemax + routed MoE; SOES from attention."""
    cfg = ModelConfig.from_preset(name)
    r, a = cfg.r2mu, cfg.asam
    assert cfg.arch == "ressformer" and r.enabled and r.memory
    assert (r.n_prelude, r.n_coda, r.step_sampling) == (0, 0, "fixed")  # prelude / coda / sampled K: extensions
    assert a.activation == "sparsemax" and a.topk > 0 and a.impl != "block" and a.block_select == "query"
    assert cfg.moe.num_experts > 1 and cfg.moe.experts_per_token < cfg.moe.num_experts
    assert cfg.soes.enabled and cfg.soes.graph == "attention"
    assert ModelConfig().r2mu.n_prelude == 0 and ModelConfig().asam.activation == "sparsemax"  # dataclass defaults
