"""Shared fixtures: small, randomly initialised timm ViTs that run in well under a second, the
helpers that run them, and the factories that several test files use.

Each helper is a fixture that returns a function, so that a test asks for what it uses:
``def test_x(make_model, images, logits): ...``.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

# Ray swaps 127.0.0.1 for this machine's own address unless its multi-node support is off:
# keep the Ray instances that tests start (and their subprocesses) on loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


import pytest
import timm
import torch

from ppt_bench.results.spec import RunSpec
from ppt_bench.sweeps.grid import make_spec

PLUGINS = Path(__file__).resolve().parent / "plugins"


def pytest_configure(config) -> None:
    """A third-party package installed beside ppt-bench (``plugins/``: a module and its
    dist-info): its method and metric group reach every test, the contract suite included,
    through their entry points alone; on ``PYTHONPATH`` too, for the commands and Ray workers
    that tests start as processes."""
    sys.path.insert(0, str(PLUGINS))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])
    )


# Named timm architectures covering each structural feature the patch must keep.
ARCHS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit3_small": ("deit3_small_patch16_224", {"img_size": 96}),  # LayerScale
    "vit_reg": ("vit_small_patch14_reg4_dinov2", {"img_size": 98}),  # 4 register tokens
    "vit_qknorm": ("vit_tiny_patch16_224", {"qk_norm": True, "img_size": 96}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 96}),
}

# timm ``Eva`` backbones with rotary position embeddings, and an input size of 8 x 8 patches,
# which keeps each forward well under a second.
ROPE_MODELS = {
    "eva02": ("eva02_tiny_patch14_224", 112),  # RotaryEmbeddingCat, SwiGLU, EvaAttention
    "dinov3": ("vit_small_patch16_dinov3", 128),  # DINOv3 rope, 4 registers, LayerScale
    "rope_vit": ("vit_small_patch16_rope_224", 128),  # AttentionRope, LayerScale
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", 128),  # one rope table per block
}


# -- models and inputs ------------------------------------------------------------------------


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    """Each name of ``ARCHS`` in turn; a test that parametrizes ``arch`` itself picks its own."""
    return request.param


@pytest.fixture(scope="session")
def make_model():
    """``make_model(arch, seed=0, **kwargs)``: a randomly initialised model in eval mode with
    non-trivial LayerScale and norm weights; ``arch`` is a key of ``ARCHS`` or a timm name.

    timm initialises LayerScale at 1e-5 or so, which would make every block almost the identity
    and hide mistakes; the weights are spread out instead.
    """
    # Imported here, not at the top: the contract suite lists the registered methods when it is
    # imported, which must come after pytest_configure has put the plugin package on the path.
    from ppt_bench.testing import spread_weights

    def make(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
        name, defaults = ARCHS.get(arch, (arch, {}))
        torch.manual_seed(seed)
        return spread_weights(
            timm.create_model(name, pretrained=False, **{**defaults, **kwargs}).eval()
        )

    return make


@pytest.fixture(scope="module")
def deit_small(make_model) -> torch.nn.Module:
    """DeiT-S at 224 px, made once per module: tests apply their methods to a ``clone`` of it."""
    return make_model("deit_small_patch16_224")


@pytest.fixture(scope="session")
def rope_model(make_model):
    """``rope_model(key, size=None, spread_head=True, **kwargs)``: the ``ROPE_MODELS`` backbone
    ``key`` with a 10-class head, at ``size`` px (None: its own 8 x 8 patches), and that size.

    ``spread_head`` draws the head's weights from a standard normal instead of timm's init.
    """

    def make(
        key: str, size: int | None = None, *, spread_head: bool = True, **kwargs
    ) -> tuple[torch.nn.Module, int]:
        name, default = ROPE_MODELS[key]
        size = size or default
        model = make_model(name, img_size=size, num_classes=10, **kwargs)
        if spread_head:
            with torch.no_grad():
                torch.nn.init.normal_(model.head.weight)
        return model, size

    return make


@pytest.fixture(scope="session")
def rope_models() -> dict[str, tuple[str, int]]:
    """``ROPE_MODELS``: key -> (timm name, input size)."""
    return dict(ROPE_MODELS)


@pytest.fixture(scope="session")
def img_size():
    """``img_size(model)``: the input size a model was made for."""

    def size(model: torch.nn.Module) -> int:
        return model.patch_embed.img_size[0]

    return size


@pytest.fixture(scope="session")
def images():
    """``images(n, size, seed=1)``: ``n`` seeded random images ``[n, 3, size, size]``."""

    def make(n: int, size: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, size, size, generator=g)

    return make


@pytest.fixture(scope="session")
def clone():
    """``clone(model)``: a deep copy, to patch without touching the original."""
    return copy.deepcopy


@pytest.fixture(scope="session")
def logits():
    """``logits(model, x)``: the model's output under ``torch.inference_mode``."""

    def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run


@pytest.fixture(scope="session")
def cuda_graph_replay():
    """``cuda_graph_replay(model, x)``: ``model(x)`` eagerly and replayed from a CUDA graph
    capture, in bf16 autocast.

    Capture fails on any host synchronisation or CPU-GPU copy inside the forward.
    """

    from ppt_bench.testing import cuda_graph_replay  # after pytest_configure (see make_model)

    return cuda_graph_replay


@pytest.fixture(scope="session")
def assert_one_graph():
    """``assert_one_graph(model, x, reset=True, grad_mode=torch.inference_mode)``: dynamo traces
    ``model(x)`` under ``grad_mode`` as one graph without a break, so that torch.compile and CUDA
    graphs take the whole forward; ``reset`` clears dynamo's caches first."""

    def check(model, x, *, reset: bool = True, grad_mode=torch.inference_mode) -> None:
        if reset:
            torch._dynamo.reset()
        with grad_mode():
            explain = torch._dynamo.explain(model)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1

    return check


@pytest.fixture(scope="session")
def traced_source(make_model, images, logits, clone, img_size):
    """``traced_source(arch, method)``: ``(source [2, N, N0], P, N0)`` after a forward of two
    images through ``arch`` patched by ``method`` with source tracing: which of the ``N0``
    input tokens (``P`` prefix tokens first) each of the ``N`` output tokens stands for."""

    def trace(arch: str, method) -> tuple[torch.Tensor, int, int]:
        ref = make_model(arch)
        P = ref.num_prefix_tokens
        model = method.apply(clone(ref), trace_source=True)
        logits(model, images(2, img_size(ref)))
        return model.reduction_info.source, P, ref.patch_embed.num_patches + P

    return trace


@pytest.fixture
def one_thread():
    """One CPU thread: on a shared 2-core machine two threads spin against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- runs and files ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def spec():
    """``spec(method="baseline", params=None, model="deit_tiny_patch16_224", **fields)``: a
    ``RunSpec`` of these fields, the others at their defaults, made by the one factory of specs
    (:func:`ppt_bench.sweeps.grid.make_spec`, which fills in the experiment's identity)."""

    def make(
        method: str = "baseline",
        params: dict | None = None,
        model: str = "deit_tiny_patch16_224",
        **fields,
    ) -> RunSpec:
        return make_spec(model, method, params, **fields)

    return make


@pytest.fixture
def image_tree(tmp_path):
    """``image_tree(write)``: the folder ``toy`` in the test's temporary folder, filled by
    ``write(root)``: each test module writes the image folder it needs."""

    def make(write) -> Path:
        root = tmp_path / "toy"
        write(root)
        return root

    return make


@pytest.fixture(scope="session")
def assert_one_line_error():
    """``assert_one_line_error(code, err, message)``: a command refused with exit status 2 and one
    line on stderr, ``ppt-bench: error: ...``, that holds ``message``."""

    def check(code: int, err: str, message: str) -> None:
        assert code == 2, err
        assert err.startswith("ppt-bench: error: ") and err.count("\n") == 1, err
        assert message in err, err

    return check


# -- the image cache --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _image_cache_root(tmp_path_factory) -> object:
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture(autouse=True)
def _image_cache_in_tmp(_image_cache_root, monkeypatch) -> None:
    """Runs that use the default image cache keep it in the session's temporary folder, not in
    the user's cache directory."""
    import ppt_bench.data.imagecache

    monkeypatch.setattr(ppt_bench.data.imagecache, "default_cache_dir", lambda: _image_cache_root)
