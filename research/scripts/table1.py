"""Regenerate `results/table1.md` and `results/table1.json`: the paper's Table 1 spectra beside ours at initialisation.

Grid (see `research.experiments.table1`): six normalisations x depth {4, 6, 8} x seeds {42, 123, 456}, d = 128,
associative-recall probe, N = 2048, the default recipe (full spectrum). Supplementary rows, each one measurement
of a stated hypothesis about a row that does not match: the pre-norm-sum snapshot convention for the two post-norm
models, PyTorch's default init for all six, and the rank-32 approximation (the paper's stated recipe) at depth 6.

    OMP_NUM_THREADS=2 python -m research.scripts.table1 --out results      # about 1-5 minutes
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from research.experiments.table1 import NORMS, PAPER_TABLE1, measure

DEPTHS = (4, 6, 8)
SEEDS = (42, 123, 456)
LABELS = {"pre_ln": "Pre-LN", "post_ln": "Post-LN", "rmsnorm": "RMSNorm", "deepnorm": "DeepNorm", "subln": "SubLN",
          "none": "No-Norm"}


def _summary(rows: list[dict], key: str) -> str:
    values = np.array([r[key] for r in rows], dtype=float)
    return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"


def _table(rows: list[dict], title: str, paper: bool = True) -> list[str]:
    head = "| norm | runs | M≈1 | M>1 | ρ (layer mean) | κ(V) median | η_nl | reliable modes | ‖Y−X‖/‖X‖ |"
    lines = [f"### {title}", "", head + (" paper M≈1 / M>1 / ρ |" if paper else ""),
             "|" + "---|" * (9 + int(paper))]
    for norm in NORMS:
        sel = [r for r in rows if r["norm"] == norm]
        if not sel:
            continue
        cells = [LABELS[norm], str(len(sel))] + [_summary(sel, k) for k in (
            "near_unit_mass", "unstable_mass", "spectral_radius", "eigvec_condition_median", "nonlinearity",
            "reliable_fraction", "update_ratio")]
        if paper:
            cells.append(" / ".join(f"{v:.2f}" for v in PAPER_TABLE1[norm]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _mean(rows: list[dict], norm: str, key: str) -> float:
    return float(np.mean([r[key] for r in rows if r["norm"] == norm]))


def _paper_verdict(near_unit: float) -> str:
    """The paper's decision rule (App. J) on a mean M≈1: what `hf_koopman.profile` reports for such a model."""
    return "high risk" if near_unit > 0.5 else "safe" if near_unit < 0.3 else "moderate"


def _reading(main_rows: list[dict], conv_rows: list[dict], rank_rows: list[dict]) -> list[str]:
    """How to read the tables: which rows match the paper and what a user of `profile()` sees for the others; every
    number is computed from the rows."""
    family = ("pre_ln", "rmsnorm", "subln")
    gap = max(abs(_mean(main_rows, n, k) - PAPER_TABLE1[n][i])
              for n in family for i, k in enumerate(("near_unit_mass", "unstable_mass")))
    rho = ", ".join(f"{LABELS[n]} {_mean(main_rows, n, 'spectral_radius'):.2f} (paper {PAPER_TABLE1[n][2]:.2f})"
                    for n in family)
    lines = ["## How to read it", ""]
    lines.append(f"- **Pre-LN, RMSNorm, SubLN** match: M≈1 and M>1 within {gap:.3f} of the paper. ρ: {rho}.")
    for norm in ("post_ln", "deepnorm", "none"):
        ours, paper = _mean(main_rows, norm, "near_unit_mass"), PAPER_TABLE1[norm][0]
        same = _paper_verdict(ours) == _paper_verdict(paper)
        line = (f"- **{LABELS[norm]}**: M≈1 {ours:.2f} against the paper's {paper:.2f}; `hf_koopman.profile` (block "
                f"output to block output) reads it **{_paper_verdict(ours)}**"
                + (", as the paper's value does." if same else f", the paper's value {_paper_verdict(paper)}."))
        if norm == "deepnorm":
            sum_near = _mean(conv_rows, norm, "near_unit_mass")
            sum_rho = _mean(conv_rows, norm, "spectral_radius")
            line += (f" The paper's masses come back only when Y is α·h + f(h), the sum entering the block's final "
                     f"LayerNorm (second table: M≈1 {sum_near:.2f}), a snapshot point `profile()` does not offer; "
                     f"there ρ is {sum_rho:.1f} against the paper's {PAPER_TABLE1[norm][2]:.2f}, which we cannot "
                     "explain from the paper's text.")
        elif norm == "none":
            update = _mean(main_rows, norm, "update_ratio")
            line += (f" With the GPT-2 init the residual branches are {update:.0%} of the stream (‖Y−X‖/‖X‖), so "
                     f"the blocks are near the identity; the paper's value lies between our full spectrum and the "
                     f"rank-32 recipe ({_mean(rank_rows, norm, 'near_unit_mass'):.2f}).")
        else:
            line += " Nearer the identity than the paper's, for a reason we have not found."
        lines.append(line)
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    main_rows = [measure(n, L, s).to_dict() for n in NORMS for L in DEPTHS for s in SEEDS]
    conv_rows = [measure(n, L, s, convention="pre_norm_sum").to_dict()
                 for n in ("post_ln", "deepnorm") for L in DEPTHS for s in SEEDS]
    init_rows = [measure(n, 6, s, init="pytorch").to_dict() for n in NORMS for s in SEEDS]
    rank_rows = [measure(n, 6, s, rank=32).to_dict() for n in NORMS for s in SEEDS]
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.json").write_text(json.dumps({
        "main": main_rows, "pre_norm_sum": conv_rows, "pytorch_init": init_rows, "rank32": rank_rows,
        "paper": PAPER_TABLE1, "seconds": round(seconds, 1)}, indent=1), encoding="utf-8")
    lines = [
        "# Table 1 at initialisation: the paper beside hf_koopman's default recipe",
        "",
        "Generated by `python -m research.scripts.table1` "
        f"({seconds / 60:.1f} minutes wall time). Research GPT, d = 128, 4 heads, associative-recall probe (seq 64, vocab 256,",
        "4 pairs), N = 2048 token states, full spectrum of the whitened DMD operator (the default of `hf_koopman.profile`).",
        "Each cell is mean ± std over runs (depths 4/6/8 × seeds 42/123/456) of the layer mean; κ(V) is the layer median.",
        "`reliable modes` is the fraction of modes that pass the ResDMD filter (τ = 0.1); ‖Y−X‖/‖X‖ is the size of the",
        "block update on the raw snapshots.",
        "",
    ]
    lines += _reading(main_rows, conv_rows, rank_rows)
    lines += _table(main_rows, "Default recipe (full spectrum), block input → block output")
    lines += _table(conv_rows, "Post-norm models with the pre-norm-sum convention (block input → α·h + f(h))")
    lines += _table(init_rows, "PyTorch default init (embeddings N(0, 1), Kaiming-uniform linear layers), depth 6")
    lines += _table(rank_rows, "Rank-32 approximation (the paper's stated recipe), depth 6")
    (out / "table1.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
