"""bench/quality.py runs end to end (tiny settings) and writes its JSON."""

import json

from bench import quality


def test_quality_bench_smoke(tmp_path, capsys):
    summary = quality.main(["--steps", "3", "--seeds", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "quality_digits.json").read_text())
    assert saved["best_adamw"] == summary["best_adamw"]
    names = set(saved["results"])
    assert {"EmoSens (lr=1.0)", "EmoAiry (lr=1.0)", "EmoCats (lr=1.0)", "EmoTion (lr=1.0)", "Prodigy (lr=1.0)"} <= names
    for r in saved["results"].values():
        assert 0.0 <= r["test_acc_mean"] <= 1.0 and r["test_loss_mean"] > 0
    assert "test loss / best AdamW" in capsys.readouterr().out
