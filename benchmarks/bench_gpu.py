"""GPU timing of the spectral analysis: seconds per layer at d = 4096 (issue #19, item 3, when a GPU is lent).

Sections, each run on the GPU with a device sync around every timed call, and written to `--json` as soon as it ends
(so a run cut short keeps what it measured):

1. `llama`: the LLaMA-2-7B block geometry (d = 4096, 32 heads, MLP 11008) with `--layers` blocks, randomly initialised
   from the embedded config in `--dtype` on the GPU. One forward over the default probe (N = `--num-samples` token
   states per block) records the snapshots; `whitened_dmd` of all blocks in one batched call is timed for the default
   (full spectrum, right and left eigenvectors, kappa(V)), right eigenvectors only, eigenvalues only, and the rank-32
   randomized approximation (the paper's "default recipe", for comparison with its 2.5-3.5 s per layer at d = 4096);
   then `profile_from_snapshots` (analysis + features, what `profile()` spends after the forward). Seconds per layer
   are totals divided by the number of blocks.
2. `eig`: the non-symmetric eigenproblem alone on one operator of that size (float32, the default above 1024 modes),
   `torch.linalg.eig` / `eigvals` on the GPU and on the host CPU (all its threads): where the per-layer time goes.
3. `gpt2`: GPT-2 small (12 x 768, N = 2048), the plain forward against the full-spectrum analysis on the GPU.

    python benchmarks/bench_gpu.py --json results/bench_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device: torch.device) -> tuple[float, list[float], object]:
    """Median wall seconds of `fn()` over `repeats` calls after one warm-up, with a device sync around each."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def _model(name: str, layers: int | None, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModel

    from hf_koopman.profiling.architectures import load_architecture_config

    overrides = {} if layers is None else {"num_hidden_layers": layers}
    config = load_architecture_config(name, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype)
    return model.eval()


def _snapshots(model, num_samples: int):
    from hf_koopman.profiling import ResidualStreamRecorder, default_probe_inputs
    from hf_koopman.profiling.inputs import prepare_batch

    batch = prepare_batch(default_probe_inputs(model, num_tokens=num_samples, seed=0), model)
    device = next(model.parameters()).device
    with torch.no_grad():
        forward_s, _, _ = _timed(lambda: model(**batch), 3, device)
        with ResidualStreamRecorder(model, num_samples=num_samples) as rec:
            model(**batch)
    return rec.snapshots(), forward_s


def _features(result) -> dict:
    feats = result.features
    keys = ("near_unit_mass", "unstable_mass", "spectral_radius")
    return {k: sum(float(getattr(f, k)) for f in feats) / len(feats) for k in keys}


def llama_section(args, device: torch.device) -> dict:
    from hf_koopman.koopman import whitened_dmd
    from hf_koopman.profiling import profile_from_snapshots
    from hf_koopman.profiling.profiler import _stack_chunk

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    model = _model("llama-2-7b", args.layers, dtype, device)
    _sync(device)
    build_s = time.perf_counter() - start
    snapshots, forward_s = _snapshots(model, args.num_samples)
    X, Y = _stack_chunk(snapshots)
    layers, n, d = X.shape
    out: dict = {"layers": layers, "num_samples": n, "d": d, "dtype": args.dtype, "build_s": build_s,
                 "forward_s": forward_s, "calls": {}}
    variants = {
        "full_default": {},
        "full_right_vectors_only": {"left_eigenvectors": False},
        "full_eigenvalues_only": {"eigenvectors": False},
        "rank32_randomized": {"rank": 32, "randomized": True},
    }
    for name, kwargs in variants.items():
        median, times, res = _timed(lambda kw=kwargs: whitened_dmd(X, Y, **kw), args.repeats, device)
        out["calls"][name] = {"median_s": median, "per_layer_s": median / layers, "times_s": times,
                              "modes": int(res.eigenvalues.shape[-1])}
        print(f"llama {name}: {median:.2f} s for {layers} blocks = {median / layers:.2f} s/layer "
              f"({res.eigenvalues.shape[-1]} modes)", flush=True)
    median, times, prof = _timed(lambda: profile_from_snapshots(snapshots, progress=False), args.repeats, device)
    out["calls"]["profile_from_snapshots"] = {"median_s": median, "per_layer_s": median / layers, "times_s": times}
    out["layer_mean"] = _features(prof)
    out["analysis_over_forward"] = median / forward_s
    print(f"llama profile_from_snapshots: {median:.2f} s = {median / layers:.2f} s/layer; forward {forward_s:.3f} s; "
          f"features {out['layer_mean']}", flush=True)
    del model, snapshots, X, Y
    torch.cuda.empty_cache()
    return out


def eig_section(args, device: torch.device) -> dict:
    from hf_koopman.koopman import whitened_dmd
    from hf_koopman.profiling.profiler import _stack_chunk

    model = _model("llama-2-7b", 1, getattr(torch, args.dtype), device)
    snapshots, _ = _snapshots(model, args.num_samples)
    X, Y = _stack_chunk(snapshots)
    operator = whitened_dmd(X[:1], Y[:1], eigenvectors=False).operator[0].to(torch.float32)
    m = operator.shape[-1]
    out: dict = {"modes": m, "cpu_threads": torch.get_num_threads()}
    gpu_op = operator.to(device)
    for name, fn in (("gpu_eig", lambda: torch.linalg.eig(gpu_op)), ("gpu_eigvals", lambda: torch.linalg.eigvals(gpu_op))):
        median, times, _ = _timed(fn, args.repeats, device)
        out[name + "_s"] = median
        print(f"eig {name} ({m} x {m} float32): {median:.2f} s", flush=True)
    cpu_op = operator.cpu()
    for name, fn in (("cpu_eig", lambda: torch.linalg.eig(cpu_op)), ("cpu_eigvals", lambda: torch.linalg.eigvals(cpu_op))):
        median, times, _ = _timed(fn, args.repeats, device)
        out[name + "_s"] = median
        print(f"eig {name} ({m} x {m} float32, {torch.get_num_threads()} threads): {median:.2f} s", flush=True)
    return out


def gpt2_section(args, device: torch.device) -> dict:
    from hf_koopman.profiling import profile_from_snapshots

    model = _model("gpt2", None, torch.float32, device)
    snapshots, forward_s = _snapshots(model, 2048)
    median, times, prof = _timed(lambda: profile_from_snapshots(snapshots, progress=False), args.repeats, device)
    out = {"forward_s": forward_s, "analysis_s": median, "analysis_over_forward": median / forward_s,
           "per_layer_s": median / len(snapshots), "layer_mean": _features(prof)}
    print(f"gpt2: forward {forward_s * 1e3:.1f} ms, analysis {median:.2f} s ({median / len(snapshots):.3f} s/layer)",
          flush=True)
    return out


SECTIONS = {"llama": llama_section, "eig": eig_section, "gpt2": gpt2_section}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--layers", type=int, default=4, help="LLaMA-2-7B blocks built (the width is the 7B's)")
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", help="weights of the LLaMA blocks")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="`cpu` runs the same code on the host (a dry run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark times the GPU path (benchmarks/bench_profile.py times the CPU one)")
        return 1
    device = torch.device(args.device)
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__,
                    "transformers": transformers.__version__, "args": {k: v for k, v in vars(args).items()
                                                                        if k != "json"}}
    for name in args.sections:
        start = time.perf_counter()
        try:
            result[name] = SECTIONS[name](args, device)
        except Exception as exc:  # keep the other sections' measurements
            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result[name]["section_wall_s"] = time.perf_counter() - start
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
