"""MACs: torchprofile and fvcore agree, ppt paths match an analytic count, adaptive means."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import timm
import torch
from torchprofile import profile_macs

from ppt_bench.measure import macs
from ppt_bench.measure.macs import (
    forced_path,
    is_adaptive,
    macs_torchprofile,
    measure_macs,
    path_of,
)
from ppt_bench.methods import create_method

DEIT_S = "deit_small_patch16_224"
PPT = {"r": 50, "locations": (3, 6, 9)}


def analytic_macs(tokens_in: list[int], tokens_out: list[int], dim: int, classes: int) -> float:
    """Linear layers and attention products of a ViT, MLP ratio 4, patch 16 at 224 px.

    A block with ``N_in`` tokens before its reduction and ``N_out`` after costs
    ``4 N_in C^2`` (qkv, proj) + ``2 N_in^2 C`` (q k^T, attn v) + ``8 N_out C^2`` (MLP).
    """
    patches = (224 // 16) ** 2
    total = patches * 3 * 16 * 16 * dim + dim * classes  # patch embedding, head
    for n_in, n_out in zip(tokens_in, tokens_out, strict=True):
        total += 4 * n_in * dim**2 + 2 * n_in**2 * dim + 8 * n_out * dim**2
    return total


@pytest.fixture(scope="module")
def deit_s_figures(make_model) -> dict[str, dict]:
    """measure_macs of DeiT-S (baseline, ppt forced to prune / pool at every location) and the
    tokens entering and leaving each block."""
    figures = {"baseline": measure_macs(make_model(DEIT_S), (3, 224, 224))}
    figures["baseline"]["tokens"] = ([197] * 12, [197] * 12)
    for branch in ("prune", "pool"):
        model = create_method("ppt", **PPT, branch=branch).apply(make_model(DEIT_S))
        with torch.inference_mode():
            model(torch.randn(1, 3, 224, 224))
        out = list(model.reduction_info.tokens)
        figures[branch] = measure_macs(model, (3, 224, 224))
        figures[branch]["tokens"] = ([197, *out[:-1]], out)
    return figures


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:No handlers found")
def test_baseline_gmacs_match_torchprofile_on_the_unpatched_model(make_model, deit_s_figures):
    model = timm.create_model(DEIT_S).eval()
    direct = profile_macs(model, torch.randn(1, 3, 224, 224)) / 1e9
    assert deit_s_figures["baseline"]["gmacs"] == pytest.approx(direct, rel=1e-3)
    assert deit_s_figures["baseline"]["gmacs_single_input"] == pytest.approx(direct, rel=1e-3)
    assert deit_s_figures["baseline"]["param_count"] == pytest.approx(
        sum(p.numel() for p in model.parameters()) / 1e6
    )
    # The patched model with nothing to remove costs the same as timm's own.
    patched = create_method("ppt", **{**PPT, "r": 0}).apply(make_model(DEIT_S))
    patched_gmacs = macs_torchprofile(patched, torch.randn(1, 3, 224, 224)) / 1e9
    assert patched_gmacs == pytest.approx(direct, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["baseline", "prune", "pool"])
def test_fvcore_within_one_percent_of_torchprofile(deit_s_figures, name):
    fig = deit_s_figures[name]
    assert fig["gmacs_fvcore"] == pytest.approx(fig["gmacs"], rel=1e-2)


@pytest.mark.parametrize("name", ["baseline", "prune", "pool"])
def test_gmacs_match_the_analytic_count(deit_s_figures, name):
    tokens_in, tokens_out = deit_s_figures[name]["tokens"]
    if name != "baseline":
        assert tokens_out[3] == 147 and tokens_out[-1] == 49
        assert deit_s_figures[name]["gmacs"] < deit_s_figures["baseline"]["gmacs"]
    expected = analytic_macs(tokens_in, tokens_out, dim=384, classes=1000) / 1e9
    assert deit_s_figures[name]["gmacs"] == pytest.approx(expected, rel=1e-2)


def test_print_deit_small_figures(deit_s_figures):
    """The figures quoted in the README (run with ``-s`` or ``-rP`` to see them)."""
    for name in ("baseline", "prune", "pool"):
        fig = deit_s_figures[name]
        print(
            f"{DEIT_S} {name}: torchprofile {fig['gmacs']:.4f} GMACs, "
            f"fvcore {fig['gmacs_fvcore']:.4f} GMACs, params {fig['param_count']:.2f} M"
        )
    assert deit_s_figures["prune"]["gmacs"] < deit_s_figures["baseline"]["gmacs"]


def test_adaptive_gmacs_is_the_path_weighted_mean(make_model):
    model = create_method("ppt", r=20, locations=(1, 3), threshold=1e-4).apply(
        make_model("test_vit")
    )
    size = (3, 160, 160)
    assert is_adaptive(model)
    x = torch.randn(1, *size)
    cost = {}
    for path in [(False, False), (False, True), (True, False), (True, True)]:
        with forced_path(model, path):
            cost[path] = macs_torchprofile(model, x) / 1e9
    assert model.reduction_plan.method.branch == "auto"  # restored after forcing
    assert len(set(cost.values())) == len(cost)  # the paths really differ in cost
    counts = Counter({(False, False): 3, (True, True): 1, (True, False): 4})
    fig = measure_macs(model, size, counts, seed=5)
    mean = sum(cost[p] * n for p, n in counts.items()) / counts.total()
    assert fig["gmacs"] == pytest.approx(mean, rel=1e-9)
    single = path_of(model, torch.randn(1, *size, generator=torch.Generator().manual_seed(5)))
    assert fig["gmacs_single_input"] == pytest.approx(cost[single], rel=1e-9)
    assert fig["gmacs_fvcore"] == pytest.approx(fig["gmacs"], rel=2e-2)


def test_forced_branch_is_not_adaptive(make_model):
    model = create_method("ppt", locations=(1, 3), branch="prune").apply(make_model("test_vit"))
    assert not is_adaptive(model)
    assert not is_adaptive(make_model("test_vit"))


def test_the_path_bar_shows_only_with_progress(make_model, capsys, monkeypatch):
    monkeypatch.setattr(macs, "macs_torchprofile", lambda model, x: 1)
    monkeypatch.setattr(macs, "macs_fvcore", lambda model, x: 1)
    model = create_method("ppt", r=20, locations=(1, 3), threshold=1e-4).apply(
        make_model("test_vit")
    )
    counts = Counter({(False, False): 1, (True, True): 1})
    measure_macs(model, (3, 160, 160), counts, progress=False)
    assert "macs per path" not in capsys.readouterr().err
    measure_macs(model, (3, 160, 160), counts)
    assert "macs per path" in capsys.readouterr().err


def test_fvcore_import_gives_no_torch_jit_script_warning():
    code = (
        "import torch\n"
        "from ppt_bench.measure.macs import macs_fvcore\n"
        "print(macs_fvcore(torch.nn.Linear(4, 3), torch.randn(1, 4)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "12" and "torch.jit.script" not in proc.stderr, proc.stderr
