"""Hub readiness: complete auto_map, remote code that runs without hf_koopman, offline load by repo id, model card,
and the training script's quick mode (CI smoke test)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_koopman.models import equivcnp as eq
from hf_koopman.models.publishing import render_model_card, save_for_hub
from hf_koopman.testing_utils import populate_offline_hub_cache, run_without_hf_koopman

REPO = Path(__file__).resolve().parents[3]
CODE_DIR = Path(eq.__file__).parent


def test_remote_code_is_self_contained():
    """The folder doubles as Hub remote code: only torch/transformers/same-folder imports."""
    import ast

    for path in CODE_DIR.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must be a file of this folder
                    assert (CODE_DIR / f"{node.module}.py").is_file(), (path.name, node.module)
                    continue
                names = [node.module.split(".")[0]]
            else:
                continue
            assert set(names) <= {"torch", "transformers", "__future__", "math", "logging", "dataclasses", "collections", "typing"}, (path.name, names)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    models = {
        "equivcnp": eq.EquivCNPModel(eq.EquivCNPConfig(group="SE2", hidden_size=8, num_layers=1, encoder_length_scale=0.3)),
        "convcnp": eq.ConvCNPModel(eq.ConvCNPConfig(channels=[4])),
        "cnp": eq.CNPModel(eq.CNPConfig(hidden_size=8)),
    }
    gen = torch.Generator().manual_seed(1)
    expected = {}
    for name, model in models.items():
        model.eval()
        x_dim = model.config.x_dim
        cx, cy, tx = torch.rand(1, 6, x_dim, generator=gen), torch.randn(1, 6, 1, generator=gen), torch.rand(1, 9, x_dim, generator=gen)
        with torch.no_grad():
            out = model(cx, cy, tx)
        expected.update({f"{name}.cx": cx, f"{name}.cy": cy, f"{name}.tx": tx, f"{name}.mean": out.mean, f"{name}.std": out.stddev})
        card = render_model_card(
            REPO / "model_cards" / "equivcnp.md",
            card_data={"license": "apache-2.0", "tags": ["neural-process"], "model_name": f"tiny-{name}", "metrics": ["log_likelihood"]},
            eval_results=[{"task_type": "regression", "dataset_type": "gp-rbf", "dataset_name": "gp-rbf",
                           "metric_type": "log_likelihood", "metric_value": 0.123}],
            template_vars={"model_name": f"tiny-{name}", "repo_id": f"acme/tiny-{name}", "description": "test", "class_name":
                           type(model).__name__, "config_json": "{}", "example": "pass", "training": "none", "results":
                           "LL 0.123", "quick": True, "protocol": "{}", "model_intro": "intro",
                           "is_equivcnp": name == "equivcnp"},
        )
        save_for_hub(model, root / name, card=card)  # code and auto_map default to hf_koopman's for the model type
    save_file({k: v.contiguous() for k, v in expected.items()}, str(root / "expected.safetensors"))
    return root


def test_published_folder_layout(published):
    for name, auto_map in eq.AUTO_MAPS.items():
        folder = published / name
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["auto_map"] == auto_map and cfg["model_type"] == name
        for ref in auto_map.values():
            assert (folder / (ref.split(".")[0] + ".py")).is_file()
        assert not (folder / "__init__.py").exists() and (folder / "model.safetensors").is_file()
        card = (folder / "README.md").read_text()
        assert "library_name: transformers" in card and "0.123" in card and "Smoke-test checkpoint" in card


def test_remote_code_without_hf_koopman_and_offline_hub_cache(published, tmp_path):
    cache = tmp_path / "hub-cache"
    for name in eq.AUTO_MAPS:
        populate_offline_hub_cache(published / name, f"acme/tiny-{name}", cache)
    code = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel
        exp = load_file({str(published / 'expected.safetensors')!r})
        for name in ("equivcnp", "convcnp", "cnp"):
            for source in ({str(published)!r} + "/" + name, "acme/tiny-" + name):
                model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
                assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
                with torch.no_grad():
                    out = model(exp[name + ".cx"], exp[name + ".cy"], exp[name + ".tx"])
                torch.testing.assert_close(out.mean, exp[name + ".mean"], atol=0, rtol=0)
                torch.testing.assert_close(out.stddev, exp[name + ".std"], atol=0, rtol=0)
        import sys
        assert "hf_koopman" not in {{m.split(".")[0] for m, v in sys.modules.items() if v is not None}}
        print("ok")
        """
    )
    proc = run_without_hf_koopman(code, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


CNP_CHECKPOINTS = sorted(p for p in (REPO / "checkpoints").glob("*cnp*") if p.is_dir())


@pytest.mark.parametrize("folder", CNP_CHECKPOINTS, ids=lambda p: p.name)
def test_checkpoint_card_metadata_matches_the_folder(folder):
    """The card's configuration block is the shipped config.json; no `custom_code` tag on a folder without code; no
    Hub dataset ids (or model-index, which needs one) for data that are not on the Hub."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    block = card.text.split("Configuration (`config.json`):\n\n```json\n", 1)[1].split("```", 1)[0]
    assert block.strip() == (folder / "config.json").read_text().strip()
    meta = card.data.to_dict()
    assert "custom_code" not in meta["tags"] and not list(folder.glob("*.py"))
    assert "datasets" not in meta and "model-index" not in meta
    if folder.name.startswith("equivcnp-"):
        assert "*exactly* equivariant" not in card.text
        assert "up to the truncation of its neighbourhoods" in card.text
        assert "Measured on the usage example" in card.text


def _task(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A task with target points far from the context: 1-D curves on [-4, 4] from context on [-2, 2]; images on a
    12 x 12 grid of [-1, 1]^2 with 40 context pixels."""
    gen = torch.Generator().manual_seed(0)
    if "image" not in name:
        context_x = torch.rand(2, 20, 1, generator=gen) * 4 - 2
        return context_x, torch.sin(3 * context_x), torch.linspace(-4, 4, 100)[None, :, None].expand(2, -1, -1)
    axis = torch.linspace(-1, 1, 12)
    pixels = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(1, -1, 2)
    context_x = pixels[:, torch.randperm(144, generator=gen)[:40]]
    return context_x, torch.rand(1, 40, 1, generator=gen), pixels


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.01), (torch.bfloat16, 0.05)], ids=str)
@pytest.mark.parametrize("name", [p.name for p in CNP_CHECKPOINTS])
def test_half_precision_checkpoints_predict_what_float32_predicts(name, dtype, tolerance):
    """Half-precision weights give float32's prediction on the same (rounded) inputs to within their rounding:
    coordinates, neighbourhoods and the encoder's density ratio run in float32 (in float16 the ratio of two
    underflowing sums is noise, and bfloat16 resolves a coordinate of 4 only to the grid's spacing). Measured over the
    shipped checkpoints: at most 0.005 (float16) and 0.037 (bfloat16); against float32 on the unrounded inputs, whose
    rounding the model cannot undo, 0.011 and 0.11 (docs/guides/models.md)."""
    from transformers import AutoModel

    context_x, context_y, target_x = (t.to(dtype) for t in _task(name))
    reference = AutoModel.from_pretrained(REPO / "checkpoints" / name).eval()
    model = AutoModel.from_pretrained(REPO / "checkpoints" / name, dtype=dtype).eval()
    with torch.no_grad():
        want = reference(context_x.float(), context_y.float(), target_x.float())
        out = model(context_x, context_y, target_x)
    assert out.mean.dtype == dtype and out.stddev.dtype == dtype
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.stddev).all()
    assert (out.mean.float() - want.mean).abs().max() < tolerance
    assert (out.stddev.float() - want.stddev).abs().max() < tolerance
