"""The paper's Table 1 at initialisation: the six normalisations of the research GPT, profiled with the default recipe.

Setting (rksp_paper.md §3.1-3.2): GPT-2-style research GPT, d = 128, 4 heads, associative-recall probe (seq 64,
vocab 256, 4 pairs), N = 2048 token states (32 sequences x 64 positions, every token), seeds 42 / 123 / 456. Each model
is profiled at initialisation with `profile_from_snapshots` defaults (the full spectrum) and summarised as the paper
summarises a run: the layer means of M≈1, M>1 and rho, plus the median kappa(V), the mean eta_nl and the fraction of
ResDMD-reliable modes.

Two snapshot conventions are measured, because the paper does not say where it reads the residual stream of a block
that ends in a normalisation (Post-LN, DeepNorm):

* `"block"`: block input -> block output (after its final LayerNorm), what `hf_koopman.profile` records for any model;
* `"pre_norm_sum"`: block input -> the sum `alpha * h + f(h)` that enters the block's final LayerNorm. For the Pre-LN
  family and No-Norm the two coincide (the block ends in the residual sum).

`update_ratio` is the layer mean of `||Y - X||_F / ||X||_F` on the raw snapshots: how far the block is from the
identity at initialisation.

`init="pytorch"` re-initialises the model with PyTorch's module defaults (embeddings N(0, 1), linear layers
Kaiming-uniform), the init of a hand-written GPT, instead of the GPT-2 init (`initializer_range = 0.02`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PAPER_TABLE1", "NORMS", "Table1Row", "measure", "build_model", "probe_batch"]

NORMS = ("pre_ln", "post_ln", "rmsnorm", "deepnorm", "subln", "none")

#: Paper Table 1: (M≈1, M>1, rho), means over its runs.
PAPER_TABLE1: dict[str, tuple[float, float, float]] = {
    "pre_ln": (0.16, 0.54, 2.29),
    "post_ln": (0.66, 0.31, 7.48),
    "rmsnorm": (0.16, 0.54, 2.28),
    "deepnorm": (0.00, 1.00, 3.94),
    "subln": (0.13, 0.54, 2.23),
    "none": (0.80, 0.19, 1.11),
}


@dataclass
class Table1Row:
    """Layer-mean spectral summary of one model at initialisation."""

    norm: str
    num_layers: int
    seed: int
    convention: str
    init: str
    near_unit_mass: float
    unstable_mass: float
    spectral_radius: float
    eigvec_condition_median: float
    nonlinearity: float
    reliable_fraction: float
    update_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(norm: str, num_layers: int, seed: int, *, hidden_size: int = 128, init: str = "gpt2"):
    """Research GPT for associative recall, initialised from `seed` (`init`: `"gpt2"` or `"pytorch"`)."""
    from research.rksp_gpt import RKSPGPTConfig, RKSPGPTForSequenceClassification

    config = RKSPGPTConfig(
        vocab_size=256, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        max_position_embeddings=64, norm=norm, num_labels=256,
    )
    torch.manual_seed(seed)
    model = RKSPGPTForSequenceClassification(config)
    if init == "pytorch":
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.reset_parameters()
    elif init != "gpt2":
        raise ValueError(f"init={init!r} must be 'gpt2' or 'pytorch'")
    return model.eval()


def probe_batch(seed: int, num_sequences: int = 32) -> dict[str, torch.Tensor]:
    """`num_sequences` associative-recall inputs (seq 64): 2048 token states for 32 sequences."""
    from research.experiments.tasks import associative_recall_dataset

    ds = associative_recall_dataset(num_sequences, seq_len=64, vocab_size=256, num_pairs=4, seed=10_000 + seed)
    return {"input_ids": torch.as_tensor(np.asarray(ds.with_format("numpy")["input_ids"]))}


def _snapshots(model, batch: dict[str, torch.Tensor], convention: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    blocks = model.transformer.layers
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())))
        final_norm = block.norm_2 if convention == "pre_norm_sum" and block.norm_type in ("post_ln", "deepnorm") else None
        if final_norm is not None:
            handles.append(final_norm.register_forward_pre_hook(lambda m, args: outputs.append(args[0].detach())))
        else:
            handles.append(block.register_forward_hook(lambda m, args, out: outputs.append(out.detach())))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    d = inputs[0].shape[-1]
    return [(f"layers.{i}", x.reshape(-1, d).float(), y.reshape(-1, d).float())
            for i, (x, y) in enumerate(zip(inputs, outputs))]


def measure(
    norm: str, num_layers: int, seed: int, *, convention: str = "block", init: str = "gpt2", hidden_size: int = 128,
    **analysis_kwargs: Any,
) -> Table1Row:
    """Profile one model of the Table 1 grid at initialisation (default recipe unless `analysis_kwargs` say otherwise)."""
    from hf_koopman.profiling import profile_from_snapshots

    if convention not in ("block", "pre_norm_sum"):
        raise ValueError(f"convention={convention!r} must be 'block' or 'pre_norm_sum'")
    model = build_model(norm, num_layers, seed, hidden_size=hidden_size, init=init)
    snaps = _snapshots(model, probe_batch(seed), convention)
    prof = profile_from_snapshots(snaps, seed=seed, progress=False, **analysis_kwargs)
    feats = prof.features
    reliable = sum(f.n_reliable for f in feats) / max(sum(f.n_modes for f in feats), 1)
    return Table1Row(
        norm=norm, num_layers=num_layers, seed=seed, convention=convention, init=init,
        near_unit_mass=float(np.mean([f.near_unit_mass for f in feats])),
        unstable_mass=float(np.mean([f.unstable_mass for f in feats])),
        spectral_radius=float(np.mean([f.spectral_radius for f in feats])),
        eigvec_condition_median=float(np.median([f.eigvec_condition for f in feats])),
        nonlinearity=float(np.mean([f.nonlinearity for f in feats])),
        reliable_fraction=float(reliable) if math.isfinite(reliable) else float("nan"),
        update_ratio=float(np.mean([float((y - x).norm() / x.norm()) for _, x, y in snaps])),
    )
