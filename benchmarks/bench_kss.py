#!/usr/bin/env python
"""KSS training-step overhead: KSSTrainer at the default schedule vs the same model without KSS, in one run.

Model: GPT-2 style, 12 layers, d = 256, 8 heads, vocabulary 10,000, sequences of 256 tokens, 8 sequences per step
(2048 tokens, so the default N = 2048 token states per block are available). KSS defaults throughout: alpha = 0.15,
the full spectrum (`kss_rank=None`), every 10 steps, 50 % of the layers, gradient cap `kss_max_grad_ratio = 0.5`.
Both arms start from the same weights. Each step is `Trainer.training_step` (forward, loss, backward) + `optimizer.step()` + `zero_grad()`, timed
with a device sync, on two clocks: wall (`time.perf_counter`) and CPU time of this process (`time.process_time`,
less sensitive to other jobs on a shared machine; on a GPU only wall time is meaningful).

Design: `--repeats` rounds; each round runs one whole KSS period (10 optimizer steps, the first of which carries the
KSS term) of the KSS arm and 10 steps of the plain arm, the order alternating between rounds (ABBA) so that slow load
drifts hit both arms alike. Two overhead estimates per round, summarised as median [min, max] over the rounds:

* **period ratio**: time of the KSS arm's period / time of the plain arm's period - 1 (what a user sees);
* **paired step**: (KSS step - median of the 9 plain steps of the same period) / (10 x that median), i.e. the
  extra cost of the one KSS step spread over the schedule; less noisy because both come from the same seconds.

`--breakdown` additionally times where a KSS step spends its extra time (the DMD/penalty, the two backward passes of
the gradient cap) and measures the same KSS step with the cap off (`max_grad_ratio=None`) and with the
three-pass parameter cap (diagnostics only; the defaults are what the rounds measure). The load
average is printed before and after. Paper (Sec. 5, Table 3): 8-12 % overhead. Target: <= 5 %.

    python benchmarks/bench_kss.py --repeats 6 --breakdown --out results/bench_kss_cpu.json
    python benchmarks/bench_kss.py --repeats 10 --breakdown --bf16 --out results/bench_kss_gpu_bf16.json   # a GPU
    python benchmarks/bench_kss.py --report results/bench_kss.md results/bench_kss_*.json   # table from the JSONs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_koopman.training import KSSTrainer, KSSTrainingArguments


def build(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=10_000, n_positions=256, n_embd=256, n_layer=12, n_head=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def make_trainer(alpha: float, out: str, bf16: bool, use_cpu: bool, **kss) -> KSSTrainer:
    args = KSSTrainingArguments(
        output_dir=out, report_to="none", use_cpu=use_cpu, bf16=bf16, per_device_train_batch_size=8,
        kss_alpha=alpha, learning_rate=1e-4, disable_tqdm=True, **kss,
    )
    trainer = KSSTrainer(model=build(0), args=args)
    trainer.model.to(args.device).train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(trainer: KSSTrainer, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(wall s, CPU s) of one optimizer step; advances `global_step`."""
    device = trainer.args.device
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    sync(device)
    out = time.perf_counter() - wall, time.process_time() - cpu
    trainer.state.global_step += 1
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict[str, float]) -> str:
    return f"{100 * s['median']:+.2f} % [{100 * s['min']:+.2f}, {100 * s['max']:+.2f}]"


class Stopwatch:
    """Accumulates (wall, CPU) seconds of wrapped calls by name; used by `--breakdown` only."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, list[float]] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                acc = self.totals.setdefault(name, [0.0, 0.0])
                acc[0] += time.perf_counter() - wall
                acc[1] += time.process_time() - cpu

        return timed

    @contextlib.contextmanager
    def patched(self, obj, attr: str, name: str):
        original = getattr(obj, attr)
        setattr(obj, attr, self.wrap(name, original))
        try:
            yield
        finally:
            setattr(obj, attr, original)


def breakdown(trainer: KSSTrainer, batch: dict[str, torch.Tensor], plain_cpu: float, plain_wall: float, n: int):
    """Where the extra time of a KSS step goes (median over `n` KSS steps), and a KSS step without the cap."""
    device = trainer.args.device
    rows: list[dict[str, float]] = []
    for _ in range(n):
        watch = Stopwatch(device)
        grad_calls: list[tuple[float, float]] = []
        original_grad = torch.autograd.grad

        def grad(*args, **kwargs):
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original_grad(*args, **kwargs)
            finally:
                sync(device)
                grad_calls.append((time.perf_counter() - wall, time.process_time() - cpu))

        trainer.state.global_step = 0
        with watch.patched(trainer, "_kss_term", "dmd"), watch.patched(trainer, "_capped_loss", "cap"), \
                watch.patched(trainer, "_activation_capped_loss", "cap"):
            torch.autograd.grad = grad
            try:
                wall, cpu = one_step(trainer, batch)
            finally:
                torch.autograd.grad = original_grad
        row = {"step_wall": wall, "step_cpu": cpu}
        for name, (w, c) in watch.totals.items():
            row[f"{name}_wall"], row[f"{name}_cpu"] = w, c
        # the order of `_capped_loss`; the activation cap makes one autograd.grad call (KSS gradient w.r.t. the states)
        labels = ("cap_kss_grad", "cap_task_grad") if trainer.kss_config.grad_cap == "parameters" else ("cap_kss_grad",)
        for label, (w, c) in zip(labels, grad_calls):
            row[f"{label}_wall"], row[f"{label}_cpu"] = w, c
        rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    # the same KSS step (i) without the gradient cap (max_grad_ratio=None) and (ii) with the cap computed
    # in three passes (task + scaled term through a third, ordinary backward pass): what each part costs the user
    variants = {}
    ratio, cap = trainer.kss_config.max_grad_ratio, trainer.kss_config.grad_cap
    setups = {
        "uncapped": {"max_grad_ratio": None},
        "activation_cap": {"grad_cap": "activations"},
        "parameter_cap": {"grad_cap": "parameters"},
        "three_pass": {"grad_cap": "parameters", "fast": False},
    }
    for label, setup in setups.items():
        trainer.kss_config.max_grad_ratio = setup.get("max_grad_ratio", ratio)
        trainer.kss_config.grad_cap = setup.get("grad_cap", cap)
        trainer._kss_fast_cap = setup.get("fast", True)
        variants[label] = []
        for _ in range(n):
            trainer.state.global_step = 0
            variants[label].append(one_step(trainer, batch))
        trainer.kss_config.max_grad_ratio, trainer.kss_config.grad_cap = ratio, cap
        trainer._kss_fast_cap = True
        med[f"{label}_step_wall"] = statistics.median(w for w, _ in variants[label])
        med[f"{label}_step_cpu"] = statistics.median(c for _, c in variants[label])
    med["plain_step_wall"], med["plain_step_cpu"] = plain_wall, plain_cpu
    return med


def _pct(s: dict[str, float]) -> str:
    return f"{100 * s['median']:+.1f} % [{100 * s['min']:+.1f}, {100 * s['max']:+.1f}]"


def _spectrum(result: dict) -> str:
    """`full` or `r <rank>`: which spectrum the KSS arm shaped (`KSSConfig.rank`, None = the full spectrum)."""
    rank = result["kss"].get("rank")
    return "full" if rank is None else f"r {rank}"


def write_report(path: str, inputs: list[str]) -> None:
    """Markdown table of one or more JSON results of this script (no timing is run)."""
    runs = [(Path(p).name, json.loads(Path(p).read_text(encoding="utf-8"))) for p in inputs]
    runs = [(name, r) for name, r in runs if "period_ratio_cpu" in r]
    if not runs:
        raise ValueError(f"none of {inputs} is a result of this script (written with --out)")
    lines = [
        "# KSS training-step overhead",
        "",
        "Generated by `python benchmarks/bench_kss.py --report results/bench_kss.md results/bench_kss_*.json` from the",
        "JSON files that `benchmarks/bench_kss.py --out ...` wrote (do not edit by hand). Model: GPT-2 style, 12 layers,",
        "d = 256, 8 heads, vocabulary 10k, 8 x 256 tokens per step; KSS defaults of the code each file was run with",
        "(alpha 0.15, every 10 steps, 50 % of the layers, gradient cap `kss_max_grad_ratio` 0.5; the *spectrum* column",
        "says which: `full` = all 256 modes, the default since 2026-12-03, `r 32` = the rank-32 approximation, the",
        "default before) vs the same model without KSS. Each round runs one KSS",
        "period (10 steps, the first with KSS) and 10 plain steps, order alternating; median [min, max] over rounds.",
        "*Period ratio* = KSS-arm time / plain-arm time - 1; *paired* = (KSS step - median of the 9 plain steps of the",
        "same period) / (10 x that median). CPU time (`time.process_time`) is the load-robust clock on a shared CPU;",
        "on a GPU only wall time means anything. Paper: 8-12 %. Target: <= 5 %.",
        "",
        "| file | device | spectrum | cap | rounds | load avg before / after | plain step | KSS step | "
        "period ratio (CPU) | period ratio (wall) | paired (CPU) | paired (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs:
        gpu = "cuda" in r["device"].lower() or "nvidia" in r["device"].lower() or "h100" in r["device"].lower()
        clock = "wall" if gpu else "cpu"
        device = r["device"] + (" bf16" if r.get("bf16") else "") + (f", {r['threads']} thread(s)" if not gpu else "")
        device += f", torch {r.get('torch', '?')}"
        lines.append(
            f"| {name} | {device} | {_spectrum(r)} | {r['kss'].get('grad_cap', 'parameters')} | {r['repeats']} | "
            f"{r['load_average_before'][0]:.1f} / "
            f"{r['load_average_after'][0]:.1f} | {r[f'plain_step_{clock}']['median']:.3f} s {clock} | "
            f"{r[f'kss_step_{clock}']['median']:.3f} s {clock} | {_pct(r['period_ratio_cpu'])} | "
            f"{_pct(r['period_ratio_wall'])} | {_pct(r['paired_cpu'])} | {_pct(r['paired_wall'])} |"
        )
    lines.append("")
    for name, r in runs:
        gpu = "cuda" in r["device"].lower() or "nvidia" in r["device"].lower() or "h100" in r["device"].lower()
        clock = "wall" if gpu else "cpu"
        value = r[f"period_ratio_{clock}"]["median"]
        lines.append(
            f"- `{name}` ({_spectrum(r)}): overhead at the default schedule {100 * value:+.1f} % ({clock} time, median "
            "period ratio) -> "
            f"target <= 5 % {'met' if value <= 0.05 else 'NOT met'}."
        )
    lines += [
        "",
        "## Where a KSS step's extra time goes (`--breakdown`)",
        "",
        "Same trainer, same batch, median over the breakdown steps. *Cap passes* are the `torch.autograd.grad` calls",
        "of the run's cap: with `grad_cap=\"parameters\"` the two passes that give the separate task and KSS gradient",
        "norms over the parameters; with `\"activations\"` the one call that differentiates L_KSS with respect to the",
        "captured token states (a backward through the small DMD graph only, listed as the KSS-grad pass). The",
        "*activation* / *parameter* cap columns re-time the same KSS step with `grad_cap` set to each; the *three-pass*",
        "variant is the parameter cap in three passes (the capped loss then went through a third, ordinary backward",
        "pass);",
        "*no cap* is `kss_max_grad_ratio=None` (paper-literal gradient). Overheads are at the default schedule (1 KSS",
        "step in 10), computed from these single-step times, so they are noisier than the rounds above.",
        "",
        "| file | clock | plain step | KSS step (run's cap) | DMD + penalty | cap: task-grad pass | cap: KSS-grad pass | "
        "KSS step, activation cap | KSS step, parameter cap | KSS step, three-pass cap | KSS step, no cap | "
        "overhead run's cap / activation / parameter / three-pass / no cap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs:
        b = r.get("breakdown")
        if not b:
            continue
        gpu = "cuda" in r["device"].lower() or "nvidia" in r["device"].lower() or "h100" in r["device"].lower()
        clock = "wall" if gpu else "cpu"
        t = b[f"plain_step_{clock}"]
        period = r["kss"]["every_n_steps"]

        def over(key: str) -> str:
            return f"{100 * (b[key] - t) / (period * t):+.1f} %" if key in b else "-"

        def sec(key: str) -> str:
            return f"{b[key]:.3f} s" if key in b else "-"

        lines.append(
            f"| {name} | {clock} | {t:.3f} s | {b[f'step_{clock}']:.3f} s | {b.get(f'dmd_{clock}', 0):.3f} s | "
            f"{b.get(f'cap_task_grad_{clock}', 0):.3f} s | {b.get(f'cap_kss_grad_{clock}', 0):.3f} s | "
            f"{sec(f'activation_cap_step_{clock}')} | {sec(f'parameter_cap_step_{clock}')} | "
            f"{sec(f'three_pass_step_{clock}')} | {sec(f'uncapped_step_{clock}')} | {over(f'step_{clock}')} / "
            f"{over(f'activation_cap_step_{clock}')} / {over(f'parameter_cap_step_{clock}')} / "
            f"{over(f'three_pass_step_{clock}')} / {over(f'uncapped_step_{clock}')} |"
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=str, default=None,
                        help="write a markdown table to this path from the JSON files given as arguments, and exit")
    parser.add_argument("inputs", nargs="*", help="JSON results for --report")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of (one KSS period, one plain period)")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true", help="time the parts of a KSS step (and uncapped)")
    parser.add_argument("--breakdown_steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is visible")
    parser.add_argument("--out", type=str, default=None, help="write the numbers as JSON here")
    parser.add_argument("--grad_cap", choices=("parameters", "activations"), default=None,
                        help="KSSConfig.grad_cap of the KSS arm (default: the KSSConfig default)")
    opts = parser.parse_args()
    if opts.report:
        write_report(opts.report, opts.inputs)
        return
    if opts.inputs:
        parser.error("JSON inputs are only read with --report")
    if opts.repeats < 1:
        parser.error("--repeats must be >= 1")

    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp()
    with_kss = make_trainer(0.15, tmp, opts.bf16, opts.cpu,
                            **({} if opts.grad_cap is None else {"kss_grad_cap": opts.grad_cap}))
    without = make_trainer(0.0, tmp, opts.bf16, opts.cpu)
    device = with_kss.args.device
    period = with_kss.kss_config.every_n_steps
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 10_000, (8, 256), generator=g)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}

    for trainer in (with_kss, without):  # warm-up (allocator, kernels); includes one KSS step for the KSS arm
        trainer.state.global_step = 0
        for _ in range(opts.warmup_steps):
            one_step(trainer, batch)

    rounds = []
    for i in range(opts.repeats):
        times: dict[str, list[tuple[float, float]]] = {}
        order = (("kss", with_kss), ("plain", without)) if i % 2 == 0 else (("plain", without), ("kss", with_kss))
        for name, trainer in order:
            trainer.state.global_step = 0  # step 0 of the KSS arm carries the KSS term, steps 1-9 do not
            times[name] = [one_step(trainer, batch) for _ in range(period)]
        row = {}
        for c, clock in enumerate(("wall", "cpu")):
            kss_steps = [t[c] for t in times["kss"]]
            plain_steps = [t[c] for t in times["plain"]]
            inner = statistics.median(kss_steps[1:])
            row[f"period_ratio_{clock}"] = sum(kss_steps) / sum(plain_steps) - 1.0
            row[f"paired_{clock}"] = (kss_steps[0] - inner) / (period * inner)
            row[f"plain_step_{clock}"] = statistics.median(plain_steps)
            row[f"kss_step_{clock}"] = kss_steps[0]
        rounds.append(row)
        print(
            f"round {i + 1}/{opts.repeats}: plain step {row['plain_step_cpu']:.3f} s CPU / {row['plain_step_wall']:.3f} s "
            f"wall, KSS step {row['kss_step_cpu']:.3f} s CPU; period ratio CPU {100 * row['period_ratio_cpu']:+.2f} %, "
            f"wall {100 * row['period_ratio_wall']:+.2f} %; paired CPU {100 * row['paired_cpu']:+.2f} %",
            flush=True,
        )

    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16": opts.bf16,
        "model": "GPT-2 style, 12 layers, d=256, 8 heads, vocab 10k, 8 x 256 tokens per step",
        "kss": {k: v for k, v in with_kss.kss_config.to_dict().items() if k not in ("layers", "enabled")},
        "repeats": opts.repeats,
        "load_average_before": load_before,
        "rounds": rounds,
    }
    for key in ("period_ratio_cpu", "period_ratio_wall", "paired_cpu", "paired_wall",
                "plain_step_cpu", "plain_step_wall", "kss_step_cpu", "kss_step_wall"):
        result[key] = summary([r[key] for r in rounds])
    if opts.breakdown:
        result["breakdown"] = breakdown(
            with_kss, batch, result["plain_step_cpu"]["median"], result["plain_step_wall"]["median"],
            opts.breakdown_steps,
        )
    result["load_average_after"] = os.getloadavg()

    print(f"\ndevice: {result['device']} (bf16={opts.bf16}, {result['threads']} threads); {result['model']}")
    print(f"KSS: alpha 0.15, spectrum {_spectrum(result)}, every {period} steps, 50 % of layers, max_grad_ratio "
          f"{with_kss.kss_config.max_grad_ratio} (grad_cap={with_kss.kss_config.grad_cap!r}); {opts.repeats} rounds; "
          "median [min, max] over rounds")
    print(f"load average before {load_before[0]:.2f} / after {result['load_average_after'][0]:.2f} (1 min)")
    print(f"plain step: {result['plain_step_cpu']['median']:.3f} s CPU, {result['plain_step_wall']['median']:.3f} s wall;"
          f" KSS step: {result['kss_step_cpu']['median']:.3f} s CPU, {result['kss_step_wall']['median']:.3f} s wall")
    print(f"overhead at the default schedule, period ratio:  CPU {fmt(result['period_ratio_cpu'])}   "
          f"wall {fmt(result['period_ratio_wall'])}")
    print(f"overhead at the default schedule, paired step:   CPU {fmt(result['paired_cpu'])}   "
          f"wall {fmt(result['paired_wall'])}   [paper 8-12 %, target <= 5 %]")
    if opts.breakdown:
        b = result["breakdown"]
        clock = "wall" if device.type == "cuda" else "cpu"
        print(f"breakdown of one KSS step ({clock}, median of {opts.breakdown_steps}): step {b[f'step_{clock}']:.3f} s vs "
              f"plain {b[f'plain_step_{clock}']:.3f} s; DMD + penalty {b.get(f'dmd_{clock}', 0):.3f} s; gradient cap "
              f"{b.get(f'cap_{clock}', 0):.3f} s (task-gradient pass {b.get(f'cap_task_grad_{clock}', 0):.3f} s, "
              f"KSS-gradient pass {b.get(f'cap_kss_grad_{clock}', 0):.3f} s); the same KSS step without the cap "
              f"{b[f'uncapped_step_{clock}']:.3f} s, with the three-pass cap {b[f'three_pass_step_{clock}']:.3f} s")
        t = b[f"plain_step_{clock}"]
        for label in ("step", "activation_cap_step", "parameter_cap_step", "three_pass_step", "uncapped_step"):
            print(f"    -> {label:16s} overhead at the schedule: {100 * (b[f'{label}_{clock}'] - t) / (period * t):+.2f} %")
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
