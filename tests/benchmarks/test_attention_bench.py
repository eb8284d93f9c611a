"""Micro-benchmarks of one attention block with proportional attention (``tox -e bench``).

DeiT-S after ppt's first reduction (147 tokens, 6 heads of 64) with merged-token sizes: the
``log(size)`` bias as an additive SDPA mask (``fast``) against the bias carried in an extra
query/key channel (``fold``), and the unbiased attention as the floor. On CUDA the batch is 256
under bf16 autocast (the issue-7 setting); on a CPU it is kept small. Compare the groups' times
side by side within one run.
"""

from __future__ import annotations

import pytest
import timm
import torch

from ppt_bench.methods import ops
from ppt_bench.methods.patch.attention import attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
B = 256 if CUDA else 8
N = 147


@pytest.fixture(scope="module")
def block_inputs():
    torch.manual_seed(0)
    attn = timm.create_model("deit_small_patch16_224").blocks[4].attn.eval().to(DEVICE)
    x = torch.randn(B, N, 384, device=DEVICE)
    size = torch.randint(1, 4, (B, N, 1), device=DEVICE).float()
    return attn, x, size


def run(fn):
    with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
        out = fn()
    if CUDA:
        torch.cuda.synchronize()
    return out


@pytest.mark.benchmark(group="prop-attn block")
@pytest.mark.parametrize(
    "impl, with_bias",
    [("fast", True), ("fold", True), ("fast", False)],
    ids=["mask", "fold", "none"],
)
def test_attention_block(benchmark, block_inputs, impl, with_bias):
    attn, x, size = block_inputs
    bias = ops.prop_attn_bias(size) if with_bias else None
    needs = frozenset({"cls_attn", "key_mean", "value_norm"})
    out, feats = benchmark(lambda: run(lambda: attention(attn, x, bias, needs, impl)))
    assert out.shape == (B, N, 384) and feats.cls_attn.shape == (B, 6, N)
