"""Packaging (pretrain/convert.py, pretrain/hf/) and DeepSpeed shard recovery (pretrain/checkpoint/ds_recovery.py):
model folder or DeepSpeed checkpoint -> Hugging Face -> ours -> Hugging Face.

Fast tests export a seeded debug model directly, and convert a run folder whose tags hold model folders and no
DeepSpeed file. The slow tests train the debug model for 2 steps on 2 gloo CPU ranks with the trainer CLI under
ZeRO-1, ZeRO-3, ZeRO-3 + AutoEP and ZeRO-2 + native MoE (one session fixture), convert each, and check: the
logits of the export == the logits of the trainer's engine after DeepSpeed's own `engine.load_checkpoint` (an
independent reader, so wrong weights fail); logits of the transformers model == our training model rebuilt from
the recovered weights; each expert-parallel backend gives the weights of its plain ZeRO counterpart trained from
the same seed and data (a misplaced expert would not); every native-MoE expert file arrives in its fused slot;
a tag without model folder is recovered from its shards; damaged checkpoints raise errors naming what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.convert import export_hf, import_hf, load_init_state, read_any, read_hf, read_safetensors_dir
from pretrain.checkpoint.ds_recovery import CheckpointError, check_complete, load_ds_file, read_deepspeed_checkpoint
from pretrain.model_dir import save_model_dir
from ressformer import build_model
from ressformer.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "tinyshakespeare" / "input.txt"
TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n  It is the east, 12345 \u00e9\u2713\U0001F642\t<s>x"

# Runs with `python -I -S` (no PYTHONPATH, no cwd on sys.path, no .pth files, so not the editable install of
# ressformer either): site-packages is added back by hand and only the export folder provides model code.
CLEAN_SCRIPT = r"""
import os, sys
sys.path += os.environ["CLEAN_SITE_PACKAGES"].split(os.pathsep)
import json, torch
hf, out = sys.argv[1], sys.argv[2]
assert not any(p.rstrip('/').endswith('main') for p in sys.path), sys.path
import importlib.util
assert importlib.util.find_spec('ressformer') is None and importlib.util.find_spec('pretrain') is None
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
x = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    res = {"logits": m(x).logits, "logits_k5": m(x, num_steps=5).logits,
           "gen": m.generate(x[:1, :6], max_new_tokens=4, do_sample=False),
           "gen_k2": m.generate(x[:1, :6], max_new_tokens=4, do_sample=False, num_steps=2)}
text = sys.argv[4]
res["ids"] = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
res["decoded"] = tok.decode(res["ids"].tolist())
res["cls"] = type(m).__module__
torch.save(res, out)
"""


def clean_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_MODULES_CACHE=str(tmp / "hf_modules"), CLEAN_SITE_PACKAGES=os.pathsep.join(site.getsitepackages()))
    return env


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from tokenizer.train import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([CORPUS], out, vocab_size=512, num_threads=2)
    return out


def seeded_model(cfg: ModelConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    m = build_model(cfg or ModelConfig.from_preset("debug"))
    return m.eval()


def greedy(model, ids: torch.Tensor, n: int, num_steps=None) -> torch.Tensor:
    for _ in range(n):
        nxt = model(ids, num_steps=num_steps).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def check_clean_load(hf: Path, model, tok_dir: Path, tmp: Path) -> None:
    """Load `hf` in a clean interpreter; logits / generate / tokenizer must equal ours."""
    from tokenizer import Tokenizer

    x = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    out = tmp / "clean.pt"
    p = subprocess.run([sys.executable, "-I", "-S", "-c", CLEAN_SCRIPT, str(hf), str(out), json.dumps(x.tolist()), TEXT],
                       cwd=tmp, env=clean_env(tmp), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = torch.load(out, weights_only=False)
    assert res["cls"].startswith("transformers_modules.")
    with torch.no_grad():
        ref = model(x).logits
        assert (res["logits"] - ref).abs().max().item() < 1e-5
        ref5 = model(x, num_steps=5).logits
        assert (res["logits_k5"] - ref5).abs().max().item() < 1e-5
        assert (ref5 - ref).abs().max().item() > 1e-4  # K really reaches the model
        assert torch.equal(res["gen"], greedy(model, x[:1, :6], 4))
        assert torch.equal(res["gen_k2"], greedy(model, x[:1, :6], 4, num_steps=2))
    ours = Tokenizer(tok_dir)
    assert res["ids"].tolist() == ours.encode(TEXT)
    assert res["decoded"] == TEXT == ours.decode(ours.encode(TEXT))


def test_export_loads_without_install_and_matches_training_model(tmp_path, tok_dir):
    model = seeded_model()
    hf = export_hf(model.state_dict(), model.config, tmp_path / "hf", max_shard_size="200KB", tokenizer_dir=tok_dir)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # sharded above the size
    assert {p.name for p in hf.glob("ressformer_*.py")} >= {"ressformer_model.py", "ressformer_config.py"}
    check_clean_load(hf, model, tok_dir, tmp_path)


def test_roundtrip_hf_ours_hf_is_bitwise_and_init_state_loads(tmp_path, tok_dir):
    cfg = ModelConfig.from_preset("debug").replace(**{"tie_embeddings": True})
    model = seeded_model(cfg)
    for dtype in ("bf16", "fp32"):
        a = export_hf(model.state_dict(), cfg, tmp_path / f"a_{dtype}", dtype=dtype, max_shard_size="300KB",
                      tokenizer_dir=tok_dir, num_steps=6)
        ours = import_hf(a, tmp_path / f"ours_{dtype}")
        cfg2, sd2 = load_init_state(ours)
        assert cfg2 == cfg and (ours / "tokenizer" / "tokenizer.model").is_file()
        b = export_hf(sd2, cfg2, tmp_path / f"b_{dtype}", dtype=dtype, max_shard_size="300KB",
                      tokenizer_dir=ours / "tokenizer", num_steps=6)
        sa, sb = read_safetensors_dir(a), read_safetensors_dir(b)
        assert "lm_head.weight" not in sa  # tied: stored once
        assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
        assert sa["model.embed_tokens.weight"].dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    # in-process transformers load of the tied fp32 export: same logits, config K used by default
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a_fp32", trust_remote_code=True).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(x).logits - model(x, num_steps=6).logits).abs().max().item() < 1e-5
        with pytest.raises(ValueError, match="left padding"):
            hf(x, attention_mask=torch.cat([torch.zeros(1, 2), torch.ones(1, 18)], 1).long())


def test_save_pretrained_of_a_loaded_export_converts_back_with_its_tokenizer(tmp_path, tok_dir):
    """export -> from_pretrained -> save_pretrained -> --to-ressformer keeps weights, config and tokenizer; the
    export generates with its cache and uses EOS as BOS (pretraining never saw a BOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenizer import Tokenizer

    model = seeded_model(seed=4)
    hf = export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_dir=tok_dir, num_steps=3)
    meta = json.loads((tok_dir / "ressformer_tokenizer.json").read_text())
    cfg, gen = (json.loads((hf / n).read_text()) for n in ("config.json", "generation_config.json"))
    assert cfg["use_cache"] is True and gen["use_cache"] is True
    assert cfg["bos_token_id"] == gen["bos_token_id"] == cfg["eos_token_id"] == meta["eos_id"] != meta["bos_id"]
    m = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    t = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
    assert t.bos_token == t.eos_token and t.bos_token_id == meta["eos_id"]
    assert t("To be")["input_ids"] == Tokenizer(tok_dir).encode("To be")  # never added to encoded text
    saved = tmp_path / "saved"
    m.save_pretrained(saved)
    t.save_pretrained(saved)
    assert (saved / "ressformer_tokenizer.json").read_bytes() == (tok_dir / "ressformer_tokenizer.json").read_bytes()
    x = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).eval()
        assert (again(x).logits - model(x, num_steps=3).logits).abs().max().item() < 1e-5
    p = _convert_cli(["--to-ressformer", "--checkpoint", str(saved), "--out", str(tmp_path / "ours")])
    assert p.returncode == 0 and "tokenizer/" in p.stdout, p.stderr[-3000:]
    cfg2, sd2 = load_init_state(tmp_path / "ours")
    assert cfg2 == model.config and all(torch.equal(sd2[k], v) for k, v in model.state_dict().items())
    assert Tokenizer(tmp_path / "ours" / "tokenizer").encode(TEXT) == Tokenizer(tok_dir).encode(TEXT)
    (saved / "ressformer_tokenizer.json").unlink()  # a partial tokenizer is named, not silently dropped
    with pytest.raises(CheckpointError, match=r"ressformer_tokenizer\.json.*original export"):
        import_hf(saved, tmp_path / "partial")


def test_init_from_starts_continued_pretraining_from_the_export(tmp_path, tok_dir):
    """HF -> --to-ressformer folder -> run config `init_from` -> the trainer's model holds those weights."""
    from pretrain.config import ConfigError, RunConfig
    from pretrain.engine import build_model_for, load_init_from

    model = seeded_model(seed=3)
    hf = export_hf(model.state_dict(), model.config, tmp_path / "hf", tokenizer_dir=tok_dir)
    init = import_hf(hf, tmp_path / "init")
    run = RunConfig(model=str(init / "model_config.yaml"), init_from=str(init))
    sd = load_init_from(run)
    built = build_model_for(run, {"zero_optimization": {"stage": 1}}, sd)
    got = built.state_dict()
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    assert load_init_from(RunConfig()) is None
    with pytest.raises(ValueError, match=r"differs from this run's model config.*d_model"):
        load_init_from(RunConfig(model="debug", model_overrides={"d_model": 32}, init_from=str(init)))
    with pytest.raises(ConfigError, match="--to-ressformer"):  # reported like a config error: one line, rc 2
        load_init_from(RunConfig(init_from=str(tmp_path / "missing")))
    # a checkpoint tag is verified against its manifest first (its model files only)
    from pretrain.checkpoint.tags import COMPLETE, MANIFEST, checkpoint_files, file_digest

    (init / MANIFEST).write_text(json.dumps({"files": {n: file_digest(init / n) for n in checkpoint_files(init)}}))
    (init / COMPLETE).write_text("1\n")
    assert load_init_from(run).keys() == sd.keys()
    w = bytearray((init / "model.safetensors").read_bytes())
    w[len(w) // 2] ^= 0xFF  # same size: only the sha256 shows it
    (init / "model.safetensors").write_bytes(bytes(w))
    with pytest.raises(ConfigError, match="model.safetensors does not match its sha256"):
        load_init_from(run)


def test_damaged_hf_folder_and_incomplete_state_dict(tmp_path):
    model = seeded_model()
    hf = export_hf(model.state_dict(), model.config, tmp_path / "hf", max_shard_size="200KB")
    sd = model.state_dict()
    bad = {k: v for k, v in sd.items() if "layers.0.mlp.experts" not in k}
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.experts\.gate_up_proj.*expert shards"):
        check_complete(bad, model.config, "test")
    bad = dict(sd, **{"model.layers.0.mlp.experts.down_proj": sd["model.layers.0.mlp.experts.down_proj"][:3]})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        check_complete(bad, model.config, "test")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        read_hf(hf)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shards.*{shard.name}.*missing"):
        read_hf(hf)


def test_loading_an_export_refuses_missing_and_unexpected_tensors(tmp_path):
    """transformers alone would fill a tensor absent from the files with uninitialised memory and load."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = seeded_model()
    hf = export_hf(model.state_dict(), model.config, tmp_path / "hf")
    f = hf / "model.safetensors"
    good = load_file(str(f))
    _, info = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    key = "model.layers.0.mlp.experts.down_proj"
    save_file({k: v for k, v in good.items() if k != key}, str(f), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=rf"1 missing \['{key}'\].*export it again"):
        AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    save_file(dict(good, **{"model.extra.weight": torch.zeros(3)}), str(f), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"1 unexpected \['model\.extra\.weight'\]"):
        AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)


def test_convert_reads_the_model_folder_of_a_checkpoint_tag(tmp_path, tok_dir):
    """RUN_DIR -> its newest complete tag's model folder; no DeepSpeed file is needed or read."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):  # step 6: a save that did not finish
        m = seeded_model(seed=step)
        tag = save_model_dir(run / f"step_{step:08d}", m.state_dict(), m.config, tokenizer_dir=tok_dir)
        if complete:
            (tag / "COMPLETE").write_text("1\n")
    assert not list(run.rglob("*.pt"))
    p = _convert_cli(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--max-shard-size", "200KB"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step_00000004 (model folder)" in p.stdout and "ds_recovery" not in p.stdout
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    x = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (hf(x).logits - seeded_model(seed=4)(x).logits).abs().max().item() < 1e-5
    sd, mcfg, info = read_any(run / "step_00000002")
    assert info["source"] == "model folder" and mcfg == seeded_model(seed=2).config.to_dict()
    assert all(torch.equal(sd[k], v) for k, v in seeded_model(seed=2).state_dict().items())
    # an unfinished tag named explicitly is refused; a damaged model.safetensors names itself
    p = _convert_cli(["--checkpoint", str(run / "step_00000006"), "--out", str(tmp_path / "x")])
    assert p.returncode == 2 and "COMPLETE" in p.stderr
    f = run / "step_00000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    p = _convert_cli(["--checkpoint", str(run), "--out", str(tmp_path / "y")])
    assert p.returncode == 2 and "step_00000004/model.safetensors" in p.stderr and "truncated" in p.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # with manifests (the trainer writes one per tag): same-size corruption is caught; RUN_DIR falls back to the
    # previous usable tag with a warning naming the file, a tag given by name is refused
    from pretrain.checkpoint.tags import MANIFEST, checkpoint_files, file_digest

    save_model_dir(run / "step_00000004", seeded_model(seed=4).state_dict(), seeded_model(seed=4).config)
    for step in (2, 4):
        t = run / f"step_{step:08d}"
        (t / MANIFEST).write_text(json.dumps({"files": {n: file_digest(t / n) for n in checkpoint_files(t)}}))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    p = _convert_cli(["--checkpoint", str(run), "--out", str(tmp_path / "z")])
    assert p.returncode == 0 and "skipping step_00000004" in p.stderr and "sha256" in p.stderr, p.stderr[-3000:]
    assert "step_00000002 (model folder)" in p.stdout
    p = _convert_cli(["--checkpoint", str(run / "step_00000004"), "--out", str(tmp_path / "w")])
    assert p.returncode == 2 and "model.safetensors" in p.stderr and "sha256" in p.stderr
    assert "--from-shards" in p.stderr  # the DeepSpeed files may still be intact


def test_a_tag_removed_while_it_is_chosen_is_named_never_the_tokenizer(tmp_path, tok_dir, monkeypatch, capsys):
    """A running job's keep_last removes the tag convert chose before convert holds it: a run folder picks again, a
    tag named by path is refused with that cause (not 'pass --no-tokenizer')."""
    import pretrain.convert as conv
    from pretrain.checkpoint.tags import remove_tag

    run = tmp_path / "run"
    for step in (2, 4):
        m = seeded_model(seed=step)
        save_model_dir(run / f"step_{step:08d}", m.state_dict(), m.config, tokenizer_dir=tok_dir)
        (run / f"step_{step:08d}" / "COMPLETE").write_text("1\n")
    real, removed = conv.reading, []

    def reading_after_keep_last(tag):
        if not removed:  # the job's keep_last, between convert's choice and its lock
            removed.append(tag.name)
            remove_tag(tag)
        return real(tag)

    monkeypatch.setattr(conv, "reading", reading_after_keep_last)
    sd, _, info = read_any(run)  # chose step 4, which went: chosen again
    assert removed == ["step_00000004"] and info["tag"].endswith("step_00000002")
    removed.clear()
    rc = conv.main(["--checkpoint", str(run / "step_00000002"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "hf").exists()
    assert "removed while it was being read" in err and "keep_last" in err and "--no-tokenizer" not in err, err


# --- 2-rank DeepSpeed checkpoints from the trainer CLI ----------------------------------------------------------
BACKENDS = ("zero1", "zero3", "zero3_autoep", "zero2_moe")


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    from tests.helpers.dist import base_env, free_port, run_group

    root = tmp_path_factory.mktemp("convert_runs")
    art = root / "art"
    subprocess.run([sys.executable, "-m", "pretrain.data", "prepare", "--out", str(art)], cwd=REPO, env=base_env(),
                   check=True, timeout=300, capture_output=True)
    launcher = shutil.which("deepspeed", path=str(REPO / ".venv" / "bin")) or shutil.which("deepspeed")
    out = {}
    for name in BACKENDS:
        run_dir = root / name
        cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "pretrain/main.py",
               "--ds_config", f"ds_configs/{name}.json", "--config", "pretrain/configs/debug.yaml",
               "--set", f"run_dir={run_dir}", "--set", "steps=2", "--set", "save_every=2", "--set", "eval_every=1000",
               "--set", "seq_len=64", "--set", "micro_batch=2", "--set", "wandb.mode=disabled", "--set", "plot=false", "--set", "preflight=false",
               "--set", f"data.blend=[[1.0, {art}/data/shakespeare]]", "--set", f"data.tokenizer={art}/tokenizer",
               # three MoE layers (prelude, core, coda), so expert files and layer ids are mapped across layers
               "--set", "model.r2mu.n_prelude=1", "--set", "model.r2mu.n_coda=1"]
        p = run_group(cmd, timeout=400, cwd=REPO, env=base_env())
        assert p.returncode == 0, f"{name}:\n" + (p.stdout + p.stderr)[-5000:]
        out[name] = run_dir
    return out


def _run_config(tag: Path) -> dict:
    """The run config a tag records (run_state.json; run_config.json in tags of older trainers)."""
    f = tag / "run_state.json" if (tag / "run_state.json").is_file() else tag / "run_config.json"
    return json.loads(f.read_text())["run_config"]


def _drop_model_folder(tag: Path) -> None:
    """Make `tag` look like a checkpoint saved before tags carried the model folder and a manifest."""
    for name in ("model.safetensors", "model_config.yaml", "manifest.json"):
        (tag / name).unlink(missing_ok=True)
    if (tag / "run_state.json").is_file():  # the client state's name before manifests
        (tag / "run_state.json").rename(tag / "run_config.json")
    shutil.rmtree(tag / "tokenizer", ignore_errors=True)


def _convert_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.convert", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_backends_convert_load_and_agree(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    import pretrain.convert as conv

    gathered = {}
    for name in BACKENDS:
        sd, mcfg, info = read_deepspeed_checkpoint(runs[name])
        sd = check_complete(sd, mcfg, name)
        assert info["world_size"] == 2 and info["zero_stage"] == {"zero1": 1, "zero3": 3, "zero3_autoep": 3,
                                                                  "zero2_moe": 2}[name]
        gathered[name] = sd
        out = tmp_path / f"hf_{name}"
        args = ["--checkpoint", str(runs[name]), "--out", str(out), "--max-shard-size", "500KB"]
        if name == "zero3_autoep":  # the command line once; the other backends in this process
            p = _convert_cli(args)
            assert p.returncode == 0, p.stderr
        else:
            assert conv.main(args) == 0
        model = build_model(ModelConfig.from_dict(mcfg)).eval()
        model.load_state_dict(sd)
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert (hf(x).logits - model(x).logits).abs().max().item() < 1e-5, name
        if name == "zero3_autoep":
            check_clean_load(out, model, Path(_run_config(runs[name] / "step_00000002")["data"]["tokenizer"]), tmp_path)
    # same seed, same data, same init path, 2 steps: the expert-parallel backend must give the weights of its
    # plain counterpart, expert order included. (The trainer initialises ZeRO-3 models with a different RNG
    # sequence than ZeRO-1/2 ones, so the pairs share a ZeRO family.)
    for name, ref_name in (("zero2_moe", "zero1"), ("zero3_autoep", "zero3")):
        ref = gathered[ref_name]
        diff = max((gathered[name][k] - ref[k]).abs().max().item() for k in ref)
        assert diff < 1e-4, (name, ref_name, diff)
    e = gathered["zero1"]["model.layers.1.mlp.experts.gate_up_proj"]
    assert (e[[1, 0, 2, 3]] - e).abs().max().item() > 1e-2  # a swapped expert would fail the check above
    # every native-MoE expert file lands in its fused slot
    tag = runs["zero2_moe"] / "step_00000002"
    files = sorted(tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(files) == 3 * 4
    for f in files:
        for k, v in load_ds_file(f).items():
            prefix, rest = k.split(".mlp.moe.deepspeed_moe.experts.deepspeed_experts.")
            eid, which = int(rest.split(".")[0]), rest.split(".")[1]
            assert torch.equal(gathered["zero2_moe"][f"{prefix}.mlp.experts.{which}"][eid], v.float()), k


def _copy_tag(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("wandb"))
    return dst


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_damaged_checkpoints_name_what_is_missing(runs, tmp_path):
    # missing rank shard (AutoEP ZeRO-3)
    d = _copy_tag(runs["zero3_autoep"], tmp_path / "a")
    _drop_model_folder(d / "step_00000002")  # convert then reads the shards
    (d / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"world size 2.*zero_pp_rank_1_mp_rank_00_optim_states\.pt"):
        read_deepspeed_checkpoint(d)
    p = _convert_cli(["--checkpoint", str(d), "--out", str(tmp_path / "x"), "--no-tokenizer"])
    assert p.returncode == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in p.stderr
    assert not (tmp_path / "x" / "config.json").exists()
    # truncated file
    d = _copy_tag(runs["zero3"], tmp_path / "b")
    f = d / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot read .*zero_pp_rank_1_mp_rank_00_optim_states\.pt.*truncated"):
        read_deepspeed_checkpoint(d)
    # altered world-size record
    d = _copy_tag(runs["zero1"], tmp_path / "c")
    f = d / "step_00000002" / "mp_rank_00_model_states.pt"
    state = load_ds_file(f)
    state["dp_world_size"] = 3
    torch.save(state, f)
    with pytest.raises(CheckpointError, match=r"world size 3.*zero_pp_rank_2_mp_rank_00_optim_states\.pt"):
        read_deepspeed_checkpoint(d)
    # a missing native-MoE expert file
    d = _copy_tag(runs["zero2_moe"], tmp_path / "d")
    (d / "step_00000002" / "layer_2_expert_3_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"layer_2_expert_3_mp_rank_00_model_states\.pt"):
        read_deepspeed_checkpoint(d)
    # an unfinished save is never picked, and naming it explicitly is refused
    d = _copy_tag(runs["zero1"], tmp_path / "e")
    (d / "step_00000002" / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        read_deepspeed_checkpoint(d)
    with pytest.raises(CheckpointError, match="COMPLETE"):
        read_deepspeed_checkpoint(d / "step_00000002")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_export_logits_equal_the_engine_after_load_checkpoint(runs, tmp_path):
    """The trainer's engine loads each checkpoint with DeepSpeed's own reader (on the 2 ranks that saved it: its
    load_checkpoint refuses another world size); its eval-mode logits must equal those of the export of the tag's
    model folder and of the export rebuilt from the shards (pretrain.checkpoint.ds_recovery)."""
    from transformers import AutoModelForCausalLM

    import pretrain.convert as conv
    from pretrain.config import RunConfig
    from pretrain.engine import build_model_for
    from tests.helpers.dist import launch_ranks

    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(7))
    cases = []
    for name in BACKENDS:
        tag = runs[name] / "step_00000002"
        cases.append({"name": name, "tag": str(tag), "ds_json": (REPO / "ds_configs" / f"{name}.json").read_text(),
                      "run": _run_config(tag)})
    spec, out = tmp_path / "spec.pt", tmp_path / "engine_logits.pt"
    torch.save({"input_ids": x, "cases": cases}, spec)
    launch_ranks(["tests/helpers/engine_logits_worker.py", str(spec), str(out)], world_size=2, timeout=600)
    engine = torch.load(out, weights_only=True)
    for name in BACKENDS:
        # the tag's model folder (tags of older trainers have none: then both read the shards)
        for how in ([], ["--from-shards"]):
            hf_dir = tmp_path / f"hf_{name}{'_shards' if how else ''}"
            # in this process (test_all_backends_convert_load_and_agree runs the command line)
            assert conv.main(["--checkpoint", str(runs[name]), "--out", str(hf_dir), "--no-tokenizer", *how]) == 0
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
            with torch.no_grad():
                got = hf(x).logits
            assert got.shape == engine[name].shape
            diff = (got - engine[name]).abs().max().item()
            assert diff < 1e-5, (name, how, diff)
        # the run's initial weights (its seed) give other logits: an export of untrained weights would fail
        init = build_model_for(RunConfig.from_dict(cases[BACKENDS.index(name)]["run"]),
                               {"zero_optimization": {"stage": 1}}).eval()
        with torch.no_grad():
            assert (init(x).logits - engine[name]).abs().max().item() > 1e-3, name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_tag_without_model_folder_is_recovered_from_its_shards(runs, tmp_path):
    """Tags saved before checkpoints carried model.safetensors: convert says so and reads DeepSpeed's shards;
    --from-shards does the same for a tag whose model.safetensors is damaged."""
    from transformers import AutoModelForCausalLM

    d = _copy_tag(runs["zero3"], tmp_path / "old")
    tag = d / "step_00000002"
    ref, _, _ = read_deepspeed_checkpoint(d)
    _drop_model_folder(tag)
    p = _convert_cli(["--checkpoint", str(d), "--out", str(tmp_path / "hf"), "--no-tokenizer"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "holds no model.safetensors" in p.stdout and "DeepSpeed shards, ZeRO stage 3, world 2" in p.stdout
    sd = read_hf(tmp_path / "hf")[0]
    assert all(torch.equal(sd[k], ref[k]) for k in sd)
    # a tag whose model.safetensors is damaged: the error points at --from-shards, which then converts it
    model = build_model(ModelConfig.from_dict(read_hf(tmp_path / "hf")[1]))
    save_model_dir(tag, model.state_dict(), model.config)
    (tag / "model.safetensors").write_bytes(b"")
    p = _convert_cli(["--checkpoint", str(tag), "--out", str(tmp_path / "x"), "--no-tokenizer"])
    assert p.returncode == 2 and "--from-shards" in p.stderr and "model.safetensors" in p.stderr
    p = _convert_cli(["--checkpoint", str(tag), "--out", str(tmp_path / "x"), "--no-tokenizer", "--from-shards"])
    assert p.returncode == 0, p.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "x", trust_remote_code=True)
    assert all(torch.equal(v, ref[k]) for k, v in hf.state_dict().items())
