"""scripts/train_kss.py in one process: a `datasets` text dataset and the Tiny Shakespeare file."""

from __future__ import annotations

import json

import pytest

import ddp_worker


COMMON = [
    "--tiny", "--block_size", "32", "--max_steps", "3", "--per_device_train_batch_size", "2",
    "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
    "--kss_every_n_steps", "2", "--kss_rank", "8", "--kss_num_samples", "64", "--rksp_num_samples", "128",
    "--disable_tqdm", "true",
]


def test_train_script_on_a_datasets_text_dataset(tmp_path):
    train_kss = ddp_worker.load_train_script()
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus for the koopman test" for i in range(200)))
    out = tmp_path / "out"
    trainer = train_kss.main(
        ["--dataset", "text", "--dataset_files", str(corpus), "--output_dir", str(out), *COMMON]
    )
    assert trainer.state.global_step == 3 and trainer.kss_steps == [0, 2]
    assert json.loads((out / "rksp_profile.json").read_text())["layers"]
    assert (out / "model.safetensors").exists()
    # no pickle in the output folder: the arguments are JSON, and the KSS fields are among them
    assert sorted(p.name for p in out.iterdir() if p.suffix not in (".json", ".safetensors", ".md", ".png")) == []
    assert json.loads((out / "training_args.json").read_text())["kss_rank"] == 8
    assert any("kss/penalty" in h for h in trainer.state.log_history)


def test_train_script_on_tiny_shakespeare(tmp_path, data_dir):
    train_kss = ddp_worker.load_train_script()
    text = data_dir / "tinyshakespeare" / "input.txt"
    trainer = train_kss.main(
        ["--text_file", str(text), "--max_chars", "20000", "--architecture", "llama-2-7b",
         "--output_dir", str(tmp_path), *COMMON]
    )
    assert type(trainer.model).__name__ == "LlamaForCausalLM" and trainer.model.config.num_hidden_layers == 2
    assert trainer.state.global_step == 3


def test_train_script_rejects_bad_input(tmp_path):
    train_kss = ddp_worker.load_train_script()
    with pytest.raises(ValueError, match="exactly one of"):
        train_kss.main(["--output_dir", str(tmp_path), *COMMON])
    with pytest.raises(ValueError, match="key=value"):
        train_kss._parse_overrides("n_layer")


def test_train_script_probes_enough_blocks_for_its_num_samples(tmp_path):
    # 512 token states at 32 tokens per block need 16 blocks; the callback's default probe of 8 would hold 256
    from hf_koopman import RKSPCallback

    train_kss = ddp_worker.load_train_script()
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus for the koopman test" for i in range(200)))
    trainer = train_kss.main(["--dataset", "text", "--dataset_files", str(corpus), "--output_dir", str(tmp_path / "o"),
                              *COMMON, "--rksp_num_samples", "512", "--max_steps", "1"])
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RKSPCallback))
    assert callback.probe_batch_size == 16
    assert min(callback.profile.meta["tokens_seen_per_layer"].values()) >= 512


def test_train_script_pushes_no_pickle(tmp_path, monkeypatch):
    import fnmatch
    from types import SimpleNamespace

    import huggingface_hub

    uploaded = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, ignore_patterns, **kwargs):
            from pathlib import Path

            for path in Path(folder_path).rglob("*"):
                name = path.relative_to(folder_path).as_posix()
                if path.is_file() and not any(fnmatch.fnmatch(name, p) for p in ignore_patterns):
                    uploaded.append(name)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    train_kss = ddp_worker.load_train_script()
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus for the koopman test" for i in range(200)))
    out = tmp_path / "out"
    train_kss.main(["--dataset", "text", "--dataset_files", str(corpus), "--output_dir", str(out), *COMMON,
                    "--max_steps", "1", "--push_to_hub", "true", "--hub_model_id", "me/kss-test"])
    assert "model.safetensors" in uploaded and "training_args.json" in uploaded
    assert not [name for name in uploaded if name.endswith((".bin", ".pt", ".pth", ".pkl"))]


def test_train_script_refuses_a_bad_push_target_before_training(tmp_path):
    train_kss = ddp_worker.load_train_script()
    corpus = tmp_path / "train.txt"
    corpus.write_text("a small corpus\n" * 50)
    with pytest.raises(ValueError, match="not a Hub repository name.*--hub_model_id"):
        train_kss.main(["--dataset", "text", "--dataset_files", str(corpus), "--output_dir",
                        str(tmp_path / "kss run (lr=1e-3)"), *COMMON, "--push_to_hub", "true"])
    assert not (tmp_path / "kss run (lr=1e-3)").exists()  # nothing trained
