"""Run config (pretrain/config.py), the DeepSpeed JSON it completes (pretrain/ds_config.py), the LR schedule and
weight-decay groups of the engine, and the CLI's config errors (fast, no ranks)."""

import json
import math

import pytest
import torch

from pretrain.config import RunConfig, describe, load_run_config
from pretrain.ds_config import build_ds_config, resolve_precision, zero_stage
from pretrain.engine import lr_lambda, param_groups
from tests.helpers.dist import REPO


def test_debug_yaml_and_set_overrides():
    run = load_run_config(REPO / "pretrain/configs/debug.yaml",
                          ["steps=40", "run_dir=/tmp/x", "model.asam.topk=8", "wandb.mode=disabled",
                           "activation_checkpointing.every=2"])
    assert (run.steps, run.run_dir, run.wandb.mode) == (40, "/tmp/x", "disabled")
    assert run.model_config().asam.topk == 8
    assert (run.activation_checkpointing.enabled, run.activation_checkpointing.every) == (True, 2)
    assert run.to_dict()["activation_checkpointing"] == {"enabled": True, "every": 2}  # the YAML / run_state shape
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run  # round trip


def test_set_reaches_model_overrides_or_a_model_dict():
    run = load_run_config(None, ["model_overrides.asam.topk=4", "model.moe.num_experts=2"])
    assert run.model_overrides == {"asam.topk": 4, "moe.num_experts": 2}
    assert (run.model_config().asam.topk, run.model_config().moe.num_experts) == (4, 2)
    as_dict = load_run_config(None, ["model={arch: transformer, n_layers: 2}", "model.n_heads=2"])
    assert as_dict.model == {"arch": "transformer", "n_layers": 2, "n_heads": 2} and not as_dict.model_overrides
    assert as_dict.model_config().n_heads == 2 and as_dict.model_config().n_layers == 2


@pytest.mark.parametrize("sets, words", [
    (["stepz=3"], ["stepz", "allowed", "steps"]),
    (["model.asam.nope=1"], ["asam.nope"]),
    (["micro_batch=0"], ["micro_batch", ">= 1"]),
    (["decay=step"], ["decay", "cosine"]),
    (["wandb.mode=cloud"], ["wandb", "offline"]),
    (["lr=1e-3", "min_lr=1e-2"], ["min_lr"]),
    (["seq_len=4096"], ["seq_len=4096", "max_seq_len"]),
    (["steps"], ["key=value"]),
    (["steps=3", "steps.every=2"], ["steps.every", "mapping"]),
    (["eval_tasks_every=0"], ["eval_tasks_every", ">= 1"]),
    (["eval_tasks=[paper:hops, 3]"], ["eval_tasks[1]=3", "string"]),
    (["data.document_mask=2"], ["data.document_mask", "true or false"]),
])
def test_bad_config_names_key_and_fix(sets, words):
    with pytest.raises(ValueError) as e:
        load_run_config(None, sets)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_eval_tasks_schedule():
    """eval_tasks run at every eval_tasks_every-th checkpoint holding the model folder, and at the last step."""
    from pretrain.trainer import eval_tasks_due

    run = load_run_config(None, ["eval_tasks=paper:hops", "steps=100", "save_every=10", "save_model_every=2",
                                 "eval_tasks_every=2"])
    assert run.eval_tasks == ["paper:hops"]
    assert [s for s in range(1, 101) if eval_tasks_due(run, s)] == [40, 80, 100]
    final_only = load_run_config(None, ["eval_tasks=[a, b]", "steps=100", "save_every=10", "save_model_every=0"])
    assert final_only.eval_tasks == ["a", "b"] and [s for s in range(1, 101) if eval_tasks_due(final_only, s)] == [100]
    assert not any(eval_tasks_due(load_run_config(None, ["steps=100"]), s) for s in range(1, 101))


def test_ds_batch_fields_derived_and_mismatch_named():
    run = RunConfig(micro_batch=3, grad_accum=2, wandb={"mode": "disabled"})
    ds = build_ds_config({"zero_optimization": {"stage": 3}}, run, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 3, 2)
    assert ds["bf16"]["enabled"] is (resolve_precision(run.precision) == "bf16") and ds["gradient_clipping"] == run.grad_clip
    assert resolve_precision(run.precision) == ("bf16" if torch.cuda.is_available() else "fp32")
    assert zero_stage(ds) == 3 and zero_stage({}) == 0
    with pytest.raises(ValueError, match=r"train_batch_size=32 .* gives 24"):
        build_ds_config({"train_batch_size": 32}, run, world_size=4)
    for name in ("zero3.json", "zero1.json"):  # shipped JSONs leave the batch fields to the engine
        build_ds_config(json.loads((REPO / "ds_configs" / name).read_text()), run, world_size=2)


def test_lr_schedule_warmup_then_decay_to_min():
    for decay in ("cosine", "linear"):
        run = RunConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110, decay=decay, wandb={"mode": "disabled"})
        lrs = [run.lr * lr_lambda(run, s) for s in range(run.steps + 1)]
        assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
        assert lrs[110] == pytest.approx(1e-4) and all(a >= b - 1e-15 for a, b in zip(lrs[10:], lrs[11:]))
        mid = 1e-4 + 0.9e-3 * (0.5 * (1 + math.cos(math.pi * 0.5)) if decay == "cosine" else 0.5)
        assert lrs[60] == pytest.approx(mid)


def test_wsd_holds_lr_then_decays_with_its_shape():
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=100, decay="wsd", wandb={"mode": "disabled"})
    for shape, at_half in (("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - 0.5 ** 0.5)):
        run = RunConfig(**base, decay_steps=20, decay_shape=shape)
        lrs = [run.lr * lr_lambda(run, s) for s in range(run.steps + 1)]
        assert lrs[9] == lrs[10] == lrs[79] == lrs[80] == pytest.approx(1e-3)  # warmup, then stable to step 80
        assert lrs[90] == pytest.approx(1e-4 + 0.9e-3 * at_half) and lrs[100] == pytest.approx(1e-4)
        assert all(a >= b - 1e-15 for a, b in zip(lrs[80:], lrs[81:]))
    frac = RunConfig(**base, decay_fraction=0.3)
    assert lr_lambda(frac, 69) == 1.0 and lr_lambda(frac, 71) < 1.0  # the last 30 % decay
    # a cool-down branch from the stable phase: the same curve up to its branch point
    long, branch = RunConfig(**{**base, "steps": 1000}, decay_steps=200), RunConfig(**base, decay_steps=20)
    assert [lr_lambda(long, s) for s in range(80)] == [lr_lambda(branch, s) for s in range(80)]
    with pytest.raises(ValueError, match="decay_steps"):
        RunConfig(**base, decay_steps=101)


def test_weight_decay_groups_skip_norms_and_embeddings():
    m = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(5, 4), "proj": torch.nn.Linear(4, 4),
                             "norm": torch.nn.LayerNorm(4)})
    g = param_groups(m, 0.1)
    assert [p.shape for p in g[0]["params"]] == [torch.Size([4, 4])] and g[0]["weight_decay"] == 0.1
    assert len(g[1]["params"]) == 4 and g[1]["weight_decay"] == 0.0  # embedding, bias, norm weight + bias


def test_missing_data_prefix_names_file_and_command(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"")  # only the data prefix is missing
    run = load_run_config(REPO / "pretrain/configs/debug.yaml",
                          [f"data.blend=[[1.0, {tmp_path}/nope]]", f"data.tokenizer={tmp_path}/tok"])
    with pytest.raises(ValueError) as e:
        run.data.check_files()
    assert f"{tmp_path}/nope.bin" in str(e.value) and "tokenizer.preprocess" in str(e.value)


@pytest.mark.parametrize("resume", [["--resume", "auto"], ["--resume", "step_00000100"], ["--overwrite"]])
def test_cli_config_errors_are_one_line_with_rc_2(resume, capsys, monkeypatch):
    """pretrain/main.py parses --resume / --overwrite and hands --set to load_run_config; a bad key is one line on
    rank 0's stderr and exit status 2, before any process group exists (what the flags do is tests/e2e's)."""
    from pretrain.main import main

    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(["--ds_config", "ds_configs/zero3.json", *resume, "--set", "stepz=3"]) == 2
        err = capsys.readouterr().err
        assert ("config error" in err and "stepz" in err and "Traceback" not in err) is printed, err
        assert len(err.strip().splitlines()) == int(printed)
    with pytest.raises(SystemExit):
        main(["--ds_config", "ds_configs/zero3.json", "--resume"])  # --resume needs a value


@pytest.mark.parametrize("argv, words", [
    (["--set", "steps=true"], ["steps=True", "integer"]),  # a YAML bool is not an integer
    (["--set", "lr=.inf"], ["lr=inf", "finite"]),
    (["--set", "seq_len=1"], ["seq_len=1", ">= 2"]),
    (["--set", "warmup_steps=abc"], ["warmup_steps='abc'", "integer"]),
    (["--set", "betas=0.9"], ["betas=0.9", "list"]),
    (["--set", "seed=abc"], ["seed='abc'", "integer"]),
    (["--set", "seed=-1"], ["seed=-1", "2**32"]),
    (["--set", "wandb.mode=dryrun"], ["wandb.mode='dryrun'", "offline"]),
    (["--set", "activation_checkpointing.enabled=yes please"], ["activation_checkpointing.enabled", "true or false"]),
    (["--set", "data.num_workers=-1"], ["data.num_workers=-1"]),
    (["--resume", "auto", "--overwrite"], ["--overwrite", "--resume auto", "one of them"]),
    (["--config", "pretrain/configs/nope.yaml"], ["nope.yaml", "no such file"]),
])
def test_bad_values_are_refused_by_key(argv, words, capsys, monkeypatch):
    from pretrain.main import main

    monkeypatch.setenv("RANK", "0")
    assert main(["--ds_config", "ds_configs/zero3.json", *argv]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_bad_ds_json_and_wandb_env_are_config_errors(tmp_path, capsys, monkeypatch):
    from pretrain.main import main

    monkeypatch.setenv("RANK", "0")
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["--ds_config", str(tmp_path / "bad.json")]) == 2
    assert "bad.json is not readable JSON" in capsys.readouterr().err
    assert main(["--ds_config", str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # rank 0 alone would meet it, after the others started training
    assert main(["--ds_config", "ds_configs/zero3.json"]) == 2
    assert "WANDB_MODE='dryrun'" in capsys.readouterr().err


def test_every_key_is_documented():
    text = describe()
    from dataclasses import fields

    for f in fields(RunConfig):
        assert f"\n{f.name}:" in "\n" + text, f.name
    assert "data.blend: list" in text and "wandb.mode: offline | online | disabled = 'offline'" in text
    undocumented = [ln for ln in text.splitlines() if ln.startswith("    ") and not ln.strip()]
    assert not undocumented, undocumented
