"""One sweep run = one `RunSpec`: build the research model from a seed, profile it at initialisation, train it, label it.

Rows are plain JSON dicts (one per line in `runs.jsonl`), so `datasets.load_dataset("json", data_files=...)` reads the
table. Runs are resumable: `run_sweep` skips `run_id`s already in the file.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .runner import RunResult, train_run, train_with_trainer
from .tasks import associative_recall_dataset, mnist_datasets, synthetic_lm_dataset, wikitext2_datasets

__all__ = [
    "RunSpec",
    "build_model",
    "task_datasets",
    "init_profile_features",
    "execute",
    "run_sweep",
    "read_rows",
    "dump_row",
    "mark_kss_grad_cap",
    "relabel_uncapped_kss",
]

logger = logging.getLogger(__name__)

TASKS = ("assoc_recall", "synthetic_lm", "wikitext2", "mnist_vit")
ARCHS = ("rksp_gpt", "mixtral")
_METHOD_PREFIXES = ("none", "clip", "kss")
UNCAPPED_SUFFIX = "-uncapped"
# Mixtral-style MoE of the MoE grid (paper Table 16: 8 experts, load-balancing loss coefficient 0.01)
MOE_NUM_EXPERTS = 8
MOE_ROUTER_AUX_LOSS_COEF = 0.01


@dataclass(frozen=True)
class RunSpec:
    """One trial of the sweep. `method`: `"none"`, `"clip<c>"` (gradient clipping at c), `"kss<alpha>"` (KSS with
    `KSSTrainer`'s default gradient cap, `kss_max_grad_ratio=0.5`) or `"kss<alpha>-uncapped"` (the paper-literal KSS
    gradient, `kss_max_grad_ratio=None`). `backend`: `"loop"` (plain AdamW loop) or `"trainer"` (`KSSTrainer`,
    required for KSS). `arch`: `"rksp_gpt"` (the research transformer; `norm` picks its normalisation) or
    `"mixtral"` (a tiny `MixtralForCausalLM` built from `MixtralConfig`, pre-RMSNorm, 8 experts, `num_experts_per_tok`
    = `top_k`, router load-balancing loss 0.01; needs an LM task and `norm="rmsnorm"`)."""

    norm: str
    learning_rate: float
    seed: int
    hidden_size: int = 32
    num_layers: int = 4
    num_heads: int = 4
    task: str = "assoc_recall"
    max_steps: int = 200
    batch_size: int = 16
    warmup_steps: int = 10
    method: str = "none"
    backend: str = "loop"
    group: str = ""
    arch: str = "rksp_gpt"
    top_k: int = 2

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}.")
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} must be one of {ARCHS}.")
        if self.arch == "mixtral":
            if self.task not in ("synthetic_lm", "wikitext2") or self.norm != "rmsnorm":
                raise ValueError(f"arch='mixtral' is a causal LM with pre-RMSNorm: use task='synthetic_lm' or "
                                 f"'wikitext2' and norm='rmsnorm' (got task={self.task!r}, norm={self.norm!r}).")
            if not 1 <= self.top_k <= MOE_NUM_EXPERTS:
                raise ValueError(f"top_k={self.top_k} must be in [1, {MOE_NUM_EXPERTS}].")
        if not self.method.startswith(_METHOD_PREFIXES):
            raise ValueError(
                f"method={self.method!r} must be 'none', 'clip<value>', 'kss<alpha>' or 'kss<alpha>-uncapped'."
            )
        if self.method.endswith(UNCAPPED_SUFFIX) and not self.method.startswith("kss"):
            raise ValueError(f"method={self.method!r}: only KSS methods take the '{UNCAPPED_SUFFIX}' suffix.")
        try:
            _ = self.clip, self.kss_alpha
        except ValueError:
            raise ValueError(
                f"method={self.method!r}: the number after 'clip' / 'kss' must be a float (e.g. 'clip1.0', 'kss0.15', "
                "'kss0.15-uncapped')."
            ) from None
        if self.backend not in ("loop", "trainer"):
            raise ValueError(f"backend={self.backend!r} must be 'loop' or 'trainer'.")
        if self.method.startswith("kss") and self.backend != "trainer":
            raise ValueError("KSS runs need backend='trainer' (KSSTrainer).")

    @property
    def run_id(self) -> str:
        # the default architecture adds nothing, so ids of rows written before `arch` existed stay valid
        arch = "" if self.arch == "rksp_gpt" else f"{self.arch}-top{self.top_k}-"
        return (
            f"{arch}{self.task}-{self.norm}-d{self.hidden_size}-L{self.num_layers}-lr{self.learning_rate:g}-s{self.seed}"
            f"-T{self.max_steps}-b{self.batch_size}-w{self.warmup_steps}-{self.method}-{self.backend}"
        )

    @property
    def clip(self) -> float | None:
        return float(self.method[4:]) if self.method.startswith("clip") else None

    @property
    def kss_alpha(self) -> float:
        return float(self.method[3:].removesuffix(UNCAPPED_SUFFIX)) if self.method.startswith("kss") else 0.0

    @property
    def kss_capped(self) -> bool:
        """False for `"kss<alpha>-uncapped"` (paper-literal KSS gradient)."""
        return not self.method.endswith(UNCAPPED_SUFFIX)


def build_model(spec: RunSpec) -> torch.nn.Module:
    """The research model of `spec`, initialised deterministically from `spec.seed`."""
    from research.rksp_gpt import RKSPGPTConfig, RKSPGPTForCausalLM, RKSPGPTForSequenceClassification

    from research.rksp_gpt import RKSPViTForImageClassification

    vocab = 512 if spec.task == "synthetic_lm" else 256  # wikitext2 is byte-level
    if spec.arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        moe = MixtralConfig(
            vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
            num_local_experts=MOE_NUM_EXPERTS, num_experts_per_tok=spec.top_k, max_position_embeddings=64,
            output_router_logits=True, router_aux_loss_coef=MOE_ROUTER_AUX_LOSS_COEF,
        )
        torch.manual_seed(spec.seed)
        return MixtralForCausalLM(moe)
    config = RKSPGPTConfig(
        vocab_size=vocab, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, max_position_embeddings=64, norm=spec.norm,
        num_labels=10 if spec.task == "mnist_vit" else vocab, image_size=28, patch_size=7, num_channels=1,
    )
    torch.manual_seed(spec.seed)
    if spec.task == "assoc_recall":
        return RKSPGPTForSequenceClassification(config)
    if spec.task == "mnist_vit":
        return RKSPViTForImageClassification(config)
    return RKSPGPTForCausalLM(config)


def task_datasets(spec: RunSpec, *, num_train: int = 4096, num_eval: int = 512):
    """`(train, eval)` data of the run: associative recall (seq 64, vocab 256, 4 pairs), the synthetic LM
    (seq 64, vocab 512 at CPU scale), WikiText-2 bytes (train valid.txt / eval test.txt, first 512 test blocks) or the
    MNIST test set split 80/20 by the run seed; data seeds derive from the run seed. Real data come from
    `$HF_KOOPMAN_DATA`."""
    if spec.task == "wikitext2":
        return wikitext2_datasets(None, seq_len=64, max_eval=num_eval)
    if spec.task == "mnist_vit":
        train, test = mnist_datasets(None, seed=spec.seed)
        return train, test
    if spec.task == "assoc_recall":
        make = associative_recall_dataset
        kw: dict[str, Any] = {"seq_len": 64, "vocab_size": 256, "num_pairs": 4}
    else:
        make = synthetic_lm_dataset
        kw = {"seq_len": 64, "vocab_size": 512}
    return make(num_train, seed=1000 + spec.seed, **kw), make(num_eval, seed=2000 + spec.seed, **kw)


def init_profile_features(model: torch.nn.Module, train_dataset, *, seed: int, num_sequences: int = 32) -> dict[str, Any]:
    """RKSP at initialisation on the first `num_sequences` training inputs (32 x 64 = 2048 token states, N = 2048):
    the profile's aggregates (`<feature>_<mean|max|min|std>`), its verdict, and the profiling time.

    Uses the default recipe (the full spectrum of the whitened DMD operator). Sweep tables written before the default
    changed hold rank-32 features; `research/scripts/fit_risk.py --reprofile` recomputes them with this function."""
    from hf_koopman.profiling import profile

    inputs = _probe_inputs(train_dataset, num_sequences)
    t0 = time.perf_counter()
    prof = profile(model, inputs, num_samples=2048, seed=seed, progress=False)
    out: dict[str, Any] = {k: _jsonable(v) for k, v in prof.aggregates.items()}
    out["verdict"] = prof.verdict
    out["profile_seconds"] = time.perf_counter() - t0
    return out


def _probe_inputs(dataset, n: int) -> dict[str, torch.Tensor]:
    key = "pixel_values" if "pixel_values" in dataset.column_names else "input_ids"
    n = n if key == "input_ids" else 128  # 128 images x 17 tokens = 2176 token states >= N = 2048
    return {key: torch.as_tensor(dataset.with_format("torch")[:n][key])}


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf / nan; readers map these strings back with float()
    return v


def _train(spec: RunSpec, model, train_ds, eval_ds) -> RunResult:
    if spec.backend == "loop":
        return train_run(
            model, train_ds, learning_rate=spec.learning_rate, max_steps=spec.max_steps, batch_size=spec.batch_size,
            warmup_steps=spec.warmup_steps, max_grad_norm=spec.clip, seed=spec.seed, eval_dataset=eval_ds,
        )
    from hf_koopman.training import KSSTrainer, KSSTrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = KSSTrainingArguments(
            output_dir=tmp, max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.learning_rate, warmup_steps=spec.warmup_steps, lr_scheduler_type="constant_with_warmup",
            weight_decay=0.01, max_grad_norm=spec.clip if spec.clip is not None else 0.0, seed=spec.seed,
            data_seed=spec.seed, logging_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
            disable_tqdm=True, dataloader_num_workers=0, kss_alpha=spec.kss_alpha, kss_seed=spec.seed,
            **({} if spec.kss_capped else {"kss_max_grad_ratio": None}),
        )
        return train_with_trainer(model, train_ds, args, trainer_cls=KSSTrainer, eval_dataset=eval_ds)


def execute(spec: RunSpec, *, features: bool = True) -> dict[str, Any]:
    """Run one trial and return its table row (spec fields, label, gradient baselines, eval, init features)."""
    train_ds, eval_ds = task_datasets(spec)
    model = build_model(spec)
    row: dict[str, Any] = {"run_id": spec.run_id, **asdict(spec)}
    if spec.method.startswith("kss"):  # provenance: which KSS gradient the run used (None = paper-literal)
        from hf_koopman.training import KSSConfig

        row["kss_max_grad_ratio"] = KSSConfig().max_grad_ratio if spec.kss_capped else None
        row["kss_grad_cap"] = KSSConfig().grad_cap if spec.kss_capped else None  # where the cap's norms are measured
    if features:  # profile keys first, spec fields win on a name clash (the profile also reports "num_layers")
        row.update({k: v for k, v in init_profile_features(model, train_ds, seed=spec.seed).items() if k not in row})
    result = _train(spec, model, train_ds, eval_ds)
    row.update(
        diverged=result.diverged, divergence_step=result.divergence_step, divergence_reason=result.divergence_reason,
        steps_run=len(result.losses), final_loss=_jsonable(result.losses[-1]) if result.losses else None,
        train_seconds=result.train_seconds, label_on="task_loss",
        **{k: _jsonable(v) for k, v in result.baselines.items()},
        **{f"eval_{k}": _jsonable(v) for k, v in result.eval.items()},
    )
    if result.objective_losses:  # a regulariser was added: would the label on the full objective differ?
        from .divergence import label_divergence

        obj = label_divergence(result.objective_losses, result.grad_norms)
        row.update(objective_loss_max=_jsonable(max(result.objective_losses)), diverged_on_objective=obj.diverged,
                   objective_divergence_step=obj.step)
    if features and not result.diverged:  # the spectrum after training (paper Table 3 reports M≈1 after training)
        from hf_koopman.profiling import profile

        inputs = _probe_inputs(train_ds, 32)
        try:
            final = profile(model, inputs, num_samples=2048, seed=spec.seed, progress=False)
            row["final_near_unit_mass_mean"] = final.aggregates[
                "near_unit_mass_mean"
            ]
        except ValueError as err:  # e.g. non-finite activations
            logger.warning("final profile failed for %s: %s", spec.run_id, err)
    return row


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a `runs.jsonl` file ("inf"/"nan" strings turned back into floats)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            row = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in row.items()}
            for key in ("num_layers", "hidden_size", "num_heads", "seed", "max_steps", "batch_size", "warmup_steps"):
                if isinstance(row.get(key), float):  # rows written before the spec-wins fix held the profile's float
                    row[key] = int(row[key])
            rows.append(row)
    return rows


def dump_row(row: dict[str, Any]) -> str:
    """One JSON line for `row` (non-finite floats as "inf" / "-inf" / "nan" strings, which `read_rows` maps back)."""
    return json.dumps({k: _jsonable(v) for k, v in row.items()})


def _rewrite_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace the table at `path` with `rows` atomically (write a sibling file, then rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(dump_row(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def mark_kss_grad_cap(path: str | Path, grad_cap: str) -> int:
    """Record `kss_grad_cap = grad_cap` on the capped KSS rows of `path` that predate the field.

    Rows written before `KSSConfig.grad_cap` existed (session 2) were capped with parameter-space norms; rows written
    between the session-3 switch of the default to `"activations"` and this field (the `--quick` tables of that
    session) used activation-space norms. The caller says which; rows that already carry the field are left alone
    (idempotent).

    Returns:
        `int`: the number of rows changed.
    """
    if grad_cap not in ("parameters", "activations"):
        raise ValueError(f"grad_cap must be 'parameters' or 'activations', got {grad_cap!r}")
    path = Path(path)
    rows = read_rows(path)
    changed = 0
    for row in rows:
        capped = str(row.get("method", "")).startswith("kss") and row.get("kss_max_grad_ratio") is not None
        if capped and "kss_grad_cap" not in row:
            row["kss_grad_cap"] = grad_cap
            changed += 1
    if changed:
        _rewrite_rows(path, rows)
    return changed


def relabel_uncapped_kss(path: str | Path) -> int:
    """Relabel KSS rows of `path` trained before `KSSTrainer` capped the KSS gradient.

    Such rows have no `kss_max_grad_ratio` field and were trained with the paper-literal gradient: their method
    becomes `kss<alpha>-uncapped` (and their `run_id` follows), with `kss_max_grad_ratio = None`. Idempotent.

    Returns:
        `int`: the number of rows changed.
    """
    path = Path(path)
    rows = read_rows(path)
    fields = set(RunSpec.__dataclass_fields__)
    changed = 0
    for row in rows:
        if not str(row.get("method", "")).startswith("kss") or "kss_max_grad_ratio" in row:
            continue
        row["method"] = row["method"] + UNCAPPED_SUFFIX
        row["run_id"] = RunSpec(**{k: row[k] for k in fields if k in row}).run_id
        row["kss_max_grad_ratio"] = None
        changed += 1
    if changed:
        _rewrite_rows(path, rows)
    return changed


def run_sweep(specs: Iterable[RunSpec], out_path: str | Path, *, features: bool = True, progress: bool = True) -> list[dict]:
    """Execute every spec whose `run_id` is not yet in `out_path` (JSON lines), appending one row per finished run."""
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["run_id"] for r in read_rows(out_path)}
    todo = [s for s in specs if s.run_id not in done]
    logger.info("%d runs done, %d to go -> %s", len(done), len(todo), out_path)
    new_rows = []
    bar = tqdm(todo, desc=out_path.parent.name, disable=not progress)
    for spec in bar:
        row = execute(spec, features=features)
        with out_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        new_rows.append(row)
        bar.set_postfix(div=row["diverged"], sec=f"{row['train_seconds']:.1f}")
    return new_rows
