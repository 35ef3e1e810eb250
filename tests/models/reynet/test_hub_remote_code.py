"""A saved ReyNet folder loads as Hub remote code for users without hf_koopman: from a path and, offline, by repo id."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

from hf_koopman.models.publishing import render_model_card, save_for_hub
from hf_koopman.testing_utils import populate_offline_hub_cache, run_without_hf_koopman
from hf_koopman.models.reynet import AUTO_MAP, ReyNetConfig, ReyNetForEquivariantRegression

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_remote_code_without_hf_koopman(tmp_path):
    torch.manual_seed(0)
    model = ReyNetForEquivariantRegression(
        ReyNetConfig(in_channels=2, phi_hidden_sizes=[8], channel_hidden_sizes=[6], num_targets=2)
    ).eval()
    folder = save_for_hub(
        model,
        tmp_path / "reynet-tiny",
        card=render_model_card(
            REPO_ROOT / "model_cards" / "reynet.md",
            card_data={"license": "apache-2.0", "tags": ["reynet"], "model_name": "reynet-tiny"},
            eval_results=[{"task_type": "tabular-regression", "dataset_type": "synthetic",
                           "dataset_name": "synthetic", "metric_type": "mse", "metric_value": 0.1}],
            template_vars={"model_name": "reynet-tiny", "repo_id": "acme/reynet-tiny", "description": "test",
                           "in_channels": 2, "head_class": "ReyNetForEquivariantRegression", "load_snippet": "...",
                           "usage": "...",
                           "training": "none", "results": "none", "caveats": ""},
        ),
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "reynet"
    # every remote-code file imports only torch / transformers / same-folder modules
    for py in folder.glob("*.py"):
        for line in py.read_text().splitlines():
            if line.startswith(("import ", "from ")) and not line.startswith("from __future__"):
                root = line.split()[1].split(".")[0]
                assert root in {"", "torch", "transformers", "itertools", "math", "collections", "dataclasses"}, line
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "model-index" in card

    cache = tmp_path / "hub"
    populate_offline_hub_cache(folder, "acme/reynet-tiny", cache)
    X = torch.rand(2, 2, 5, 5)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    torch.save({"X": X, "mask": mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected_base = model.reynet(X, node_mask=mask).last_hidden_state
        expected_head = model(X, node_mask=mask).logits
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel, AutoConfig
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        try:
            import hf_koopman
            raise SystemExit("hf_koopman must not be importable here")
        except ImportError:
            pass
        data = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        out = {{}}
        for source in ({str(folder)!r}, "acme/reynet-tiny"):
            base = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            assert type(base).__name__ == "ReyNetModel", type(base)
            head_cls = get_class_from_dynamic_module("modeling_reynet.ReyNetForEquivariantRegression", source)
            head = head_cls.from_pretrained(source).eval()
            with torch.no_grad():
                out[source] = (base(data["X"], node_mask=data["mask"]).last_hidden_state,
                               head(data["X"], node_mask=data["mask"]).logits)
        torch.save(out, {str(tmp_path / 'outputs.pt')!r})
        print("ok")
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    proc = run_without_hf_koopman(code, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for source, (base_out, head_out) in outputs.items():
        torch.testing.assert_close(base_out, expected_base, msg=f"base model from {source}")
        torch.testing.assert_close(head_out, expected_head, msg=f"head from {source}")
