"""ressformer/ is single-device PyTorch (STYLE.md 1): no deepspeed, torch.distributed or environment reads; it and
tokenizer/ need only the core dependencies of pyproject.toml at import time."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ressformer"
FORBIDDEN = ("deepspeed", "torch.distributed", "megatron", "transformers", "os.environ", "os.getenv")


def test_model_package_imports_no_distributed_stack():
    bad = []
    for f in sorted(PKG.glob("*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Attribute):
                names = [ast.unparse(node)]
            bad += [f"{f.name}:{node.lineno} {n}" for n in names if n.startswith(FORBIDDEN)]
    assert not bad, "ressformer/ must stay single-device PyTorch; move these to pretrain/: " + ", ".join(bad)


def test_importing_the_model_does_not_load_deepspeed():
    code = ("import sys, ressformer; from ressformer import build_model, ModelConfig; "
            "build_model(ModelConfig.from_preset('debug')); "
            "print(','.join(m for m in ('deepspeed', 'megatron', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing ressformer pulled in {out}"


CORE = {"torch", "numpy", "yaml", "safetensors", "sentencepiece"}  # import names of pyproject's dependencies
# Kernel modules importing an extra at the top; ressformer imports them only when a kernel is about to run.
KERNELS = {"ressformer/kernels/asam_triton.py": {"triton"},
           "ressformer/kernels/fused_loss.py": {"liger_kernel", "triton"}}


def _module_level_imports(body):
    """(line, module) of every import run when the module loads: outside function bodies."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _module_level_imports(getattr(node, field, None) or [])


def test_core_dependencies_are_pyprojects():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[=<>!~;\[ ]", d, maxsplit=1)[0].lower() for d in deps}
    assert {{"pyyaml": "yaml"}.get(n, n) for n in names} == CORE, names


def test_model_and_tokenizer_import_only_core_packages_at_module_level():
    bad = []
    for f in sorted([*PKG.rglob("*.py"), *(ROOT / "tokenizer").rglob("*.py")]):
        rel = f.relative_to(ROOT).as_posix()
        for line, name in _module_level_imports(ast.parse(f.read_text(), filename=rel).body):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in CORE | {"ressformer", "tokenizer"}:
                if name.replace(".", "/") + ".py" in KERNELS:
                    bad.append(f"{rel}:{line} {name} (a kernel module: import it where the kernel runs)")
                continue
            if top not in KERNELS.get(rel, ()):
                bad.append(f"{rel}:{line} {name}")
    assert not bad, ("ressformer/ and tokenizer/ must import with the core dependencies only; import these inside "
                     "the function that needs them: " + ", ".join(bad))


def test_config_is_the_root_of_the_model_package():
    """config.py imports no other ressformer module (flops.py and describe.py import it, not the reverse)."""
    tree = ast.parse((PKG / "config.py").read_text())
    mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if m.startswith("ressformer")], mods
