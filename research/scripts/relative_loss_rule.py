"""What a loss rule relative to the run's own start adds to the guard's absolute one (loss > 50), read off the
held-out-family study's 2,704 training runs (`results/heldout_risk/runs.jsonl`), no new training.

Question (written before the analysis, notes/plan47): the paper's rule lets through states whose loss is far above
the untrained model's (`results/safety_net.md`: MoE states with eval loss 7-49 from an init at ~6.5 were kept as
validated). Does "a step's loss above F x the run's initial loss" catch runs that end worse than they started, and
how often does it trip on runs that end well?

Per run: `init_loss` (the loss at initialisation on the first 32 training sequences), `max_loss` (the largest per-step
training loss, batch 16), `final_loss` (the last step's), `diverged` (the paper's rule). Groups:

* *healthy-ending*: not diverged, `final_loss < init_loss`;
* *damaged*: not diverged, `final_loss > 1.1 x init_loss` (ended at least 10 % worse than untrained);
* *diverged*: the paper's rule tripped.

The relative rule trips a run when `max_loss > F x init_loss` (a non-finite `max_loss` trips). Reading rule (fixed
before the analysis): the recommended F is the smallest of 2, 3, 5 whose pooled trip rate on healthy-ending runs is
at most 1 % with a Wilson 95 % upper bound at most 2 %; its catch rate on damaged runs is reported as it is. The data
is run-level: `max_loss` has no step, so how much earlier than the paper's rule the relative one trips is not
measured here.

Run (seconds):

    python -m research.scripts.relative_loss_rule --runs results/heldout_risk/runs.jsonl --out results

Writes `OUT/relative_loss_rule.md` and `OUT/relative_loss_rule.json`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

FACTORS = (2.0, 3.0, 5.0)
MAX_RATE = 0.01
MAX_UPPER = 0.02
DAMAGED_MARGIN = 1.1


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of a proportion k / n (`(nan, nan)` for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def group(row: dict[str, Any]) -> str | None:
    """'healthy', 'damaged', 'diverged' or None (a run that ended between 1 and 1.1 x its initial loss)."""
    if row.get("diverged"):
        return "diverged"
    init, final = _float(row.get("init_loss")), _float(row.get("final_loss"))
    if final < init:
        return "healthy"
    if final > DAMAGED_MARGIN * init:
        return "damaged"
    return None


def trips(row: dict[str, Any], factor: float) -> bool:
    """Whether `max_loss > factor x init_loss` (a non-finite `max_loss` trips)."""
    peak = _float(row.get("max_loss"))
    return not peak <= factor * _float(row.get("init_loss"))


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Trip counts per factor, group and (family, task) cell."""
    usable = [r for r in rows if _float(r.get("init_loss")) > 0 and group(r) is not None]
    out: dict[str, Any] = {"runs": len(rows), "usable": len(usable), "factors": {}}
    for factor in FACTORS:
        entry: dict[str, Any] = {}
        for name in ("healthy", "damaged", "diverged"):
            members = [r for r in usable if group(r) == name]
            k = sum(trips(r, factor) for r in members)
            low, high = wilson(k, len(members))
            entry[name] = {"n": len(members), "tripped": k, "rate": k / len(members) if members else float("nan"),
                           "wilson_low": low, "wilson_high": high}
        cells: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in usable:
            if group(r) == "healthy":
                cell = cells[f"{r.get('family')} / {r.get('task')}"]
                cell[0] += 1
                cell[1] += trips(r, factor)
        entry["healthy_by_cell"] = {key: {"n": n, "tripped": k} for key, (n, k) in sorted(cells.items())}
        out["factors"][f"{factor:g}"] = entry
    ratios = sorted(_float(r["max_loss"]) / _float(r["init_loss"]) for r in usable if group(r) == "healthy")
    out["healthy_peak_ratio_quantiles"] = {
        f"{q:g}": ratios[min(len(ratios) - 1, int(q * len(ratios)))] for q in (0.5, 0.9, 0.95, 0.99, 0.999)
    }
    chosen = [f for f in FACTORS if (e := out["factors"][f"{f:g}"]["healthy"])["rate"] <= MAX_RATE
              and e["wilson_high"] <= MAX_UPPER]
    out["recommended_factor"] = chosen[0] if chosen else None
    return out


def report(result: dict[str, Any], runs_path: str) -> str:
    """The Markdown report."""
    lines = [
        "# A loss rule relative to the run's start: what it adds to loss > 50",
        "",
        f"`python -m research.scripts.relative_loss_rule --runs {runs_path}` (the purpose, groups and reading rule are",
        "in the script's docstring, written before the analysis). Data: the held-out-family study's training runs (8",
        "architecture families x associative recall and WikiText-2, batch 16, AdamW, 150 steps, learning rates from",
        "stable to diverging). A run trips the relative rule when its largest step loss exceeds F x its loss at",
        "initialisation.",
        "",
        f"{result['usable']} of {result['runs']} runs fall in a group (the rest ended between 1 and "
        f"{DAMAGED_MARGIN:g} x their initial loss, or have no initial loss).",
        "",
        "| F | healthy-ending runs tripped (false trips) | Wilson 95 % | damaged runs caught | paper-diverged runs "
        "tripped |",
        "|---|---|---|---|---|",
    ]
    for key, e in result["factors"].items():
        h, d, v = e["healthy"], e["damaged"], e["diverged"]
        lines.append(
            f"| {key} | {h['tripped']} / {h['n']} ({100 * h['rate']:.1f} %) | [{100 * h['wilson_low']:.1f}, "
            f"{100 * h['wilson_high']:.1f}] % | {d['tripped']} / {d['n']} ({100 * d['rate']:.0f} %) | "
            f"{v['tripped']} / {v['n']} |"
        )
    q = result["healthy_peak_ratio_quantiles"]
    lines += [
        "",
        "Largest step loss / initial loss on healthy-ending runs, quantiles: "
        + ", ".join(f"{k}: {v:.2f}" for k, v in q.items()) + ".",
        "",
        "False trips per (family, task), healthy-ending runs:",
        "",
        "| cell | " + " | ".join(f"F = {k}" for k in result["factors"]) + " |",
        "|---|" + "---|" * len(result["factors"]),
    ]
    cells = next(iter(result["factors"].values()))["healthy_by_cell"]
    for cell in cells:
        row = [f"{e['healthy_by_cell'][cell]['tripped']} / {e['healthy_by_cell'][cell]['n']}"
               for e in result["factors"].values()]
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    chosen = result["recommended_factor"]
    lines += ["", "## Reading", ""]
    if chosen is None:
        lines.append(f"No factor of {', '.join(f'{f:g}' for f in FACTORS)} keeps false trips at most "
                     f"{100 * MAX_RATE:g} % (upper bound {100 * MAX_UPPER:g} %): no value is recommended.")
    else:
        e = result["factors"][f"{chosen:g}"]
        lines.append(
            f"By the rule fixed before the analysis, F = {chosen:g} is the recommended `relative_loss_threshold`: it "
            f"trips {e['healthy']['tripped']} of {e['healthy']['n']} healthy-ending runs and catches "
            f"{e['damaged']['tripped']} of {e['damaged']['n']} runs that end more than {DAMAGED_MARGIN:g} x worse "
            "than untrained, which loss > 50 lets through."
        )
    lines += [
        "",
        "A false trip here is a run whose step loss rose above F x its start and that still ended below its start: a",
        "spike it recovered from. Under `on_divergence=\"rollback\"` such a trip costs a rollback and a lower learning",
        "rate; under `\"stop\"` it ends the run. The runs are LM cross-entropy at batch 16: a loss whose scale is not",
        "set by the task (a regression loss near 0, a negative log-likelihood) has no meaningful multiple, which is",
        "why the rule is off by default.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="results/heldout_risk/runs.jsonl", help="the study's runs.jsonl")
    parser.add_argument("--out", default="results", help="folder for relative_loss_rule.md / .json")
    args = parser.parse_args(argv)
    path = Path(args.runs)
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --runs <the held-out study's runs.jsonl>")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    result = analyse(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "relative_loss_rule.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "relative_loss_rule.md").write_text(report(result, args.runs), encoding="utf-8")
    print(report(result, args.runs))


if __name__ == "__main__":
    main()
