"""The methods on CUDA: same logits as on the definition, static enough for CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from ppt_bench.methods import create_method, list_methods

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def exact_matmuls():
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize("arch", ["deit_tiny", "deit3_small", "vit_reg", "deit_distilled"])
def test_zero_reduction_gives_unpatched_logits_on_cuda(make_model, images, logits, clone, arch):
    ref = make_model(arch).cuda()
    x = images(4, ref.patch_embed.img_size[0]).cuda()
    expected = logits(ref, x)
    for name in ("ppt", "prune", "merge", "tome", "topk", "random"):
        if name not in list_methods():
            continue
        model = create_method(name, r=0).apply(clone(ref))
        assert (logits(model, x) - expected).abs().max() < 1e-4, name


def test_fast_path_matches_explicit_attention_on_cuda(make_model, images, logits, clone):
    ref = make_model("deit_small_patch16_224").cuda()
    x = images(4, 224).cuda()
    for name in ("ppt", "prune", "merge"):
        fast = logits(create_method(name).apply(clone(ref)), x)
        explicit = logits(create_method(name).apply(clone(ref), attn_impl="explicit"), x)
        assert (fast - explicit).abs().max() < 1e-3, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_bias_runs_on_the_flash_kernel_and_equals_the_mask(
    make_model, images, logits, clone, dtype
):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ref = make_model("deit_small_patch16_224").cuda()
    x = images(8, 224).cuda()
    for name in ("ppt", "merge", "tome"):
        with torch.autocast("cuda", dtype=dtype):
            masked = logits(create_method(name).apply(clone(ref)), x)
            folded_model = create_method(name).apply(clone(ref), attn_impl="fold")
            # Flash attention takes no mask: this raises unless the bias rides in q and k.
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                folded = logits(folded_model, x)
        assert (folded.float() - masked.float()).abs().max() < 5e-2, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_batch_under_autocast_is_batch_independent(make_model, images, logits, clone, dtype):
    ref = make_model("deit_small_patch16_224").cuda()
    x = images(8, 224, seed=3).cuda()
    x[:4] *= 4
    probe = create_method("ppt", threshold=0).apply(clone(ref))
    logits(probe, x)
    var = probe.reduction_info.stats["score_var"][:, 0].sort().values
    threshold = float((var[3] + var[4]) / 2)
    model = create_method("ppt", threshold=threshold).apply(clone(ref))
    with torch.autocast("cuda", dtype=dtype):
        batch = logits(model, x)
        pooled = model.reduction_info.stats["pooled"]
        assert pooled[:, 0].any() and not pooled[:, 0].all()
        for i in range(len(x)):
            alone = logits(model, x[i : i + 1])
            assert torch.equal(model.reduction_info.stats["pooled"][0], pooled[i])
            assert (alone[0].float() - batch[i].float()).abs().max() < 5e-2
    assert batch.dtype == dtype


@pytest.mark.parametrize(
    "name, attn_impl",
    [(m, "fast") for m in ("ppt", "prune", "merge", "tome", "evit", "topk", "random")]
    + [("ppt", "fold"), ("tome", "fold")],
)
def test_methods_capture_in_a_cuda_graph(make_model, images, cuda_graph_replay, name, attn_impl):
    """Capture fails on any host synchronisation or CPU-GPU copy inside the forward."""
    if name not in list_methods():
        pytest.skip(f"{name} is not registered")
    model = create_method(name).apply(
        make_model("deit_small_patch16_224").cuda(), attn_impl=attn_impl
    )
    x = images(8, 224).cuda()
    eager, out = cuda_graph_replay(model, x)
    assert (out.float() - eager.float()).abs().max() < 5e-2


def test_compiled_ppt_on_cuda_matches_eager(make_model, images, logits):
    model = create_method("ppt", threshold=1e-4).apply(make_model("deit_small_patch16_224").cuda())
    x = images(8, 224).cuda()
    eager = logits(model, x)
    torch._dynamo.reset()
    compiled = logits(torch.compile(model, fullgraph=True), x)
    assert (compiled - eager).abs().max() < 1e-3


@pytest.mark.parametrize("mode", ["none", "cudagraph"])
def test_evaluate_times_eager_and_cuda_graph_replays(mode):
    from ppt_bench.engine.evaluate import evaluate
    from ppt_bench.results.spec import RunSpec

    spec = RunSpec(
        model="deit_tiny_patch16_224",
        method="ppt",
        batch_size=8,
        device="cuda",
        dtype="bf16",
        compile=mode,
        metrics=("throughput", "latency", "memory"),
    )
    metrics = {row["metric"]: row["value"] for row in evaluate(spec)}
    assert metrics["samples_per_sec"] > 0 and metrics["peak_mem_mb"] > 0
    assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p90_ms"]
