#!/usr/bin/env python
"""KSS training-step overhead: KSSTrainer at the default schedule vs the same step without KSS, measured in one run.

Model: GPT-2 style, 12 layers, d = 256, 8 heads, vocabulary 10,000, sequences of 256 tokens, 8 sequences per step
(2048 tokens, so the default N = 2048 token states per block are available). KSS defaults: alpha = 0.15, r = 32,
every 10 steps, 50 % of the layers. Both arms share the same initial weights; their steps are interleaved period by
period (10 steps of one arm, then 10 of the other, ...) so that machine load drifts hit both equally. Each step is
`Trainer.training_step` (forward, loss, backward) + `optimizer.step()` + `zero_grad()`, timed with a device sync.

Two estimates are printed: (1) paired -- KSS steps and plain steps of the same trainer alternated, overhead =
median extra time of a KSS step / (10 x median plain step), robust on a busy machine; (2) direct -- mean step time
over whole interleaved periods of both arms (needs a quiet machine: one KSS step in ten is a small signal).

Paper (Sec. 5, Table 3): 8-12 % overhead. Target here: <= 5 %.

    python benchmarks/bench_kss.py                 # CPU or the visible GPU
    python benchmarks/bench_kss.py --periods 6 --bf16 --out results/bench_kss.json
    python benchmarks/bench_kss.py --periods 0 --pairs 4     # paired estimate only (slow CPUs)
"""

from __future__ import annotations

import argparse
import json
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


def make_trainer(alpha: float, out: str, bf16: bool, use_cpu: bool) -> KSSTrainer:
    args = KSSTrainingArguments(
        output_dir=out, report_to="none", use_cpu=use_cpu, bf16=bf16, per_device_train_batch_size=8,
        kss_alpha=alpha, learning_rate=1e-4, disable_tqdm=True,
    )
    trainer = KSSTrainer(model=build(0), args=args)
    trainer.model.to(args.device).train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(trainer: KSSTrainer, batch: dict[str, torch.Tensor]) -> float:
    device = trainer.args.device
    sync(device)
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    sync(device)
    elapsed = time.perf_counter() - start
    trainer.state.global_step += 1
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5, help="alternated (KSS step, plain step) pairs")
    parser.add_argument("--periods", type=int, default=2, help="interleaved KSS periods (10 steps) per arm; 0 = skip")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is visible")
    parser.add_argument("--out", type=str, default=None, help="write the numbers as JSON here")
    opts = parser.parse_args()

    tmp = tempfile.mkdtemp()
    with_kss = make_trainer(0.15, tmp, opts.bf16, opts.cpu)
    without = make_trainer(0.0, tmp, opts.bf16, opts.cpu)
    device = with_kss.args.device
    period = with_kss.kss_config.every_n_steps
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 10_000, (8, 256), generator=g)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}

    for trainer in (with_kss, without):  # warm-up (allocator, kernels); includes one KSS step for the KSS arm
        for _ in range(opts.warmup_steps):
            one_step(trainer, batch)
        trainer.state.global_step = 0

    # (1) paired: one KSS step and one plain step of the same trainer, alternated (robust to load drift);
    #     schedule overhead = (t_kss_step - t_plain_step) / (every_n_steps * t_plain_step)
    paired_kss, paired_plain = [], []
    for _ in range(opts.pairs):
        with_kss.state.global_step = 0  # a KSS step
        paired_kss.append(one_step(with_kss, batch))
        with_kss.state.global_step = 1  # a plain step (identical code path to alpha = 0)
        paired_plain.append(one_step(with_kss, batch))
    diffs = [k - p for k, p in zip(paired_kss, paired_plain)]
    t_plain = statistics.median(paired_plain)
    extra = statistics.median(diffs)
    # (2) direct: whole KSS periods of each arm, interleaved
    times: dict[str, list[float]] = {"kss": [], "plain": []}
    with_kss.state.global_step = 0
    for _ in range(opts.periods):
        for name, trainer in (("kss", with_kss), ("plain", without)):
            for _ in range(period):
                times[name].append(one_step(trainer, batch))

    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "bf16": opts.bf16,
        "model": "GPT-2 style, 12 layers, d=256, 8 heads, vocab 10k, 8 x 256 tokens per step",
        "kss": {"alpha": 0.15, "rank": 32, "every_n_steps": period, "layer_fraction": 0.5, "num_samples": 2048},
        "pairs": opts.pairs,
        "plain_step_s_median": t_plain,
        "kss_step_s_median": statistics.median(paired_kss),
        "extra_s_per_kss_step_median": extra,
        "overhead_at_schedule_paired": extra / (period * t_plain),
    }
    print(f"device: {result['device']} (bf16={opts.bf16}); {result['model']}")
    print(f"(1) paired, {opts.pairs} pairs: plain step {t_plain:.4f} s, KSS step {result['kss_step_s_median']:.4f} s "
          f"(median extra {extra:.4f} s)")
    print(f"    overhead at the default schedule (every {period} steps): "
          f"{100 * result['overhead_at_schedule_paired']:+.2f} %   [paper 8-12 %, target <= 5 %]")
    if opts.periods:
        mean_kss, mean_plain = statistics.mean(times["kss"]), statistics.mean(times["plain"])
        result.update(
            periods=opts.periods,
            step_time_plain_s=mean_plain,
            step_time_kss_schedule_s=mean_kss,
            overhead_at_schedule_direct=mean_kss / mean_plain - 1.0,
        )
        print(f"(2) direct, {opts.periods} interleaved period(s) of {period} steps per arm: plain {mean_plain:.4f} s, "
              f"KSS schedule {mean_kss:.4f} s per step -> {100 * result['overhead_at_schedule_direct']:+.2f} %")
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
