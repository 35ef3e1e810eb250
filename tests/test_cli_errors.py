"""`hf-koopman` CLI: bad or surprising input gets a clear message (what is wrong and the fix), never a traceback."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from hf_koopman.cli import load_model, main
from hf_koopman.testing_utils import tiny_config

FAST = ["--num-samples", "32", "--rank", "4", "--no-plots", "--no-progress"]


@pytest.fixture()
def tiny_llama_json(tmp_path):
    path = tmp_path / "tiny-llama.json"
    tiny_config("llama", num_hidden_layers=2).to_json_file(path)
    return path


@pytest.fixture()
def saved_model_dir(tmp_path):
    """A save_pretrained folder of a tiny GPT-2 without tokenizer files (like a Trainer output_dir)."""
    from transformers import AutoModel

    folder = tmp_path / "saved"
    AutoModel.from_config(tiny_config("gpt2", num_hidden_layers=2)).save_pretrained(folder)
    return folder


def _text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("The residual stream carries token states from block to block. " * 40)
    return path


# ------------------------------------------------------------------------------------- 1. --num-layers per stack
def test_num_layers_sets_the_depth_of_both_t5_stacks(tmp_path, capsys):
    out = tmp_path / "t5"
    assert main(["profile", "t5-small", "--init", "--num-layers", "2", *FAST, "--out", str(out)]) == 0
    data = json.loads((out / "profile.json").read_text())
    assert len(data["layers"]) == 4  # 2 encoder + 2 decoder blocks, not 2 + the default 6 decoder blocks
    assert data["model_name"] == "t5-small (init) [2 layers per stack]"
    assert "4 layers" in capsys.readouterr().out


def test_num_layers_sets_encoder_and_decoder_layers_of_bart_like_configs(tmp_path):
    path = tmp_path / "tiny-bart.json"
    tiny_config("bart", num_hidden_layers=3).to_json_file(path)
    model, _, name = load_model(str(path), init=True, num_layers=1)
    assert (model.config.encoder_layers, model.config.decoder_layers) == (1, 1)
    assert len(model.encoder.layers) == 1 and len(model.decoder.layers) == 1
    assert name.endswith("[1 layer per stack]")


def test_num_layers_must_be_positive(tiny_llama_json, tmp_path, capsys):
    assert main(["profile", str(tiny_llama_json), "--init", "--num-layers", "0", *FAST, "--out", str(tmp_path)]) == 2
    assert "--num-layers must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 2. config but no weights
def test_folder_with_config_and_no_weights_names_the_fix(tmp_path, capsys):
    folder = tmp_path / "config-only"
    tiny_config("gpt2", num_hidden_layers=2).save_pretrained(folder)
    assert main(["profile", str(folder), *FAST, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "config.json but no weights" in err
    assert "--init" in err and "model.safetensors" in err and "Traceback" not in err
    assert main(["profile", str(folder), "--init", *FAST, "--out", str(tmp_path / "out")]) == 0  # the fix works


# ------------------------------------------------------------------------------------- 3. --dataset NAME offline
def test_dataset_name_offline_says_it_needs_the_hub(tiny_llama_json, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("datasets was imported online; this test must not reach the network")
    code = main(["profile", str(tiny_llama_json), "--init", "--dataset", "wikitext", *FAST, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "'wikitext' is a dataset name, which needs the Hub" in err and "offline" in err
    assert "--text-file" in err and "path/to/file.txt" in err and "save_to_disk" in err


def test_dataset_name_without_network_says_it_needs_the_hub(tiny_llama_json, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    code = main(["profile", str(tiny_llama_json), "--init", "--dataset", "wikitext", *FAST, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "needs the Hub, and the Hub could not be reached" in err and "--text-file" in err


def test_missing_dataset_path_is_named(tiny_llama_json, tmp_path, capsys):
    pytest.importorskip("datasets")
    missing = tmp_path / "data" / "train.txt"
    assert main(["profile", str(tiny_llama_json), "--init", "--dataset", str(missing), *FAST, "--out",
                 str(tmp_path / "out")]) == 2
    assert f"--dataset {missing}: no such file or folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 4. a path that does not exist
@pytest.mark.parametrize("spec", ["./does/not/exist", "../nope", "~/no-such-model-xyz", "a/b/c", "missing.json"])
def test_missing_path_says_it_does_not_exist(spec, tmp_path, capsys):
    assert main(["profile", spec, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: no such file or folder" in err and "embedded architecture" not in err.split(".")[0]


def test_typo_below_an_existing_folder_is_named_without_blocking_hub_ids(tmp_path, monkeypatch, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "meta-llama").mkdir()  # where `huggingface-cli download --local-dir` puts another model
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "checkpoints/my-modle", "--out", str(tmp_path / "out")]) == 2
    assert "There is a local folder 'checkpoints', but no 'checkpoints/my-modle' in it" in capsys.readouterr().err
    # a bare name read as a Hub id, next to a folder of a close name: the likely typo is named
    (tmp_path / "run_final").mkdir()
    assert main(["profile", "run_fnal", "--out", str(tmp_path / "out")]) == 2
    assert "There is no local folder 'run_fnal' here; did you mean 'run_final'?" in capsys.readouterr().err
    # an embedded architecture under its Hub id still resolves offline although ./meta-llama exists
    assert main(["profile", "meta-llama/Llama-2-7b-hf", "--init", "--num-layers", "1", "--num-samples", "64",
                 "--out", str(tmp_path / "out")]) == 0


def test_hub_id_is_not_mistaken_for_a_path(tmp_path, capsys):
    # owner/name is a Hub id: offline, the message says the Hub is offline, not that a path is missing
    assert main(["profile", "some-owner/some-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Hub is offline" in err and "no such file" not in err


# ------------------------------------------------------------------------------------- 5. no network, not offline
def test_connection_failure_hints_at_init(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformers import AutoConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        except LocalEntryNotFoundError as err:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.") from err

    monkeypatch.setattr(AutoConfig, "from_pretrained", unreachable)
    assert main(["profile", "gpt2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not reach the Hub to load 'gpt2'" in err and "couldn't connect" in err
    assert "'gpt2' is an embedded architecture: pass --init" in err and "HF_HUB_OFFLINE=1" in err
    assert main(["profile", "some-owner/some-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pass --init with an embedded architecture (" in err and "gpt2" in err


# ------------------------------------------------------------------------------------- 6. --context keys not read
def test_max_lr_warns_about_context_keys_the_estimator_does_not_read(tiny_llama_json, tmp_path, caplog):
    from hf_koopman.risk import FeatureSpec, RiskEstimator

    estimator = RiskEstimator(
        [FeatureSpec("learning_rate", "log10", mean=-3.0, std=0.5, low=-5.0, high=-1.0),
         FeatureSpec("near_unit_mass_mean", mean=0.5, std=0.25, low=0.0, high=1.0)],
        coef=[2.0, 1.0], intercept=-1.0, training_ranges={"inputs": {"model_type": {"values": ["llama"]}}},
    ).save_json(tmp_path / "est.json")
    args = ["max-lr", str(tiny_llama_json), "--init", "--estimator", str(estimator), "--num-samples", "32",
            "--no-progress", "--context", "norm=pre_ln", "--context", "model_type=llama"]
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        assert main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--context" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("--context norm: ignored, --estimator does not read it")
    assert "the keys it reads are: learning_rate, model_type, near_unit_mass_mean" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        assert main(args[:-4]) == 0  # no --context, or only keys it reads: no warning
    assert "--context" not in caplog.text


# ------------------------------------------------------------------------------------- 7. config.json only
def test_config_file_warns_and_is_named_after_its_folder(tmp_path, caplog):
    folder = tmp_path / "my-model"
    tiny_config("llama", num_hidden_layers=2).save_pretrained(folder)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="hf_koopman"):
        assert main(["profile", str(folder / "config.json"), *FAST, "--out", str(out)]) == 0
    notices = [r for r in caplog.records if "config.json only" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING
    assert "profiling the architecture at random initialisation (no weights)" in notices[0].getMessage()
    assert json.loads((out / "profile.json").read_text())["model_name"] == "my-model (init)"


# ------------------------------------------------------------------------------------- 8. tokenizer warning
def test_no_tokenizer_warning_without_text_input(saved_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        assert main(["profile", str(saved_model_dir), *FAST, "--out", str(tmp_path / "probe")]) == 0
    assert "no tokenizer files" not in caplog.text  # the synthetic probe needs no tokenizer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        assert main(["profile", str(saved_model_dir), "--text-file", str(_text_file(tmp_path)), *FAST,
                     "--max-length", "32", "--batch-size", "2", "--out", str(tmp_path / "text")]) == 0
    assert "no tokenizer files" in caplog.text and "byte-level" in caplog.text


# ------------------------------------------------------------------------------------- 9. no default probe
def test_model_without_default_probe_gets_cli_advice(tmp_path, capsys):
    from hf_koopman.models.reynet.configuration_reynet import ReyNetConfig

    path = tmp_path / "reynet.json"
    ReyNetConfig().to_json_file(path)
    assert main(["profile", str(path), "--init", *FAST, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'reynet' models have no default probe input" in err and "no integer vocab_size" in err
    assert "hf_koopman.profile(model, inputs)" in err and "--text-file" in err
    assert "Pass inputs to profile(model, inputs)" not in err and "Traceback" not in err


def test_num_layers_resizes_per_layer_patterns():
    from transformers import AutoConfig, AutoModel

    from hf_koopman.cli import _set_num_layers

    config = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=100, num_hidden_layers=2)
    _set_num_layers(config, 5)  # deeper than the config: its per-layer list must follow, or the build fails
    assert len(config.layer_types) == 5 and len(AutoModel.from_config(config).layers) == 5
    _set_num_layers(config, 1)
    assert config.layer_types == ["full_attention"]


def test_task_head_tensors_are_named_not_reported_as_a_failed_load(tmp_path, capsys, caplog):
    # a CausalLM checkpoint with an untied head: the base model has no lm_head, which transformers reports as
    # UNEXPECTED in a load report that reads like a failure; the CLI says what it means instead
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "lm"
    config = tiny_config("gpt2", num_hidden_layers=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()  # library INFO records follow the transformers verbosity (`-v` sets it)
    try:
        with caplog.at_level(logging.INFO, logger="hf_koopman"):
            model, _, _ = load_model(str(folder), text_inputs=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    err = capsys.readouterr().err
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("lm_head.weight" in n and "task head" in n for n in notes)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert type(model).__name__ == "GPT2Model"


def test_weights_missing_from_the_checkpoint_are_a_warning(saved_model_dir, caplog):
    from safetensors.torch import load_file, save_file

    file = saved_model_dir / "model.safetensors"
    tensors = load_file(file)
    dropped = next(k for k in tensors if k.endswith("mlp.c_fc.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, file, metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="hf_koopman"):
        load_model(str(saved_model_dir))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(dropped in w and "randomly initialised" in w for w in warnings), warnings


def test_weights_missing_from_the_checkpoint_are_recorded_in_the_profile(saved_model_dir, tmp_path, capsys):
    """The warning scrolls by; profile.json, report.md and the summary line keep saying the model was partly random."""
    from safetensors.torch import load_file, save_file

    file = saved_model_dir / "model.safetensors"
    tensors = load_file(file)
    dropped = next(k for k in tensors if k.endswith("mlp.c_fc.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, file, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["profile", str(saved_model_dir), *FAST, "--out", str(out)]) == 0
    meta = json.loads((out / "profile.json").read_text())["meta"]
    assert meta["weights"] == "pretrained" and meta["weights_not_in_checkpoint"] == [dropped]
    assert "**Note — partly random weights:** 1 weight(s)" in (out / "report.md").read_text()
    assert "partly random: 1 profiled weights were not in the checkpoint" in capsys.readouterr().out


def test_a_shape_mismatch_keeps_transformers_report_and_names_the_fix(saved_model_dir):
    config = json.loads((saved_model_dir / "config.json").read_text())
    config["n_inner"] = 4 * (config.get("n_inner") or 4 * config["n_embd"])  # the saved MLP no longer fits
    (saved_model_dir / "config.json").write_text(json.dumps(config))
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())  # transformers' own handler is not captured
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addHandler(handler)
    try:
        with pytest.raises(ValueError, match="check that the config belongs to these weights"):
            load_model(str(saved_model_dir), text_inputs=False)
    finally:
        report_logger.removeHandler(handler)
    assert any("LOAD REPORT" in r and "MISMATCH" in r for r in reports)


def test_a_pooler_a_masked_lm_checkpoint_never_had_is_not_a_warning(tmp_path, caplog):
    from transformers import AutoModelForMaskedLM

    folder = tmp_path / "mlm"
    AutoModelForMaskedLM.from_config(tiny_config("bert", num_hidden_layers=2)).save_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="hf_koopman"):
        model, _, _ = load_model(str(folder), text_inputs=False)
    assert type(model).__name__ == "BertModel"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_hub_weights_missing_after_retries_name_the_network_and_the_offline_options(monkeypatch):
    # a Hub id whose config is cached: when the endpoint refuses connections, huggingface_hub retries and then reports
    # the weights as a missing file; the message says what that can mean and what works without network
    import hf_koopman.cli as cli

    config = tiny_config("gpt2", num_hidden_layers=2)
    monkeypatch.setattr(cli, "resolve_config", lambda spec, init: (config, "foo/tinygpt", "foo/tinygpt"))

    def refused(*args, **kwargs):
        raise OSError("foo/tinygpt does not appear to have a file named pytorch_model.bin or model.safetensors.")

    monkeypatch.setattr(cli, "_load_base_model", refused)
    with pytest.raises(ValueError, match="not in the local cache") as info:
        load_model("foo/tinygpt", text_inputs=False)
    assert "HF_HUB_OFFLINE=1" in str(info.value) and "--init" in str(info.value)


# ------------------------------------------------------------------------------------- 10. checked before loading
@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails the test if MODEL is resolved: the checks below must come before any model is loaded."""
    import hf_koopman.cli as cli

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "resolve_config", loaded)


def test_out_naming_an_existing_file_fails_before_the_model_loads(tiny_llama_json, tmp_path, no_model_load, capsys):
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    assert main(["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"--out {file} is an existing file" in err and f"e.g. --out {tmp_path / 'results'}" in err
    assert "save(" not in err and "Traceback" not in err
    assert main(["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(file / "run")]) == 2
    assert f"{file} is an existing file, so no folder can be created below it" in capsys.readouterr().err
    assert main(["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(tmp_path / "profile.json")]) == 2
    assert "names a JSON file" in capsys.readouterr().err


def test_an_os_error_while_saving_is_a_cli_error(tiny_llama_json, tmp_path, monkeypatch, capsys):
    from hf_koopman.profiling import SpectralProfile

    def read_only(self, directory, *, plots=True):
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(SpectralProfile, "save", read_only)
    out = tmp_path / "out"
    assert main(["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"hf-koopman profile: error: --out {out}: could not write the profile" in err
    assert "Permission denied" in err and "pass a writable folder" in err


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--max-length", "0", "--max-length must be >= 2"),
    ("--max-length", "1", "--max-length must be >= 2"),
    ("--learning-rate", "-1", "--learning-rate must be a positive finite number"),
    ("--learning-rate", "0", "--learning-rate must be a positive finite number"),
    ("--learning-rate", "nan", "--learning-rate must be a positive finite number"),
    ("--learning-rate", "inf", "--learning-rate must be a positive finite number"),
])
def test_bad_numbers_fail_before_the_model_loads(flag, value, message, tiny_llama_json, tmp_path, no_model_load,
                                                 capsys):
    args = ["profile", str(tiny_llama_json), "--init", "--text-file", str(_text_file(tmp_path)), *FAST, flag, value]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and f"got {value}" in err and "Traceback" not in err


def test_text_file_is_checked_before_the_model_loads(tiny_llama_json, tmp_path, no_model_load, capsys):
    base = ["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(tmp_path / "out")]
    missing = tmp_path / "missing.txt"
    assert main([*base, "--text-file", str(missing)]) == 2
    assert f"--text-file {missing} does not exist; check the path" in capsys.readouterr().err
    assert main([*base, "--text-file", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--text-file {tmp_path} is a folder" in err and "does not exist" not in err and "--dataset" in err
    assert main([*base, "--stream", "--text-file", str(missing)]) == 2  # --stream reads the file itself
    assert "does not exist" in capsys.readouterr().err


def test_mps_and_meta_devices_name_the_fix(tiny_llama_json, tmp_path, monkeypatch, no_model_load, capsys):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    base = ["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(tmp_path / "out")]
    assert main([*base, "--device", "mps"]) == 2
    err = capsys.readouterr().err
    assert "--device mps: no MPS device is available" in err and "use --device cpu" in err
    assert main([*base, "--device", "meta"]) == 2
    err = capsys.readouterr().err
    assert "--device meta holds shapes without data" in err and "use --device cpu or cuda" in err


# ------------------------------------------------------------------------------------- 11. out of memory
@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 409600000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
    "torch.OutOfMemoryError",
])
def test_out_of_memory_names_num_samples_and_stream(error, tiny_llama_json, tmp_path, monkeypatch, capsys):
    import torch

    import hf_koopman.profiling

    if error == "torch.OutOfMemoryError":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 381.47 GiB")

    def huge(*args, **kwargs):  # what profile() raises for --num-samples 100000000, without allocating it
        raise error

    monkeypatch.setattr(hf_koopman.profiling, "profile", huge)
    code = main(["profile", str(tiny_llama_json), "--init", "--num-samples", "100000000", "--no-plots",
                 "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hf-koopman profile: error: out of memory")
    assert "the probe needs 100000000 tokens in memory" in err and "smaller --num-samples" in err and "--stream" in err


def test_other_runtime_errors_are_not_called_out_of_memory(tiny_llama_json, tmp_path, monkeypatch):
    import hf_koopman.profiling

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(hf_koopman.profiling, "profile", broken)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        main(["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(tmp_path / "out")])


def test_out_of_memory_while_loading_names_the_model_not_the_probe(tiny_llama_json, saved_model_dir, tmp_path,
                                                                   monkeypatch, capsys):
    import transformers

    import hf_koopman.cli as cli

    def no_memory(*args, **kwargs):  # what building or loading a model too large for the machine raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_memory)  # pretrained weights
    code = main(["profile", str(saved_model_dir), *FAST, "--out", str(tmp_path / "pre")])
    err = capsys.readouterr().err
    assert code == 2 and "out of memory while building or loading" in err and "do not fit" not in err
    monkeypatch.setattr(cli, "_build_or_load", no_memory)  # --init
    for command in ("profile", "max-lr"):
        code = main([command, str(tiny_llama_json), "--init", *FAST, "--out", str(tmp_path / "out")]
                    if command == "profile" else [command, str(tiny_llama_json), "--init", *FAST[:2], "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "out of memory while building or loading" in err and "--stream" in err
        assert "--num-samples" not in err


def test_a_broken_pipe_other_than_stdout_is_not_swallowed(tiny_llama_json, tmp_path, monkeypatch):
    import hf_koopman.profiling

    def worker_pipe(*args, **kwargs):  # e.g. a DataLoader worker's pipe; stdout itself is fine
        raise BrokenPipeError("worker pipe closed")

    monkeypatch.setattr(hf_koopman.profiling, "profile", worker_pipe)
    with pytest.raises(BrokenPipeError, match="worker pipe"):
        main(["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(tmp_path / "out")])


def test_a_negative_learning_rate_in_scientific_notation_gets_the_range_message(tiny_llama_json, capsys):
    # argparse alone reads "-1e-3" as an option ("expected one argument"); the range check must see it
    code = main(["profile", str(tiny_llama_json), *FAST, "--learning-rate", "-1e-3"])
    err = capsys.readouterr().err
    assert code != 0 and "--learning-rate must be a positive finite number" in err and "expected one" not in err


def test_version_flag(capsys):
    from hf_koopman import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-koopman {__version__}"


def test_an_inconsistent_config_names_the_fix(tmp_path, capsys):
    from transformers import LlamaConfig

    (tmp_path / "broken").mkdir()
    path = tmp_path / "broken" / "config.json"
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                pad_token_id=500).to_json_file(path)  # a pad token beyond the vocabulary: nn.Embedding asserts
    code = main(["profile", str(path), *FAST, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "could not build a llama from the config" in err and "Fix the config.json" in err
    assert "Traceback" not in err


def test_negative_numbers_join_only_options_that_take_a_value():
    from hf_koopman.cli import _join_negative_numbers, _valued_options, make_parser

    valued = _valued_options(make_parser())
    join = lambda argv: _join_negative_numbers(argv, valued)  # noqa: E731
    assert join(["profile", "gpt2", "--learning-rate", "-1e-3"]) == ["profile", "gpt2", "--learning-rate=-1e-3"]
    assert join(["profile", "--learning-rate", "-inf", "gpt2"]) == ["profile", "--learning-rate=-inf", "gpt2"]
    assert join(["profile", "--init", "-1e-3"]) == ["profile", "--init", "-1e-3"]  # a flag takes no value
    assert join(["profile", "--init", "--", "-1"]) == ["profile", "--init", "--", "-1"]  # nothing after --
    assert join(["max-lr", "gpt2", "--ris", "-1e-3"]) == ["max-lr", "gpt2", "--ris=-1e-3"]  # a unique prefix


def test_max_lr_refuses_a_rank():
    from hf_koopman import suggest_max_lr
    from hf_koopman.testing_utils import tiny_model

    with pytest.raises(ValueError, match="reads the full spectrum.*drop rank="):
        suggest_max_lr(tiny_model("llama"), rank=8)


def test_cli_max_lr_refuses_a_rank_with_the_reason(tiny_llama_json, capsys):
    assert main(["max-lr", str(tiny_llama_json), "--init", "--rank", "8"]) == 2
    assert "max-lr reads the full spectrum" in capsys.readouterr().err


def test_a_peft_adapter_folder_is_named_with_the_merge_that_profiles_it(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert main(["profile", str(tmp_path), "--no-progress"]) == 2
    assert "holds a PEFT adapter (adapter_config.json)" in capsys.readouterr().err
    from hf_koopman.profiling import profile_streaming

    with pytest.raises(ValueError, match=r"merge_and_unload\(\)"):
        profile_streaming(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    assert main(["profile", str(tmp_path), "--no-progress"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    # a Trainer's output_dir: its checkpoints are named, the latest first to try
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")
    assert main(["profile", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds Trainer checkpoints (checkpoint-5, checkpoint-10)" in err and "checkpoint-10, or the folder" in err


def test_a_folder_named_like_an_embedded_architecture_is_named_as_the_cause(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()  # e.g. an earlier `--out gpt2`, without config.json
    assert main(["max-lr", "gpt2", "--init", "--num-samples", "64", "--no-progress"]) == 2
    assert "shadows the embedded architecture 'gpt2'" in capsys.readouterr().err


def test_missing_datasets_extra_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    code = main(["profile", str(tmp_path / "no-such-model"), "--dataset", "wikitext", *FAST, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "needs the `datasets` package" in err and "pip install 'hf-koopman[datasets]'" in err
    assert "no-such-model" not in err  # named before the model path is even looked at


def test_out_folder_with_a_users_report_and_no_profile_is_refused(tiny_llama_json, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    code = main(["profile", str(tiny_llama_json), "--init", *FAST, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds report.md but no profile.json" in err and "another folder" in err
    assert (out / "report.md").read_text() == "my notes" and not (out / "profile.json").exists()


def test_out_expands_a_tilde_the_shell_left(tiny_llama_json, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["profile", str(tiny_llama_json), "--init", *FAST, "--out=~/prof"]) == 0
    assert (tmp_path / "home" / "prof" / "profile.json").is_file() and not (tmp_path / "~").exists()


def _folder_with_remote_code(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    (folder / "configuration_evil.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').write('the checkpoint code ran')\n"
        "from transformers import PretrainedConfig\n\n\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evilnet'\n")
    return folder


@pytest.mark.parametrize("stream", [False, True], ids=["load", "stream"])
def test_a_checkpoints_own_code_never_runs(tmp_path, monkeypatch, capsys, stream):
    import io

    folder = _folder_with_remote_code(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # transformers would ask whether to run it
    code = main(["profile", str(folder), "--init", *FAST, "--out", str(tmp_path / "out"),
                 *(["--stream"] if stream else [])])
    err = capsys.readouterr().err
    assert code == 2 and "needs its own modelling code" in err and "trust_remote_code=True" in err
    assert not (tmp_path / "ran").exists()


def test_a_config_field_of_the_wrong_type_is_named(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "big"}))
    assert main(["profile", str(folder), "--init", *FAST, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "could not be loaded as a transformers config" in err and "hidden_size" in err and "Traceback" not in err


def test_an_option_of_another_subcommand_is_named_with_this_subcommands_usage(capsys):
    # `max-lr` takes no --out: the error is max-lr's (its usage), and says which subcommand has the option
    with pytest.raises(SystemExit) as info:
        main(["max-lr", "gpt2", "--init", "--out", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hf-koopman max-lr")
    assert "unrecognized arguments: --out x (--out is an option of hf-koopman profile, not of max-lr)" in err
    assert "see hf-koopman max-lr --help" in err
    with pytest.raises(SystemExit):
        main(["profile", "gpt2", "--init", "--bogus"])
    err = capsys.readouterr().err
    assert err.startswith("usage: hf-koopman profile") and "unrecognized arguments: --bogus; see" in err
    with pytest.raises(SystemExit):  # before the subcommand: the top-level usage
        main(["--bogus", "profile", "gpt2", "--init"])
    err = capsys.readouterr().err
    assert err.startswith("usage: hf-koopman [-h]") and "unrecognized arguments: --bogus" in err
