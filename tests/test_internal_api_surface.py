"""The non-public parts of transformers and accelerate that hf_koopman relies on, named one by one.

transformers and accelerate do not promise these across minor releases. When an upgrade within the ranges that
pyproject.toml allows moves or drops one, this file fails with the name and the hf_koopman code that uses it, instead
of a streamed profile, an FSDP run or the CLI's load report misbehaving later.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

# (module, attribute path, where hf_koopman uses it)
SYMBOLS = [
    ("transformers.initialization", "guard_torch_init_functions",
     "profiling/_streaming_weights.py: InitWeights builds each block with the model's own init"),
    ("transformers.conversion_mapping", "get_model_conversion_mapping",
     "profiling/_streaming_weights.py: saved weights renamed / converted as from_pretrained does"),
    ("transformers.core_model_loading", "WeightConverter", "profiling/_streaming_weights.py"),
    ("transformers.core_model_loading", "WeightRenaming", "profiling/_streaming_weights.py"),
    ("transformers.core_model_loading", "rename_source_key", "profiling/_streaming_weights.py"),
    ("transformers.core_model_loading", "convert_and_load_state_dict_in_model",
     "profiling/_streaming_weights.py: loads one block's tensors"),
    ("transformers.modeling_utils", "LoadStateDictConfig", "profiling/_streaming_weights.py"),
    ("transformers", "PreTrainedModel._from_config", "profiling/streaming.py: the empty skeleton"),
    ("transformers", "PreTrainedModel._init_weights", "profiling/_streaming_weights.py"),
    ("accelerate.state", "PartialState._shared_state", "training/fsdp.py: CPU multi-process FSDP2"),
    ("accelerate.utils", "DistributedType.FSDP", "training/fsdp.py"),
]


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("module, path, used_by", SYMBOLS, ids=[f"{m}.{p}" for m, p, _ in SYMBOLS])
def test_internal_symbol_exists(module, path, used_by):
    try:
        _resolve(module, path)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"{module}.{path} is gone ({err}); hf_koopman uses it in {used_by}")


def test_load_state_dict_config_takes_the_fields_streaming_passes():
    from transformers.modeling_utils import LoadStateDictConfig

    params = inspect.signature(LoadStateDictConfig).parameters
    assert {"device_map", "dtype", "weight_mapping"} <= set(params), "profiling/_streaming_weights.py passes these"


def test_trainer_attributes_the_callback_and_kss_trainer_read(tmp_path):
    # KSSTrainer._loss_counts_as_ga_scaled reads these; RKSPCallback / KSSTrainer read is_deepspeed_enabled;
    # training/fsdp.py sets is_fsdp_enabled
    from transformers import Trainer, TrainingArguments

    from hf_koopman.testing_utils import tiny_model

    args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    trainer = Trainer(model=tiny_model("gpt2"), args=args)
    for name in ("model_accepts_loss_kwargs", "compute_loss_func", "is_deepspeed_enabled", "is_fsdp_enabled"):
        assert hasattr(trainer, name), f"Trainer.{name} is gone; see hf_koopman/training/"
    assert isinstance(trainer.is_fsdp_enabled, bool)


def test_load_report_wording_the_cli_filters():
    # cli._QuietHeadReport drops transformers' load report by its heading; the heading must still be produced
    import logging

    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, num_labels=2)
    handler = Keep()
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addHandler(handler)
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
            AutoModel.from_pretrained(folder)  # the head's `score` tensor is UNEXPECTED for the base model: a report
    finally:
        report_logger.removeHandler(handler)
    assert any("LOAD REPORT" in message for message in records), "cli._QuietHeadReport matches 'LOAD REPORT'"
