"""The public facade: every name in `hf_koopman.__all__` resolves, and importing registers our Auto classes."""

import importlib

import pytest

import hf_koopman


@pytest.mark.parametrize("name", [n for n in hf_koopman.__all__ if n != "__version__"])
def test_public_name_resolves(name):
    obj = getattr(hf_koopman, name)
    home = hf_koopman._LAZY[name]  # the name comes from the module the facade says defines it
    assert obj is getattr(importlib.import_module(home), name)


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        hf_koopman.not_a_public_name  # noqa: B018


def test_auto_classes_registered_on_import():
    from transformers import AutoConfig

    for model_type in ("reynet", "equivcnp"):
        assert AutoConfig.for_model(model_type).model_type == model_type


def test_static_analysers_see_every_public_name():
    """Type checkers read the `if TYPE_CHECKING:` imports, not the lazy `__getattr__`: each public name is imported
    there from the module `_LAZY` names, so `hf_koopman.profile` has its real signature for mypy / pyright."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(hf_koopman))
    block = next(node for node in tree.body
                 if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    imported = {alias.name: node.module
                for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert imported == hf_koopman._LAZY
