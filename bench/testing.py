"""The contract every registered method meets, as pytest tests over ``list_methods()``.

ppt-bench runs it on its own methods (``tests/test_contract.py``); a plugin's repository runs it
on its methods the same way, with one line in a test module::

    from ppt_bench.testing import *  # noqa: F403

Each property is one test function parametrised over the registered methods (entry-point
plugins included), or over the ones whose names match ``PPT_BENCH_CONTRACT_METHODS`` (a
shell-style pattern, default ``*``). A method takes part through what it declares: its
:class:`~ppt_bench.methods.contract.Examples` (a setting that reduces, the values only its own
rules refuse, a setting that reduces nothing where its budget knob cannot say it), its budget
knob, its parameters' types, family and plot style, and what it needs of a model (a class
token, the explicit attention map). The properties:

- identity: the setting that reduces nothing (declared, or the budget knob at its end that
  removes nothing) gives the unpatched logits, with each attention implementation of the patch
  (fused, folded bias, explicit) on the plain and LayerScale backbones and the fused one on
  every other backbone family the patch supports (registers, qk-norm, distilled, global average
  pooling without a class token, rotary ``Eva`` with and without registers, mixed rope); a
  method that needs a class token refuses a model without one in one line;
- token counts: the reducing setting removes tokens, never adds any back, keeps the prefix
  tokens, and its reported counts are the tokens that leave the last block;
- batch independence: a mixed batch gives each image what it gives alone;
- bf16 runs and keeps the dtype; ``torch.compile`` traces the forward as one graph; a CUDA graph
  captures it (GPU only);
- invalid parameters are refused with one line naming the parameter: an unknown name, the
  values a parameter of its type cannot take (``bool``, ``int``, ``float``, block lists) and the
  values the method declares;
- a MAC budget resolves to the knob value that meets it;
- every method has its own colour and a marker of its family in the plots;
- a sweep of the method writes its rows and a report row.

The backbones are small random-weight timm models (36 to 64 patch tokens, 12 blocks, 192 wide),
so the suite runs on a 2-core CPU in a few minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from functools import cache

import pytest
import timm
import torch

from ppt_bench.cli import main
from ppt_bench.core.errors import MethodError, PatchError
from ppt_bench.measure.macs import measure_macs
from ppt_bench.methods import create_method, get_method_class, is_patched, list_methods
from ppt_bench.methods.contract import FAMILIES, Knob
from ppt_bench.methods.patch import vit_info
from ppt_bench.methods.patch.attention import ATTN_IMPLS
from ppt_bench.results.plots import FAMILY_MARKERS, style
from ppt_bench.results.records import read_results
from ppt_bench.sweeps.budget import Budget, ModelCost, resolve_macs

__all__ = [
    "BACKBONES",
    "test_a_budget_resolves_to_the_nearest_knob_value",
    "test_a_sweep_writes_rows_and_a_report_row",
    "test_bf16_runs_and_keeps_the_dtype",
    "test_captures_in_a_cuda_graph",
    "test_compiles_without_graph_breaks",
    "test_declares_what_the_harness_needs",
    "test_has_its_own_plot_style",
    "test_invalid_parameters_are_refused",
    "test_mixed_batch_equals_each_image_alone",
    "test_reducing_setting_removes_tokens_and_keeps_the_prefix",
    "test_zero_reduction_gives_the_unpatched_logits",
]

# key -> (timm name, keyword arguments): one of each structure the patch must keep, 192 wide.
_TINY = {"embed_dim": 192, "num_heads": 3}
BACKBONES = {
    "plain": ("deit_tiny_patch16_224", {"img_size": 128}),
    "layerscale": ("deit3_small_patch16_224", {"img_size": 96, **_TINY}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 84, **_TINY}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True, "img_size": 96}),
    "scale_norm": (
        "vit_tiny_patch16_224",
        {"scale_attn_norm": True, "scale_mlp_norm": True, "img_size": 96},
    ),
    "distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 96}),
    "gap": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg", "img_size": 96}),
    "rope": ("eva02_tiny_patch14_224", {"img_size": 112}),
    "rope_registers": ("vit_small_patch16_dinov3", {"img_size": 96, **_TINY}),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {"img_size": 96, **_TINY}),
}
# The backbones each attention implementation of the patch runs on in the identity test (the
# fused one everywhere; the folded bias and explicit attention on the plain and LayerScale ones).
ALL_IMPLS = ("plain", "layerscale")
# Models a MAC budget is resolved on (at their own input size, as a sweep resolves it), with the
# shares of the unreduced model's MACs.
BUDGETS = {"deit_tiny_patch16_224": (0.85, 0.55), "eva02_tiny_patch14_224": (0.7,)}


def _methods() -> list[str]:
    return list_methods(os.environ.get("PPT_BENCH_CONTRACT_METHODS", "*"))


METHODS = _methods()
REDUCING = [m for m in METHODS if get_method_class(m).examples.reducing is not None]


def spread_weights(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its LayerScale and norm weights spread out, in place: timm initialises
    LayerScale at 1e-5 or so, which would make every block almost the identity and hide
    mistakes."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "gamma", None), torch.Tensor):
                module.gamma.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.1, 0.1)
    return model


@cache
def backbone(key: str, seed: int = 0) -> torch.nn.Module:
    """The ``BACKBONES`` model ``key`` with random weights (:func:`spread_weights`), in eval
    mode."""
    name, kwargs = BACKBONES[key]
    torch.manual_seed(seed)
    return spread_weights(
        timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    )


def _images(model: torch.nn.Module, n: int, seed: int = 1) -> torch.Tensor:
    size = model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, *size, generator=g)
    x[0] *= 3  # images that differ in scale choose different tokens
    return x


def _run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _patched(name: str, key: str, params: dict, **apply) -> torch.nn.Module:
    return create_method(name, **params).apply(copy.deepcopy(backbone(key)), **apply)


def identity(name: str, key: str) -> dict:
    """The method's setting that reduces nothing on backbone ``key``: its declared
    ``Examples.identity``, or its budget knob at the end that removes nothing."""
    cls = get_method_class(name)
    if cls.examples.identity is not None:
        return dict(cls.examples.identity)
    knob = create_method(name).budget_knob(vit_info(backbone(key)))
    if not isinstance(knob, Knob):  # the baseline
        return {}
    end = knob.low if knob.more_at_high else knob.high
    return {knob.param: int(end) if knob.kind == "int" else end}


def cuda_graph_replay(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` eagerly and replayed from a CUDA graph capture, in bf16 autocast. Capture
    fails on any host synchronisation or CPU-GPU copy inside the forward."""
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        graph.replay()
        torch.cuda.synchronize()
    return eager, out


def _fits(name: str, key: str) -> bool:
    """Whether the method can reduce this backbone (one that needs a class token cannot reduce
    a model without one)."""
    return not (get_method_class(name).needs_class_token() and key == "gap")


# -- what a method declares -------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_declares_what_the_harness_needs(name):
    cls = get_method_class(name)
    method = create_method(name)  # the defaults are valid
    assert method.name == name
    assert cls.description and "\n" not in cls.description, "a one-line description"
    assert cls.family in FAMILIES
    assert all(cls.parameter_help().values()), f"document every parameter: {cls.parameter_help()}"
    if name != "baseline":
        assert cls.examples.reducing is not None, "Examples.reducing: a setting that reduces"
    for params in (cls.examples.identity or {}, cls.examples.reducing or {}):
        create_method(name, **params)


@pytest.mark.parametrize("name", METHODS)
def test_has_its_own_plot_style(name):
    own = style(name)
    assert own["family"] == get_method_class(name).family
    if name != "baseline":
        assert own["marker"] in FAMILY_MARKERS[own["family"]]
    pairs = [(s["color"], s["marker"]) for s in map(style, list_methods())]
    assert pairs.count((own["color"], own["marker"])) == 1, f"{name} shares its style"
    assert style(name) == own  # stable


# Values each parameter of a plain type must refuse: its message names the parameter.
_REFUSED = {
    bool: ("yes",),
    int: (-1, 2.5, True),
    float: (math.nan, -1.0, "0.5"),
    tuple[int, ...]: ([1, 1], [0, -1]),
}


def _invalid_cases() -> list:
    """Per method: an unknown parameter, the refused values of each parameter of a plain type
    (:data:`_REFUSED`, every method's checks alike), and the method's own ``Examples.invalid``
    (its ranges, choices and the rules of its other types). Each message names the parameter."""
    cases = []
    for name in METHODS:
        cls = get_method_class(name)
        cases.append((name, {"no_such_parameter": 1}, "has no parameter 'no_such_parameter'"))
        hints = typing.get_type_hints(cls)
        refused = {f.name: _REFUSED.get(hints[f.name], ()) for f in dataclasses.fields(cls)}
        for param, values in cls.examples.invalid.items():
            refused[param] = (*refused.get(param, ()), *values)
        cases += [
            (name, {param: value}, rf"\b{param}\b")
            for param, values in refused.items()
            for value in values
        ]
    return cases


@pytest.mark.parametrize(("name", "params", "match"), _invalid_cases())
def test_invalid_parameters_are_refused(name, params, match):
    with pytest.raises(MethodError, match=match) as err:
        create_method(name, **params)
    assert "\n" not in str(err.value)


# -- what the patched model does --------------------------------------------------------------


@pytest.mark.parametrize("key", list(BACKBONES))
@pytest.mark.parametrize("name", METHODS)
def test_zero_reduction_gives_the_unpatched_logits(name, key):
    if not _fits(name, key):
        with pytest.raises((MethodError, PatchError), match="class token") as err:
            _patched(name, key, identity(name, "plain"))
        assert "\n" not in str(err.value)
        return
    ref = backbone(key)
    x = _images(ref, 2)
    expected = _run(ref, x)
    params = identity(name, key)
    for impl in ATTN_IMPLS if key in ALL_IMPLS else ("fast",):
        model = _patched(name, key, params, attn_impl=impl)
        diff = (_run(model, x) - expected).abs().max().item()
        assert diff < 1e-5, f"{name} {params} ({impl}) on {key}: max abs diff {diff}"
    if is_patched(model):  # the baseline leaves the model as it is
        n = ref.patch_embed.num_patches + ref.num_prefix_tokens
        assert model.reduction_info.tokens == (n,) * len(ref.blocks)


@pytest.mark.parametrize("key", list(BACKBONES))
@pytest.mark.parametrize("name", REDUCING)
def test_reducing_setting_removes_tokens_and_keeps_the_prefix(name, key):
    if not _fits(name, key):
        pytest.skip(f"{name} needs a class token")
    ref = backbone(key)
    P, n = ref.num_prefix_tokens, ref.patch_embed.num_patches + ref.num_prefix_tokens
    params = get_method_class(name).examples.reducing
    model = _patched(name, key, params, trace_source=True)
    x = _images(ref, 2)
    with torch.inference_mode():
        features = model.forward_features(x)
    tokens = model.reduction_info.tokens
    assert len(tokens) == len(ref.blocks) and tokens[-1] == features.shape[1]
    assert all(a >= b for a, b in zip((n, *tokens), tokens, strict=False)), tokens
    assert tokens[-1] < n, f"{name} {params} removed no token on {key}: {tokens}"
    source = model.reduction_info.source  # [B, N_final, N0]
    assert source.shape == (2, tokens[-1], n)
    eye = torch.eye(P, n).expand(2, -1, -1)
    assert torch.equal(source[:, :P], eye), "prefix tokens are carried, never reduced"


@pytest.mark.parametrize("key", ["plain", "rope"])
@pytest.mark.parametrize("name", REDUCING)
def test_mixed_batch_equals_each_image_alone(name, key):
    cls = get_method_class(name)
    if not cls.batch_independent:
        pytest.skip(f"{name} depends on an image's place in the batch by definition")
    ref = backbone(key)
    model = _patched(name, key, cls.examples.reducing)
    x = _images(ref, 3, seed=4)
    batch = _run(model, x)
    assert model.reduction_info.tokens[-1] < ref.patch_embed.num_patches + ref.num_prefix_tokens
    for i in range(len(x)):
        alone = _run(model, x[i : i + 1])
        diff = (alone[0] - batch[i]).abs().max().item()
        assert diff < 1e-4, f"image {i}: max abs diff {diff}"


@pytest.mark.parametrize("name", REDUCING)
def test_bf16_runs_and_keeps_the_dtype(name):
    ref = copy.deepcopy(backbone("plain")).to(torch.bfloat16)
    model = create_method(name, **get_method_class(name).examples.reducing).apply(ref)
    out = _run(model, _images(backbone("plain"), 2).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_compiles_without_graph_breaks(name):
    params = get_method_class(name).examples.reducing or {}
    model = _patched(name, "plain", params)
    torch._dynamo.reset()
    with torch.inference_mode():
        explain = torch._dynamo.explain(model)(_images(backbone("plain"), 2))
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", METHODS)
def test_captures_in_a_cuda_graph(name):
    params = get_method_class(name).examples.reducing or {}
    model = _patched(name, "plain", params).cuda()
    eager, out = cuda_graph_replay(model, _images(backbone("plain"), 2).cuda())
    assert (out.float() - eager.float()).abs().max() < 1e-2


# -- budgets, plots and reports ---------------------------------------------------------------


@cache
def _cost(model_name: str) -> ModelCost:
    return ModelCost(model_name)


def _nearest_proof(name: str, cost: ModelCost, res, target: float, knob: Knob) -> None:
    """A resolution that misses its budget by more than 1.5% must be the nearest allowed value:
    no other value within the budget costs more."""
    assert knob.kind in ("int", "choice"), (name, res)
    others = [v for v in knob.values() if v != res.value]
    if knob.kind == "int":  # by monotony, the next value toward less reduction
        step = -1 if knob.more_at_high else 1
        others = [v for v in (res.value + step,) if knob.low <= v <= knob.high]
    for other in others:
        other_gmacs = cost.count(create_method(name, **{knob.param: other}))
        assert not (res.gmacs < other_gmacs <= target), (name, other, other_gmacs)


@pytest.mark.parametrize("model_name", list(BUDGETS))
@pytest.mark.parametrize("name", [m for m in METHODS if m != "baseline"])
def test_a_budget_resolves_to_the_nearest_knob_value(name, model_name):
    cost = _cost(model_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the counts are small; two threads only spin on a shared CPU
    try:
        knob = create_method(name).budget_knob(cost.info)
        if isinstance(knob, Knob):  # every value of the knob is a valid setting for the model
            for value in knob.values()[:2] + knob.values()[-2:] or (knob.low, knob.high):
                create_method(name, **{knob.param: value}).check_fits(cost.info)
        else:  # a method without a knob for this model says why in one line
            assert isinstance(knob, str) and "\n" not in knob, knob
        for share in BUDGETS[model_name]:
            budget = Budget("macs", share)
            target = budget.target_gmacs(cost.base_gmacs)
            res = resolve_macs(cost, name, {}, budget)
            if res.skipped:  # a knob that does not apply to this model says why in one line
                assert res.reason and "\n" not in res.reason, res
                continue
            method = create_method(name, **res.params)
            gmacs = measure_macs(method.apply(cost._fresh()), (3, *cost.input_size))["gmacs"]
            # The row's figure, never above the budget (an adaptive method's mean path costs at
            # most its costlier path), and as near it as the knob allows.
            assert gmacs <= res.gmacs + 1e-9 <= target + 1e-9, (share, res)
            assert math.isclose(res.share, res.gmacs / cost.base_gmacs)
            if abs(gmacs - target) > 0.015 * target:
                _nearest_proof(name, cost, res, target, method.budget_knob(cost.info))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [m for m in REDUCING if m != "baseline"])
def test_a_sweep_writes_rows_and_a_report_row(name, tmp_path):
    """The digits ViT (64 patch tokens, 12 blocks) on synthetic images, paired with its
    baseline: every row ``ok``, the reduction in the token rows, the method in the report."""
    params = get_method_class(name).examples.reducing
    csv, md = tmp_path / "r.csv", tmp_path / "r.md"
    args = ["run", "--model", "vit_digits_patch4_32", "--method", name, "--data", "synthetic"]
    for key, value in params.items():
        args += ["--param", f"{key}={_toml(value)}"]
    args += ["--n-images", "2", "--batch-size", "2", "--workers", "0", "--metrics", "tokens"]
    assert main([*args, "--out", str(csv), "--report", str(md), "--quiet"]) == 0
    df = read_results(csv)
    assert set(df["status"]) == {"ok"} and set(df["method"]) == {"baseline", name}
    rows = df[df["method"] == name].set_index("metric")["value"]
    assert rows["tokens_block_11"] < 65, rows
    assert any(line.startswith(f"| {name} ") for line in md.read_text().splitlines())


def _toml(value) -> str:
    """A parameter value as ``--param`` reads it (TOML)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return repr(value)
