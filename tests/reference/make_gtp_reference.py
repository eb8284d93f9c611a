"""Write ``gtp_authors_logits.npz``: the logits of the authors' GTP-ViT code on random-weight
DeiT-Ti and DeiT-S, which ``tests/test_gtp.py`` compares ``gtp`` against without their code.

Usage, from the root of this repository with ppt-bench installed::

    git clone https://github.com/Ackesnal/GTP-ViT /tmp/GTP-ViT
    git -C /tmp/GTP-ViT checkout 97a117814d0ff99edbbe34bec12e851db4be2eb5
    python tests/reference/make_gtp_reference.py /tmp/GTP-ViT

The weights and images are not stored: the test regenerates them from the seeds written in the
file, as ``tests/conftest.py``'s ``make_model`` and ``images`` do (timm's random initialisation
then ``spread_weights``; standard-normal images), so the fixture holds for the torch and timm
versions it names. It is made on the CPU: where scores tie (sparse attention), which tokens
leave is the CPU sort kernel's choice, in their code as in ``gtp``.

Their ``models_v3.py`` registers no DeiT-Ti: both models are built as its DeiT-S is, with each
architecture's width and head count. Its spatial graph is put on CUDA in its constructor; the
constructor runs here with that move left out, and the file ``missing`` it appends to on every
block goes to a temporary folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch

from ppt_bench.methods import create_method
from ppt_bench.testing import spread_weights

COMMIT = "97a117814d0ff99edbbe34bec12e851db4be2eb5"
OUTPUT = Path(__file__).resolve().parent / "gtp_authors_logits.npz"

# timm name -> (width, heads) of the authors' GraphPropagationTransformer.
MODELS = {"deit_tiny_patch16_224": (192, 3), "deit_small_patch16_224": (384, 6)}
MODEL_SEED, IMAGE_SEED, IMAGES, IMG_SIZE = 0, 1, 2, 224

# gtp's parameters, each given in full: the settings the tests use, the authors' DeiT-B P=8
# setting, and one of each graph.
CASES = {
    "mixed_p2_s0.6": {"num_prop": 2, "sparsity": 0.6, "alpha": 0.1},
    "mixed_p2_s0.7": {"num_prop": 2, "sparsity": 0.7, "alpha": 0.3},
    "mixed_p4_s1.0": {"num_prop": 4, "sparsity": 1.0, "alpha": 0.4},
    "mixed_p8_s0.6": {"num_prop": 8, "sparsity": 0.6, "alpha": 0.1},
    "spatial_p4_s0.6": {
        "num_prop": 4,
        "graph": "spatial",
        "sparsity": 0.6,
        "alpha": 0.1,
        "token_scale": False,
    },
    "semantic_p8_s0.7": {"num_prop": 8, "graph": "semantic", "num_neighbours": 5, "sparsity": 0.7},
}
CASES = {
    name: {"graph": "mixed", "num_neighbours": 8, "alpha": 0.4, "token_scale": True, **params}
    for name, params in CASES.items()
}


@contextlib.contextmanager
def cuda_moves_skipped():
    """``tensor.to("cuda")`` returns the tensor unmoved, so that their constructor runs on a
    machine without CUDA."""
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        return self if args[:1] == ("cuda",) else real(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = real


def authors_model(models_v3, name: str, params: dict) -> torch.nn.Module:
    """Their GraphPropagationTransformer for ``params``: MixedAttnMax selection, GraphProp."""
    width, heads = MODELS[name]
    with cuda_moves_skipped():
        return models_v3.GraphPropagationTransformer(
            patch_size=16,
            embed_dim=width,
            depth=12,
            num_heads=heads,
            mlp_ratio=4,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            selection="MixedAttnMax",
            propagation="GraphProp",
            num_prop=params["num_prop"],
            num_neighbours=params["num_neighbours"],
            sparsity=params["sparsity"],
            alpha=params["alpha"],
            token_scale=params["token_scale"],
            graph_type=params["graph"].capitalize(),
        ).eval()


def main(checkout: Path) -> None:
    head = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if head != COMMIT:
        sys.exit(f"{checkout} is not a checkout of GTP-ViT at {COMMIT}: check out that commit.")
    sys.path.insert(0, str(checkout.resolve()))
    import models_v3  # their code, found only once the checkout is on the path

    x = torch.randn(
        IMAGES, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(IMAGE_SEED)
    )
    out = {}
    os.chdir(tempfile.mkdtemp())
    for name in MODELS:
        torch.manual_seed(MODEL_SEED)
        ours = spread_weights(timm.create_model(name, pretrained=False).eval())
        for case, params in CASES.items():
            theirs = authors_model(models_v3, name, params)
            theirs.load_state_dict(ours.state_dict())
            patched = create_method("gtp", **params).apply(copy.deepcopy(ours))
            with torch.inference_mode():
                expected, got = theirs(x), patched(x)
            out[f"{name}:{case}"] = expected.numpy()
            print(f"{name} {case}: largest |gtp - theirs| {(got - expected).abs().max():.3g}")
    meta = {
        "commit": COMMIT,
        "model_seed": MODEL_SEED,
        "image_seed": IMAGE_SEED,
        "images": IMAGES,
        "img_size": IMG_SIZE,
        "cases": CASES,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    np.savez_compressed(OUTPUT, meta=np.array(json.dumps(meta)), **out)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/reference/make_gtp_reference.py GTP-VIT-CHECKOUT")
    main(Path(sys.argv[1]))
