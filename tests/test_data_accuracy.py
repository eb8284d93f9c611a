"""Data loading (ImageFolder checks, unreadable images, synthetic data) and accuracy metrics."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.utils import accuracy as timm_accuracy
from torch import nn

from ppt_bench.core.errors import UserError
from ppt_bench.data.loader import (
    TolerantImageFolder,
    Transformed,
    dataset_name,
    image_folder_root,
    make_loader,
)
from ppt_bench.measure.accuracy import TokenStats, evaluate_accuracy, kl_per_image
from ppt_bench.methods import create_method

# Solid-colour images, 32 px, no resize effects: the transform is exactly x = pixel / 255.
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "crop_pct": 1.0,
    "crop_mode": "center",
}
CLASSES = ("a", "b", "c", "d", "e", "f", "g")  # "g" stays empty
EMPTY_CLASS = "g"
RED_STEP = 20  # image i is solid red = RED_STEP * (i + 1)
# Per image: (label, rank of the true class in the logits the model returns for it).
IMAGES = [(0, 0), (0, 1), (1, 0), (2, 4), (3, 5), (4, 6), (5, 0), (5, 2)]


def logits_with_rank(label: int, rank: int, num_classes: int = len(CLASSES)) -> list[float]:
    """Logits ``7, 6, ..., 1`` with the true class at position ``rank`` of that order."""
    order = [k for k in range(num_classes) if k != label]
    order.insert(rank, label)
    row = [0.0] * num_classes
    for position, k in enumerate(order):
        row[k] = float(num_classes - position)
    return row


class LookupModel(nn.Module):
    """Recognises image i from its red value and returns a fixed logits row for it."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(table))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0].mean(dim=(1, 2)) * 255  # [B]
        index = (red / RED_STEP).round().long() - 1
        return self.table[index]


def write_tree(root: Path) -> None:
    """Class folders with real PNG files, one corrupt file and one empty class folder."""
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i, (label, _) in enumerate(IMAGES):
        img = Image.new("RGB", (40, 40), (RED_STEP * (i + 1), 50, 90))
        img.save(root / CLASSES[label] / f"img{i}.png")
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


def hand_answer() -> dict[str, float]:
    """top-1 / top-5 in % and cross entropy, straight from IMAGES."""
    n = len(IMAGES)
    loss = 0.0
    for label, rank in IMAGES:
        row = logits_with_rank(label, rank)
        loss += math.log(sum(math.exp(v) for v in row)) - row[label]
    return {
        "top1": 100.0 * sum(rank == 0 for _, rank in IMAGES) / n,
        "top5": 100.0 * sum(rank < 5 for _, rank in IMAGES) / n,
        "loss": loss / n,
    }


@pytest.mark.parametrize(("batch_size", "workers"), [(3, 0), (4, 2)])
def test_accuracy_on_generated_image_folder(image_tree, batch_size, workers):
    tree = image_tree(write_tree)
    model = LookupModel([logits_with_rank(*im) for im in IMAGES])
    loader, name = make_loader(str(tree), DATA_CONFIG, batch_size, workers=workers)
    assert name == "toy"
    assert loader.dataset.classes == list(CLASSES)  # the empty folder is still a class
    result = evaluate_accuracy(model, loader)
    expected = hand_answer()
    assert (expected["top1"], expected["top5"]) == (37.5, 75.0)  # the hand count itself
    assert result.figure("top1") == pytest.approx(expected["top1"])
    assert result.figure("top5") == pytest.approx(expected["top5"])
    assert result.figure("loss") == pytest.approx(expected["loss"], rel=1e-5)
    assert result.n_images == len(IMAGES)
    assert result.unreadable_images == 1
    assert (result.figure("agreement_top1"), result.figure("kl")) == (100.0, 0.0)
    # The per-image outcomes give timm's accuracy over the same logits.
    logits = torch.tensor([logits_with_rank(*im) for im in IMAGES])
    labels = torch.tensor([label for label, _ in IMAGES])
    top1, top5 = timm_accuracy(logits, labels, topk=(1, 5))
    assert (result.figure("top1"), result.figure("top5")) == pytest.approx(
        (top1.item(), top5.item())
    )


def test_agreement_and_kl_against_a_reference(image_tree):
    tree = image_tree(write_tree)
    ranks = [rank for _, rank in IMAGES]
    model = LookupModel([logits_with_rank(label, 0) for label, _ in IMAGES])
    reference = LookupModel([logits_with_rank(*im) for im in IMAGES])
    loader, _ = make_loader(str(tree), DATA_CONFIG, 3, workers=0)
    result = evaluate_accuracy(model, loader, reference)
    # The model always ranks the label first; the reference only where its rank is 0.
    assert result.figure("agreement_top1") == pytest.approx(100.0 * ranks.count(0) / len(ranks))
    kl = 0.0
    for label, rank in IMAGES:
        p = torch.tensor(logits_with_rank(label, rank)).softmax(-1)
        q = torch.tensor(logits_with_rank(label, 0)).softmax(-1)
        kl += float((p * (p.log() - q.log())).sum())
    assert result.figure("kl") == pytest.approx(kl / len(IMAGES), rel=1e-5)
    assert result.figure("kl") > 0


def test_kl_of_each_image_of_a_batch():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).log_softmax(-1)
    assert (kl_per_image(ref.flip(-1), ref) > 0).all()
    assert kl_per_image(ref, ref).tolist() == [0.0, 0.0]


def test_root_val_layout_and_dataset_name(tmp_path):
    write_tree(tmp_path / "imagenet" / "val")
    loader, name = make_loader(str(tmp_path / "imagenet"), DATA_CONFIG, 4, workers=0)
    assert name == "imagenet"
    assert len(loader.dataset) == len(IMAGES) + 1
    assert dataset_name(str(tmp_path / "imagenet" / "val")) == "imagenet"


def test_a_batch_of_only_unreadable_images_is_skipped(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "bad.png").write_bytes(b"junk")
    Image.new("RGB", (8, 8)).save(tmp_path / "x" / "good.png")
    loader, _ = make_loader(str(tmp_path), DATA_CONFIG, 1, workers=0, single_class=True)
    batches = list(loader)
    assert [b[2] for b in batches] == [1, 0]
    assert batches[0][0] is None and batches[1][0].shape == (1, 3, 32, 32)


# Each bad layout of a data folder and the error it gives.
BAD_LAYOUTS = {
    "missing": "does not exist",
    "empty": "is empty",
    "flat": "no class folders",
    "empty_classes": "no images found",
}


@pytest.mark.parametrize("layout", BAD_LAYOUTS)
def test_bad_layouts_are_user_errors(tmp_path, layout):
    message = BAD_LAYOUTS[layout]
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "flat":
        Image.new("RGB", (8, 8)).save(root / "img.png")
    if layout == "empty_classes":
        (root / "cat").mkdir()
        (root / "dog").mkdir()
    with pytest.raises(UserError, match=message):
        make_loader(str(root), DATA_CONFIG, 2, workers=0)


def test_layout_check_opens_no_image(tmp_path):
    (tmp_path / "cat" / "deep").mkdir(parents=True)
    (tmp_path / "dog").mkdir()
    with pytest.raises(UserError, match="no images found"):
        image_folder_root(tmp_path)
    (tmp_path / "cat" / "deep" / "x.PNG").write_bytes(b"not decoded by the check")
    assert image_folder_root(tmp_path) == tmp_path


def test_transformed_passes_an_unreadable_image_through(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"junk")
    dataset = Transformed(TolerantImageFolder(str(tmp_path)), lambda im: 1 / 0)
    assert dataset[0] == (None, 0)


def test_subset_is_seeded_and_random(image_tree):
    tree = image_tree(write_tree)

    def labels(seed):
        loader, _ = make_loader(str(tree), DATA_CONFIG, 8, n_images=4, workers=0, seed=seed)
        return loader.dataset.indices

    assert labels(0) == labels(0)
    assert len(labels(0)) == 4
    assert any(labels(0) != labels(s) for s in range(1, 5))


def test_synthetic_data_is_seeded():
    cfg = {**DATA_CONFIG, "input_size": (3, 16, 16)}
    first, name = make_loader(None, cfg, 4, n_images=6, workers=0, seed=3)
    again, _ = make_loader("synthetic", cfg, 2, n_images=6, workers=0, seed=3)
    other, _ = make_loader(None, cfg, 4, n_images=6, workers=0, seed=4)
    assert name == "synthetic"
    a = torch.cat([b[0] for b in first])
    assert a.shape == (6, 3, 16, 16)
    assert torch.equal(a, torch.cat([b[0] for b in again]))
    assert not torch.equal(a, torch.cat([b[0] for b in other]))
    assert all(int(b[1].sum()) == 0 for b in first)


@pytest.mark.parametrize("threshold", [0.0, float("inf"), 1e-4])
def test_token_stats_follow_ppt_branches(make_model, images, threshold):
    model = create_method("ppt", r=8, threshold=threshold).apply(
        make_model("deit_tiny", img_size=96)
    )
    stats, pooled = TokenStats(), []
    with torch.inference_mode():
        for batch in images(4, 96).split(2):
            model(batch)
            stats.update(model, batch.shape[0])
            pooled.append(model.reduction_info.stats["pooled"])
    pooled = torch.cat(pooled)  # [4, 3]
    metrics = stats.metrics()
    assert [metrics[f"tokens_block_{i}"] for i in range(12)] == list(model.reduction_info.tokens)
    fracs = [metrics[f"pooled_frac_block_{loc}"] for loc in (3, 6, 9)]
    assert fracs == pooled.float().mean(0).tolist()
    assert stats.paths == Counter(tuple(row) for row in pooled.tolist())
    assert sum(stats.paths.values()) == stats.n_images == 4
    if threshold == 0.0:
        assert fracs == [0.0] * 3
    if threshold == float("inf"):
        assert fracs == [1.0] * 3


def test_token_stats_of_an_unreduced_vit(make_model):
    model = make_model("deit_tiny")
    stats = TokenStats()
    stats.update(model, 3)
    assert stats.metrics() == {f"tokens_block_{i}": 197.0 for i in range(12)}


def test_digits_loader_uses_the_model_transform():
    digits = pytest.importorskip("ppt_bench.models.digits")
    from ppt_bench.models.build import build_model

    _, config = build_model(digits.MODEL_NAME)
    loader, name = make_loader("digits", config, 64, n_images=100, workers=0)
    batch, labels, skipped = next(iter(loader))
    assert name == "digits" and len(loader.dataset) == 100 and skipped == 0
    assert batch.shape == (64, *config["input_size"]) and labels.max() < 10


def test_more_classes_than_the_model_predicts_is_a_user_error(image_tree):
    tree = image_tree(write_tree)
    model = LookupModel([logits_with_rank(0, 0, num_classes=3) for _ in IMAGES])
    loader, _ = make_loader(str(tree), DATA_CONFIG, 8, workers=0)
    with pytest.raises(UserError, match="predicts 3 classes"):
        evaluate_accuracy(model, loader)
