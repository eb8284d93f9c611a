"""The preprocessed-image cache: same tensors and predictions as decoding, each image decoded
once per sweep, rebuilt when a file changes, safe with two processes, never fatal."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from timm import get_pretrained_cfg
from timm.data import create_transform, resolve_data_config

import ppt_bench.core.decode
import ppt_bench.data.loader
from ppt_bench.cli import _overrides, build_parser
from ppt_bench.core.folder import list_image_folder
from ppt_bench.data import imagecache
from ppt_bench.data.imagecache import cached_images, split_transform, to_uint8
from ppt_bench.data.loader import device_transform, make_loader
from ppt_bench.measure.accuracy import evaluate_accuracy
from ppt_bench.methods import create_method
from ppt_bench.results.spec import RunSpec
from ppt_bench.runners.local import LocalRunner
from ppt_bench.sweeps.config import build_config
from ppt_bench.sweeps.grid import expand, make_spec

# DeiT's eval transform scaled down: resize to 36 (bicubic, crop_pct 0.9), crop 32, normalise.
DATA_CONFIG = {
    **resolve_data_config(pretrained_cfg=get_pretrained_cfg("deit_small_patch16_224").to_dict()),
    "input_size": (3, 32, 32),
}
CLASSES = ("ant", "bee", "cat")
PER_CLASS = 4


def write_image(path: Path, seed: int, size: tuple[int, int] = (50, 37)) -> None:
    """Smooth random colours with noise, saved as JPEG or PNG by the file name."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=(1, 1, 3))
    ramp = np.linspace(0, 120, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    pixels = (base + ramp + rng.normal(0, 25, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))


def write_tree(root: Path, per_class: int = PER_CLASS) -> Path:
    """JPEGs and PNGs of two sizes in class folders, and one corrupt file."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            suffix = ".jpg" if i % 2 == 0 else ".png"
            size = (50, 37) if i % 3 else (37, 50)
            write_image(root / name / f"{i}{suffix}", seed=100 * c + i, size=size)
    (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture
def decodes(monkeypatch) -> Counter[str]:
    """Counts every image decode (in this process) by path."""
    counts: Counter[str] = Counter()
    decode = ppt_bench.core.decode.decode_image

    def counting(path: str) -> Image.Image:
        counts[path] += 1
        return decode(path)

    monkeypatch.setattr(ppt_bench.core.decode, "decode_image", counting)
    return counts


def batches(loader) -> list[tuple[torch.Tensor | None, torch.Tensor | None, int]]:
    """The loader's batches as the model sees them (cached images normalised)."""
    normalize = device_transform(loader)
    out = []
    for images, labels, skipped in loader:
        if images is not None and normalize is not None:
            images = normalize(images)
        out.append((images, labels, skipped))
    return out


def test_the_cached_pixels_normalise_to_the_decoded_tensor_bit_for_bit(image_tree):
    tree = image_tree(write_tree)
    transform = create_transform(**DATA_CONFIG, is_training=False)
    pil_steps, normalize = split_transform(transform)
    for path in sorted(tree.glob("*/*.*g")):
        if path.name == "broken.jpg":
            continue
        image = Image.open(path).convert("RGB")
        pixels = to_uint8(pil_steps(image))  # [3, 32, 32] uint8
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
        assert torch.equal(normalize(pixels[None])[0], transform(image))


@pytest.mark.parametrize(("batch_size", "n_images", "workers"), [(5, None, 0), (4, 7, 2)])
def test_cached_batches_equal_decoded_batches(image_tree, tmp_path, batch_size, n_images, workers):
    tree = image_tree(write_tree)
    args = (str(tree), DATA_CONFIG, batch_size, n_images, workers)
    direct, _ = make_loader(*args)
    cached, name = make_loader(*args, cache_dir=tmp_path / "cache", progress=False)
    assert name == "toy" and device_transform(direct) is None
    assert isinstance(cached.dataset, imagecache.CachedImages)
    for (a, la, sa), (b, lb, sb) in zip(batches(direct), batches(cached), strict=True):
        assert sa == sb
        assert (a is None) == (b is None)
        if a is not None:
            assert b.dtype == torch.float32 and torch.equal(a, b)
            assert torch.equal(la, lb)
    assert sum(b[2] for b in batches(cached)) == (
        1 if n_images is None else sum(b[2] for b in batches(direct))
    )


def test_same_top1_agreement_and_predictions_from_the_cache(make_model, image_tree, tmp_path):
    tree = image_tree(write_tree)
    model = make_model("deit_tiny", img_size=32, patch_size=8, num_classes=len(CLASSES))
    reduced = create_method("tome", r=4).apply(make_model("deit_tiny", img_size=32, patch_size=8,
                                                          num_classes=len(CLASSES)))  # fmt: skip
    direct, _ = make_loader(str(tree), DATA_CONFIG, 5, workers=0)
    cached, _ = make_loader(str(tree), DATA_CONFIG, 5, workers=0, cache_dir=tmp_path / "c")
    results = [evaluate_accuracy(reduced, lo, model, progress=False) for lo in (direct, cached)]
    for name in ("top1", "top5", "loss", "agreement_top1", "kl"):
        assert results[0].figure(name) == results[1].figure(name), name
    for name in ("n_images", "unreadable_images"):
        assert getattr(results[0], name) == getattr(results[1], name), name
    predictions = []
    with torch.inference_mode():
        for loader in (direct, cached):
            logits = [reduced(images) for images, _, _ in batches(loader) if images is not None]
            predictions.append(torch.cat(logits))
    assert predictions[0].shape == (len(CLASSES) * PER_CLASS, len(CLASSES))
    assert torch.equal(predictions[0].argmax(-1), predictions[1].argmax(-1))
    assert torch.equal(predictions[0], predictions[1])


def _specs(data: Path, cache_dir: Path | None, sweep: str) -> list[RunSpec]:
    common = dict(
        model="test_vit", data=str(data), batch_size=16, workers=0, metrics=("accuracy",),
        cache=cache_dir is not None, cache_dir=None if cache_dir is None else str(cache_dir),
        sweep=sweep,
    )  # fmt: skip
    specs = [make_spec(method="baseline", **common)]
    specs += [make_spec(method="tome", params={"r": r}, **common) for r in (2, 4, 8)]
    specs += [
        make_spec(method="random", params={"r": r, "locations": [1, 3]}, **common)
        for r in (2, 4, 8)
    ]
    specs += [make_spec(method="ppt", params={"r": 4, "locations": [1, 3]}, **common)]
    return specs


def test_a_sweep_of_eight_runs_decodes_each_image_once(image_tree, tmp_path, decodes):
    tree = image_tree(write_tree)
    runner = LocalRunner(tmp_path / "cached.csv", progress=False)
    summary = runner.run(_specs(tree, tmp_path / "cache", "cached"))
    assert summary.ok == 8 and not summary.failed
    images = {str(p) for p in tree.rglob("*.*g")}
    assert set(decodes) == images and set(decodes.values()) == {1}  # broken.jpg tried once too
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1

    decodes.clear()
    direct = _specs(tree, None, "d")[-2:]  # two of the runs again, decoding
    summary = LocalRunner(tmp_path / "direct.csv", progress=False).run(direct)
    assert summary.ok == 2 and set(decodes.values()) == {2}  # without the cache: every run

    def values(csv: Path) -> dict[tuple, float]:
        from ppt_bench.results.records import read_results

        rows = read_results(csv).to_dict("records")
        return {(r["method"], str(r["params"]), r["metric"]): r["value"] for r in rows}

    cached, decoded = values(tmp_path / "cached.csv"), values(tmp_path / "direct.csv")
    assert len(decoded) == 2 * 8 and decoded == {k: cached[k] for k in decoded}


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p.parent for p in cache_dir.glob("*/meta.json"))


@pytest.mark.parametrize("change", ["touched", "replaced", "added", "removed"])
def test_a_changed_file_rebuilds_the_cache(image_tree, tmp_path, decodes, change):
    tree = image_tree(write_tree)
    cache_dir = tmp_path / "cache"

    def load() -> list:
        loader, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
        return batches(loader)

    load()
    load()
    assert set(decodes.values()) == {1}  # the second load decoded nothing
    first = _entries(cache_dir)
    target = tree / "ant" / "1.png"
    if change == "touched":
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "replaced":
        write_image(target, seed=999)  # same name, new pixels
    elif change == "added":
        write_image(tree / "cat" / "new.jpg", seed=998)
    else:
        target.unlink()
    decodes.clear()
    after = load()
    assert sum(decodes.values()) >= len(CLASSES) * PER_CLASS - 1  # decoded again
    assert len(_entries(cache_dir)) == 2 and first[0] in _entries(cache_dir)
    direct, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0)
    for (a, la, _), (b, lb, _) in zip(batches(direct), after, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_an_image_rewritten_in_place_with_its_mtime_kept_is_decoded_again(image_tree, tmp_path):
    """Same name, same size (a BMP of the same dimensions), mtime put back as ``touch -r``
    does: the key still changes (the ctime does), so the new pixels are read."""

    def write_bmps(root: Path) -> None:
        for c, name in enumerate(CLASSES):
            (root / name).mkdir(parents=True)
            for i in range(2):
                write_image(root / name / f"{i}.bmp", seed=10 * c + i)

    tree = image_tree(write_bmps)
    cache_dir = tmp_path / "cache"
    make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    target = tree / "bee" / "1.bmp"
    before = target.stat()
    write_image(target, seed=777)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino,
    )  # fmt: skip
    cached, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    direct, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0)
    assert isinstance(cached.dataset, imagecache.CachedImages)
    for (a, la, _), (b, lb, _) in zip(batches(direct), batches(cached), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def _shorten(path: Path, keep: int) -> None:
    np.save(path, np.load(path)[:keep])


DAMAGE = {
    "labels shortened": lambda entry: _shorten(entry / imagecache.LABELS, 2),
    "readable shortened": lambda entry: _shorten(entry / imagecache.READABLE, 2),
    "images truncated": lambda entry: os.truncate(entry / imagecache.IMAGES, 1000),
    "labels unreadable": lambda entry: (entry / imagecache.LABELS).write_bytes(b"junk"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_replaced_and_never_read(image_tree, tmp_path, decodes, damage):
    tree = image_tree(write_tree)
    cache_dir = tmp_path / "cache"
    make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    (entry,) = _entries(cache_dir)
    DAMAGE[damage](entry)
    decodes.clear()
    loader, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    assert isinstance(loader.dataset, imagecache.CachedImages)
    assert len(loader.dataset) == len(CLASSES) * PER_CLASS + 1
    assert sum(decodes.values()) == len(CLASSES) * PER_CLASS + 1  # rebuilt from the images
    direct, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0)
    for (a, la, sa), (b, lb, sb) in zip(batches(direct), batches(loader), strict=True):
        assert sa == sb and torch.equal(a, b) and torch.equal(la, lb)
    decodes.clear()
    make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    assert not decodes and _entries(cache_dir) == [entry]  # repaired: read from now on
    assert not list(cache_dir.glob("*.tmp-*"))


SCRIPT = """
import hashlib, json, sys
from collections import Counter
import ppt_bench.data.loader
import ppt_bench.core.decode
from ppt_bench.data.loader import device_transform, make_loader
from ppt_bench.core.folder import list_image_folder

config = json.loads(sys.argv[3])
count = Counter()
decode = ppt_bench.core.decode.decode_image
def counting(path):
    count[path] += 1
    return decode(path)
ppt_bench.core.decode.decode_image = counting
loader, _ = make_loader(sys.argv[1], config, 16, workers=0, cache_dir=sys.argv[2], progress=False)
normalize = device_transform(loader)
h = hashlib.sha256()
for images, labels, skipped in loader:
    if images is not None:
        h.update(normalize(images).numpy().tobytes())
        h.update(labels.numpy().tobytes())
    h.update(str(skipped).encode())
cached = normalize is not None
print(json.dumps({"digest": h.hexdigest(), "decodes": sum(count.values()), "cached": cached}))
"""


def test_two_processes_building_the_same_cache_at_once(tmp_path):
    tree = write_tree(tmp_path / "big", per_class=40)
    cache_dir = tmp_path / "cache"
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(SCRIPT))
    argv = [sys.executable, str(script), str(tree), str(cache_dir), json.dumps(DATA_CONFIG)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert all(r["cached"] for r in results)
    n_files = len(CLASSES) * 40 + 1
    assert sum(r["decodes"] for r in results) == n_files  # one built it, the other waited
    direct, _ = make_loader(str(tree), DATA_CONFIG, 16, workers=0)

    h = hashlib.sha256()
    for images, labels, skipped in direct:
        h.update(images.numpy().tobytes())
        h.update(labels.numpy().tobytes())
        h.update(str(skipped).encode())
    assert {r["digest"] for r in results} == {h.hexdigest()}
    assert len(_entries(cache_dir)) == 1
    assert not list(cache_dir.glob("*.tmp-*"))  # no half-built entry left behind


def test_a_build_killed_halfway_leaves_nothing_that_is_read(image_tree, tmp_path, decodes):
    tree = image_tree(write_tree)
    cache_dir = tmp_path / "cache"
    make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    (entry,) = _entries(cache_dir)
    leftover = entry.with_name(f"{entry.name}.tmp-999999-dead")  # as a killed build leaves it
    leftover.mkdir()
    (leftover / imagecache.IMAGES).write_bytes(b"\0" * 100)
    shutil.rmtree(entry)
    decodes.clear()
    loader, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    assert device_transform(loader) is not None
    assert sum(decodes.values()) == len(CLASSES) * PER_CLASS + 1  # rebuilt, not read
    assert _entries(cache_dir) == [entry] and not leftover.exists()


def test_an_entry_renamed_into_place_by_another_process_is_read(image_tree, tmp_path, monkeypatch):
    """Without a working lock both processes build; the one that renames second keeps the
    first one's entry and reads it."""
    tree = image_tree(write_tree)
    cache_dir = tmp_path / "cache"
    make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    (entry,) = _entries(cache_dir)
    valid = imagecache._valid
    calls = Counter()

    def blind_until_built(*args):  # sees no entry before building, as if racing
        calls["valid"] += 1
        return valid(*args) if calls["valid"] > 2 else False

    monkeypatch.setattr(imagecache, "_valid", blind_until_built)
    loader, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    assert isinstance(loader.dataset, imagecache.CachedImages)
    assert _entries(cache_dir) == [entry] and not list(cache_dir.glob("*.tmp-*"))


@pytest.mark.parametrize("problem", ["not a folder", "disk full", "write fails"])
def test_an_unusable_cache_warns_once_and_the_run_decodes(image_tree, tmp_path, caplog, monkeypatch,
                                                          problem):  # fmt: skip
    tree = image_tree(write_tree)
    cache_dir = tmp_path / "cache"
    if problem == "not a folder":
        cache_dir.write_text("a file where the cache folder should be")
    elif problem == "disk full":
        monkeypatch.setattr(
            imagecache.shutil,
            "disk_usage",
            lambda p: SimpleNamespace(total=10**9, used=10**9, free=1000),
        )
    else:

        def full(f, data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(imagecache, "_write", full)
    caplog.set_level(logging.WARNING, logger="ppt_bench.data.imagecache")
    loader, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache_dir)
    warnings = [r for r in caplog.records if r.name == "ppt_bench.data.imagecache"]
    assert len(warnings) == 1 and "decoding directly" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert device_transform(loader) is None
    direct, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0)
    for (a, _, sa), (b, _, sb) in zip(batches(direct), batches(loader), strict=True):
        assert sa == sb and (a is None or torch.equal(a, b))
    assert not list(tmp_path.glob("cache/*.tmp-*"))


def test_a_run_with_an_unwritable_cache_dir_succeeds(image_tree, tmp_path):
    tree = image_tree(write_tree)
    from ppt_bench.engine.evaluate import evaluate

    blocker = tmp_path / "file"
    blocker.write_text("")
    spec = RunSpec(model="test_vit", data=str(tree), batch_size=8, workers=0,
                   metrics=("accuracy",), cache_dir=str(blocker / "cache"))  # fmt: skip
    rows = evaluate(spec)
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["metric"]: r["value"] for r in rows}["unreadable_images"] == 1


def test_cache_settings_do_not_change_the_run_id(tmp_path):
    spec = RunSpec(model="test_vit")
    assert spec.cache and spec.cache_dir is None
    assert spec.replace(cache=False).run_id == spec.run_id
    assert spec.replace(cache_dir=str(tmp_path)).run_id == spec.run_id
    with pytest.raises(Exception, match="cache must be true or false"):
        RunSpec(model="test_vit", cache="yes")


def test_cache_flags_and_config_keys_reach_the_specs(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["run", "--model", "test_vit", "--no-cache"])
    (spec,) = expand(build_config(overrides=_overrides(args)))
    assert spec.cache is False
    args = parser.parse_args(["run", "--model", "test_vit", "--cache-dir", "rel/cache"])
    (spec,) = expand(build_config(overrides=_overrides(args)))
    assert spec.cache and spec.cache_dir == str(Path("rel/cache").resolve())
    (spec,) = expand(build_config({"models": ["test_vit"], "cache_dir": "/shared/c"}))
    assert spec.cache_dir == "/shared/c"
    (spec,) = expand(build_config({"models": ["test_vit"], "cache": False}))
    assert spec.cache is False


def test_default_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.undo()  # the conftest fixture points the default at a temporary folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert imagecache.default_cache_dir() == tmp_path / "ppt-bench" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert imagecache.default_cache_dir() == Path.home() / ".cache" / "ppt-bench" / "images"


def test_synthetic_and_digits_data_do_not_use_the_cache(tmp_path):
    loader, _ = make_loader(None, DATA_CONFIG, 4, n_images=4, workers=0, cache_dir=tmp_path)
    assert device_transform(loader) is None and not any(tmp_path.iterdir())


def test_cached_images_needs_a_tensor_tail_to_split(image_tree, tmp_path):
    tree = image_tree(write_tree)
    transform = create_transform(**DATA_CONFIG, is_training=False)
    listing = list_image_folder(tree)
    args = (listing.samples, listing.stamps, listing.classes)
    no_tail = type(transform)(transform.transforms[:-1])  # no Normalize: not cached
    assert cached_images(*args, no_tail, (3, 32, 32), tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()
    assert cached_images(*args, transform, (3, 32, 32), tmp_path / "cache")


def test_normalising_into_a_reused_buffer_gives_the_same_tensors():
    normalize = imagecache.DeviceNormalize(DATA_CONFIG["mean"], DATA_CONFIG["std"])
    reusing = normalize.reusing()
    g = torch.Generator().manual_seed(0)
    batches_ = [
        torch.randint(0, 256, (b, 3, 8, 8), generator=g, dtype=torch.uint8) for b in (4, 4, 3)
    ]
    outs = [reusing(b) for b in batches_[:2]]
    assert outs[0].data_ptr() == outs[1].data_ptr()  # one buffer
    assert torch.equal(outs[1], normalize(batches_[1]))
    assert torch.equal(reusing(batches_[2]), normalize(batches_[2]))  # a smaller last batch
