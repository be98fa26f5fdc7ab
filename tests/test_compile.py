"""torch.compile of the repeated units (CausalLM.compile_units, run config `compile: true`) against eager.

- Graph structure (Dynamo only, backend "eager": fast): the dense baseline's blocks and a ReSSFormer without
  data-dependent paths (asam.topk=0, no SOES, dense FFN) compile with fullgraph=True, and once both step variants
  (step 0, steps >= 1) are compiled, K = 1..5 with and without activation checkpointing recompiles nothing. The
  debug preset's block breaks only where documented: the eager top-k selection and MoE experts calls.
- Parity (fp32): logits, loss and every gradient of the compiled model equal eager within 1e-5 relative
  (inductor fuses and reorders, so not bitwise), checkpointing on and off, K fixed and sampled; the baseline with
  inductor in the quick tier, the debug preset with aot_eager (quick) and inductor (slow).
- Trainer (slow): `pretrain/main.py --set compile=true` gives the eager run's losses over 3 steps, on 1 rank with
  ZeRO-1 and on 2 gloo ranks with ZeRO-3 (the shared block called K times under ZeRO-3 hooks); compile with expert
  parallelism is refused.
Inductor caches go to a temporary folder of this session.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch.utils.checkpoint import checkpoint

from pretrain.config import RunConfig, load_run_config
from ressformer import ModelConfig, build_model
from ressformer.moe import MoEExperts
from ressformer.recurrence import sample_num_steps
from tests.helpers.dist import REPO, base_env, launch_ranks, run_group

B, T = 2, 64
# the recurrent step without data-dependent code: dense attention, no SOES graph, dense FFN
NO_BREAKS = {"asam.topk": 0, "soes.enabled": False, "moe.num_experts": 1}


def ckpt(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """Inductor's caches in this session's temporary folder; compiled code released afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield
    torch._dynamo.reset()


def _pair(cfg: ModelConfig, **compile_kwargs):
    """(eager model, compiled model) with the same weights."""
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_units(**compile_kwargs)
    return eager, compiled


def _fwd_bwd(model, ids, k, ac):
    model.set_checkpointing(ckpt if ac else None)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, num_steps=k, return_logits=True)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                                     if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_parity(eager, compiled, cases, tol=1e-5):
    ids = torch.randint(0, eager.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    for k, ac in cases:
        logits, loss, grads = _fwd_bwd(eager, ids, k, ac)
        c_logits, c_loss, c_grads = _fwd_bwd(compiled, ids, k, ac)
        where = f"K={k} checkpointing={ac}"
        assert _rel(c_logits, logits) < tol, (where, _rel(c_logits, logits))
        assert abs(c_loss - loss).item() <= tol * abs(loss).item(), (where, c_loss.item(), loss.item())
        assert c_grads.keys() == grads.keys(), where
        worst = max(grads, key=lambda n: _rel(c_grads[n], grads[n]))
        assert _rel(c_grads[worst], grads[worst]) < tol, (where, worst, _rel(c_grads[worst], grads[worst]))


def _sampled_ks(cfg: ModelConfig, n: int) -> list[int]:
    """K as the trainer draws it (r2mu.step_sampling=uniform) for steps 0..n-1."""
    cfg = cfg.replace(**{"r2mu.step_sampling": "uniform", "r2mu.min_steps": 1, "r2mu.max_steps": 6})
    return [sample_num_steps(cfg, step, seed=3) for step in range(n)]


# --- the hook ---------------------------------------------------------------------------------------------------
def test_compile_units_keeps_keys_and_leaves_experts_and_cached_path_eager():
    cfg = ModelConfig.from_preset("debug", **{"r2mu.n_prelude": 1, "r2mu.n_coda": 1})
    eager, compiled = _pair(cfg, backend="eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints are unchanged
    targets = [*compiled.model.layers, compiled.model.memory]
    assert len(targets) == 4 and all(m._compiled_call_impl is not None for m in targets)
    experts = [m for m in compiled.modules() if isinstance(m, MoEExperts)]
    assert experts and all(getattr(m.loop, "_torchdynamo_disable", False) for m in experts)
    compiled.load_state_dict(eager.state_dict())  # a checkpoint of the eager model loads as is
    # generation (the cached path) calls forward_cached, which stays eager, and agrees with the full forward
    from ressformer.cache import ModelCache

    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    compiled.eval()
    with torch.no_grad():
        full = compiled(ids).logits
        cache = ModelCache()
        step = compiled(ids, cache=cache).logits
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,overrides,graphs", [("debug-transformer", {}, 1), ("debug", NO_BREAKS, 4)],
                         ids=["baseline", "ressformer-dense-attention"])
def test_units_compile_whole_and_the_k_loop_never_recompiles(preset, overrides, graphs):
    """fullgraph=True: no graph break anywhere in a unit. The baseline's 5 layers share one graph; ReSSFormer's
    step compiles 4 (the block at step 0 and at steps >= 1, the memory without and with S^(t-1)). After one K=2
    forward+backward, other K, with checkpointing on or off, reuse them: error_on_recompile stays silent."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cfg = ModelConfig.from_preset(preset, **overrides)
    counter = CompileCounter()
    _, model = _pair(cfg, backend=counter, fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    _fwd_bwd(model, ids, 2, ac=False)
    assert counter.frame_count == graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in (1, 3, 5, 2):
            for ac in (False, True):
                _fwd_bwd(model, ids, k, ac)
    assert counter.frame_count == graphs


def test_grouped_gemm_experts_compile_inside_the_block():
    """The routed experts on the grouped-GEMM path (what a bf16 run on an sm90+ GPU takes) break no graph: the
    recurrent step with routed experts (asam.topk=0, no SOES) compiles with fullgraph=True in bf16, K = 1..3 with
    and without checkpointing reuse its graphs, and the compiled model gives eager's logits, loss and gradients."""
    from torch._dynamo.testing import CompileCounter

    from ressformer import kernels

    kernels.set_moe_experts("grouped_mm")
    try:
        torch._dynamo.reset()
        cfg = ModelConfig.from_preset("debug", **{"asam.topk": 0, "soes.enabled": False})
        assert cfg.moe.enabled
        counter = CompileCounter()
        _, model = _pair(cfg, backend=counter, fullgraph=True)
        ids = torch.randint(0, cfg.vocab_size, (B, T))
        _fwd_bwd(model.bfloat16(), ids, 2, ac=False)
        graphs = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            for k, ac in ((1, False), (3, True), (2, True)):
                _fwd_bwd(model, ids, k, ac)
        assert counter.frame_count == graphs == 4
        torch._dynamo.reset()
        eager, compiled = _pair(cfg, backend="aot_eager", fullgraph=True)
        _assert_parity(eager.bfloat16(), compiled.bfloat16(), [(2, False), (3, True)], tol=1e-2)
    finally:
        kernels.set_moe_experts("auto")


def test_a_compiled_consumer_of_topk_first_does_not_recompile_on_ties():
    """topk_first redoes tied rows; its result has one layout either way, so the compiled frame that takes the
    indices (attention._gathered_attend_all) keeps its graph as the pattern of tied rows changes."""
    from torch._dynamo.testing import CompileCounter

    from ressformer.selection import topk_first

    torch._dynamo.reset()
    counter = CompileCounter()
    consume = torch.compile(lambda x, idx: x.gather(-1, idx).sum(-1), backend=counter, dynamic=False)
    untied = torch.arange(24.0).repeat(3, 1)  # distinct values: no row redone
    tied = untied.clone()
    tied[1, 21:] = 100.0
    tied[1, [16, 9, 2]] = 50.0  # row 1: three clear winners, then a three-way tie for the 4th place
    a, b = topk_first(untied, 4), topk_first(tied, 4)
    assert a.is_contiguous() and b.is_contiguous() and a.stride() == b.stride()
    assert b[1].sort().values.tolist() == [2, 21, 22, 23]  # the tie broke by index, so that row was redone
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, idx in ((untied, a), (tied, b), (untied, a)):
            consume(x, idx)
    assert counter.frame_count == 1


def test_graph_breaks_of_the_ressformer_block_are_the_documented_ones():
    """The debug preset's shared block at a step >= 1 (memory keys and the previous step's graph): every graph
    break is a call of the eager top-k selection (ASAM per-chunk selection, SOES pattern) or of the eager MoE
    experts; none lies in the model, recurrence or attention code around them."""
    torch._dynamo.reset()
    cfg = ModelConfig.from_preset("debug")
    _, model = _pair(cfg, backend="eager")
    h = model.model.embed_tokens(torch.randint(0, cfg.vocab_size, (B, T)))
    pos = torch.arange(T)
    memory = model.model.memory.memory_keys(h, model.model.memory(h, None)[0])
    graph = model._step(h, None, None, None, None, pos, t=0, need_summary=False).graph
    explained = torch._dynamo.explain(model.core_block(1).forward)(h, pos, memory=memory, graph=tuple(graph),
                                                                   recurrent=True)
    sites = set()
    for brk in explained.break_reasons:
        frame = [f for f in brk.user_stack if "/ressformer/" in f.filename][-1]  # innermost frame of ours
        call = [c for c in ("topk_first(", "self.loop(") if c in frame.line]
        sites.add((Path(frame.filename).name, frame.name, *call))
        assert "disable()" in brk.reason, brk.reason  # a call of an eager function, not an unsupported op
    assert sites == {("attention.py", "_select_topk", "topk_first("), ("attention.py", "_pad_edges", "topk_first("),
                     ("moe.py", "forward", "self.loop(")}, sites


# --- parity -----------------------------------------------------------------------------------------------------
def test_baseline_compiled_equals_eager():
    eager, compiled = _pair(ModelConfig.from_preset("debug-transformer"), fullgraph=True)
    _assert_parity(eager, compiled, [(None, False), (None, True)])


def test_ressformer_compiled_equals_eager_aot_eager():
    """AOTAutograd's joint graphs, without inductor's codegen: the forward is bitwise eager's."""
    cfg = ModelConfig.from_preset("debug")
    eager, compiled = _pair(cfg, backend="aot_eager")
    ks = _sampled_ks(cfg, 3)
    _assert_parity(eager, compiled, [(4, True), (4, False)] + [(k, True) for k in ks])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ressformer_compiled_equals_eager_inductor():
    cfg = ModelConfig.from_preset("debug")
    eager, compiled = _pair(cfg)
    ks = _sampled_ks(cfg, 4)
    assert len(set(ks)) > 1, ks
    _assert_parity(eager, compiled, [(4, False), (4, True)] + [(k, i % 2 == 0) for i, k in enumerate(ks)])


# --- run config and trainer -------------------------------------------------------------------------------------
def test_run_config_compile_field():
    assert RunConfig().compile is False
    assert load_run_config(None, ["compile=true"]).compile is True
    with pytest.raises(ValueError, match="compile='yes'"):
        RunConfig(compile="yes")


@pytest.mark.parametrize("ds_json", ["zero3_autoep.json", "zero2_moe.json"])
def test_compile_with_expert_parallel_is_refused(ds_json):
    from pretrain.engine import build_model_for

    ds = json.loads((REPO / "ds_configs" / ds_json).read_text())
    with pytest.raises(ValueError, match="compile: true with expert parallelism .* set compile: false"):
        build_model_for(RunConfig(compile=True, wandb={"mode": "disabled"}), ds)


TRAIN_ARGS = ["--config", "pretrain/configs/debug.yaml", "--set", "steps=3", "--set", "log_every=1",
              "--set", "save_every=3", "--set", "eval_iters=0", "--set", "wandb.mode=disabled",
              "--set", "micro_batch=2", "--set", "seq_len=64", "--set", "warmup_steps=2", "--set", "eps=1e-4",
              "--set", "model.r2mu.step_sampling=uniform", "--set", "model.r2mu.max_steps=4"]


@pytest.fixture(scope="module")
def default_data():
    if not (REPO / "artifacts" / "data" / "shakespeare.idx").is_file():
        subprocess.run([sys.executable, "-m", "pretrain.data", "prepare"], cwd=REPO, env=base_env(), check=True,
                       timeout=300)


def _train_records(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}


def _inductor_ran(tmp_path: Path) -> bool:
    """Whether a run wrote inductor's cache (it compiled), the runs' TORCHINDUCTOR_CACHE_DIR being tmp_path/inductor."""
    cache = tmp_path / "inductor"
    return cache.is_dir() and any(f.is_file() for f in cache.rglob("*"))


def _assert_same_losses(eager_dir: Path, compiled_dir: Path):
    eager, compiled = _train_records(eager_dir), _train_records(compiled_dir)
    assert sorted(eager) == sorted(compiled) == [1, 2, 3], (eager, compiled)
    assert len({r["num_steps"] for r in eager.values()}) > 1, eager  # K sampled per step
    for step, rec in eager.items():
        assert compiled[step]["num_steps"] == rec["num_steps"]
        assert abs(compiled[step]["loss"] - rec["loss"]) <= 1e-5 * abs(rec["loss"]), (step, compiled[step], rec)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trainer_compile_zero1_one_rank_matches_eager(tmp_path, default_data):
    """The debug ReSSFormer (MoE, SOES, R2MU memory, activation checkpointing from debug.yaml), K sampled."""
    env = {**base_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for name, extra in (("eager", []), ("compiled", ["--set", "compile=true"])):
        cmd = [sys.executable, "pretrain/main.py", "--ds_config", "ds_configs/zero1.json", *TRAIN_ARGS,
               "--set", f"run_dir={tmp_path / name}", *extra]
        p = run_group(cmd, timeout=540, cwd=REPO, env=env)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert _inductor_ran(tmp_path) == (name == "compiled")
    _assert_same_losses(tmp_path / "eager", tmp_path / "compiled")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trainer_compile_zero3_two_ranks_matches_eager(tmp_path, default_data):
    """ZeRO-3 gathers each parameter in an eager module hook (a graph break per submodule call) and the shared
    block runs K times per forward: the losses must still be eager's."""
    env = {**base_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for name, extra in (("eager", []), ("compiled", ["--set", "compile=true"])):
        launch_ranks(["pretrain/main.py", "--ds_config", "ds_configs/zero3.json", *TRAIN_ARGS,
                      "--set", f"run_dir={tmp_path / name}", *extra], 2, timeout=780, env=env)
        assert _inductor_ran(tmp_path) == (name == "compiled")
    _assert_same_losses(tmp_path / "eager", tmp_path / "compiled")
