"""The method registry and parameter validation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ppt_bench.core import registry as plugin_registry
from ppt_bench.core.errors import MethodError, PatchError
from ppt_bench.methods import Method, create_method, list_methods, method_params, register_method
from ppt_bench.methods import registry as registry_module


def test_core_methods_are_listed():
    assert {"baseline", "ppt", "prune", "merge"} <= set(list_methods())
    assert list_methods("pp*") == ["ppt"]


def test_defaults_follow_the_paper():
    ppt = create_method("ppt")
    assert (ppt.r, ppt.locations, ppt.threshold, ppt.prop_attn) == (50, (3, 6, 9), 7e-5, True)
    assert method_params("merge")["locations"] == (3, 6, 9)


def test_unknown_method_suggests_the_closest():
    with pytest.raises(
        MethodError, match=r"unknown method 'pruned'.*Did you mean 'prune'.*baseline"
    ):
        create_method("pruned")


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(MethodError, match=r"no parameter 'rr'.*valid parameters: r, locations"):
        create_method("ppt", rr=3)


def test_location_outside_the_model_is_rejected_at_apply(make_model):
    with pytest.raises(
        MethodError, match=r"outside the model's blocks: valid locations are 0 to 11"
    ):
        create_method("ppt", locations=(3, 12)).apply(make_model("deit_tiny"))


def test_unpatchable_models_say_why(make_model):
    with pytest.raises(PatchError, match="not a timm VisionTransformer"):
        create_method("ppt").apply(torch.nn.Linear(3, 3))
    model = make_model("deit_tiny")
    model.blocks[2] = torch.nn.Identity()
    with pytest.raises(PatchError, match=r"block 2 \(Identity\)"):
        create_method("merge").apply(model)


def test_a_patched_model_is_patched_again_only_when_asked(make_model):
    """A second method on a patched model would silently replace the first: refused in one
    line, unless ``replace=True`` asks for it; the replaced model is the one the second method
    makes of a fresh model."""
    model = create_method("merge", r=4).apply(make_model("deit_tiny"))
    prune = create_method("prune", r=4)
    with pytest.raises(PatchError) as err:
        prune.apply(model)
    assert str(err.value) == (
        "the model already reduces tokens with merge: pass a fresh model (a copy made before the "
        "first patch), or replace=True to reduce with prune instead"
    )
    assert model.reduction_plan.method == create_method("merge", r=4)
    assert prune.apply(model, replace=True) is model
    assert model.reduction_plan.method == prune
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), prune.apply(make_model("deit_tiny"))(x))


def test_the_baseline_refuses_a_patched_model_too(make_model):
    """The baseline returns an unpatched model as it is, but a patched one would keep reducing:
    refused like any method, or with ``replace=True`` patched to reduce nothing."""
    model = create_method("merge", r=4).apply(make_model("deit_tiny"))
    with pytest.raises(PatchError, match="already reduces tokens with merge"):
        create_method("baseline").apply(model)
    create_method("baseline").apply(model, replace=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), make_model("deit_tiny")(x))


def test_ppt_branches_follow_their_locations_in_order():
    """A branch per location is matched to the locations in the order given: unsorted
    locations would silently move each branch to another block, so they are refused."""
    with pytest.raises(MethodError, match="give the locations in increasing order"):
        create_method("ppt", locations=[9, 3], branch=["prune", "pool"])
    assert create_method("ppt", locations=[3, 9], branch=["prune", "pool"]).branch == (
        "prune",
        "pool",
    )


def test_duplicate_registration_is_an_error():
    with pytest.raises(MethodError, match="already registered"):

        @register_method("ppt")
        @dataclass(frozen=True)
        class Other(Method):
            pass


def test_third_party_methods_load_from_entry_points(monkeypatch):
    class EP:
        name = "shuffle_free"
        value = "tests_plugin_module:Plugin"

    import sys
    import types

    module = types.ModuleType("tests_plugin_module")

    @dataclass(frozen=True)
    class Plugin(Method):
        description = "a plugin"

    module.Plugin = Plugin
    monkeypatch.setitem(sys.modules, "tests_plugin_module", module)
    monkeypatch.setattr(registry_module, "METHODS", registry_module.METHODS.fresh())
    monkeypatch.setattr(plugin_registry, "entry_points", lambda group: [EP] if group else [])
    assert "shuffle_free" in list_methods()
    method = create_method("shuffle_free")
    assert isinstance(method, Plugin) and Plugin.name == "shuffle_free"
