"""pretrain/plot.py: one line per run in every panel, the PNG written, bad input named."""

import json

import pytest

from pretrain.plot import main, plot


def _run(d, scale):
    d.mkdir()
    recs = [{"step": 0, "val_loss": 6.0 * scale}]
    recs += [{"step": s, "loss": 6.0 * scale / s, "lm_loss": 6.0 / s, "lr": 1e-3, "grad_norm": 1.0 + s,
              "tokens_seen": 512 * s, "tokens_per_s": 100.0, "moe_balance": 0.01, "diag/moe_load_max": 0.3,
              "diag/moe_load_min": 0.2, "diag/attn_density": 0.3} for s in range(1, 6)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "lo')  # a cut line
    return d


def test_runs_are_overlaid_one_line_each(tmp_path):
    a, b = _run(tmp_path / "seed1", 1.0), _run(tmp_path / "seed2", 1.1)
    fig = plot([a, b], tmp_path / "out.png")
    assert (tmp_path / "out.png").stat().st_size > 10_000
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert {"training loss", "validation loss", "learning rate", "tokens / s", "gradient norm",
            "training loss by tokens", "auxiliary losses", "expert load (max / min share)",
            "attention density"} <= set(panels)
    assert "MFU" not in panels  # no run logged it (CPU)
    loss = panels["training loss"]
    assert [ln.get_label() for ln in loss.get_lines()] == ["seed1", "seed2"]
    assert list(loss.get_lines()[1].get_xdata()) == [1, 2, 3, 4, 5]
    assert len(panels["expert load (max / min share)"].get_lines()) == 4  # two series per run


def test_cli_names_a_folder_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    _run(tmp_path / "r", 1.0)
    assert main([str(tmp_path / "r")]) == 0 and (tmp_path / "r" / "metrics.png").is_file()
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot([tmp_path / "r", tmp_path / "r"], tmp_path / "x.png", labels=["one"])
