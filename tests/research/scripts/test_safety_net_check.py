"""`research/scripts/safety_net_check.py` tables: every arm's row, the restored steps, wall and CPU time."""

from __future__ import annotations

from research.scripts.safety_net_check import markdown, summarise


def _row(arm, seed, loss, trips=(), restored=()):
    return {"regime": "poison", "seed": seed, "arm": arm, "finished": arm != "stop", "steps": 40,
            "rollbacks": len(trips) if arm == "rollback" else 0, "trips": list(trips), "restored": list(restored),
            "final_eval_loss": loss}


def test_summary_and_table_carry_restored_steps_and_both_clocks():
    rows = [_row("stop", 0, 5.5, [20], [5]), _row("rollback", 0, 5.3, [20], [6]), _row("backed-off", 0, 5.1)]
    summary = summarise(rows)
    assert summary["poison"]["rollback"]["first_restored"] == [6]
    assert summary["poison"]["rollback_minus_backed_off"] == [5.3 - 5.1]
    meta = {"command": "cmd", "wall_seconds": 42.0, "cpu_seconds": 76.0, "threads": 2, "torch": "t", "transformers": "x"}
    text = markdown(summary, meta)
    assert "42 s wall (76 CPU-s)" in text
    assert "| poison | rollback | 1/1 | [1] | [20] | [6] | 5.300 |" in text
    assert "* poison: +0.200 (mean +0.200)" in text
