"""The embedded default: the digits split, the registered model and the trained, cached weights."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import ppt_bench.data.digits as digits
import ppt_bench.engine.demo_model as demo_model
from ppt_bench.core.errors import UserError
from ppt_bench.data.digits import digits_dataset
from ppt_bench.engine.demo_model import load_or_train
from ppt_bench.models.digits import MODEL_NAME

TEST_DIGEST = "39b19f18c3f0"
TEST_FIRST_LABELS = [7, 6, 3, 7, 7, 3, 2, 8, 9, 3]


def test_split_sizes_and_stratification():
    train, test = digits_dataset("train"), digits_dataset("test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.classes == test.classes == [str(i) for i in range(10)]
    assert not set(train.indices) & set(test.indices)
    per_class = Counter(test.targets)
    totals = Counter(train.targets) + per_class
    assert sorted(per_class) == list(range(10))
    for c, n in per_class.items():  # each class keeps its 20% share, give or take one image
        assert abs(n - 0.2 * totals[c]) < 1, (c, n, totals[c])


def test_split_is_fixed():
    digits._split.cache_clear()
    first = digits_dataset("test")
    digits._split.cache_clear()
    again = digits_dataset("test")
    assert np.array_equal(first.indices, again.indices)
    assert np.array_equal(first.images, again.images)
    # Results under results/ were measured on exactly these 360 images of load_digits().
    digest = hashlib.sha1(np.asarray(first.indices, dtype=np.int64).tobytes()).hexdigest()
    assert digest[:12] == TEST_DIGEST
    assert first.targets[:10] == TEST_FIRST_LABELS


def test_dataset_is_like_image_folder():
    seen = []
    data = digits_dataset("test", transform=lambda im: seen.append(im) or "t")
    assert data[0] == ("t", data.targets[0])
    image = seen[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert isinstance(data.targets[0], int)
    r, g, b = image.split()
    assert np.array_equal(np.asarray(r), np.asarray(b)) and np.array_equal(r, g)
    with pytest.raises(UserError, match="'train' or 'test'"):
        digits_dataset("val")


def test_mean_and_std_are_those_of_the_training_images():
    images = digits_dataset("train").images
    pixels = images.astype(np.float64) / 255.0
    assert abs(pixels.mean() - digits.MEAN[0]) < 1e-3
    assert abs(pixels.std() - digits.STD[0]) < 1e-3


def test_registered_model_and_its_data_config():
    model = timm.create_model(MODEL_NAME)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["crop_pct"] == 1.0
    assert tuple(cfg["mean"]) == digits.MEAN and tuple(cfg["std"]) == digits.STD
    assert cfg["interpolation"] == "bicubic"
    assert len(model.blocks) == 12 and model.num_prefix_tokens == 1
    assert model.patch_embed.num_patches == 64
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="load_or_train"):
        timm.create_model(MODEL_NAME, pretrained=True)


def test_cache_path_follows_xdg_and_the_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = demo_model.default_checkpoint_path()
    assert path.parent == tmp_path / "ppt-bench"
    assert path.name == f"{MODEL_NAME}-{demo_model.config_hash()}.pth"
    changed = demo_model.train_config().__class__(
        **{**vars(demo_model.train_config()), "epochs": 1}
    )
    assert demo_model.config_hash(changed) != demo_model.config_hash()


def test_unreadable_cached_checkpoint_is_ignored(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not a checkpoint")
    assert demo_model._load(bad) is None
    assert demo_model._load(tmp_path / "missing.pth") is None


def test_a_second_process_waits_for_the_training_and_reads_its_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    trainings = []

    def slow_training(progress):
        trainings.append(threading.get_ident())
        time.sleep(0.5)  # the other caller asks meanwhile
        return demo_model.create_model(), 12.5, {}

    monkeypatch.setattr(demo_model, "_train_fresh", slow_training)
    results = []
    callers = [threading.Thread(target=lambda: results.append(load_or_train())) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(trainings) == 1  # flock holds between two open files, threads as processes
    assert [top1 for _, _, top1 in results] == [12.5, 12.5]
    assert results[0][1] == results[1][1] == demo_model.default_checkpoint_path()


def top1(model: torch.nn.Module) -> float:
    """Top-1 [%] on the 360 test images through the model's own timm eval transform."""
    transform = create_transform(**resolve_data_config(model=model))
    data = digits_dataset("test", transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=120)
    correct = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += (model(x).argmax(dim=-1) == y).sum().item()
    return 100.0 * correct / len(data)


@pytest.mark.slow
def test_trained_model_reaches_95_percent_and_is_cached(monkeypatch):
    model, path, stored = load_or_train(progress=False)
    accuracy = top1(model)
    print(f"\n{MODEL_NAME} test top-1 {accuracy:.2f}% on 360 digits ({path})")
    assert accuracy >= 95.0
    assert abs(accuracy - stored) < 0.3  # the stored value is the one measured after training
    assert path.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached checkpoint should be loaded, not trained again")

    monkeypatch.setattr(demo_model, "_train_fresh", no_training)
    again, again_path, _ = load_or_train(progress=False)
    assert again_path == path
    cached = again.state_dict()
    assert all(torch.equal(v, cached[k]) for k, v in model.state_dict().items())
