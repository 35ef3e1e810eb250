#!/usr/bin/env python
"""Train a causal LM with Koopman Spectral Shaping and the RKSP callback; runs unchanged under `accelerate launch`.

The model is built offline from an embedded architecture config (`--architecture gpt2`, see
`hf_koopman.profiling.architectures.known_architectures()`), optionally shrunk (`--tiny`, `--config_overrides`).
Text is byte-tokenised (vocabulary 256, no Hub tokenizer needed) and cut into `--block_size` blocks.

Examples:
    # one process
    python scripts/train_kss.py --text_file $HF_KOOPMAN_DATA/tinyshakespeare/input.txt --tiny \
        --output_dir out/kss --max_steps 200 --per_device_train_batch_size 8 --learning_rate 1e-3 --kss_alpha 0.15
    # two processes (DDP); on a CPU-only host add --use_cpu (the script adds it when WORLD_SIZE > 1 and no GPU)
    accelerate launch --config_file scripts/accelerate_configs/ddp.yaml scripts/train_kss.py ... (same arguments)
    # two processes, parameters sharded (FSDP2); on a CPU-only host KSSTrainer turns accelerate's DDP fallback into FSDP2
    accelerate launch --config_file scripts/accelerate_configs/fsdp.yaml scripts/train_kss.py ... (same arguments)
    # a datasets dataset (local files or a cached Hub dataset)
    python scripts/train_kss.py --dataset text --dataset_files train.txt --text_column text ...

Every `TrainingArguments` / `kss_*` flag of `hf_koopman.KSSTrainingArguments` is accepted, plus the RKSP callback
flags `--rksp_auto_kss`, `--rksp_every_n_steps`, `--rksp_no_guard`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

from hf_koopman.profiling.architectures import load_architecture_config
from hf_koopman.training import KSSTrainer, KSSTrainingArguments, RKSPCallback


logger = logging.getLogger("train_kss")
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}


@dataclass
class ScriptArguments:
    text_file: str | None = field(default=None, metadata={"help": "Plain-text training file."})
    dataset: str | None = field(default=None, metadata={"help": "`datasets.load_dataset` name or builder ('text')."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_files: str | None = field(default=None, metadata={"help": "Comma-separated data_files for the builder."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    max_chars: int | None = field(default=None, metadata={"help": "Truncate the corpus to this many characters."})
    architecture: str = field(default="gpt2", metadata={"help": "Embedded architecture config (e.g. gpt2, llama-2-7b)."})
    tiny: bool = field(default=False, metadata={"help": "Shrink to 2 layers, width 64, 4 heads."})
    config_overrides: str | None = field(default=None, metadata={"help": "e.g. 'n_layer=4,n_embd=128'."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    rksp_auto_kss: bool = field(default=False, metadata={
        "help": "At a high-risk init verdict, log which state KSS is in and the evidence on it. It never switches KSS "
                "on or off; --kss_enabled decides."})
    rksp_every_n_steps: int = field(default=0, metadata={"help": "Periodic RKSP monitoring (0 = off)."})
    rksp_num_samples: int = field(default=2048, metadata={"help": "Token states per layer for the init profile."})
    rksp_no_guard: bool = field(default=False, metadata={"help": "Disable the divergence guard."})


class BlockDataset(torch.utils.data.Dataset):
    """Consecutive `block_size`-token blocks of a byte-tokenised corpus, `labels = input_ids`."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        n = ids.numel() // block_size
        if n < 1:
            raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than one block of {block_size}")
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _parse_overrides(text: str | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise ValueError(f"--config_overrides expects key=value pairs separated by commas, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
    return out


def load_text(script: ScriptArguments) -> str:
    if (script.text_file is None) == (script.dataset is None):
        raise ValueError("pass exactly one of --text_file or --dataset")
    if script.text_file is not None:
        with open(script.text_file, encoding="utf-8") as handle:
            text = handle.read(script.max_chars) if script.max_chars else handle.read()
        return text
    from hf_koopman.optional_imports import import_optional

    load_dataset = import_optional("datasets", extra="datasets", feature="--dataset").load_dataset

    files = script.dataset_files.split(",") if script.dataset_files else None
    data = load_dataset(script.dataset, script.dataset_config, data_files=files, split=script.dataset_split)
    if script.text_column not in data.column_names:
        raise ValueError(f"--text_column {script.text_column!r} not in the dataset columns {data.column_names}")
    text = "\n".join(data[script.text_column])
    return text[: script.max_chars] if script.max_chars else text


def build_model(script: ScriptArguments):
    overrides = dict(TINY) if script.tiny else {}
    overrides.update(_parse_overrides(script.config_overrides))
    config = load_architecture_config(script.architecture, vocab_size=256)
    for key, value in overrides.items():
        setattr(config, key, value)
    if script.tiny:
        for key, value in (("intermediate_size", 4 * TINY["hidden_size"]), ("num_key_value_heads", 4), ("head_dim", 16)):
            if getattr(config, key, None) is not None:
                setattr(config, key, value)
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None) is not None and getattr(config, key) < script.block_size:
            setattr(config, key, script.block_size)
    return AutoModelForCausalLM.from_config(config)


def main(argv: list[str] | None = None, extra_callbacks: list | None = None) -> KSSTrainer:
    argv = list(sys.argv[1:] if argv is None else argv)
    # torchrun / accelerate launch on a CPU-only host: without use_cpu the Trainer silently runs independent copies
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv.append("--use_cpu")
    parser = HfArgumentParser((ScriptArguments, KSSTrainingArguments))
    script, args = parser.parse_args_into_dataclasses(args=argv)
    # --push_to_hub: one upload at the end, of the folder without pickles; the Trainer's own pushes would upload
    # transformers' pickled training_args.bin (and, per save, optimizer and RNG state) before it is replaced by JSON
    push, args.push_to_hub = args.push_to_hub, False
    repo_id = check_push_target(args) if push else None  # before training: a bad name or no access fails now
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)

    ids = torch.tensor(list(load_text(script).encode("utf-8")), dtype=torch.long)
    dataset = BlockDataset(ids, script.block_size)
    model = build_model(script)
    callback = RKSPCallback(
        auto_kss=script.rksp_auto_kss,
        every_n_steps=script.rksp_every_n_steps,
        num_samples=script.rksp_num_samples,
        # enough training blocks for num_samples token states (the callback's default of 8 holds 1024 at 128 tokens)
        probe_batch_size=max(8, math.ceil(script.rksp_num_samples / script.block_size)),
        guard=not script.rksp_no_guard,
    )
    trainer = KSSTrainer(
        model=model, args=args, train_dataset=dataset, callbacks=[callback, *(extra_callbacks or [])]
    )
    logger.info(
        "world_size=%d, %d blocks of %d tokens, %s with %.2fM parameters, KSS %s",
        args.world_size,
        len(dataset),
        script.block_size,
        type(model).__name__,
        model.num_parameters() / 1e6,
        trainer.kss_config,
    )
    trainer.train()
    trainer.save_model()  # on every rank: FSDP gathers the shards, only the main process writes
    if trainer.is_world_process_zero():
        # the output folder holds no pickle: the arguments as JSON, not transformers' training_args.bin
        out = Path(args.output_dir)
        (out / "training_args.bin").unlink(missing_ok=True)
        args.push_to_hub = push  # the run's arguments as given
        (out / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
        if push:
            push_output(out, args, repo_id)
    return trainer


#: never uploaded: pickles (transformers' own files, optimizer and RNG state), checkpoints, logs, private files
PUSH_IGNORE = ["*.bin", "*.pt", "*.pth", "*.pkl", "_*", ".*", "checkpoint-*", "runs/*"]


def check_push_target(args: KSSTrainingArguments) -> str:
    """The repository `--push_to_hub` uploads to (`--hub_model_id`, or the output folder's name), created now, before
    training, as the Trainer does: a name the Hub refuses, a missing token or no network fails at once."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = args.hub_model_id or Path(args.output_dir).absolute().name
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ValueError(f"--push_to_hub: {name!r} is not a Hub repository name ({err}); pass --hub_model_id "
                         "org/name.") from None
    if args.process_index != 0:  # the main process creates it and uploads
        return name
    return HfApi(token=args.hub_token).create_repo(name, private=getattr(args, "hub_private_repo", None),
                                                   exist_ok=True).repo_id


def push_output(out: Path, args: KSSTrainingArguments, repo_id: str) -> str:
    """Upload the output folder (model, card, profile, JSON arguments; no pickle) to `repo_id`; returns it."""
    from huggingface_hub import HfApi

    HfApi(token=args.hub_token).upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="End of training",
                                              ignore_patterns=PUSH_IGNORE)
    logger.info("pushed %s to %s (no pickle: %s left out)", out, repo_id, ", ".join(PUSH_IGNORE))
    return repo_id


if __name__ == "__main__":
    main()
