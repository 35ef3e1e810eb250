"""Hub publishing: complete auto_map, remote code loadable without hf_koopman, offline Hub cache, model card YAML."""

from __future__ import annotations

import importlib
import json
import os
import sys
import textwrap

import pytest
import torch

from hf_koopman.models.publishing import render_model_card, save_for_hub
from hf_koopman.testing_utils import populate_offline_hub_cache, run_without_hf_koopman

CONFIG_SRC = '''
from transformers import PreTrainedConfig


class ToyConfig(PreTrainedConfig):
    model_type = "hfk-toy"

    def __init__(self, width=4, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''

MODELING_SRC = '''
import torch
from transformers import PreTrainedModel

from .configuration_toy import ToyConfig


class ToyModel(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.proj(x)


class ToyForRegression(ToyModel):
    pass
'''

AUTO_MAP = {
    "AutoConfig": "configuration_toy.ToyConfig",
    "AutoModel": "modeling_toy.ToyModel",
    "AutoModelForImageClassification": "modeling_toy.ToyForRegression",
}


@pytest.fixture()
def toy_package(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "configuration_toy.py").write_text(CONFIG_SRC)
    (pkg / "modeling_toy.py").write_text(MODELING_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_pkg.modeling_toy")
    yield pkg, module
    for name in [m for m in sys.modules if m.startswith("toy_pkg")]:
        del sys.modules[name]


@pytest.fixture()
def card_template(tmp_path):
    path = tmp_path / "card.md"
    path.write_text("# {{ title }}\n\nAccuracy: {{ acc }}\n")
    return path


def _publish(toy_package, card_template, out):
    pkg, module = toy_package
    model = module.ToyModel(module.ToyConfig(width=4)).eval()
    folder = save_for_hub(
        model,
        out,
        code_dir=pkg,
        auto_map=AUTO_MAP,
        card=render_model_card(
            card_template,
            card_data={"license": "apache-2.0", "tags": ["toy"], "model_name": "toy", "metrics": ["accuracy"]},
            eval_results=[
                {"task_type": "graph-classification", "dataset_type": "mutag", "dataset_name": "MUTAG",
                 "metric_type": "accuracy", "metric_value": 0.5}
            ],
            template_vars={"title": "Toy", "acc": 0.5},
        ),
    )
    return model, folder


def test_folder_layout_and_card(toy_package, card_template, tmp_path):
    _, folder = _publish(toy_package, card_template, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert (folder / "model.safetensors").is_file()
    assert {"configuration_toy.py", "modeling_toy.py"} <= {p.name for p in folder.glob("*.py")}
    assert not (folder / "__init__.py").exists()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "model-index" in card
    assert "Accuracy: 0.5" in card


def test_bad_auto_map_is_rejected(toy_package, tmp_path):
    pkg, module = toy_package
    model = module.ToyModel(module.ToyConfig())
    with pytest.raises(ValueError, match="AutoModel"):
        save_for_hub(model, tmp_path / "o", code_dir=pkg, auto_map={"AutoConfig": "configuration_toy.ToyConfig"})
    with pytest.raises(ValueError, match="not in"):
        save_for_hub(model, tmp_path / "o", code_dir=pkg,
                     auto_map={**AUTO_MAP, "AutoModel": "modeling_missing.ToyModel"})


def test_a_module_that_is_not_a_pretrained_model_is_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match=r"save_for_hub exports a transformers PreTrainedModel .* got Linear"):
        save_for_hub(torch.nn.Linear(2, 2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remote_code_and_offline_cache_without_hf_koopman(toy_package, card_template, tmp_path):
    model, folder = _publish(toy_package, card_template, tmp_path / "out")
    x = torch.randn(2, 4)
    expected = model(x).detach()
    torch.save({"x": x}, tmp_path / "x.pt")
    cache = tmp_path / "hf_home" / "hub"
    populate_offline_hub_cache(folder, "acme/toy-model", cache)
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForImageClassification
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)["x"]
        for source in ({str(folder)!r}, "acme/toy-model"):
            m = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            print(type(m).__name__, m(x).detach().tolist())
        head = AutoModelForImageClassification.from_pretrained("acme/toy-model", trust_remote_code=True)
        print(type(head).__name__)
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(cache)}
    proc = run_without_hf_koopman(code, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "ToyForRegression"
    for line in lines[:2]:
        name, values = line.split(" ", 1)
        assert name == "ToyModel"
        assert torch.allclose(torch.tensor(json.loads(values)), expected, atol=1e-6)


def test_missing_template_variable_raises_naming_it(card_template):
    # `acc` is forgotten: it must not silently render as an empty string
    with pytest.raises(ValueError, match=r"card.md: the template variables \['acc'\] have no value; pass them in "
                                         r"template_vars"):
        render_model_card(card_template, card_data={"license": "apache-2.0"}, template_vars={"title": "Toy"})
    # card_data keys are template variables too, as in ModelCard.from_template
    card = render_model_card(card_template, card_data={"license": "apache-2.0", "title": "From data"},
                             template_vars={"acc": 0.5})
    assert "# From data" in str(card) and "license: apache-2.0" in str(card)


def test_missing_variable_inside_a_condition_raises(tmp_path):
    template = tmp_path / "cond.md"
    template.write_text("{% if quick %}smoke test{% endif %}\n")
    with pytest.raises(ValueError, match=r"\['quick'\]"):
        render_model_card(template, card_data={})
    assert "smoke test" not in str(render_model_card(template, card_data={}, template_vars={"quick": False}))


def test_save_for_hub_without_card_writes_a_minimal_card(toy_package, tmp_path):
    from huggingface_hub import ModelCard

    pkg, module = toy_package
    model = module.ToyForRegression(module.ToyConfig(width=4))
    folder = save_for_hub(model, tmp_path / "toy-export", code_dir=pkg, auto_map=AUTO_MAP)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and {"custom_code", "hfk-toy"} <= set(card.data.tags)
    # the Auto class of the saved head, and an honest note that the model is undocumented
    assert "AutoModelForImageClassification.from_pretrained('<user>/toy-export', trust_remote_code=True)" in card.text
    assert str(tmp_path) not in card.text  # no local path in a card meant for the Hub
    assert "without a description of the model" in card.text


def test_the_minimal_card_of_a_reynet_head_loads_it_without_hf_koopman(tmp_path):
    # the auto_map also names Auto classes transformers lacks (AutoModelForGraphClassification ...): the snippet
    # must use one that exists, or take the class from the exported code (both heads in one subprocess)
    import re

    import hf_koopman.models.reynet as reynet
    from hf_koopman.testing_utils import run_without_hf_koopman

    heads = ["ReyNetForGraphClassification", "ReyNetForEquivariantRegression"]
    code = ""
    for head in heads:
        model = getattr(reynet, head)(reynet.ReyNetConfig(in_channels=2, phi_hidden_sizes=[4],
                                                          channel_hidden_sizes=[4], num_labels=2))
        folder = save_for_hub(model, tmp_path / head)
        snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.DOTALL).group(1)
        code += snippet.replace(f"<user>/{head}", str(folder))
        code += "print(type(model).__name__)\n"
    assert "AutoModelForSequenceClassification" in code and "get_class_from_dynamic_module" in code
    proc = run_without_hf_koopman(code, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2:] == heads


def test_export_tags_the_card_custom_code(toy_package, card_template, tmp_path):
    from huggingface_hub import ModelCard

    from hf_koopman.models.publishing import export_for_hub, save_checkpoint

    pkg, module = toy_package
    card = render_model_card(card_template, card_data={"license": "apache-2.0", "tags": ["toy"]},
                             template_vars={"title": "Toy", "acc": 0.5})
    checkpoint = save_checkpoint(module.ToyModel(module.ToyConfig()), tmp_path / "ckpt", card=card)
    assert ModelCard.load(checkpoint / "README.md").data.tags == ["toy"]  # a checkpoint holds no code
    export = export_for_hub(checkpoint, tmp_path / "export", code_dir=pkg, auto_map=AUTO_MAP)
    exported = ModelCard.load(export / "README.md")
    assert exported.data.tags == ["toy", "custom_code"]
    assert exported.text == ModelCard.load(checkpoint / "README.md").text
    export_for_hub(export, tmp_path / "again", code_dir=pkg, auto_map=AUTO_MAP)  # the tag is added once
    assert ModelCard.load(tmp_path / "again" / "README.md").data.tags == ["toy", "custom_code"]


def test_export_updates_a_verbatim_config_copy_in_the_card(toy_package, tmp_path):
    from hf_koopman.models.publishing import export_for_hub, save_checkpoint

    pkg, module = toy_package
    checkpoint = save_checkpoint(module.ToyModel(module.ToyConfig()), tmp_path / "ckpt")
    shipped = (checkpoint / "config.json").read_text().strip()
    (checkpoint / "README.md").write_text(f"---\ntags: [toy]\n---\n# Toy\n\n```json\n{shipped}\n```\n")
    export = export_for_hub(checkpoint, tmp_path / "export", code_dir=pkg, auto_map=AUTO_MAP)
    block = (export / "README.md").read_text().split("```json\n", 1)[1].split("```", 1)[0]
    assert block.strip() == (export / "config.json").read_text().strip()
    assert json.loads(block)["auto_map"] == AUTO_MAP


def test_an_export_refuses_a_folder_that_already_holds_files(toy_package, tmp_path):
    # everything in the folder is uploaded: a stale pickle left there would be published with the export
    pkg, module = toy_package
    model = module.ToyModel(module.ToyConfig())
    out = tmp_path / "toy-export"
    save_for_hub(model, out, code_dir=pkg, auto_map=AUTO_MAP)
    (out / "pytorch_model.bin").write_bytes(b"stale")
    (out / ".git").mkdir()  # a Hub repository's clone: kept, and not counted
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_for_hub(model, out, code_dir=pkg, auto_map=AUTO_MAP)
    assert (out / "pytorch_model.bin").exists()  # untouched
    save_for_hub(model, out, code_dir=pkg, auto_map=AUTO_MAP, overwrite=True)
    assert not (out / "pytorch_model.bin").exists() and (out / "model.safetensors").is_file() and (out / ".git").is_dir()
    assert [p.name for p in out.iterdir() if p.is_dir()] == [".git"]  # the earlier files kept aside are gone too


def test_overwrite_clears_only_an_earlier_export(toy_package, tmp_path, monkeypatch):
    pkg, module = toy_package
    model = module.ToyModel(module.ToyConfig())
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("keep")
    with pytest.raises(FileExistsError, match="does not look like an earlier export"):
        save_for_hub(model, other, code_dir=pkg, auto_map=AUTO_MAP, overwrite=True)
    monkeypatch.chdir(other)
    with pytest.raises(ValueError, match="current or home directory"):
        save_for_hub(model, ".", code_dir=pkg, auto_map=AUTO_MAP, overwrite=True)
    assert (other / "thesis.tex").read_text() == "keep"
    with pytest.raises(ValueError, match="not in"):  # a bad map is refused before the folder is touched
        save_for_hub(model, tmp_path / "new", code_dir=pkg, auto_map={**AUTO_MAP, "AutoModel": "modeling_x.Y"})
    assert not (tmp_path / "new").exists()


def test_an_overwrite_never_clears_a_folder_it_reaches_through_a_link_or_one_holding_an_input(toy_package, tmp_path,
                                                                                             monkeypatch):
    pkg, module = toy_package
    model = module.ToyModel(module.ToyConfig())
    real = tmp_path / "real-export"
    save_for_hub(model, real, code_dir=pkg, auto_map=AUTO_MAP)
    before = sorted(p.name for p in real.iterdir())
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(FileExistsError, match="symbolic link"):
        save_for_hub(model, link, code_dir=pkg, auto_map=AUTO_MAP, overwrite=True)
    card = real / "MY_CARD.md"
    card.write_text("---\nlicense: apache-2.0\n---\n# mine\n")
    with pytest.raises(ValueError, match="holds an input"):
        save_for_hub(model, real, code_dir=pkg, auto_map=AUTO_MAP, card=card, overwrite=True)
    (real / "sub").mkdir()
    monkeypatch.chdir(real / "sub")  # the export folder holds the current directory
    with pytest.raises(ValueError, match="current or home"):
        save_for_hub(model, real, code_dir=pkg, auto_map=AUTO_MAP, overwrite=True)
    assert sorted(p.name for p in real.iterdir()) == sorted([*before, "MY_CARD.md", "sub"])


def test_an_overwrite_that_fails_midway_puts_the_earlier_export_back(toy_package, tmp_path, monkeypatch, caplog):
    import hf_koopman.models.publishing as publishing

    pkg, module = toy_package
    model = module.ToyModel(module.ToyConfig())
    out = tmp_path / "toy-export"
    save_for_hub(model, out, code_dir=pkg, auto_map=AUTO_MAP)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publishing, "add_remote_code", full_disk)  # after the weights were written
    with pytest.raises(OSError, match="No space"):
        save_for_hub(model, out, code_dir=pkg, auto_map=AUTO_MAP, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in out.iterdir() if p.is_dir()] == []  # no staging folder left behind
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="hf_koopman"):
        save_for_hub(model, out, code_dir=pkg, auto_map=AUTO_MAP, overwrite=True)
    assert "notes.txt" in caplog.text and not (out / "notes.txt").exists()  # a replace says what it replaced


def test_an_interrupted_move_aside_puts_every_earlier_file_back(tmp_path, monkeypatch):
    import hf_koopman.models.publishing as publishing

    out = tmp_path / "export"
    out.mkdir()
    names = ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    for name in names:
        (out / name).write_text(f"earlier {name}")
    earlier = publishing._empty_output(out, True)
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C between two moves
        return real(src, dst)

    monkeypatch.setattr(publishing.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), publishing._replacing(out, earlier):
        pass
    assert sorted(p.name for p in out.iterdir()) == names
    assert all((out / name).read_text() == f"earlier {name}" for name in names)
