"""`hf-koopman` CLI, run in-process through `main([...])`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from hf_koopman.cli import main, make_parser
from hf_koopman.testing_utils import tiny_config


@pytest.fixture()
def tiny_llama_json(tmp_path):
    path = tmp_path / "tiny-llama.json"
    tiny_config("llama", num_hidden_layers=3).to_json_file(path)
    return path


def test_profile_config_file_writes_outputs(tiny_llama_json, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["profile", str(tiny_llama_json), "--init", "--num-samples", "64", "--rank", "8", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    data = json.loads((out / "profile.json").read_text())
    assert len(data["layers"]) == 3 and data["settings"]["num_samples"] == 64 and data["settings"]["rank"] == 8
    assert (out / "report.md").read_text().startswith("# RKSP spectral profile")
    assert (out / "eigenvalues.png").stat().st_size > 0 and (out / "masses.png").stat().st_size > 0
    assert "verdict:" in capsys.readouterr().out


def test_profile_known_architecture_with_text_file(tmp_path, caplog):
    text = tmp_path / "notes.txt"
    text.write_text("The residual stream carries token states from block to block. " * 40)
    out = tmp_path / "gpt2"
    with caplog.at_level("WARNING"):
        code = main(["profile", "gpt2", "--init", "--num-layers", "1", "--text-file", str(text), "--num-samples", "32",
                     "--rank", "4", "--max-length", "64", "--no-plots", "--no-progress", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "profile.json").read_text())
    assert data["model_name"] == "gpt2 (init) [1 layer]" and len(data["layers"]) == 1
    # an embedded config brings no tokenizer: the text is read as byte ids, and the user is told
    assert "no tokenizer is read for gpt2" in caplog.text and "byte-level ids" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["profile", "gpt2", "--init", "--num-layers", "1", "--text-file", str(text), "--stream",
                     "--num-samples", "32", "--no-plots", "--no-progress", "--out", str(tmp_path / "s")]) == 0
    assert "no tokenizer is read for gpt2" in caplog.text
    assert not (out / "masses.png").exists()


def test_full_spectrum_by_default_and_seed_reproducibility(tiny_llama_json, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["profile", str(tiny_llama_json), "--num-samples", "48", "--no-plots",
                     "--no-progress", "--seed", "7", "--out", str(out)]) == 0
        runs.append(json.loads((out / "profile.json").read_text()))
    assert runs[0]["settings"]["rank"] is None and runs[0]["settings"]["spectrum"] == "full"  # the default
    for a, b in zip(runs[0]["layers"], runs[1]["layers"]):  # same seed: same model, probe and sample
        assert a.keys() == b.keys()
        assert a == {k: pytest.approx(v, rel=1e-9) if isinstance(v, float) else v for k, v in b.items()}


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["profile", "no-such-model-xyz", "--init", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no-such-model-xyz" in err and "gpt2" in err
    assert main(["profile", "gpt2", "--out", str(tmp_path)]) == 2  # offline, no weights: --init is needed
    assert "--init" in capsys.readouterr().err


def test_stream_flag_errors_clearly_when_streaming_is_unavailable(tiny_llama_json, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hf_koopman.profiling.streaming", None)
    assert main(["profile", str(tiny_llama_json), "--init", "--stream", "--out", str(tmp_path)]) == 2
    assert "--stream is unavailable" in capsys.readouterr().err


def test_architectures_subcommand(capsys):
    assert main(["architectures", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["llama-2-7b"]["num_hidden_layers"] == 32


def test_parser_lists_commands():
    help_text = make_parser().format_help()
    assert "profile" in help_text and "architectures" in help_text
    with pytest.raises(SystemExit):
        make_parser().parse_args([])


def test_profile_on_a_saved_dataset(tiny_llama_json, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["spectral profile of a residual stream " * 3] * 6}).save_to_disk(folder)
    out = tmp_path / "out"
    assert main(["profile", str(tiny_llama_json), "--dataset", str(folder), "--num-samples", "64", "--rank", "8",
                 "--no-plots", "--no-progress", "--out", str(out)]) == 0
    data = json.loads((out / "profile.json").read_text())
    assert data["meta"]["tokens_seen"] == 6 * len(("spectral profile of a residual stream " * 3).encode())


def test_learning_rate_is_recorded_for_the_risk_estimator(tiny_llama_json, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["profile", str(tiny_llama_json), "--learning-rate", "0.003", "--num-samples", "48", "--rank", "4",
                 "--no-plots", "--no-progress", "--out", str(out)]) == 0
    data = json.loads((out / "profile.json").read_text())
    assert data["meta"]["learning_rate"] == 0.003
    assert data["risk"] is None or 0.0 < data["risk"] < 1.0  # a probability whenever an estimator is shipped
    # the full spectrum's calibrated risk is on the terminal too, not only in report.md
    capsys.readouterr()
    assert main(["profile", str(tiny_llama_json), "--init", "--learning-rate", "0.003", "--num-samples", "256",
                 "--no-plots", "--no-progress", "--out", str(tmp_path / "full")]) == 0
    assert "P(divergence) at learning rate 0.003:" in capsys.readouterr().out


def test_the_summary_line_names_every_input_outside_the_fitted_range(tmp_path, capsys):
    """A width and a learning rate both outside the shipped estimator's runs: the one-line summary names both, not
    only the first."""
    path = tmp_path / "wide.json"
    tiny_config("llama", num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                num_key_value_heads=4).to_json_file(path)
    assert main(["profile", str(path), "--init", "--learning-rate", "1e-5", "--num-samples", "1024", "--no-plots",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "P(divergence) at learning rate" in l)
    assert "extrapolated:" in line and "learning_rate" in line and "hidden_size" in line, line


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture()
def saved_model_dir(tmp_path):
    """A save_pretrained folder of a tiny GPT-2 without tokenizer files (like a Trainer output_dir)."""
    from transformers import AutoModel

    folder = tmp_path / "saved"
    AutoModel.from_config(tiny_config("gpt2", num_hidden_layers=2)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stream", [False, True], ids=["load", "stream"])
@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_corrupt_safetensors_is_named_with_the_fix(saved_model_dir, tmp_path, capsys, damage, stream):
    weights = saved_model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64 + data[64:])
    code = main(["profile", str(saved_model_dir), "--num-samples", "32", "--rank", "4", "--no-progress",
                 "--out", str(tmp_path / "out"), *(["--stream"] if stream else [])])
    err = capsys.readouterr().err
    assert code == 2 and str(weights) in err and "save_pretrained" in err
    assert "Traceback" not in err


def test_invalid_config_json_is_named_with_the_fix(saved_model_dir, tmp_path, capsys):
    (saved_model_dir / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    code = main(["profile", str(saved_model_dir), "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and str(saved_model_dir / "config.json") in err and "not valid JSON" in err


def test_text_file_without_tokenizer_files_falls_back_to_bytes(saved_model_dir, tmp_path, caplog):
    text = tmp_path / "notes.txt"
    text.write_text("The residual stream carries token states from block to block. " * 40)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        code = main(["profile", str(saved_model_dir), "--text-file", str(text), "--num-samples", "32", "--rank", "4",
                     "--max-length", "32", "--batch-size", "2", "--no-plots", "--no-progress", "--out", str(out)])
    assert code == 0 and (out / "profile.json").exists()
    assert "no tokenizer files" in caplog.text and "byte-level" in caplog.text
    # said once, in the CLI's terms (save the tokenizer there), not again as the library's Python-argument advice
    assert "no tokenizer given" not in caplog.text and "tokenizer.save_pretrained" in caplog.text


def test_max_tokens_flag_bounds_the_input_read(tiny_llama_json, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("spectral profile of the residual stream " * 2000)
    out = tmp_path / "out"
    code = main(["profile", str(tiny_llama_json), "--init", "--text-file", str(text), "--num-samples", "32",
                 "--rank", "4", "--max-length", "32", "--batch-size", "2", "--max-tokens", "64", "--no-plots",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "profile.json").read_text())
    assert data["meta"]["batches"] == 1  # 2 sequences x 32 tokens reach 64 tokens (default: 16 x 32 = 512 tokens)
    assert main(["profile", str(tiny_llama_json), "--init", "--max-tokens", "8", "--num-samples", "32"]) == 2
    assert "--max-tokens" in capsys.readouterr().err


def test_no_progress_hides_the_weight_loading_bar(saved_model_dir, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # whatever an earlier test in this process left
    argv = ["profile", str(saved_model_dir), "--num-samples", "32", "--rank", "4", "--no-plots"]
    assert main([*argv, "--out", str(tmp_path / "shown")]) == 0
    assert "Loading weights" in capsys.readouterr().err
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "quiet")]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched back on after the command


def test_rank_flag_selects_the_named_approximation(tiny_llama_json, tmp_path, capsys):
    out = tmp_path / "r4"
    assert main(["profile", str(tiny_llama_json), "--rank", "4", "--num-samples", "48", "--no-plots",
                 "--no-progress", "--out", str(out)]) == 0
    settings = json.loads((out / "profile.json").read_text())["settings"]
    assert settings["rank"] == 4 and settings["spectrum"] == "rank-4 approximation"
    assert main(["profile", str(tiny_llama_json), "--rank", "0", "--out", str(tmp_path / "r0")]) == 2
    assert "omit it for the full spectrum" in capsys.readouterr().err


def test_console_script_reports_argument_errors_before_heavy_imports():
    # as the `hf-koopman` script: a usage error comes back without importing torch / transformers models
    code = (
        "import sys\n"
        "sys.argv = ['hf-koopman', 'profile']\n"
        "import hf_koopman.cli as cli\n"
        "try:\n"
        "    cli.main(['profile'])\n"
        "except SystemExit as err:\n"
        "    print(err.code, 'torch' in sys.modules, 'transformers.modeling_utils' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False", "False"]
    assert "the following arguments are required: MODEL" in out.stderr


def test_console_script_registers_the_auto_classes_once_the_arguments_parse():
    code = (
        "import sys\n"
        "sys.argv = ['hf-koopman', 'architectures']\n"
        "import hf_koopman.cli as cli\n"
        "from transformers import AutoConfig\n"
        "try:\n"
        "    AutoConfig.for_model('reynet')\n"
        "    print('registered before main')\n"
        "except ValueError:\n"
        "    pass\n"
        "assert cli.main(['architectures']) == 0\n"
        "print(type(AutoConfig.for_model('reynet')).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "ReyNetConfig"
    assert "registered before main" not in out.stdout


def test_device_argument_errors_name_the_fix(tiny_llama_json, tmp_path, capsys):
    base = ["profile", str(tiny_llama_json), "--init", "--num-samples", "32", "--no-plots", "--out", str(tmp_path)]
    assert main([*base, "--device", "gpu0"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
    assert main([*base, "--stream", "--device", "meta"]) == 2
    assert "drop --device" in capsys.readouterr().err
    assert main([*base, "--device", "cpu"]) == 0


def test_verbose_flag_is_accepted_before_and_after_the_subcommand(tmp_path):
    parser = make_parser()
    assert parser.parse_args(["profile", "gpt2", "-v"]).verbose
    assert parser.parse_args(["profile", "gpt2", "--verbose"]).verbose
    assert parser.parse_args(["-v", "profile", "gpt2"]).verbose  # not reset by the subcommand's own default
    assert parser.parse_args(["architectures", "-v"]).verbose
    assert not parser.parse_args(["profile", "gpt2"]).verbose


def test_a_closed_stdout_pipe_exits_quietly():
    # `hf-koopman architectures --json | head -1`: the reader is gone before the output is written
    read_end, write_end = os.pipe()
    os.close(read_end)
    code = "import sys\nfrom hf_koopman.cli import main\nsys.exit(main(['architectures', '--json']))\n"
    try:
        out = subprocess.run([sys.executable, "-c", code], stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert "BrokenPipeError" not in out.stderr and "Traceback" not in out.stderr
    assert out.returncode == 1


def test_layers_help_says_the_path_is_inside_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "dotted path of the block list inside the model" in help_text and "e.g. layers or model.layers" in help_text


def test_meta_records_pretrained_or_init_weights(saved_model_dir, tiny_llama_json, tmp_path):
    fast = ["--num-samples", "32", "--rank", "4", "--no-plots", "--no-progress"]
    runs = {"pretrained": [str(saved_model_dir)], "init": [str(tiny_llama_json), "--init"],
            "init-stream": [str(tiny_llama_json), "--init", "--stream"]}
    for label, args in runs.items():
        assert main(["profile", *args, *fast, "--out", str(tmp_path / label)]) == 0
        meta = json.loads((tmp_path / label / "profile.json").read_text())["meta"]
        assert meta["weights"] == label.removesuffix("-stream"), label


def test_generic_checkpoint_folders_are_named_with_their_parent(tmp_path, monkeypatch):
    from hf_koopman.cli import resolve_config

    config = tiny_config("gpt2", num_hidden_layers=1)
    for folder in ["run-a/checkpoint-500", "run-b/model", "run-c/final", "my-gpt"]:
        config.save_pretrained(tmp_path / folder)
    names = {folder: resolve_config(str(tmp_path / folder), init=True)[2]
             for folder in ["run-a/checkpoint-500", "run-b/model", "run-c/final", "my-gpt"]}
    assert names == {"run-a/checkpoint-500": "run-a/checkpoint-500", "run-b/model": "run-b/model",
                     "run-c/final": "run-c/final", "my-gpt": "my-gpt"}
    assert resolve_config(str(tmp_path / "run-b/model/config.json"), init=True)[2] == "run-b/model (init)"
    monkeypatch.chdir(tmp_path / "run-a/checkpoint-500")
    assert resolve_config(".", init=True)[2] == "run-a/checkpoint-500"  # the folder's name, not the empty "."


def test_console_line_says_when_the_verdict_is_tentative(tiny_llama_json, tmp_path, monkeypatch, capsys):
    import hf_koopman.profiling
    from hf_koopman.koopman.features import LayerFeatures
    from hf_koopman.profiling import SpectralProfile

    def profile_of(near: float, n: int):
        feats = LayerFeatures(near_unit_mass=near, unstable_mass=1 - near, contractive_mass=0.0, mid_mass=0.0,
                              spectral_radius=1.1, eigvec_condition=20.0, nonlinearity=0.3, kreiss=float("inf"),
                              n_modes=10, n_reliable=10, degenerate=False)
        return SpectralProfile(layers=[("layers.0", feats)], aggregates={}, model_name="m",
                               settings={"num_samples": n, "hidden_size": 64, "rank": None}, meta={})

    for (near, n), tentative in {(0.58, 134): True, (0.1, 64 * 16): False}.items():  # M≈1 ± sqrt(d/N) spans 0.5
        monkeypatch.setattr(hf_koopman.profiling, "profile", lambda *a, _p=profile_of(near, n), **k: _p)
        assert main(["profile", str(tiny_llama_json), "--init", "--no-plots", "--no-progress",
                     "--out", str(tmp_path / str(n))]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "verdict:" in x)
        assert ("(tentative: the sampling error spans a threshold)" in line) is tentative, line


def test_console_line_names_the_eta_gate_when_near_gate_layers_make_the_verdict_tentative(
        tiny_llama_json, tmp_path, monkeypatch, capsys):
    import hf_koopman.profiling
    from hf_koopman.koopman.features import LayerFeatures
    from hf_koopman.profiling import DecisionRule, SpectralProfile

    n, d = 64 * 400, 64  # N/d = 400: the score's band (±5 % relative) reaches no threshold
    raw = 0.89 / DecisionRule.adjusted_nonlinearity(1.0, n, d)  # corrected η_nl 0.89, inside the gate's ±0.0275

    def layer(near: float, eta: float) -> LayerFeatures:
        return LayerFeatures(near_unit_mass=near, unstable_mass=1 - near, contractive_mass=0.0, mid_mass=0.0,
                             spectral_radius=1.1, eigvec_condition=20.0, nonlinearity=eta, kreiss=float("inf"),
                             n_modes=10, n_reliable=10, degenerate=False)

    layers = [("layers.0", layer(0.1, 0.3)), ("layers.1", layer(0.1, 0.3)), ("layers.2", layer(0.99, raw)),
              ("layers.3", layer(0.99, raw))]  # mean M≈1 0.545 with the last two read, 0.1 without
    result = SpectralProfile(layers=layers, aggregates={}, model_name="m",
                             settings={"num_samples": n, "hidden_size": d, "rank": None}, meta={})
    monkeypatch.setattr(hf_koopman.profiling, "profile", lambda *a, **k: result)
    assert main(["profile", str(tiny_llama_json), "--init", "--no-plots", "--no-progress",
                 "--out", str(tmp_path / "gate")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "verdict:" in x)
    assert line.endswith("verdict: HIGH RISK (tentative: layers near the η_nl gate can change it)"), line


def test_console_line_says_a_pretrained_verdict_is_extrapolated(saved_model_dir, tiny_llama_json, tmp_path, capsys):
    fast = ["--num-samples", "256", "--no-plots", "--no-progress"]
    assert main(["profile", str(saved_model_dir), *fast, "--out", str(tmp_path / "p")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    verdict = json.loads((tmp_path / "p" / "profile.json").read_text())["verdict"]
    assert verdict != "uninformative" and "extrapolated: pretrained weights" in line, line
    assert main(["profile", str(tiny_llama_json), "--init", *fast, "--out", str(tmp_path / "i")]) == 0
    assert "extrapolated" not in capsys.readouterr().out


def test_options_take_underscores_as_hf_argument_parser_does(tiny_llama_json, tmp_path):
    assert main(["profile", str(tiny_llama_json), "--init", "--num_samples", "48", "--rank=4", "--no_plots",
                 "--no-progress", "--out", str(tmp_path / "u")]) == 0
    settings = json.loads((tmp_path / "u" / "profile.json").read_text())["settings"]
    assert settings["num_samples"] == 48 and not (tmp_path / "u" / "masses.png").exists()
    with pytest.raises(SystemExit):  # an unknown option stays an error in either spelling
        main(["profile", str(tiny_llama_json), "--num_sample_count", "4"])


@pytest.mark.parametrize("command", ["profile", "architectures", "max-lr"])
def test_every_subcommand_help_ends_with_examples(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  hf-koopman " + command in out


def test_progress_bars_follow_the_transformers_switch(tiny_llama_json, tmp_path, capsys):
    # as HF_HUB_DISABLE_PROGRESS_BARS=1 sets it: no bar of hf_koopman's either, unless --no-progress is the reason
    from transformers.utils import logging as hf_logging

    argv = ["profile", str(tiny_llama_json), "--init", "--num-samples", "32", "--rank", "4", "--no-plots"]
    hf_logging.enable_progress_bar()  # whatever an earlier test in this process left
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "quiet")]) == 0
    assert "forward (" not in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "shown")]) == 0  # --no-progress held for its own command only
    assert "forward (" in capsys.readouterr().err
    hf_logging.disable_progress_bar()
    try:
        assert main([*argv, "--out", str(tmp_path / "hidden")]) == 0
        assert "forward (" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()


def test_python_dash_m_runs_the_command():
    import hf_koopman

    out = subprocess.run([sys.executable, "-m", "hf_koopman", "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == f"hf-koopman {hf_koopman.__version__}"


def test_token_ids_from_a_dataset_are_not_said_to_be_read_as_bytes(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    from hf_koopman.cli import load_model

    folder = tmp_path / "ids"
    datasets.Dataset.from_dict({"input_ids": [list(range(1, 40))] * 4}).save_to_disk(folder)
    with caplog.at_level("WARNING"):
        assert main(["profile", "gpt2", "--init", "--num-layers", "1", "--dataset", str(folder), "--num-samples", "32",
                     "--no-plots", "--no-progress", "--out", str(tmp_path / "out")]) == 0
        load_model("gpt2", init=True, num_layers=1)
    assert "byte-level ids" not in caplog.text
