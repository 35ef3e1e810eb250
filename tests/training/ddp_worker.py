"""Worker for `test_distributed.py`, started with `accelerate launch` (2 processes) or in-process (1 process).

Run 1 ("trajectory"): `scripts/train_kss.py` unchanged, KSS every 2 steps, RKSP monitoring every 2 steps; the log
history goes to `<out>/trajectory-rank<r>.json` together with the world size the Trainer saw, how the model is
distributed (FSDP modules, DTensor parameters, local share of the elements) and what the KSS hooks were attached to.
Run 2 ("guard"): a Trainer whose **rank 1 only** sees an infinite gradient on optimizer step 3 (a tensor hook on
the last block's output, so the loss stays finite and rank 0's own backward is clean) and, without a check window, a
loss raised by a constant on optimizer step 6 (its gradients unchanged, so DDP's gradient averaging does not carry it
to rank 0); the rank-reduced guard must roll back every rank at both steps, identically, and the run must finish. Result in `<out>/guard-rank<r>.json`: events, final step, a digest of the final weights, and the
time of the guard's one all-reduce per step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


REPO = Path(__file__).resolve().parents[2]


def load_train_script():
    if "train_kss" in sys.modules:
        return sys.modules["train_kss"]
    spec = importlib.util.spec_from_file_location("train_kss", REPO / "scripts" / "train_kss.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_kss"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def trajectory_argv(text_file: str, out: str, ga: int, per_device: int) -> list[str]:
    return [
        "--text_file", text_file, "--tiny", "--block_size", "32", "--output_dir", out,
        # no dropout: its random masks differ between a rank and the matching micro-batch of a single process
        "--config_overrides", "resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
        "--max_steps", "4", "--per_device_train_batch_size", str(per_device),
        "--gradient_accumulation_steps", str(ga), "--train_sampling_strategy", "sequential",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--learning_rate", "1e-3",
        "--kss_every_n_steps", "2", "--kss_rank", "8", "--kss_num_samples", "64", "--kss_alpha", "0.5",
        "--rksp_num_samples", "128", "--rksp_every_n_steps", "2", "--seed", "0", "--disable_tqdm", "true",
        "--use_cpu",
    ]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def run_trajectory(text_file: str, out: Path, ga: int, per_device: int) -> dict:
    from hf_koopman.training import RKSPCallback
    from hf_koopman.training.fsdp import sharding_summary

    train_kss = load_train_script()
    trainer = train_kss.main(trajectory_argv(text_file, str(out / "traj"), ga, per_device))
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RKSPCallback))
    result = {
        "world_size": trainer.args.world_size,
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "model_class": type(trainer.model_wrapped).__name__,
        "sharding": sharding_summary(trainer.model),
        "kss_block_classes": sorted({type(b.module).__name__ for b in trainer._kss_blocks or []}),
        "init_verdict": callback.init_verdict,
        "log_history": trainer.state.log_history,
        "kss_steps": trainer.kss_steps,
    }
    (out / f"trajectory-rank{rank()}.json").write_text(json.dumps(result))
    return result


def run_guard(text_file: str, out: Path, check_every: int = 1, checkpoints: bool = False) -> None:
    """The guard on 2 processes: an infinite gradient on rank 1 at step 3 and (`loss_fault`) a loss raised on rank 1
    at step 6. `checkpoints`: a checkpoint every step and an in-memory copy kept once only, and the loss fault alone,
    at step 5: both ranks restore the last good checkpoint (checkpoint-3, newer than the copy) through all-reduces."""
    from transformers import TrainingArguments

    from hf_koopman.training import KSSTrainer, RKSPCallback

    train_kss = load_train_script()
    script, _ = train_kss.HfArgumentParser((train_kss.ScriptArguments, TrainingArguments)).parse_args_into_dataclasses(
        args=["--text_file", text_file, "--tiny", "--block_size", "32", "--output_dir", str(out / "guard")]
    )
    ids = torch.tensor(list(train_kss.load_text(script).encode("utf-8")))

    class FaultOnRankOne(KSSTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            handle = None
            if rank() == 1 and self.state.global_step == 2 and not checkpoints:
                # optimizer step 3, one rank only: the gradient flowing back into the last block is infinite (works
                # under DDP and FSDP2, whose parameters autograd never sees)
                block = self.accelerator.unwrap_model(model).transformer.h[-1]

                def poison(module, args, output):
                    hidden = output[0] if isinstance(output, tuple) else output
                    hidden.register_hook(lambda grad: torch.full_like(grad, float("inf")))

                handle = block.register_forward_hook(poison)
            if rank() == 1 and self.state.global_step == (4 if checkpoints else 5) and self.loss_fault:
                # optimizer step 6, one rank only: the model's loss is raised by 100, a constant, so the gradients
                # (and DDP's averaged ones) are untouched; only the guard's all-reduce can tell rank 0
                def raise_loss(module, args, output):
                    output["loss"] = output["loss"] + 100.0
                    return output

                handle = self.accelerator.unwrap_model(model).register_forward_hook(raise_loss, prepend=True)
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                if handle is not None:
                    handle.remove()

    import time

    import hf_koopman.training.guard as guard_module

    timings = []
    reduce_max = guard_module.reduce_max

    def timed_reduce(values):
        start = time.perf_counter()
        out = reduce_max(values)
        timings.append(time.perf_counter() - start)
        return out

    import hf_koopman.training.safety_net as safety_net

    safety_net.reduce_max = timed_reduce  # test instrumentation: time the guard's all-reduce
    timings.clear()
    windowed = check_every > 1  # the windowed check: the guard only, no init profile
    # the windowed run also has the relative loss limit: its reference (the first check's maximum over both ranks'
    # steps) must be the same on both ranks
    callback = RKSPCallback(num_samples=128, rank=8, on_divergence="rollback", check_every_n_steps=check_every,
                            profile_at_init=not (windowed or checkpoints),
                            relative_loss_threshold=3.0 if windowed else None,
                            snapshot_every_n_steps=10**6 if checkpoints else "auto")
    name = "guard-window" if windowed else "guard-checkpoints" if checkpoints else "guard"
    saving = dict(save_strategy="steps", save_steps=1) if checkpoints else dict(save_strategy="no")
    args = TrainingArguments(
        output_dir=str(out / name), max_steps=8, per_device_train_batch_size=2, logging_steps=1,
        report_to="none", use_cpu=True, disable_tqdm=True, **saving,
    )
    trainer = FaultOnRankOne(
        model=train_kss.build_model(script), args=args, train_dataset=train_kss.BlockDataset(ids, 32),
        callbacks=[callback],
    )
    trainer.kss_config.alpha = 0.0
    trainer.loss_fault = not windowed or checkpoints
    trainer.train()
    weights = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    result = {
        "global_step": trainer.state.global_step,
        "divergence": callback.divergence,
        "events": callback.events,
        "weights_sum": float(weights.sum()),
        "weights_sq": float(weights.square().sum()),
        "finite": bool(torch.isfinite(weights).all()),
        "reduce_seconds": timings,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "reference_loss": callback.reference_loss,
    }
    (out / f"{name}-rank{rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    text, out_dir = sys.argv[1], Path(sys.argv[2])
    ga, per_device = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (1, 2)
    run_trajectory(text, out_dir, ga=ga, per_device=per_device)
    run_guard(text, out_dir)
    window = int(os.environ.get("HF_KOOPMAN_TEST_GUARD_WINDOW", "1"))
    if window > 1:
        run_guard(text, out_dir, check_every=window)
        run_guard(text, out_dir, checkpoints=True)
