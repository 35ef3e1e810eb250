"""The held-out-family divergence study (issue #22): model families, LR ladders, init-time features, the runner.

The plan, split, baselines and reading rules are in `results/heldout_risk/PURPOSE.md`; this module is its code.

* A **model init** (`ModelSpec`) is one architecture family variant (the research GPT in one of six normalisations,
  GPT-2, LLaMA, GPT-NeoX, Qwen2, a Mixtral-style MoE, Mamba, or the research GPT with a B-spline KAN MLP), one shape
  (depth, width, init std), one task (associative recall or byte-level WikiText-2) and one seed. Every family is a
  causal LM built from its `transformers` config, so both tasks use the same head: associative recall appends the
  answer token and puts the only label on it.
* Its **features** are computed once, before training, on the model at initialisation: the RKSP spectrum
  (`hf_koopman.profile`, default recipe), the config, the loss at init, and the curvature (`hf_koopman.curvature`):
  the top Hessian eigenvalue and the Adam-preconditioned sharpness. Each feature group records its cost in seconds.
* A **run** (`StudyRun`) trains that init with AdamW at one rung of the learning-rate ladder and labels it with the
  paper's rule (loss > 50, gradient norm > 500 or non-finite at any step; `hf_koopman.training.divergence`).

Rows are JSON lines with a fixed set of keys and JSON-native values (non-finite floats become `null`, and the field
names with their original values are listed in the string column `nonfinite`), so `datasets.load_dataset("json",
data_files=...)` reads them. `run_study` skips `run_id`s already present, repairs a half-written last line, caches the
features per model init in `features.jsonl`, and can be interrupted at any point.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_koopman.logging_utils import get_logger

__all__ = [
    "FAMILIES",
    "VARIANTS",
    "SHAPES",
    "TASKS",
    "LR_LADDER",
    "SEEDS",
    "HORIZON",
    "WARMUP",
    "BATCH_SIZE",
    "SEQ_LEN",
    "ModelSpec",
    "StudyRun",
    "build_model",
    "task_data",
    "init_features",
    "execute_run",
    "study_grid",
    "smoke_grid",
    "run_study",
    "read_jsonl",
]

logger = get_logger(__name__)

# ---- the design (PURPOSE.md states the same numbers) ---------------------------------------------------------------
FAMILIES = ("rksp_gpt", "gpt2", "llama", "gpt_neox", "qwen2", "mixtral", "mamba", "rksp_kan")
RKSP_NORMS = ("pre_ln", "post_ln", "rmsnorm", "deepnorm", "subln", "none")
# normalisation placement of each Hugging Face family (the config feature "norm"); the research GPTs carry their own
FAMILY_NORM = {
    "gpt2": "pre_ln",  # LayerNorm before each sub-layer, final LayerNorm
    "llama": "rmsnorm",
    "gpt_neox": "pre_ln",  # parallel attention + MLP residual, pre-LayerNorm
    "qwen2": "rmsnorm",
    "mixtral": "rmsnorm",
    "mamba": "rmsnorm",  # pre-RMSNorm around each Mamba mixer
    "rksp_kan": "pre_ln",
}
# (family, norm) variants: the research GPT in its six normalisations, then one variant per other family
VARIANTS: tuple[tuple[str, str], ...] = tuple(("rksp_gpt", n) for n in RKSP_NORMS) + tuple(
    (f, FAMILY_NORM[f]) for f in FAMILIES[1:]
)
# (depth L, width d, init std): a 2^(3-1) fraction of {2, 4} x {32, 64} x {0.02, 0.08}; each level of each factor
# appears twice, so the three main effects are balanced
SHAPES: tuple[tuple[int, int, float], ...] = ((2, 32, 0.02), (4, 32, 0.08), (2, 64, 0.08), (4, 64, 0.02))
TASKS = ("assoc_recall", "wikitext2")
LR_LADDER: tuple[float, ...] = tuple(1e-3 * 2.0**k for k in range(13))  # 1e-3 ... 4.096, ratio 2
SEEDS = (0, 1)
HORIZON = 150  # optimizer steps per run (sized from the timing measurement, PURPOSE.md "Budget")
WARMUP = 20  # linear warmup steps, then constant LR
BATCH_SIZE = 16
SEQ_LEN = 64
VOCAB = 256  # bytes for WikiText-2; the associative-recall vocabulary of the paper (Table 11)
WEIGHT_DECAY = 0.01
NUM_HEADS = 4
MOE_EXPERTS, MOE_TOP_K, MOE_AUX = 8, 2, 0.01
NUM_TRAIN = 4096  # associative-recall training sequences (HORIZON * BATCH_SIZE = 2400 are used)
PROBE_SEQUENCES = 32  # 32 x 64 = 2048 token states for the spectrum; also the Hessian batch
ADAM_BATCHES = 8  # gradient evaluations for Adam's second moment (mini-batches of BATCH_SIZE, first two = probe)
POWER_ITERATIONS, POWER_TOL = 20, 1e-3
STUDY_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """One model at initialisation: family variant, shape, task and seed (the unit that features describe)."""

    family: str
    norm: str
    num_layers: int
    hidden_size: int
    init_std: float
    task: str
    seed: int

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} must be one of {FAMILIES}.")
        if self.family == "rksp_gpt":
            if self.norm not in RKSP_NORMS:
                raise ValueError(f"norm={self.norm!r} must be one of {RKSP_NORMS} for the research GPT.")
        elif self.norm != FAMILY_NORM[self.family]:
            raise ValueError(f"family {self.family!r} has norm {FAMILY_NORM[self.family]!r}, got {self.norm!r}.")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}.")
        if self.hidden_size % NUM_HEADS or self.num_layers < 1 or not self.init_std > 0:
            raise ValueError(f"need hidden_size divisible by {NUM_HEADS}, num_layers >= 1, init_std > 0; got "
                             f"{self.hidden_size}, {self.num_layers}, {self.init_std}.")

    @property
    def variant(self) -> str:
        """`family` for the Hugging Face families, `rksp_gpt-<norm>` for the research GPT."""
        return f"rksp_gpt-{self.norm}" if self.family == "rksp_gpt" else self.family

    @property
    def model_id(self) -> str:
        return (f"{self.variant}-{self.task}-L{self.num_layers}-d{self.hidden_size}-std{self.init_std:g}"
                f"-s{self.seed}")


@dataclass(frozen=True)
class StudyRun:
    """One training run: a model init trained at one learning rate (schedule fixed by the module constants unless
    overridden, e.g. by the smoke grid)."""

    model: ModelSpec
    learning_rate: float
    horizon: int = HORIZON
    warmup: int = WARMUP
    batch_size: int = BATCH_SIZE

    @property
    def run_id(self) -> str:
        return f"{self.model.model_id}-lr{self.learning_rate:.6g}-T{self.horizon}-w{self.warmup}-b{self.batch_size}"


# ---- models -------------------------------------------------------------------------------------------------------
def build_model(spec: ModelSpec, *, scale: dict[str, int] | None = None) -> torch.nn.Module:
    """The causal LM of `spec`, initialised deterministically from `spec.seed` (dropout 0, vocabulary 256, 64
    positions). `scale` overrides `vocab_size` / `max_position_embeddings` (tests only)."""
    import transformers as tf

    d, n_layers, std = spec.hidden_size, spec.num_layers, spec.init_std
    vocab = (scale or {}).get("vocab_size", VOCAB)
    positions = (scale or {}).get("max_position_embeddings", SEQ_LEN)
    common = {"vocab_size": vocab, "initializer_range": std, "use_cache": False}
    torch.manual_seed(spec.seed)
    if spec.family in ("rksp_gpt", "rksp_kan"):
        from research.rksp_gpt import RKSPGPTConfig, RKSPGPTForCausalLM

        kan = spec.family == "rksp_kan"
        config = RKSPGPTConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=NUM_HEADS,
            max_position_embeddings=positions, norm=spec.norm, initializer_range=std,
            intermediate_size=2 * d if kan else 4 * d, mlp_type="kan" if kan else "mlp",
        )
        return RKSPGPTForCausalLM(config)
    if spec.family == "gpt2":
        config = tf.GPT2Config(n_positions=positions, n_embd=d, n_layer=n_layers, n_head=NUM_HEADS, n_inner=4 * d,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        return tf.GPT2LMHeadModel(config)
    if spec.family == "llama":
        config = tf.LlamaConfig(hidden_size=d, intermediate_size=(8 * d) // 3, num_hidden_layers=n_layers,
                                num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_HEADS,
                                max_position_embeddings=positions, **common)
        return tf.LlamaForCausalLM(config)
    if spec.family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=n_layers,
                                  num_attention_heads=NUM_HEADS, max_position_embeddings=positions,
                                  use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0, **common)
        return tf.GPTNeoXForCausalLM(config)
    if spec.family == "qwen2":
        config = tf.Qwen2Config(hidden_size=d, intermediate_size=(8 * d) // 3, num_hidden_layers=n_layers,
                                num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_HEADS // 2,
                                max_position_embeddings=positions, tie_word_embeddings=True, use_sliding_window=False,
                                **common)
        return tf.Qwen2ForCausalLM(config)
    if spec.family == "mixtral":
        config = tf.MixtralConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                                  num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_HEADS,
                                  num_local_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K,
                                  max_position_embeddings=positions, output_router_logits=True,
                                  router_aux_loss_coef=MOE_AUX, **common)
        return tf.MixtralForCausalLM(config)
    if spec.family == "mamba":
        config = tf.MambaConfig(hidden_size=d, state_size=16, num_hidden_layers=n_layers, expand=2, conv_kernel=4,
                                **common)
        return tf.MambaForCausalLM(config)
    raise ValueError(f"unknown family {spec.family!r}")  # unreachable: ModelSpec validates


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- data ---------------------------------------------------------------------------------------------------------
_WIKITEXT_CACHE: dict[str, Any] = {}


def task_data(task: str, seed: int, *, data_dir: str | None = None, num_train: int = NUM_TRAIN) -> dict[str, torch.Tensor]:
    """Training tensors of `task`: `input_ids` and `labels` `(n, 64)` int64.

    * `assoc_recall`: `associative_recall_dataset` with 63 tokens (4 pairs, vocabulary 256, data seed `1000 + seed`)
      plus the answer appended; labels are -100 except the answer, so a causal LM's loss is exactly the recall loss.
    * `wikitext2`: byte blocks of `wikitext-2/valid.txt` (the WikiText-2 train split is not offline), labels = ids.
    """
    from .tasks import associative_recall_dataset, wikitext2_datasets

    if task == "assoc_recall":
        ds = associative_recall_dataset(num_train, seq_len=SEQ_LEN - 1, vocab_size=VOCAB, num_pairs=4, seed=1000 + seed)
        rows = ds[:]
        ids = torch.cat([torch.as_tensor(rows["input_ids"]), torch.as_tensor(rows["labels"])[:, None]], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        return {"input_ids": ids, "labels": labels}
    if task == "wikitext2":
        key = str(data_dir)
        if key not in _WIKITEXT_CACHE:
            train, _ = wikitext2_datasets(data_dir, seq_len=SEQ_LEN, max_eval=1)
            _WIKITEXT_CACHE[key] = torch.as_tensor(train.with_format("torch")[:]["input_ids"])
        ids = _WIKITEXT_CACHE[key]
        return {"input_ids": ids, "labels": ids.clone()}
    raise ValueError(f"task={task!r} must be one of {TASKS}.")


def _as_dataset(data: dict[str, torch.Tensor]):
    from datasets import Dataset

    return Dataset.from_dict({k: v.numpy() for k, v in data.items()}).with_format("torch")


# ---- features -----------------------------------------------------------------------------------------------------
def _finite_or_none(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def init_features(model: torch.nn.Module, spec: ModelSpec, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Everything known before training, with the cost of each group in seconds.

    * config: `family`, `variant`, `norm`, `num_layers`, `hidden_size`, `init_std`, `num_parameters`;
    * `init_loss`: the loss on the probe batch (the first 32 training sequences);
    * spectrum: `hf_koopman.profile(model, probe input_ids)` (default recipe, N = 2048 token states) aggregates
      (`<feature>_<mean|max|min|std>`), `verdict`, `spectrum_seconds`; `spectrum_error` if it failed;
    * curvature (`hf_koopman.curvature`, `curvature_features`): `hessian_top_eig` (Lanczos, <= 20 Hessian-vector
      products, on the probe batch), `gd_critical_lr = 2 / hessian_top_eig`; `adam_sharpness` =
      lambda_max(P^-1 H) with P from 8 optimizer-free gradient evaluations on the first 8 training mini-batches of 16
      (the first two are the probe batch), `adam_critical_lr = 38 / adam_sharpness`; their `*_seconds`;
      `curvature_error` if it failed.
    """
    from hf_koopman.profiling import profile

    out: dict[str, Any] = {
        "family": spec.family, "variant": spec.variant, "norm": spec.norm, "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size, "init_std": spec.init_std, "task": spec.task, "seed": spec.seed,
        "num_parameters": count_parameters(model),
    }
    probe = {k: v[:PROBE_SEQUENCES] for k, v in data.items()}
    t0 = time.perf_counter()
    with torch.no_grad():
        loss = model(**probe).loss
    out["init_loss"] = float(loss)
    out["init_loss_seconds"] = time.perf_counter() - t0

    out.update(dict.fromkeys(spectrum_keys()))  # the same keys whether or not the profile succeeds
    t0 = time.perf_counter()
    try:
        prof = profile(model, {"input_ids": probe["input_ids"]}, num_samples=PROBE_SEQUENCES * SEQ_LEN,
                       seed=spec.seed, progress=False)
        for k, v in prof.aggregates.items():  # the profile's "num_layers" (blocks found) is kept as profiled_layers
            out["profiled_layers" if k == "num_layers" else k] = v
        out["verdict"] = prof.verdict
        out["spectrum_error"] = ""
    except Exception as err:  # noqa: BLE001 - a failed profile is a recorded outcome (e.g. non-finite activations)
        logger.warning("profile failed for %s: %s", spec.model_id, err)
        out["verdict"] = "error"
        out["spectrum_error"] = f"{type(err).__name__}: {err}"[:300]
    out["spectrum_seconds"] = time.perf_counter() - t0

    out.update(curvature_features(model, spec, data))
    return out


def curvature_features(model: torch.nn.Module, spec: ModelSpec, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The curvature part of `init_features`: `CURVATURE_KEYS`, `hessian_seconds`, `adam_seconds`,
    `curvature_error`."""
    from hf_koopman.curvature import adam_preconditioned_sharpness, sharpness

    out: dict[str, Any] = {}
    probe = {k: v[:PROBE_SEQUENCES] for k, v in data.items()}
    batches = [{k: v[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] for k, v in data.items()} for i in range(ADAM_BATCHES)]
    errors = []
    out.update(dict.fromkeys(CURVATURE_KEYS))
    t0 = time.perf_counter()
    try:
        h = sharpness(model, probe, num_iterations=POWER_ITERATIONS, tol=POWER_TOL, seed=spec.seed)
        out.update(hessian_top_eig=h.eigenvalue, hessian_dominant_eig=h.dominant_eigenvalue,
                   hessian_iterations=h.iterations, hessian_converged=h.converged, gd_critical_lr=h.critical_lr)
    except Exception as err:  # noqa: BLE001
        errors.append(f"hessian: {type(err).__name__}: {err}"[:300])
    out["hessian_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        a = adam_preconditioned_sharpness(model, batches, hessian_batch=probe, num_iterations=POWER_ITERATIONS,
                                          tol=POWER_TOL, seed=spec.seed)
        out.update(adam_sharpness=a.eigenvalue, adam_dominant_eig=a.dominant_eigenvalue,
                   adam_iterations=a.iterations, adam_converged=a.converged, adam_critical_lr=a.critical_lr,
                   adam_zero_gradient_fraction=a.details["zero_gradient_fraction"])
    except Exception as err:  # noqa: BLE001
        errors.append(f"adam: {type(err).__name__}: {err}"[:300])
    out["adam_seconds"] = time.perf_counter() - t0
    out["curvature_error"] = "; ".join(errors)
    return out


CURVATURE_KEYS = (
    "hessian_top_eig", "hessian_dominant_eig", "hessian_iterations", "hessian_converged", "gd_critical_lr",
    "adam_sharpness", "adam_dominant_eig", "adam_iterations", "adam_converged", "adam_critical_lr",
    "adam_zero_gradient_fraction",
)


def spectrum_keys() -> list[str]:
    """The aggregate keys of a `SpectralProfile` (`<feature>_<stat>`, the composite, the layer counts)."""
    from hf_koopman.koopman import FEATURE_NAMES
    from hf_koopman.koopman.aggregate import STATS

    keys = [f"{name}_{stat}" for name in FEATURE_NAMES for stat in STATS]
    return keys + ["near_unit_mass_x_log10_kappa_mean", "profiled_layers", "num_degenerate"]


# ---- one run ------------------------------------------------------------------------------------------------------
def execute_run(
    run: StudyRun, features: dict[str, Any], data: dict[str, torch.Tensor], dataset: Any = None
) -> dict[str, Any]:
    """Train `run` from its init (rebuilt from the seed) and return its row: the features of the init, the schedule,
    the label, the paper's gradient statistics (over the run's own horizon) and the costs (`run_seconds` wall,
    `run_cpu_seconds` process CPU time, which is what the budget counts on a shared machine). `dataset` is `data` as a
    `datasets.Dataset` (built here when not given)."""
    from .runner import train_run

    spec = run.model
    t0, c0 = time.perf_counter(), time.process_time()
    model = build_model(spec)
    result = train_run(
        model, dataset if dataset is not None else _as_dataset(data), learning_rate=run.learning_rate, max_steps=run.horizon,
        batch_size=run.batch_size, warmup_steps=run.warmup, weight_decay=WEIGHT_DECAY, seed=spec.seed,
    )
    row: dict[str, Any] = dict(features)
    row.update(
        run_id=run.run_id, model_id=spec.model_id, learning_rate=float(run.learning_rate),
        log10_lr=math.log10(run.learning_rate), horizon=run.horizon, warmup=run.warmup, batch_size=run.batch_size,
        optimizer="AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), linear warmup then constant",
        diverged=bool(result.diverged), divergence_step=result.divergence_step,
        divergence_reason=result.divergence_reason or "", steps_run=len(result.losses),
        final_loss=float(result.losses[-1]) if result.losses else None,
        max_loss=float(np.max(result.losses)) if result.losses else None,
        **{k: float(v) for k, v in result.baselines.items()},
        train_seconds=result.train_seconds, run_seconds=time.perf_counter() - t0,
        run_cpu_seconds=time.process_time() - c0,
        study_version=STUDY_VERSION,
    )
    return row


# ---- grids --------------------------------------------------------------------------------------------------------
def _ordered(
    variants: Sequence[tuple[str, str]], shapes: Sequence[tuple[int, int, float]], tasks: Sequence[str],
    seeds: Sequence[int], ladder: Sequence[float], **run_kw: Any,
) -> list[StudyRun]:
    """Seed-major tiers so that any prefix is a usable study: for each seed, first the even rungs of the ladder
    (ratio 4), then the odd rungs; inside a tier, model inits go round-robin over the family variants (shape and task
    alternate) and the rungs of one init stay together (its features are computed once)."""
    runs = []
    # every shape once with alternating tasks, then every shape with the other task
    combos = [(shape, tasks[(i + j) % len(tasks)]) for j in range(len(tasks)) for i, shape in enumerate(shapes)]
    for seed in seeds:
        for parity in (0, 1):
            rungs = [lr for k, lr in enumerate(ladder) if k % 2 == parity]
            for (n_layers, d, std), task in combos:
                for family, norm in variants:
                    spec = ModelSpec(family, norm, n_layers, d, std, task, seed)
                    runs.extend(StudyRun(spec, lr, **run_kw) for lr in rungs)
    return runs


def study_grid(seeds: Sequence[int] = SEEDS) -> list[StudyRun]:
    """The full study: 13 family variants x 4 shapes x 2 tasks x `seeds` x 13 learning rates."""
    return _ordered(VARIANTS, SHAPES, TASKS, seeds, LR_LADDER)


def smoke_grid() -> list[StudyRun]:
    """A seconds-long grid for tests: two variants, one tiny shape, associative recall, 2 learning rates, 4 steps."""
    variants = (("rksp_gpt", "none"), ("gpt2", "pre_ln"))
    return _ordered(variants, ((1, 16, 0.02),), ("assoc_recall",), (0,), (1e-3, 10.0), horizon=4, warmup=1,
                    batch_size=4)


# ---- JSON lines ---------------------------------------------------------------------------------------------------
def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-native values; non-finite floats -> None, listed as `name=value` in `nonfinite`."""
    nonfinite = []
    out = {}
    for k, v in row.items():
        if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)):
            nonfinite.append(f"{k}={float(v)}")
            v = None
        out[k] = _finite_or_none(v)
    out["nonfinite"] = ";".join(nonfinite)
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file with the values listed in `nonfinite` restored (`inf`, `nan`). A malformed last
    line (an interrupted write) is skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                logger.warning("%s: skipping a half-written last line", path)
                continue
            raise ValueError(f"{path}:{i + 1} is not valid JSON; fix or remove that line.") from None
        for item in filter(None, str(row.get("nonfinite", "")).split(";")):
            k, _, v = item.partition("=")
            row[k] = float(v)
        rows.append(row)
    return rows


def _repair_tail(path: Path) -> None:
    """Drop a half-written last line so that the next append starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    logger.warning("%s: removing a half-written last line (%d bytes)", path, len(data) - cut)
    path.write_bytes(data[:cut])


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def code_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shard_runs(runs: Sequence[StudyRun], index: int, count: int) -> list[StudyRun]:
    """The runs of every `count`-th distinct model init (in run order) from the `index`-th, order kept."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must lie in [0, {count}).")
    position = {mid: i for i, mid in enumerate(dict.fromkeys(r.model.model_id for r in runs))}
    return [r for r in runs if position[r.model.model_id] % count == index]


# ---- the runner ---------------------------------------------------------------------------------------------------
def run_study(
    runs: Iterable[StudyRun],
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """Execute every run whose `run_id` is not yet in `out_dir/runs.jsonl`, appending one row per finished run.

    `shard=(i, n)` keeps the model inits whose position among the distinct inits (in run order) is `i` modulo `n`,
    so `n` processes can share the grid without overlap, each in the study's order; they append to the same files.

    Features of each model init are cached in `out_dir/features.jsonl` (computed on first use). Every row has the
    same keys (a failed profile or curvature leaves its keys `null` and says why in `spectrum_error` /
    `curvature_error`); `normalise_rows` is a safety net run by the entry script when the grid is complete.
    `limit` stops after that many new runs.

    Returns:
        the rows written by this call.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_path, feats_path = out_dir / "runs.jsonl", out_dir / "features.jsonl"
    for p in (runs_path, feats_path):
        _repair_tail(p)
    runs = list(runs)
    runs = shard_runs(runs, *shard)
    done = {r["run_id"] for r in read_jsonl(runs_path)}
    features = {r["model_id"]: r for r in read_jsonl(feats_path)}
    todo = [r for r in runs if r.run_id not in done]
    already = len(runs) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    logger.info("%d of %d runs done, %d to go in this call -> %s", already, len(runs), len(todo), runs_path)
    commit = code_commit()
    written = []
    data_cache: dict[tuple[str, int], tuple[dict[str, torch.Tensor], Any]] = {}
    bar = tqdm(total=len(runs), initial=already, desc="heldout_risk", disable=not progress, mininterval=10.0)
    for run in todo:
        spec = run.model
        key = (spec.task, spec.seed)
        if key not in data_cache:
            data_cache.clear()  # one task's tensors at a time
            tensors = task_data(spec.task, spec.seed, data_dir=data_dir)
            data_cache[key] = (tensors, _as_dataset(tensors))
        data, dataset = data_cache[key]
        if spec.model_id not in features:
            t0, c0 = time.perf_counter(), time.process_time()
            feats = init_features(build_model(spec), spec, data)
            feats.update(model_id=spec.model_id, features_seconds=time.perf_counter() - t0,
                         features_cpu_seconds=time.process_time() - c0, code_commit=commit)
            feats = _clean_row(feats)
            _append(feats_path, feats)
            features[spec.model_id] = read_jsonl_row(feats)
        feats = {k: v for k, v in features[spec.model_id].items() if k != "nonfinite"}
        row = execute_run(run, feats, data, dataset)
        row["code_commit"] = commit
        row = _clean_row(row)
        _append(runs_path, row)
        written.append(row)
        bar.update(1)
        bar.set_postfix_str(f"{spec.variant} lr={run.learning_rate:.3g} div={row['diverged']} "
                            f"{row['run_seconds']:.1f}s", refresh=False)
    bar.close()
    return written


def read_jsonl_row(row: dict[str, Any]) -> dict[str, Any]:
    """One cleaned row with its `nonfinite` values restored (the in-memory twin of `read_jsonl`)."""
    out = dict(row)
    for item in filter(None, str(row.get("nonfinite", "")).split(";")):
        k, _, v = item.partition("=")
        out[k] = float(v)
    return out


def normalise_rows(path: str | Path) -> int:
    """Rewrite `path` so that every row has the union of all keys (missing ones `null`), atomically.

    `datasets`' JSON reader infers one schema per file; rows with different key sets (a failed profile has no
    spectrum keys) still load, but a fixed key set keeps the column order stable. Returns the number of rows.
    """
    path = Path(path)
    _repair_tail(path)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = sorted({k for row in lines for k in row})
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({k: row.get(k) for k in keys}, sort_keys=True) + "\n" for row in lines),
                   encoding="utf-8")
    tmp.replace(path)
    return len(lines)


def _spec_of(row: dict[str, Any]) -> ModelSpec:
    return ModelSpec(row["family"], row["norm"], int(row["num_layers"]), int(row["hidden_size"]),
                     float(row["init_std"]), row["task"], int(row["seed"]))


REFRESH_NAME = "curvature_refresh.jsonl"


def refresh_curvature(out_dir: str | Path, *, data_dir: str | None = None, shard: tuple[int, int] = (0, 1),
                      progress: bool = True) -> int:
    """Recompute the curvature features of every model init in `out_dir/features.jsonl` with the current
    `hf_koopman.curvature` (the same init, probe batch and mini-batches; no training), appending one row per init to
    `out_dir/curvature_refresh.jsonl`: `model_id`, the new values, and the old ones as `old_<key>`. Resumable;
    `shard=(i, n)` takes every n-th init from the i-th. Returns the number of rows written."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    path = out_dir / REFRESH_NAME
    _repair_tail(path)
    done = {r["model_id"] for r in read_jsonl(path)}
    rows = [r for i, r in enumerate(read_jsonl(out_dir / "features.jsonl")) if i % shard[1] == shard[0]]
    todo = [r for r in rows if r["model_id"] not in done]
    commit, written = code_commit(), 0
    for row in tqdm(todo, desc="curvature refresh", disable=not progress):
        spec = _spec_of(row)
        t0 = time.perf_counter()
        new = curvature_features(build_model(spec), spec, task_data(spec.task, spec.seed, data_dir=data_dir))
        keep = (*CURVATURE_KEYS, "hessian_seconds", "adam_seconds", "curvature_error")
        record = {"model_id": row["model_id"], **new, **{f"old_{k}": row.get(k) for k in keep},
                  "refresh_seconds": time.perf_counter() - t0, "curvature_code_commit": commit}
        _append(path, _clean_row(record))
        written += 1
    return written


def merge_curvature_refresh(out_dir: str | Path) -> int:
    """Write the refreshed curvature values into `features.jsonl` and into every row of `runs.jsonl` that copies its
    init's features (`curvature_code_commit` records the code that computed them). Refuses unless every init has a
    refreshed row. Returns the number of run rows updated."""
    out_dir = Path(out_dir)
    refreshed = {r["model_id"]: r for r in read_jsonl(out_dir / REFRESH_NAME)}
    features = read_jsonl(out_dir / "features.jsonl")
    missing = [r["model_id"] for r in features if r["model_id"] not in refreshed]
    if missing:
        raise ValueError(f"{len(missing)} inits have no refreshed curvature yet (e.g. {missing[0]}); run "
                         "--refresh-curvature to the end first.")
    keys = (*CURVATURE_KEYS, "hessian_seconds", "adam_seconds", "curvature_error", "curvature_code_commit")

    def update(path: Path) -> int:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        count = 0
        for row in lines:
            new = refreshed.get(row.get("model_id"))
            if new is None:
                continue
            # the row's own non-finite list, without the entries of the keys replaced here
            nonfinite = [item for item in filter(None, str(row.get("nonfinite", "")).split(";"))
                         if item.partition("=")[0] not in keys]
            for k in keys:
                v = new.get(k)
                if isinstance(v, float) and not math.isfinite(v):
                    nonfinite.append(f"{k}={v}")
                    v = None
                row[k] = v
            row["nonfinite"] = ";".join(nonfinite)
            count += 1
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in lines), encoding="utf-8")
        tmp.replace(path)
        return count

    update(out_dir / "features.jsonl")
    return update(out_dir / "runs.jsonl")


def spec_dict(run: StudyRun) -> dict[str, Any]:
    return {"run_id": run.run_id, **asdict(run.model), "learning_rate": run.learning_rate}
