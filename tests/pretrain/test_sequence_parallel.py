"""Ulysses sequence parallelism of the model (ressformer.sequence_parallel + pretrain.sequence_parallel): P = 2 gloo
ranks, each holding half of every sequence, against one process on the whole batch (and P = 2 x DP = 2 on 4 ranks
against data parallelism); the refusals of the model, the run config and the engine."""

import json
import re

import pytest
import torch

from ressformer import ModelConfig, build_model
from ressformer.sequence_parallel import memory_order, sequence_parallel_error, shard, shard_error, shift_labels
from tests.helpers.dist import base_env, launch_ranks

# the paper's debug preset (sparsemax ASAM, top-k 16, R2MU memory, attention-pattern SOES, 4 routed experts), T = 128
CASES = {
    "chunked_K4_answer_only": {"T": 128, "K": 4, "answer_only": True},
    "chunked_K1": {"T": 128, "K": 1},
    "block_K4": {"T": 128, "K": 4, "overrides": {"asam": {"impl": "block"}}},
    "block_select_chunk_K4_answer_only": {"T": 128, "K": 4, "answer_only": True,
                                          "overrides": {"asam": {"impl": "block", "block_select": "chunk"}}},
    "dense_chunks_prelude_coda_K3": {"T": 128, "K": 3,
                                     "overrides": {"asam": {"topk": 0}, "r2mu": {"n_prelude": 1, "n_coda": 1}}},
    "fused_loss_answer_only_K2": {"T": 64, "K": 2, "answer_only": True, "fused_loss": True},
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_sequence_shards_train_as_one_process(tmp_path):
    """Loss, aux losses and diagnostics of the first step within 1e-5, the loss of three AdamW steps and every
    gradient within 1e-4 (relative), activation checkpointing on, for each ASAM path, K = 1 and 4, an
    answer-only loss mask, dense chunks, prelude / coda blocks and liger's fused LM loss (in the Triton interpreter)
    (tests/helpers/sp_worker.py)."""
    out = tmp_path / "sp.json"
    launch_ranks(["tests/helpers/sp_worker.py", str(out), json.dumps(CASES)], world_size=2, timeout=280,
                 env=dict(base_env(), TRITON_INTERPRET="1"))
    _check(json.loads(out.read_text()), CASES)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_sequence_parallel_groups_train_as_data_parallelism(tmp_path):
    """P = 2 x DP = 2 on 4 ranks: each group of two ranks holds one group's rows, against those rows run whole by
    plain data parallelism (gradients averaged over all ranks both ways)."""
    cases = {k: CASES[k] for k in ("block_select_chunk_K4_answer_only",)}
    out = tmp_path / "sp.json"
    launch_ranks(["tests/helpers/sp_worker.py", str(out), json.dumps(cases), "2"], world_size=4, timeout=280)
    _check(json.loads(out.read_text()), cases)


def _check(res: dict, cases: dict) -> None:
    assert set(res) == set(cases)
    for name, r in res.items():
        # after AdamW updates the two runs' weights differ by rounding, and a token whose expert or kept key flips
        # moves the loss by a step: chunked_K4_answer_only's third loss differs by 1.06e-5 on an AVX2 CPU, where
        # its expert loads differ by 1.4e-3 (one assignment) and every first-step value agrees within 1.2e-7
        assert r["step0_rel"] < 1e-5 and r["loss_rel"] < 1e-4 and r["grad_rel"] < 1e-4, (name, r)
        assert {"soes_smooth", "moe_balance", "moe_z", "attn_density"} <= set(r["keys"]), (name, r["keys"])
        if cases[name]["K"] > 1:
            assert "r2mu_gate_step1" in r["keys"], (name, r["keys"])


def test_the_exchanged_memory_is_laid_out_as_one_process_lays_it():
    # two ranks, each with 3 cache keys and 2 summary keys: [c0 c0 c0 s0 s0 | c1 c1 c1 s1 s1] -> caches, then sums
    assert memory_order(2, 3, 2, "cpu").tolist() == [0, 1, 2, 5, 6, 7, 3, 4, 8, 9]
    labels = torch.tensor([[1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[2, 3, 4, -100]]
    assert shard(shift_labels(labels), 2, 1).tolist() == [[4, -100]]  # the second shard scores the sequence's end


def test_refusals_name_the_fix():
    cfg = ModelConfig.from_preset("debug")
    assert sequence_parallel_error(cfg, 2) is None
    assert "divisors of 4" in sequence_parallel_error(cfg, 3)
    other = lambda **kw: ModelConfig.from_preset("debug", **kw)  # noqa: E731
    assert "soes.graph=attention" in sequence_parallel_error(other(soes={"graph": "bilinear"}), 2)
    assert "causal=True" in sequence_parallel_error(other(causal=False), 2)
    assert "sequence_parallel_size=1" in sequence_parallel_error(other(arch="transformer"), 2)
    assert shard_error(cfg, 128, 2) is None
    assert "multiple of 32" in shard_error(cfg, 48, 2)  # 24 tokens per shard: not on a segment boundary (16)
    assert "divisible" in shard_error(cfg, 129, 2)

    class Two:  # a group of two, never called: the refusals come before any collective
        size, rank = 2, 0

    model = build_model(cfg)
    with pytest.raises(ValueError, match="divisors of 4"):
        model.set_sequence_parallel(type("Three", (), {"size": 3, "rank": 0})())
    model.set_sequence_parallel(Two())
    ids = torch.zeros(1, 24, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_len"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="document masking"):
        model(torch.zeros(1, 32, dtype=torch.long), documents=torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="training layout"):
        model(ids, cache=object())
    model.set_sequence_parallel(None)
    assert model(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, cfg.vocab_size)


def test_run_config_refusals_come_before_anything_is_built():
    from pretrain.config import load_run_config
    from pretrain.ds_config import build_ds_config, load_ds_json
    from pretrain.engine import check_sequence_parallel
    from tests.helpers.dist import REPO

    def run(*sets):
        return load_run_config(REPO / "pretrain/configs/debug.yaml", ["seq_len=64", *sets])

    ok = run("sequence_parallel_size=2", "micro_batch=2", "grad_accum=3")
    assert ok.global_batch(4) == 2 * 3 * 2 and ok.ds_batch_fields(4)["train_batch_size"] == 2 * 3 * 4
    for sets, words in [(["sequence_parallel_size=3"], "divisors of 4"),
                        (["sequence_parallel_size=2", "seq_len=48"], "multiple of 32"),
                        (["sequence_parallel_size=0"], ">= 1"),
                        (["sequence_parallel_size=2", "data.document_mask=true"], "document_mask"),
                        (["sequence_parallel_size=2", "compile=true"], "compile=false"),
                        (["sequence_parallel_size=2", "model_overrides={soes: {graph: bilinear}}"], "soes.graph")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            run(*sets)
    with pytest.raises(ValueError, match="launch a multiple of 2"):
        ok.data_parallel_size(3)
    ds = lambda name: build_ds_config(load_ds_json(str(REPO / "ds_configs" / name)), ok, 2)  # noqa: E731
    with pytest.raises(ValueError, match="ds_configs/zero3.json"):
        check_sequence_parallel(ok, ds("zero3_autoep.json"), 2)
    check_sequence_parallel(ok, ds("zero3.json"), 2)
