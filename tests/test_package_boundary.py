"""ressformer/ is single-device PyTorch (STYLE.md 1): no deepspeed, torch.distributed or environment reads."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ressformer"
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
