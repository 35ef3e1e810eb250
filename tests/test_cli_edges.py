"""`hf-koopman` CLI edges: --stream gives what the ordinary path gives (learning rate, risk, text use, positions), and
--dataset, max-lr and run names say what they did."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hf_koopman.cli import main
from hf_koopman.testing_utils import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:N=.*rank-limited:UserWarning")  # tiny token counts by design

FAST = ["--no-plots", "--no-progress"]
WORDS = ["[PAD]", "[UNK]", "<eos>", "the", "cat", "sat", "fox", "mat", "and", "dog", "ran", "far"]


def _checkpoint(tmp_path, name="ckpt", tokenizer=False, **overrides):
    """A save_pretrained folder of a tiny LLaMA (task class, as training scripts save it); with `tokenizer`, a
    word-level tokenizer next to it whose words are all three letters long: 4 characters per token with the space."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / name
    AutoModelForCausalLM.from_config(tiny_config("llama", **overrides)).save_pretrained(folder)
    if tokenizer:
        _tokenizer().save_pretrained(folder)
    return folder


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="<eos>", unk_token="[UNK]")


def _words(n: int) -> str:
    return " ".join(WORDS[3 + i % (len(WORDS) - 3)] for i in range(n)) + " "


def _profile_json(out) -> dict:
    return json.loads((out / "profile.json").read_text())


# ----------------------------------------------------------------------------------- 1. --stream keeps the risk inputs
def test_stream_records_the_learning_rate_and_the_same_risk(tmp_path):
    folder = _checkpoint(tmp_path)
    runs = {}
    for label, extra in {"plain": [], "stream": ["--stream"]}.items():
        out = tmp_path / label
        assert main(["profile", str(folder), "--learning-rate", "3e-3", "--num-samples", "64", *extra, *FAST,
                     "--out", str(out)]) == 0
        runs[label] = _profile_json(out)
        assert "needs the planned learning rate" not in (out / "report.md").read_text()
    plain, stream = runs["plain"], runs["stream"]
    assert stream["meta"]["learning_rate"] == plain["meta"]["learning_rate"] == 3e-3
    assert plain["risk"] is not None and stream["risk"] == pytest.approx(plain["risk"], rel=1e-4)
    a, b = plain["risk_assessment"], stream["risk_assessment"]
    assert b["probability"] == pytest.approx(a["probability"], rel=1e-4) and b["learning_rate"] == a["learning_rate"]
    assert (b["out_of_range"], b["status"], b["unknown"]) == (a["out_of_range"], a["status"], a["unknown"])
    assert [i["key"] for i in b["outside"]] == [i["key"] for i in a["outside"]]


def test_stream_reads_text_up_to_max_tokens_like_the_plain_path(tmp_path):
    folder = _checkpoint(tmp_path, tokenizer=True)
    text = tmp_path / "words.txt"
    text.write_text(_words(2000))
    common = ["--text-file", str(text), "--num-samples", "32", "--max-length", "32", "--batch-size", "2", *FAST]
    seen = {}
    for label, extra in {"stream-default": ["--stream"], "stream": ["--stream", "--max-tokens", "160"],
                         "plain": ["--max-tokens", "160"]}.items():
        assert main(["profile", str(folder), *common, *extra, "--out", str(tmp_path / label)]) == 0
        seen[label] = _profile_json(tmp_path / label)["meta"]["tokens_seen"]
    # batches of two sequences until --num-samples (32) tokens by default: one batch of 2 x 32; with --max-tokens,
    # until 160 tokens: 3 batches
    assert seen == {"stream-default": 64, "stream": 192, "plain": 192}


def test_stream_reads_text_until_num_samples_without_max_tokens(tmp_path):
    folder = _checkpoint(tmp_path, tokenizer=True)
    text = tmp_path / "words.txt"
    text.write_text(_words(2000))
    out = tmp_path / "out"
    assert main(["profile", str(folder), "--stream", "--text-file", str(text), "--num-samples", "200",
                 "--max-length", "32", "--batch-size", "2", *FAST, "--out", str(out)]) == 0
    meta = _profile_json(out)["meta"]
    assert meta["tokens_seen"] == 4 * 64  # batches of 2 x 32 tokens until 200: four, in the one streamed forward
    assert _profile_json(out)["settings"]["num_samples"] == 200  # N follows --num-samples


# -------------------------------------------------------------------------------- 2. --max-length past the positions
def test_stream_caps_max_length_at_the_position_table(tmp_path, caplog):
    config = tmp_path / "gpt2.json"
    tiny_config("gpt2", n_positions=32).to_json_file(config)
    text = tmp_path / "notes.txt"
    text.write_text("The residual stream carries token states from block to block. " * 40)
    seen = {}
    for label, extra in {"stream": ["--stream"], "plain": ["--max-tokens", "100000"]}.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_koopman"):
            assert main(["profile", str(config), "--init", "--text-file", str(text), "--max-length", "2048",
                         "--num-samples", "32", *extra, *FAST, "--out", str(tmp_path / label)]) == 0
        assert "--max-length 2048 exceeds the 32 positions" in caplog.text, label
        seen[label] = _profile_json(tmp_path / label)["meta"]["tokens_seen"]
    assert seen["stream"] == 8 * 32  # one batch of --batch-size 8 sequences, each filled to the 32 positions
    assert seen["plain"] == len(text.read_text())  # byte-level ids: every character of the file is read


def test_default_max_length_past_the_positions_is_no_warning(tmp_path, caplog):
    config = tmp_path / "gpt2.json"
    tiny_config("gpt2", n_positions=32).to_json_file(config)
    text = tmp_path / "notes.txt"
    text.write_text("The residual stream carries token states from block to block. " * 10)
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        assert main(["profile", str(config), "--init", "--stream", "--text-file", str(text), "--num-samples", "32",
                     *FAST, "--out", str(tmp_path / "out")]) == 0
    assert "--max-length" not in caplog.text  # the user never asked for 256


# ------------------------------------------------------------------------------------- 4. --text-file split at the cap
@pytest.mark.parametrize("tokenizer", [True, False], ids=["tokenizer", "byte-level"])
def test_text_file_is_read_like_profile_reads_the_text(tmp_path, tokenizer):
    from transformers import AutoModel

    from hf_koopman.profiling import profile

    folder = _checkpoint(tmp_path, tokenizer=tokenizer, max_position_embeddings=32)
    text = tmp_path / "words.txt"
    text.write_text(_words(600))
    out = tmp_path / "out"
    assert main(["profile", str(folder), "--text-file", str(text), "--num-samples", "64", "--max-tokens", "100000",
                 *FAST, "--out", str(out)]) == 0
    used = _profile_json(out)["meta"]["tokens_seen"]
    model = AutoModel.from_pretrained(folder)
    api = profile(model, text.read_text(), tokenizer=_tokenizer() if tokenizer else None, num_samples=64,
                  max_tokens=100000, progress=False)
    assert used == api.meta["tokens_seen"]
    assert used >= (600 if tokenizer else len(text.read_text())) - 2  # all the text, not a quarter of each piece


# ------------------------------------------------------------------------------- the summary names the layers left out
def test_summary_names_the_layers_left_out_for_too_few_token_states(tmp_path, capsys):
    from transformers import AutoConfig

    # Swin v2's second stage runs at twice the width; the default probe gives both stages 128 token states (its
    # image count is sized for the last stage): N/d = 128/48 = 2.7, then 128/96 = 1.3 < 2
    config = tmp_path / "swinv2.json"
    AutoConfig.for_model("swinv2", image_size=32, patch_size=4, embed_dim=48, depths=[1, 1], num_heads=[2, 4],
                         window_size=4).to_json_file(config)
    out = tmp_path / "out"
    assert main(["profile", str(config), "--init", "--num-samples", "128", *FAST, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = _profile_json(out)
    assert [(layer["num_samples"], layer["hidden_size"]) for layer in data["layers"]] == [(128, 48), (128, 96)]
    assert data["undersampled_layers"] == ["encoder.layers.1.blocks.0"]
    assert "swinv2 (init): 2 layers, mean M≈1" in printed
    assert ("  1 layer(s) left out for too few token states (N/d < 2): mean M≈1 and the verdict read 1 of 2 layers; "
            "more or longer inputs include them (see report)") in printed


def test_summary_has_no_left_out_note_when_every_layer_has_enough_tokens(tmp_path, capsys):
    folder = _checkpoint(tmp_path)
    assert main(["profile", str(folder), "--num-samples", "64", *FAST, "--out", str(tmp_path / "out")]) == 0
    assert _profile_json(tmp_path / "out")["undersampled_layers"] == []
    assert "left out" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------- 5./6. --dataset paths and splits
def test_dataset_dict_without_the_split_lists_its_splits(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    folder = _checkpoint(tmp_path)
    data = tmp_path / "dsdict"
    rows = {"text": ["the cat sat and the dog ran far " * 4] * 8}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(data))
    args = ["profile", str(folder), "--dataset", str(data), "--num-samples", "32", *FAST]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no split 'train'" in err and "validation" in err and "--split validation" in err
    assert "KeyError" not in err
    assert main([*args, "--split", "validation", "--out", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize("name", ["notes.md", "notes", "text.txt.gz", "rows.jsonl.gz", "TEXT.TXT", "rows.tsv",
                                  "page.xml"])
def test_any_local_data_file_is_read_by_its_format_never_looked_up_on_the_hub(tmp_path, monkeypatch, capsys, name):
    import gzip

    pytest.importorskip("datasets")
    folder = _checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    line = "the cat sat and the dog ran far " * 4
    rows = [f'{{"text": "{line}"}}' if "jsonl" in name else f"{line}\t7" if name.endswith(".tsv") else line
            for _ in range(8)]
    body = ("text\tlabel\n" if name.endswith(".tsv") else "") + "\n".join(rows) + "\n"
    (tmp_path / name).write_bytes(gzip.compress(body.encode()) if name.endswith(".gz") else body.encode())
    assert main(["profile", str(folder), "--dataset", name, "--num-samples", "32", *FAST, "--out", "out"]) == 0
    data = _profile_json(tmp_path / "out")
    assert data["meta"]["tokens_seen"] >= 32


def test_an_archive_is_refused_naming_the_fix(tmp_path, monkeypatch, capsys):
    folder = _checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.tar.gz").write_bytes(b"not read")
    assert main(["profile", str(folder), "--dataset", "data.tar.gz", "--num-samples", "32", *FAST, "--out", "o"]) == 2
    assert "--dataset data.tar.gz is an archive: extract it" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["nope.csv", "nope.jsonl", "data.parquet", "sub/nope.txt", "nope.arrow",
                                  "nope.txt.gz"])
def test_missing_data_file_is_a_missing_file_not_a_hub_name(tmp_path, monkeypatch, capsys, name):
    folder = _checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["profile", str(folder), "--dataset", name, "--num-samples", "32", *FAST, "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert f"--dataset {name}: no such file or folder; the data file does not exist" in err
    assert "needs the Hub" not in err and "Hub is offline" not in err


# ------------------------------------------------------------------------------------- 7. max-lr on pretrained weights
def test_max_lr_on_pretrained_weights_says_it_extrapolates(tmp_path, capsys):
    folder = _checkpoint(tmp_path)
    caveats = {}
    for label, extra in {"pretrained": [], "init": ["--init"]}.items():
        assert main(["max-lr", str(folder), *extra, "--num-samples", "64", "--no-progress", "--json"]) == 0
        caveats[label] = json.loads(capsys.readouterr().out)["caveats"]
    assert "these are pretrained weights" in caveats["pretrained"][0]
    assert not any("pretrained" in c for c in caveats["init"])
    assert main(["max-lr", str(folder), "--num-samples", "64", "--no-progress"]) == 0
    assert "extrapolated: these are pretrained weights" in capsys.readouterr().out


def test_max_lr_streams_to_the_same_answer(tmp_path, capsys):
    """`max-lr --stream` (one block in memory at a time) answers what `max-lr` answers on the same checkpoint."""
    folder = _checkpoint(tmp_path)
    answers = {}
    for label, extra in {"plain": [], "stream": ["--stream"]}.items():
        assert main(["max-lr", str(folder), "--num-samples", "64", "--no-progress", "--json", *extra]) == 0
        answers[label] = json.loads(capsys.readouterr().out)
    plain, stream = answers["plain"], answers["stream"]
    assert plain["verdict"] == stream["verdict"] and plain["caveats"] == stream["caveats"]
    if plain["max_learning_rate"] is None:
        assert stream["max_learning_rate"] is None
    else:
        assert stream["max_learning_rate"] == pytest.approx(plain["max_learning_rate"], rel=1e-3)


@pytest.mark.parametrize("layers", ["layers", "model.layers"])
def test_layers_name_the_same_blocks_with_and_without_stream(tmp_path, layers):
    """--layers as the base model names its list (`layers`) or as the task model does (`model.layers`): the plain
    path profiles the base model, --stream the task model, and both read the same blocks."""
    folder = _checkpoint(tmp_path)
    names = {}
    for label, extra in {"plain": [], "stream": ["--stream"]}.items():
        out = tmp_path / label
        assert main(["profile", str(folder), "--layers", layers, "--num-samples", "64", *extra, *FAST,
                     "--out", str(out)]) == 0
        names[label] = [layer["name"].rsplit(".", 2)[-2:] for layer in _profile_json(out)["layers"]]
    assert names["plain"] == names["stream"] == [["layers", "0"], ["layers", "1"]]


# ------------------------------------------------------------------------------- 8. run name of a folder with --init
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_folder_with_init_is_named_as_init(tmp_path, stream):
    folder = _checkpoint(tmp_path, name="my-ckpt")
    names = {}
    for label, extra in {"init": ["--init"], "pretrained": []}.items():
        out = tmp_path / label
        assert main(["profile", str(folder), *extra, *(["--stream"] if stream else []), "--num-samples", "32",
                     *FAST, "--out", str(out)]) == 0
        names[label] = _profile_json(out)["model_name"]
    assert names == {"init": "my-ckpt (init)", "pretrained": "my-ckpt"}


def test_stream_names_num_layers_like_the_plain_path(tmp_path, capsys):
    config = tmp_path / "llama.json"
    tiny_config("llama", num_hidden_layers=3).to_json_file(config)
    names = []
    for extra in ([], ["--stream"]):
        out = tmp_path / f"run{len(names)}"
        assert main(["profile", str(config), "--init", "--num-layers", "1", *extra, "--num-samples", "32", *FAST,
                     "--out", str(out)]) == 0
        names.append(_profile_json(out)["model_name"])
        assert "llama (init) [1 layer]: mean M≈1 = " in capsys.readouterr().out  # the count is said once
    assert names == ["llama (init) [1 layer]"] * 2


def test_stream_caps_roberta_style_positions_after_the_padding_offset(tmp_path, caplog):
    from transformers import AutoConfig

    config = tmp_path / "roberta.json"  # position ids start at pad_token_id + 1: 34 - 2 = 32 usable positions
    AutoConfig.for_model("roberta", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=300, max_position_embeddings=34, pad_token_id=1).to_json_file(config)
    text = tmp_path / "notes.txt"
    text.write_text("The residual stream carries token states from block to block. " * 10)
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        assert main(["profile", str(config), "--init", "--stream", "--text-file", str(text), "--max-length", "64",
                     "--num-samples", "32", *FAST, "--out", str(tmp_path / "out")]) == 0
    assert "--max-length 64 exceeds the 32 positions" in caplog.text
    assert _profile_json(tmp_path / "out")["meta"]["tokens_seen"] == 8 * 32


def test_half_precision_uninformative_run_gives_each_caveat_once_and_no_bold_probability(tmp_path, capsys):
    folder = _checkpoint(tmp_path)
    out = tmp_path / "out"  # 16 token states for width 32: an uninformative verdict, with a calibrated probability
    assert main(["profile", str(folder), "--dtype", "fp16", "--learning-rate", "3e-3", "--num-samples", "16", *FAST,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verdict: UNINFORMATIVE" in printed and printed.count("--dtype fp32") == 1
    text = (out / "report.md").read_text()
    assert text.count("--dtype fp32") == 1 and text.count("whose rounding moves them") == 1
    line = next(line for line in text.splitlines() if line.startswith("Calibrated divergence probability"))
    assert "**" not in line and "computed from an uninformative spectrum" in line
    assert "not a reading of this model" in line and "unreliable in float16 (see the float16 note above)" in line


def test_an_uninformative_profile_prints_no_probability(tmp_path, capsys):
    folder = _checkpoint(tmp_path)  # 16 token states for width 32: uninformative
    assert main(["profile", str(folder), "--learning-rate", "3e-3", "--num-samples", "16", *FAST,
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "verdict: UNINFORMATIVE" in printed
    assert "P(divergence) at learning rate 0.003: n/a (computed from an uninformative spectrum" in printed
    # the summary says why, in the reason's own words (what would make it informative)
    reason = _profile_json(tmp_path / "out")["verdict_reason"]
    assert "token states" in reason and "num_samples >= " in reason
    assert f"\n  why: {reason.replace('num_samples', '--num-samples')}\n" in printed  # the CLI's option name


def test_the_why_line_of_a_token_limited_profile_names_cli_options(tmp_path, capsys):
    """A text file too short for the width: the summary's why-line names --max-tokens and --num-samples, not the
    Python arguments or the callback's probe_batch_size."""
    folder = _checkpoint(tmp_path, tokenizer=True)
    text = tmp_path / "short.txt"
    text.write_text(_words(12))
    assert main(["profile", str(folder), "--text-file", str(text), "--num-samples", "64", *FAST,
                 "--out", str(tmp_path / "out")]) == 0
    why = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  why: "))
    assert "the inputs gave only" in why and "--max-tokens" in why
    assert "probe_batch_size" not in why and "`max_tokens`" not in why and " num_samples" not in why
