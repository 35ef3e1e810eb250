"""Checkpoints hold no code; `scripts/publish.py` exports them with remote code that loads without hf_koopman; and a
plain `save_pretrained` folder of each of our models loads with the Auto classes after `import hf_koopman`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import hf_koopman  # noqa: F401  (registers the model types)
from hf_koopman.models import equivcnp as eq
from hf_koopman.models import reynet
from hf_koopman.models.publishing import add_remote_code, export_for_hub, remote_code_for, save_checkpoint
from hf_koopman.testing_utils import run_without_hf_koopman

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTS = sorted(p for p in (REPO / "checkpoints").iterdir() if p.is_dir())
# one committed checkpoint per model type, and the Auto class that loads its saved head
EXPORTED = {
    "reynet-mutag": "AutoModelForSequenceClassification",
    "equivcnp-gp-rbf": "AutoModel",
    "cnp-gp-rbf": "AutoModel",
    "convcnp-gp-rbf": "AutoModel",
}


def _inputs(config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if config.model_type == "reynet":
        return {"graph_tensor": torch.rand(2, config.in_channels, 6, 6, generator=gen)}
    x_dim = config.x_dim
    return {"context_x": torch.rand(1, 7, x_dim, generator=gen) * 4 - 2,
            "context_y": torch.randn(1, 7, 1, generator=gen),
            "target_x": torch.rand(1, 11, x_dim, generator=gen) * 8 - 4}


def _outputs(model, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "logits"):
        return {"logits": out.logits}
    if hasattr(out, "mean"):
        return {"mean": out.mean, "stddev": out.stddev}
    return {"last_hidden_state": out.last_hidden_state}


# python run in the subprocesses: load every folder listed in `cases.json`, run it on its saved inputs, save outputs
_LOAD_ALL = """
import json, sys, torch, transformers
from safetensors.torch import load_file, save_file
cases = json.load(open(sys.argv[1]))
result = {}
for name, case in cases.items():
    model = getattr(transformers, case["auto_class"]).from_pretrained(case["folder"], **case["kwargs"]).eval()
    inputs = load_file(case["inputs"])
    with torch.no_grad():
        out = model(**inputs)
    fields = ["logits"] if hasattr(out, "logits") else ["mean", "stddev"] if hasattr(out, "mean") else ["last_hidden_state"]
    for field in fields:
        result[name + "." + field] = getattr(out, field).contiguous()
    print(name, type(model).__module__, type(model).__name__)
save_file(result, sys.argv[2])
"""


def _write_cases(tmp_path: Path, cases: dict) -> Path:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    return path


@pytest.mark.parametrize("folder", CHECKPOINTS, ids=lambda p: p.name)
def test_checkpoints_hold_no_code(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names, names
    assert not [n for n in names if n.endswith(".py")], f"{folder.name} holds code; publish it with scripts/publish.py"
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config, f"{folder.name}/config.json maps remote code that the folder does not hold"
    # ... and loads after `import hf_koopman`: the Auto classes give our class, the saved head loads with every key
    base = transformers.AutoModel.from_pretrained(folder)
    assert type(base).__module__.startswith("hf_koopman.models."), type(base)
    package = reynet if config["model_type"] == "reynet" else eq
    _, info = getattr(package, config["architectures"][0]).from_pretrained(folder, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info


def test_exported_checkpoints_load_without_hf_koopman(tmp_path):
    """scripts/publish.py exports committed checkpoints; a process that cannot import hf_koopman loads them with
    trust_remote_code=True and reproduces the outputs of the registered classes."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import publish
    finally:
        sys.path.pop(0)
    hub = tmp_path / "hub"
    publish.main([str(REPO / "checkpoints" / name) for name in EXPORTED] + ["--output-dir", str(hub)])

    gen = torch.Generator().manual_seed(0)
    cases, expected = {}, {}
    for name, auto_class in EXPORTED.items():
        folder = hub / name
        config = json.loads((folder / "config.json").read_text())
        code_dir, auto_map = remote_code_for(config["model_type"])
        assert config["auto_map"] == auto_map
        assert {p.name for p in folder.glob("*.py")} == {p.name for p in code_dir.glob("*.py")} - {"__init__.py"}
        # the same card, tagged custom_code (the export holds code, the checkpoint does not), and a copy of the
        # checkpoint's config.json in it shows the exported one, with its auto_map
        card, shipped = ModelCard.load(folder / "README.md"), ModelCard.load(REPO / "checkpoints" / name / "README.md")
        shipped_config = (REPO / "checkpoints" / name / "config.json").read_text().strip()
        assert card.text == shipped.text.replace(shipped_config, (folder / "config.json").read_text().strip())
        assert "custom_code" in card.data.tags
        if "Configuration (`config.json`)" in card.text:
            block = card.text.split("Configuration (`config.json`):\n\n```json\n", 1)[1].split("```", 1)[0]
            assert json.loads(block) == config
        assert {**card.data.to_dict(), "tags": None} == {**shipped.data.to_dict(), "tags": None}
        assert [t for t in card.data.tags if t != "custom_code"] == [t for t in shipped.data.tags if t != "custom_code"]


        model = getattr(transformers, auto_class).from_pretrained(REPO / "checkpoints" / name).eval()
        assert type(model).__module__.startswith("hf_koopman.")
        inputs = _inputs(model.config, gen)
        save_file(inputs, str(tmp_path / f"{name}.inputs.safetensors"))
        expected.update({f"{name}.{k}": v for k, v in _outputs(model, inputs).items()})
        cases[name] = {"folder": str(folder), "auto_class": auto_class, "kwargs": {"trust_remote_code": True},
                       "inputs": str(tmp_path / f"{name}.inputs.safetensors")}

    code = "import sys\nsys.argv = ['load', {!r}, {!r}]\n".format(
        str(_write_cases(tmp_path, cases)), str(tmp_path / "out.safetensors")
    ) + "try:\n    import hf_koopman\n    raise SystemExit('hf_koopman must not be importable here')\nexcept ImportError:\n    pass\n" + _LOAD_ALL
    proc = run_without_hf_koopman(code, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines():
        assert line.split()[1].startswith("transformers_modules"), line  # the folder's own code ran
    got = load_file(str(tmp_path / "out.safetensors"))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_save_pretrained_loads_with_auto_classes_after_import(tmp_path):
    """`model.save_pretrained(folder)` alone (no auto_map, no code) loads with the Auto classes in a fresh process
    after `import hf_koopman`; an exported folder loads there without trust_remote_code, as hf_koopman's classes."""
    torch.manual_seed(0)
    models = {
        "reynet-base": ("AutoModel", reynet.ReyNetModel(reynet.ReyNetConfig(in_channels=3, phi_hidden_sizes=[8],
                                                                            channel_hidden_sizes=[6]))),
        "reynet-clf": ("AutoModelForSequenceClassification", reynet.ReyNetForGraphClassification(
            reynet.ReyNetConfig(in_channels=3, phi_hidden_sizes=[8], channel_hidden_sizes=[6], num_targets=2))),
        "equivcnp": ("AutoModel", eq.EquivCNPModel(eq.EquivCNPConfig(group="T1", hidden_size=8, num_layers=1))),
        "cnp": ("AutoModel", eq.CNPModel(eq.CNPConfig(hidden_size=8))),
        "convcnp": ("AutoModel", eq.ConvCNPModel(eq.ConvCNPConfig(channels=[4]))),
    }
    gen = torch.Generator().manual_seed(1)
    cases, expected = {}, {}
    for name, (auto_class, model) in models.items():
        model.eval()
        folder = tmp_path / name
        model.save_pretrained(folder)
        assert "auto_map" not in json.loads((folder / "config.json").read_text())
        assert not list(folder.glob("*.py"))
        inputs = _inputs(model.config, gen)
        save_file(inputs, str(tmp_path / f"{name}.inputs.safetensors"))
        expected.update({f"{name}.{k}": v for k, v in _outputs(model, inputs).items()})
        cases[name] = {"folder": str(folder), "auto_class": auto_class, "kwargs": {},
                       "inputs": str(tmp_path / f"{name}.inputs.safetensors")}
    # the same weights as a Hub export: with hf_koopman imported, no trust_remote_code is needed
    export_for_hub(tmp_path / "cnp", tmp_path / "cnp-export")
    cases["cnp-export"] = {**cases["cnp"], "folder": str(tmp_path / "cnp-export")}
    expected.update({"cnp-export." + k.split(".", 1)[1]: v for k, v in expected.items() if k.startswith("cnp.")})

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    script = "import hf_koopman\n" + _LOAD_ALL
    proc = subprocess.run(
        [sys.executable, "-c", script, str(_write_cases(tmp_path, cases)), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines():
        assert line.split()[1].startswith("hf_koopman.models."), line
    got = load_file(str(tmp_path / "out.safetensors"))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_export_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="code_dir= and auto_map="):
        remote_code_for("llama")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        add_remote_code(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        export_for_hub(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="output_dir other than"):
        export_for_hub(REPO / "checkpoints" / "cnp-gp-rbf", REPO / "checkpoints" / "cnp-gp-rbf")
    import shutil

    holder = tmp_path / "holder"
    shutil.copytree(REPO / "checkpoints" / "cnp-gp-rbf", holder / "cnp-gp-rbf")
    with pytest.raises(ValueError, match="output_dir other than"):  # overwrite would clear the checkpoint with it
        export_for_hub(holder / "cnp-gp-rbf", holder, overwrite=True)
    assert (holder / "cnp-gp-rbf" / "model.safetensors").is_file()
    pickled = tmp_path / "pickled"
    eq.CNPModel(eq.CNPConfig(hidden_size=4)).save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors only"):
        export_for_hub(pickled, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="neither Markdown text"):
        save_checkpoint(eq.CNPModel(eq.CNPConfig(hidden_size=4)), tmp_path / "c", card="model_cards/missing.md")


def test_publish_refuses_a_used_folder_and_points_the_card_at_the_target_repo(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never upload from a test, token or not
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import publish
    finally:
        sys.path.pop(0)
    args = [str(REPO / "checkpoints" / "reynet-mutag"), "--output-dir", str(tmp_path / "hub")]
    (stale,) = publish.main(args)  # an earlier export, and a stale pickle left in it
    (stale / "pytorch_model.bin").write_bytes(b"stale")
    with pytest.raises(SystemExit, match="1 of 1 checkpoints not exported"):
        publish.main(args)
    assert "--overwrite" in capsys.readouterr().err  # the refusal names the fix
    (folder,) = publish.main(args + ["--overwrite", "--push-to-hub-org", "my-org"])  # the upload is skipped
    assert not (folder / "pytorch_model.bin").exists()
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert '"my-org/reynet-mutag"' in card and '"hf-koopman/reynet-mutag"' not in card


@pytest.mark.parametrize("name", ["state.ckpt", "stats.npy", "extra.PT", "weights.joblib", "rng_state.pth"])
def test_an_export_refuses_any_file_it_does_not_publish(tmp_path, name):
    """Only safetensors, JSON, Markdown and images are copied; anything else (a pickle under any name) is refused."""
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(REPO / "checkpoints" / "cnp-gp-rbf", src)
    (src / name).write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1
    with pytest.raises(ValueError, match=rf"does not publish: \['{name}'\]"):
        export_for_hub(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_leaves_hidden_files_out_and_takes_card_images_and_tokenizer_files(tmp_path):
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(REPO / "checkpoints" / "cnp-gp-rbf", src)
    for name in (".DS_Store", "figure.GIF", "curve.webp", "tokenizer.model", "chat_template.jinja"):
        (src / name).write_bytes(b"x")
    out = export_for_hub(src, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"figure.GIF", "curve.webp", "tokenizer.model", "chat_template.jinja"} <= names and ".DS_Store" not in names


def _online_with_a_failing_upload(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")

    def refuse(self, *args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)


def test_a_failed_upload_raises_and_keeps_the_folder(tmp_path, monkeypatch):
    _online_with_a_failing_upload(monkeypatch)
    with pytest.raises(RuntimeError, match=r"Push to me/cnp-gp-rbf failed \(ConnectionError.*hf upload me/cnp-gp-rbf"):
        export_for_hub(REPO / "checkpoints" / "cnp-gp-rbf", tmp_path / "out", push_to_hub="me/cnp-gp-rbf")
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import publish
    finally:
        sys.path.pop(0)
    args = [str(REPO / "checkpoints" / name) for name in ("cnp-gp-rbf", "convcnp-gp-rbf")]
    with pytest.raises(SystemExit, match="2 of 2 uploads failed"):  # a failed upload is a failed command
        publish.main(args + ["--output-dir", str(tmp_path / "hub"), "--push-to-hub-org", "me"])
    assert (tmp_path / "hub" / "convcnp-gp-rbf" / "model.safetensors").is_file()  # the next checkpoint still ran


def test_save_for_hub_points_a_given_card_at_the_target_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_koopman.models.publishing import save_for_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the upload is skipped; the card is still rewritten
    model = eq.CNPModel.from_pretrained(REPO / "checkpoints" / "cnp-gp-rbf")
    out = save_for_hub(model, tmp_path / "out", card=REPO / "checkpoints" / "cnp-gp-rbf" / "README.md",
                       push_to_hub="me/cnp-gp-rbf")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert '"me/cnp-gp-rbf"' in card and '"hf-koopman/cnp-gp-rbf"' not in card


@pytest.mark.parametrize("folder", CHECKPOINTS, ids=lambda p: p.name)
def test_every_card_carries_the_hub_metadata(folder):
    data = ModelCard.load(folder / "README.md").data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert "hf_koopman" in data.tags and data.metrics  # found with the library's other models, metrics named
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures") == ["ReyNetForGraphClassification"]:
        assert data.pipeline_tag == "graph-ml"


def test_an_export_refuses_links_and_files_that_are_not_what_their_names_say(tmp_path):
    import pickle
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(REPO / "checkpoints" / "cnp-gp-rbf", src)
    secret = tmp_path / "credentials"
    secret.write_text("AWS_SECRET=topsecret")
    (src / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ValueError, match="symbolic links.*tokenizer.json"):
        export_for_hub(src, tmp_path / "out")
    (src / "tokenizer.json").unlink()
    (src / "notes.txt").write_bytes(pickle.dumps({"payload": 1}, protocol=4))
    torch.save({"w": torch.zeros(2)}, src / "extra.json")  # a zip archive under a safe name
    with pytest.raises(ValueError, match="not what their names say.*extra.json, notes.txt"):
        export_for_hub(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _pickle5(path):
    import pickle

    path.write_bytes(pickle.dumps({"payload": 1}, protocol=5))


def _torch_archive(path):
    torch.save({"w": torch.zeros(2)}, path)


def _cut_json(path):
    path.write_text('{"model_max_length":', encoding="utf-8")


def _cut_safetensors(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name, damage", [("notes.txt", _pickle5), ("weights.txt", _torch_archive),
                                          ("tokenizer.json", _cut_json), ("model.safetensors", _cut_safetensors)],
                         ids=["pickle-protocol-5", "torch-save-as-txt", "json-cut-short", "safetensors-cut-short"])
def test_each_file_that_is_not_what_its_name_says_is_refused_on_its_own(tmp_path, name, damage):
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(REPO / "checkpoints" / "cnp-gp-rbf", src)
    damage(src / name)
    with pytest.raises(ValueError, match=f"not what their names say \\({name}"):
        export_for_hub(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adding_remote_code_never_writes_through_a_link(tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(REPO / "checkpoints" / "cnp-gp-rbf", folder)
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    code = sorted(p.name for p in (REPO / "hf_koopman" / "models" / "equivcnp").glob("*.py") if p.name != "__init__.py")
    (folder / code[0]).symlink_to(precious)
    add_remote_code(folder)
    assert precious.read_text() == "mine" and not (folder / code[0]).is_symlink()


def test_card_templates_render_in_a_sandbox(tmp_path):
    import jinja2

    from hf_koopman.models.publishing import render_model_card

    template = tmp_path / "card.md"
    template.write_text("{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_model_card(template, card_data={"license": "apache-2.0"})


def test_a_hub_cache_snapshot_exports(tmp_path):
    import hashlib

    source = REPO / "checkpoints" / "cnp-gp-rbf"
    repo = tmp_path / "models--me--cnp"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in source.iterdir():  # the cache's layout: each file a relative link to its blob
        if path.is_file() and not path.name.startswith("."):
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    out = export_for_hub(snapshot, tmp_path / "out")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors").is_symlink()


def test_exports_of_snapshot_sub_folders_and_links_to_snapshots_work_and_broken_links_are_refused(tmp_path):
    import hashlib
    import shutil

    source = REPO / "checkpoints" / "cnp-gp-rbf"
    repo = tmp_path / "models--me--cnp"
    snapshot = repo / "snapshots" / "abc123" / "ckpt"  # a checkpoint in a sub-folder of the snapshot
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("."):
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    assert (export_for_hub(snapshot, tmp_path / "out1") / "model.safetensors").is_file()
    (tmp_path / "m").symlink_to(snapshot, target_is_directory=True)  # reached through a linked folder
    assert (export_for_hub(tmp_path / "m", tmp_path / "out2") / "model.safetensors").is_file()
    (snapshot / "tokenizer.json").symlink_to(repo / "blobs" / "missing")
    with pytest.raises(ValueError, match="links to nothing.*tokenizer.json"):
        export_for_hub(snapshot, tmp_path / "out3")
    shutil.rmtree(tmp_path / "out1")


def test_publish_names_a_folder_that_is_not_a_checkpoint_without_a_traceback(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import publish
    finally:
        sys.path.pop(0)
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty"), str(REPO / "checkpoints" / "cnp-gp-rbf"), "--output-dir", str(tmp_path / "hub")]
    with pytest.raises(SystemExit, match="1 of 2 checkpoints not exported"):
        publish.main(args)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'}: error: " in err and "Traceback" not in err
    assert (tmp_path / "hub" / "cnp-gp-rbf" / "model.safetensors").is_file()  # the next checkpoint still ran
