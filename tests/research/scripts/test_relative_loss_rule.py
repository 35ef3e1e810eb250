"""The relative-loss-rule analysis counts trips per group as its docstring defines them."""

from __future__ import annotations

import json
import math

from research.scripts import relative_loss_rule as rule


def _row(init, peak, final, diverged=False, family="f", task="t"):
    return {"init_loss": init, "max_loss": peak, "final_loss": final, "diverged": diverged, "family": family,
            "task": task}


def test_groups_and_trips():
    rows = [
        _row(4.0, 4.2, 3.0),  # healthy, never above 1.05x
        _row(4.0, 9.0, 3.0),  # healthy spike of 2.25x: trips F = 2 only
        _row(4.0, 13.0, 5.0),  # damaged (5 > 4.4) with a 3.25x peak: trips F = 2 and 3
        _row(4.0, 4.1, 4.2),  # ended between 1 and 1.1x: in no group
        _row(4.0, float("nan"), float("nan"), diverged=True),  # a non-finite peak trips every F
        _row(0.0, 1.0, 0.5),  # no positive initial loss: left out
    ]
    out = rule.analyse(rows)
    assert out["usable"] == 4
    two, three, five = (out["factors"][k] for k in ("2", "3", "5"))
    assert (two["healthy"]["n"], two["healthy"]["tripped"]) == (2, 1)
    assert (three["healthy"]["tripped"], three["damaged"]["tripped"], five["damaged"]["tripped"]) == (0, 1, 0)
    assert two["diverged"]["tripped"] == five["diverged"]["tripped"] == 1
    assert three["healthy_by_cell"] == {"f / t": {"n": 2, "tripped": 0}}


def test_the_recommended_factor_follows_the_reading_rule(tmp_path):
    healthy = [_row(1.0, 1.0, 0.5) for _ in range(600)]
    spiky = [_row(1.0, 2.5, 0.5) for _ in range(30)]  # 4.8 % trip F = 2, none trip F = 3
    out = rule.analyse(healthy + spiky)
    assert out["recommended_factor"] == 3.0
    assert rule.analyse(healthy + [_row(1.0, 6.0, 0.5)] * 30)["recommended_factor"] is None
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps(r) for r in healthy + spiky))
    rule.main(["--runs", str(runs), "--out", str(tmp_path)])
    assert "F = 3 is the recommended" in (tmp_path / "relative_loss_rule.md").read_text()
    assert json.loads((tmp_path / "relative_loss_rule.json").read_text())["recommended_factor"] == 3.0


def test_wilson_interval():
    low, high = rule.wilson(16, 1855)
    assert 0.004 < low < 0.0086 < high < 0.015
    assert all(math.isnan(v) for v in rule.wilson(0, 0))
