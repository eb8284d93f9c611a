"""Shared fixtures: small, randomly initialised timm ViTs that run in well under a second."""

from __future__ import annotations

import os

# Ray swaps 127.0.0.1 for this machine's own address unless its multi-node support is off:
# keep the Ray instances that tests start (and their subprocesses) on loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import timm
import torch

# Named timm architectures covering each structural feature the patch must keep.
ARCHS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit3_small": ("deit3_small_patch16_224", {"img_size": 96}),  # LayerScale
    "vit_reg": ("vit_small_patch14_reg4_dinov2", {"img_size": 98}),  # 4 register tokens
    "vit_qknorm": ("vit_tiny_patch16_224", {"qk_norm": True, "img_size": 96}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 96}),
}


def make_model(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A randomly initialised model in eval mode with non-trivial LayerScale and norm weights.

    timm initialises LayerScale at 1e-5 or so, which would make every block almost the identity
    and hide mistakes; the weights are spread out instead.
    """
    name, defaults = ARCHS.get(arch, (arch, {}))
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**defaults, **kwargs}).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gamma") and isinstance(module.gamma, torch.Tensor):
                module.gamma.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.1, 0.1)
    return model


def clone(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def cuda_graph_replay(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` eagerly and replayed from a CUDA graph capture, in bf16 autocast.

    Capture fails on any host synchronisation or CPU-GPU copy inside the forward.
    """
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


@pytest.fixture
def make():
    return make_model


@pytest.fixture(scope="session")
def _image_cache_root(tmp_path_factory) -> object:
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture(autouse=True)
def _image_cache_in_tmp(_image_cache_root, monkeypatch) -> None:
    """Runs that use the default image cache keep it in the session's temporary folder, not in
    the user's cache directory."""
    import ppt_bench.imagecache

    monkeypatch.setattr(ppt_bench.imagecache, "default_cache_dir", lambda: _image_cache_root)
