"""MoE expert parallelism (pretrain/expert_parallel.py): start-up validation, layout conversion, and parity of
one training step on 2 real gloo CPU ranks against one plain-torch process: parity is the proof.

Parity cases (one launch of tests/helpers/ep_worker.py, 4 experts, top-2, ep size 2, data parallel over 2 ranks):
ZeRO-3 + AutoEP, ZeRO-2 + native DeepSpeed-MoE, ZeRO-3 with replicated experts (backend none);
each also with routing forced so that the experts of EP rank 1 (experts 2, 3) receive no token on any rank
(the upstream hang): the step must complete and still match. The reference averages the per-rank losses (the
balance loss is a per-batch statistic, as on every data-parallel rank), clips and steps torch AdamW; eps = 1e-3
keeps Adam's first update sensitive to the gradient's scale (a 2x expert-gradient error would show).
"""

import json
import os

import pytest
import torch

from pretrain import expert_parallel as xp
from ressformer.config import ModelConfig
from tests.helpers.dist import REPO, base_env, launch_ranks

WORLD, B, T, TOL = 2, 4, 16, 2e-6


def _cfg(k: int = 2, E: int = 4, shared: int = 0) -> ModelConfig:
    d = ModelConfig(arch="ressformer", vocab_size=64, d_model=32, n_heads=4, ffn_hidden=48, max_seq_len=32).to_dict()
    d["moe"] = {**d["moe"], "num_experts": E, "experts_per_token": k, "shared_experts": shared}
    return ModelConfig.from_dict(d)


def _ds(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


# --- start-up validation (no processes) ---------------------------------------------------------------------
@pytest.mark.parametrize("mutate, msg", [
    (lambda ds: ds["zero_optimization"].update(stage=3), "native DeepSpeed MoE cannot run under ZeRO-3: use ds_configs/zero3_autoep.json"),
    (lambda ds: ds["native_moe"].update(ep_size=3), "does not divide moe.num_experts=4"),
])
def test_native_impossible_combinations(mutate, msg):
    ds = _ds("zero2_moe")
    mutate(ds)
    with pytest.raises(ValueError, match=msg.replace(".", r"\.").replace("(", r"\(")):
        xp.resolve_plan(_cfg(), ds, 2)


def test_impossible_combinations():
    ds = _ds("zero2_moe")
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        xp.resolve_plan(_cfg(), ds, 3)
    with pytest.raises(ValueError, match="model is dense"):
        xp.resolve_plan(_cfg(k=1, E=1), ds, 2)
    with pytest.raises(ValueError, match="experts_per_token=1"):
        xp.resolve_plan(_cfg(k=1), ds, 2)
    a = _ds("zero3_autoep")
    a["expert_parallel"]["load_balance_coeff"] = 0.01
    with pytest.raises(ValueError, match="load_balance_coeff=0.01: AutoEP refuses"):
        xp.resolve_plan(_cfg(), a, 2)
    for key, val in [("zero_hpz_partition_size", 2), ("zero_quantized_gradients", True)]:
        a = _ds("zero3_autoep")
        a["zero_optimization"][key] = val
        with pytest.raises(ValueError, match=f"forbids \\['{key}'\\]"):
            xp.resolve_plan(_cfg(), a, 2)
    a = _ds("zero3_autoep")
    a["expert_parallel"]["top_k"] = 3
    with pytest.raises(ValueError, match="top_k=3 differs"):
        xp.resolve_plan(_cfg(), a, 2)
    with pytest.raises(ValueError, match="shared_experts=1"):
        xp.resolve_plan(_cfg(shared=1), _ds("zero3_autoep"), 2)
    both = _ds("zero3_autoep")
    both["native_moe"] = {"enabled": True, "ep_size": 2}
    with pytest.raises(ValueError, match="keep one"):
        xp.resolve_plan(_cfg(), both, 2)
    a = _ds("zero3_autoep")
    a["zero_optimization"]["stage"] = 2
    with pytest.raises(ValueError, match="zero stage 2 given"):
        xp.resolve_plan(_cfg(), a, 2)
    odd = ModelConfig.from_dict({**_cfg().to_dict(), "ffn_hidden": 44})
    with pytest.raises(ValueError, match=r"'ffn_hidden': 44\} must be multiples of 8"):
        xp.resolve_plan(odd, _ds("zero3_autoep"), 2)
    a = _ds("zero3_autoep")
    a["expert_parallel"]["use_grouped_mm"] = False
    assert xp.resolve_plan(odd, a, 2).backend == "autoep"
    assert xp.resolve_plan(_cfg(), _ds("zero3_autoep"), 4) == xp.ExpertParallelPlan("autoep", 2, 3)
    assert xp.resolve_plan(_cfg(), _ds("zero2_moe"), 2) == xp.ExpertParallelPlan("native", 2, 2)
    assert xp.resolve_plan(_cfg(), {"zero_optimization": {"stage": 3}}, 2).backend == "none"


def test_native_layout_round_trip():
    g = torch.Generator().manual_seed(0)
    E, F, D = 4, 6, 5
    sd = {"model.layers.0.mlp.gate.weight": torch.randn(E, D, generator=g),
          "model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * F, D, generator=g),
          "model.layers.0.mlp.experts.down_proj": torch.randn(E, D, F, generator=g),
          "model.layers.0.mlp.shared_experts.down_proj.weight": torch.randn(D, F, generator=g),
          "lm_head.weight": torch.randn(7, D, generator=g)}
    per_rank = [xp.to_native_layout(sd, E, ep_size=2, ep_rank=r) for r in range(2)]
    p = "model.layers.0.mlp.moe.deepspeed_moe."
    assert set(per_rank[1]) == {p + "gate.wg.weight", "lm_head.weight", "model.layers.0.mlp.shared_experts.down_proj.weight",
                                *(f"{p}experts.deepspeed_experts.{l}.{w}.weight" for l in (0, 1) for w in ("gate_up_proj", "down_proj"))}
    assert torch.equal(per_rank[1][p + "experts.deepspeed_experts.1.gate_up_proj.weight"], sd["model.layers.0.mlp.experts.gate_up_proj"][3])
    assert torch.equal(per_rank[0][p + "experts.deepspeed_experts.0.down_proj.weight"], sd["model.layers.0.mlp.experts.down_proj"][0])
    back = xp.from_native_layout(per_rank)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    one = xp.to_native_layout(sd, E)  # ep_size 1: all experts local
    assert all(torch.equal(xp.from_native_layout(one)[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="not 0..E-1"):
        xp.from_native_layout(per_rank[1:])


def test_autoep_layout_to_fused():
    g = torch.Generator().manual_seed(1)
    E, F, D = 4, 6, 5
    gu, dn = torch.randn(E, 2 * F, D, generator=g), torch.randn(E, D, F, generator=g)
    gate = torch.randn(E, D, generator=g)
    ranks = [{"m.mlp.router.gate.weight": gate, "m.mlp.gate.gate.weight": gate, "m.mlp.experts.w1": gu[2 * r:2 * r + 2, :F],
              "m.mlp.experts.w3": gu[2 * r:2 * r + 2, F:], "m.mlp.experts.w2": dn[2 * r:2 * r + 2]} for r in range(2)]
    out = xp.from_autoep_layout(ranks)
    assert set(out) == {"m.mlp.gate.weight", "m.mlp.experts.gate_up_proj", "m.mlp.experts.down_proj"}
    assert torch.equal(out["m.mlp.experts.gate_up_proj"], gu) and torch.equal(out["m.mlp.experts.down_proj"], dn)


# --- parity on 2 gloo ranks ----------------------------------------------------------------------------------
def _launch(inp, out, timeout: float) -> None:
    env = base_env()
    # a PYTHONPATH the caller set comes first, then the repository
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(REPO)) if p)
    launch_ranks([str(REPO / "tests" / "helpers" / "ep_worker.py"), str(inp), str(out)], WORLD, timeout, env=env)


def _forced(state: dict, cfg: ModelConfig) -> dict:
    """Route every token of every rank to experts 0 and 1 (EP rank 0): a large constant feature 0 in the
    embeddings and router rows +/- along it; experts 2, 3 (EP rank 1) get no token."""
    s = {k: v.clone() for k, v in state.items()}
    s["model.embed_tokens.weight"].mul_(0.05)[:, 0] = 1.0
    for i in range(2):
        w = s[f"model.layers.{i}.mlp.gate.weight"]
        w.mul_(0.01)[:, 0] = torch.tensor([4.0, 3.0, -4.0, -3.0])
    return s


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_expert_parallel_step_matches_single_process(tmp_path):
    from tests.helpers.ep_worker import TinyMoELM, reference_step

    cfg = _cfg()
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in TinyMoELM(cfg).state_dict().items()}
    forced = _forced(state, cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    z3 = {"zero_optimization": _ds("zero3_autoep")["zero_optimization"]}
    loop = _ds("zero3_autoep")
    loop["expert_parallel"]["use_grouped_mm"] = False  # AutoEP's expert loop instead of torch._grouped_mm
    cases = []
    # zero3_replicated_grouped_mm: our MoEExperts on torch._grouped_mm with ZeRO-3's gathered parameters
    for name, ds, experts in [("autoep", _ds("zero3_autoep"), "auto"), ("autoep_loop", loop, "auto"),
                              ("native", _ds("zero2_moe"), "auto"), ("zero3_replicated", z3, "loop"),
                              ("zero3_replicated_grouped_mm", z3, "grouped_mm")]:
        cases += [{"name": name, "ds": ds, "aux_coef": 0.05, "state": state, "moe_experts": experts},
                  {"name": name + "_forced", "ds": ds, "aux_coef": 0.05, "state": forced, "moe_experts": experts}]
    torch.save({"input_ids": ids, "cfg": cfg.to_dict(), "cases": cases}, tmp_path / "in.pt")
    _launch(tmp_path / "in.pt", tmp_path / "out.pt", timeout=280)
    res = torch.load(tmp_path / "out.pt", weights_only=False)

    refs = {s: reference_step(cfg, st, ids, WORLD, 0.05) for s, st in (("plain", state), ("forced", forced))}
    no_aux = reference_step(cfg, state, ids, WORLD, 0.0)[2]
    report = {}
    for c in cases:
        r, (ref_loss, ref_norm, ref_sd) = res[c["name"]], refs["forced" if c["name"].endswith("_forced") else "plain"]
        assert set(r["state"]) == set(ref_sd), c["name"]  # every weight, every expert, converted back to fused
        diffs = {k: (r["state"][k] - v).abs().max().item() for k, v in ref_sd.items()}
        report[c["name"]] = (abs(r["loss"] - ref_loss), abs(r["grad_norm"] - ref_norm), max(diffs.values()))
        assert abs(r["loss"] - ref_loss) < TOL, (c["name"], r["loss"], ref_loss)
        assert abs(r["grad_norm"] - ref_norm) < 1e-5 * ref_norm, (c["name"], r["grad_norm"], ref_norm)
        assert max(diffs.values()) < TOL, (c["name"], sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
        assert r["n_router_logits"] == [(B // WORLD * T, 4)] * 3  # every mlp call (core twice) returned logits
        assert r["balance"] > 0
        if c["name"].endswith("_forced"):
            # no token reached EP rank 1's experts (2, 3) in any of the 3 mlp calls, and the step completed
            assert all(load[2] == 0 and load[3] == 0 for load in r["load"]), r["load"]
    print("max |diff| (loss, grad norm, weights):", report)
    # the backends really ran, and the balance loss acts on the router (its update differs without it)
    assert "AutoEPMoELayer" in res["autoep"]["module_types"] and "NativeMoEBlock" in res["native"]["module_types"]
    assert res["autoep"]["grouped_mm"] == [True] and res["autoep_loop"]["grouped_mm"] == [False]
    router = "model.layers.0.mlp.gate.weight"
    for name in ("autoep", "native"):
        assert (res[name]["state"][router] - no_aux[router]).abs().max() > 100 * TOL


def _engine_parity(tmp_path, name: str, ds_name: str, ac: bool) -> None:
    """The product path on the real debug ReSSFormer (4 experts top-2, the shared core run K = 3 times):
    `engine.build_engine` (zero.Init under ZeRO-3, prepare_expert_parallel, param_groups_for in build_optimizer,
    deepspeed.initialize) on 2 ranks == plain torch with the engine's own optimizer/schedule builders."""
    from pretrain.config import RunConfig
    from pretrain.engine import build_optimizer, checkpoint_fn
    from ressformer import build_model

    run_d = RunConfig(model="debug", seq_len=T, micro_batch=B // WORLD, steps=10, lr=1e-2, warmup_steps=2,
                      grad_clip=0.5, seed=7, eps=1e-3, activation_checkpointing={"enabled": ac, "every": 1},
                      wandb={"mode": "disabled"}).to_dict()
    run = RunConfig.from_dict(run_d)
    cfg = run.model_config()
    assert cfg.moe.num_experts == 4 and cfg.r2mu.enabled
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    case = {"name": name, "engine": True, "run": run_d, "ds": _ds(ds_name), "num_steps": 3, "state": state}
    torch.save({"input_ids": ids, "cfg": cfg.to_dict(), "cases": [case]}, tmp_path / "in.pt")
    _launch(tmp_path / "in.pt", tmp_path / "out.pt", timeout=280)
    r = torch.load(tmp_path / "out.pt", weights_only=False)[name]

    model = build_model(cfg)
    model.load_state_dict(state)
    if ac:
        model.set_checkpointing(checkpoint_fn, every=1)
    opt, sched = build_optimizer(model, run)
    loss = torch.stack([model(x, labels=x, num_steps=3).loss for x in ids.chunk(WORLD)]).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip).item()
    opt.step()
    ref = model.state_dict()
    assert r["aux"]["moe_balance"] > 0  # computed from the router logits the expert-parallel layer returned
    assert set(r["state"]) == set(ref), set(r["state"]) ^ set(ref)
    diff = max((r["state"][k] - v).abs().max().item() for k, v in ref.items())
    report = (abs(r["loss"] - loss.item()), abs(r["grad_norm"] - norm), diff)
    print(f"{name} max |diff| (loss, grad norm, weights):", report)
    assert report[0] < TOL and report[1] < 1e-5 * norm and diff < TOL, report


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_native_moe_matches_single_process(tmp_path):
    _engine_parity(tmp_path, "native_ac_k3", "zero2_moe", ac=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_autoep_matches_single_process(tmp_path):
    _engine_parity(tmp_path, "autoep_k3", "zero3_autoep", ac=False)
