"""timm ``Eva`` backbones with rotary position embeddings: EVA-02, DINOv3 and a RoPE ViT.

Pruning is exact: the reduced model equals the unpatched one with the dropped tokens masked out
as keys from the pruning block on (each kept token keeps its own rotary embedding). What every
method does on these backbones (identity at zero reduction, batch independence, bf16) is in the
contract suite (:mod:`ppt_bench.testing`).
"""

from __future__ import annotations

import pytest
import torch

from ppt_bench.cli import main
from ppt_bench.core.errors import PatchError
from ppt_bench.methods import create_method
from ppt_bench.methods.patch import check_patchable


def masked_reference(
    model: torch.nn.Module, x: torch.Tensor, kept: torch.Tensor, block: int
) -> torch.Tensor:
    """The unpatched model's logits with the tokens not in ``kept [B, N]`` masked out as keys in
    every block after ``block`` (the pruning block's MLP still runs on all of them)."""
    with torch.inference_mode():
        tokens, rope = model._pos_embed(model.patch_embed(x))
        tokens = model.norm_pre(tokens)
        mask = kept[:, None, None, :]  # [B, 1, 1, N], True where a key is attended to
        for i, blk in enumerate(model.blocks):
            table = rope[i] if model.rope_mixed else rope
            tokens = blk(tokens, rope=table, attn_mask=mask if i > block else None)
        return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("key", ["eva02", "dinov3", "rope_vit", "rope_mixed"])
@pytest.mark.parametrize("name", ["prune", "topk", "random"])
def test_pruning_equals_masking_the_dropped_tokens(rope_model, images, logits, clone, key, name):
    ref, size = rope_model(key, global_pool="token")
    x = images(2, size, seed=5)
    block = 4
    model = create_method(name, r=16, locations=(block,)).apply(clone(ref), trace_source=True)
    got = logits(model, x)
    source = model.reduction_info.source  # [B, N - 16, N]: one original token per row
    assert source.shape[1] == source.shape[2] - 16
    kept = source.amax(dim=1) > 0  # [B, N]
    assert (kept.sum(dim=1) == source.shape[1]).all()
    expected = masked_reference(ref, x, kept, block)
    assert (got - expected).abs().max() < 1e-4
    # The kept set differs between the images, so the masks are not the same per image.
    assert not torch.equal(kept[0], kept[1]) or name == "random"


def test_positions_without_an_origin_follow_the_member_weighing_most():
    """The rule for a method that gives no origin (dct, third-party methods): a gathered token's
    rope is its own, a token holding several is its member standing for the most patches'."""
    from ppt_bench.methods.patch.rope import follow_positions

    member = torch.tensor([[[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 1]]]).float()
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0]]])
    pos = follow_positions(member, size, None, num_prefix=1)
    # Prefix slot 0, token 3 -> patch 2, the merge of 1, 2, 4 -> the largest member (2 -> patch 1).
    assert pos.tolist() == [[0, 2, 1]]


def test_unsupported_eva_variants_are_refused_in_one_line():
    import timm

    post_norm = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=56, use_post_norm=True
    )
    with pytest.raises(PatchError, match="EvaBlockPostNorm"):
        check_patchable(post_norm)
    dropping = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=56, patch_drop_rate=0.5
    )
    with pytest.raises(PatchError, match="patch dropout"):
        check_patchable(dropping)


def test_list_models_shows_rope(capsys):
    assert main(["list", "--models", "eva02_tiny*"]) == 0
    out = capsys.readouterr().out
    assert "rope" in out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("eva02_tiny_patch14_224 "))
    assert row.split()[1:] == ["12", "192", "256", "1", "yes"]


def test_macs_count_the_reduced_rope_models(rope_model, clone):
    from ppt_bench.measure.macs import measure_macs

    ref, size = rope_model("rope_vit")
    full = measure_macs(ref, (3, size, size), progress=False)
    reduced = create_method("tome", r=4).apply(clone(ref))
    cut = measure_macs(reduced, (3, size, size), progress=False)
    assert 0 < cut["gmacs"] < full["gmacs"] and 0 < cut["gmacs_fvcore"] < full["gmacs_fvcore"]


@pytest.mark.slow
def test_sweep_over_the_rope_models_writes_rows_and_a_report(rope_models, tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("PPT_BENCH_WARMUP", "1")
    monkeypatch.setenv("PPT_BENCH_ITERS", "1")
    out, report = tmp_path / "r.csv", tmp_path / "r.md"
    models = [name for name, _ in (rope_models[k] for k in ("eva02", "dinov3", "rope_vit"))]
    flags = [arg for m in models for arg in ("--model", m)]
    flags += ["--method", "baseline", "--method", "tome", "--method", "prune"]
    flags += ["--metrics", "accuracy,macs,throughput", "--data", "synthetic"]
    flags += ["--n-images", "2", "--batch-size", "2", "--workers", "0", "--quiet"]
    code = main(["run", *flags, "--out", str(out), "--report", str(report)])
    assert code == 0
    rows = pd.read_csv(out)
    assert rows["status"].eq("ok").all()
    runs = rows.groupby(["model", "method"])["metric"].agg(set)
    assert len(runs) == 9 and set(runs.index.get_level_values("model")) == set(models)
    for metrics in runs:  # generated images: agreement and KL against the unreduced model
        assert {"gmacs", "gmacs_fvcore", "agreement_top1", "kl", "samples_per_sec"} <= metrics
    agreement = rows[rows["metric"] == "agreement_top1"].set_index(["model", "method"])["value"]
    gmacs = rows[rows["metric"] == "gmacs"].set_index(["model", "method"])["value"]
    for model in models:
        assert agreement[model, "baseline"] == 100.0
        assert gmacs[model, "tome"] < gmacs[model, "baseline"]
        assert gmacs[model, "prune"] < gmacs[model, "baseline"]
    assert report.exists() and all(m in report.read_text() for m in models)


@pytest.mark.slow
def test_rope_tracking_compiles_without_graph_breaks(assert_one_graph, rope_model, images, clone):
    ref, size = rope_model("eva02")
    model = create_method("ppt", r=8).apply(clone(ref))
    assert_one_graph(model, images(2, size), grad_mode=torch.no_grad)
