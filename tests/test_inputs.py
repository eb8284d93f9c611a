"""Inputs that used to give meaningless figures, hang or end in a traceback: each is now read
faithfully or refused in one whole sentence. Non-finite weights and outputs, a data root of
split folders or of one class, 16-bit and other image modes, file names that are not UTF-8, a
checkpoint given as a folder, a server that never answers, a cache disk without room."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_data_accuracy import DATA_CONFIG  # solid-colour images in, exactly pixel / 255 out

import ppt_bench.models.build
from ppt_bench.cli import main
from ppt_bench.core import identity
from ppt_bench.core.decode import decode_image, load_sample
from ppt_bench.core.errors import UserError
from ppt_bench.data import imagecache
from ppt_bench.data.loader import make_loader
from ppt_bench.models.build import build_model, check_finite, check_weights
from ppt_bench.results.records import append_rows, failed_rows, make_rows, read_results
from ppt_bench.results.report import write_report
from ppt_bench.results.spec import RunSpec
from ppt_bench.sweeps.config import build_config, load_config
from ppt_bench.sweeps.grid import expand, make_spec, validate

TINY = "test_vit"  # timm's 6-block test ViT, 160 px, 1000 classes


def run_args(tmp_path: Path, *flags: str) -> list[str]:
    """``ppt-bench run`` of the tiny model on 4 synthetic images, its files in ``tmp_path``."""
    return [
        "run", "--model", TINY, "--metrics", "accuracy", "--n-images", "4", "--batch-size", "4",
        "--workers", "0", "--quiet", "--out", str(tmp_path / "r.csv"),
        "--report", str(tmp_path / "r.md"), *flags,
    ]  # fmt: skip


def write_png(path: Path, colour: tuple[int, int, int] = (10, 200, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), colour).save(path)


# -- non-finite weights and outputs -----------------------------------------------------------


def test_a_checkpoint_with_a_nan_weight_is_refused_naming_the_tensor(
    tmp_path, capsys, assert_one_line_error
):
    torch.manual_seed(0)
    weights = timm.create_model(TINY).state_dict()
    weights["blocks.2.mlp.fc1.weight"][3, 5] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({"model": weights}, path)
    named = (
        r"checkpoint .*nan\.pth.* non-finite values \(NaN or inf\) in blocks\.2\.mlp\.fc1\.weight"
    )
    with pytest.raises(UserError, match=named):
        build_model(TINY, checkpoint=str(path))
    with pytest.raises(UserError, match=named):
        check_weights(TINY, str(path))
    # The command stops before any run, where it used to end "ok" with a NaN loss.
    code = main(run_args(tmp_path, "--checkpoint", str(path)))
    assert_one_line_error(code, capsys.readouterr().err, "blocks.2.mlp.fc1.weight (1 of ")
    assert not (tmp_path / "r.csv").exists()


def test_a_built_model_with_an_infinite_buffer_is_refused(monkeypatch):
    create = timm.create_model

    def with_inf(name, **kwargs):
        model = create(name, **kwargs)
        model.register_buffer("scale", torch.tensor([1.0, float("inf")]))
        return model

    monkeypatch.setattr(ppt_bench.models.build.timm, "create_model", with_inf)
    with pytest.raises(
        UserError, match=r"model 'test_vit' holds non-finite .* in scale \(1 of 2\)"
    ):
        build_model(TINY)


def test_finite_weights_whose_sum_overflows_pass():
    check_finite([("big", torch.full((10,), 3e38))], "checkpoint 'w.pth'")
    with pytest.raises(UserError, match=r"in half \(1 of 3\)"):
        check_finite(
            [("big", torch.full((3,), 3e38)), ("half", torch.tensor([1.0, 0, -torch.inf]).half())],
            "x",
        )


def test_non_finite_outputs_fail_the_run_and_the_report_shows_no_figure(tmp_path, capsys):
    """Finite weights whose outputs overflow: the data pass fails the run, which is recorded as
    failed with its reason, and the report lists it without a figure."""
    torch.manual_seed(0)
    model = timm.create_model(TINY)
    with torch.no_grad():  # every feature 1e38, so every logit 64e38: inf in float32
        model.norm.weight.zero_()
        model.norm.bias.fill_(1e38)
        model.head.weight.fill_(1.0)
    path = tmp_path / "overflow.pth"
    torch.save(model.state_dict(), path)
    assert main(run_args(tmp_path, "--checkpoint", str(path))) == 1
    assert "non-finite outputs (NaN or inf) for 4 of the 4 images" in capsys.readouterr().err
    rows = read_results(tmp_path / "r.csv")
    assert list(rows["status"]) == ["failed"] and rows["value"].isna().all()
    text = (tmp_path / "r.md").read_text()
    assert "No run finished." in text and "## Failed runs" in text
    assert "non-finite outputs" in text


def test_the_report_never_shows_a_figure_of_a_failed_run(tmp_path):
    path = tmp_path / "r.csv"
    ok, failed = RunSpec(TINY, metrics=("accuracy",)), RunSpec(TINY, "tome", {"r": 2})
    append_rows(path, make_rows(ok, {"agreement_top1": 55.5}, dataset="synthetic", n_images=4))
    row = failed_rows(failed, UserError("the model gave non-finite outputs"))[0]
    append_rows(path, [{**row, "metric": "agreement_top1", "value": 12.34, "unit": "%"}])
    text = write_report(path, tmp_path / "r.md").markdown.read_text()
    assert "55.50" in text and "12.34" not in text and "## Failed runs" in text


# -- ImageFolder roots of split folders or of one class ---------------------------------------


@pytest.mark.parametrize(
    ("splits", "meant"),
    [(["train"], "train"), (["train", "test"], "test"), (["validation"], "validation")],
)
def test_a_root_of_split_folders_names_the_folder_meant(tmp_path, splits, meant):
    for split in splits:
        for name in ("cat", "dog"):
            write_png(tmp_path / split / name / "0.png")
    with pytest.raises(UserError, match=f"split folders? .*pass {tmp_path / meant} ") as err:
        make_loader(str(tmp_path), DATA_CONFIG, 2, workers=0)
    assert "\n" not in str(err.value)
    loader, _ = make_loader(str(tmp_path / meant), DATA_CONFIG, 2, workers=0)
    assert loader.dataset.classes == ["cat", "dog"]


def test_a_single_class_needs_the_flag(tmp_path, capsys, assert_one_line_error):
    write_png(tmp_path / "data" / "cat" / "0.png")
    data = str(tmp_path / "data")
    with pytest.raises(UserError, match=r"single class folder, cat, .* or --single-class"):
        make_loader(data, DATA_CONFIG, 2, workers=0)
    loader, _ = make_loader(data, DATA_CONFIG, 2, workers=0, single_class=True)
    assert loader.dataset.classes == ["cat"]
    # A folder of the class folders one level down is named as the likely root.
    write_png(tmp_path / "outer" / "imagenet" / "a" / "0.png")
    write_png(tmp_path / "outer" / "imagenet" / "b" / "0.png")
    with pytest.raises(UserError, match=f"pass {tmp_path / 'outer' / 'imagenet'} if it holds"):
        make_loader(str(tmp_path / "outer"), DATA_CONFIG, 2, workers=0)
    # The sweep checks the layout before any run; the flag, the config key and the library
    # keyword each let one class through.
    code = main(run_args(tmp_path, "--data", data, "--no-cache"))
    assert_one_line_error(code, capsys.readouterr().err, "--single-class if one class is meant")
    config = tmp_path / "one.toml"
    config.write_text(f'models = ["{TINY}"]\ndata = "{data}"\nsingle_class = true\n')
    validate(expand(build_config(load_config(config))))
    keyword = {"models": [TINY], "data": data, "single_class": True}  # ppt_bench.sweep's
    validate(expand(build_config(None, overrides=keyword)))
    assert main(run_args(tmp_path, "--data", data, "--single-class", "--no-cache")) == 0
    rows = read_results(tmp_path / "r.csv")
    assert set(rows["status"]) == {"ok"} and set(rows["n_images"]) == {1}


# -- image modes ------------------------------------------------------------------------------


GREY16 = np.array([[0, 128, 257], [40000, 65280, 65535]], dtype=np.uint16)


def _modes(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Each mode's file and the 8-bit RGB ``[H, W, 3]`` it must decode to."""
    grey8 = np.round(GREY16 / 257).astype(np.uint8)
    as_rgb = np.repeat(grey8[..., None], 3, axis=-1)
    files = {}
    Image.fromarray(GREY16).save(tmp_path / "i16.png")  # I;16
    files["I;16"] = (tmp_path / "i16.png", as_rgb)
    Image.frombytes("I;16B", (3, 2), GREY16.astype(">u2").tobytes()).save(tmp_path / "i16b.tif")
    files["I;16B"] = (tmp_path / "i16b.tif", as_rgb)
    Image.fromarray(GREY16.astype(np.int32)).save(tmp_path / "i32.tif")  # I
    files["I"] = (tmp_path / "i32.tif", as_rgb)
    la = np.stack([grey8, np.full_like(grey8, 7)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    files["LA"] = (tmp_path / "la.png", as_rgb)
    palette = Image.new("P", (3, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1, 0, 1, 1, 0])
    palette.save(tmp_path / "p.png")
    red, blue = [255, 0, 0], [0, 0, 255]
    files["P"] = (tmp_path / "p.png", np.array([[red, blue, red], [blue, blue, red]], np.uint8))
    Image.new("CMYK", (3, 2), (255, 0, 0, 0)).save(tmp_path / "cmyk.tif")  # cyan
    files["CMYK"] = (tmp_path / "cmyk.tif", np.full((2, 3, 3), [0, 255, 255], np.uint8))
    bits = np.array([[0, 1, 0], [1, 1, 0]], dtype=bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")  # 1
    files["1"] = (tmp_path / "bits.png", np.repeat(bits[..., None] * 255, 3, -1).astype(np.uint8))
    return files


def test_every_image_mode_decodes_to_its_8_bit_colours(tmp_path):
    for mode, (path, expected) in _modes(tmp_path).items():
        with Image.open(path) as image:
            assert image.mode == mode, path
        assert np.array_equal(np.asarray(decode_image(str(path))), expected), mode


def test_images_without_an_8_bit_meaning_are_unreadable(tmp_path, caplog):
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)).save(tmp_path / "wide.tif")
    for name, why in (("f.tif", "mode F"), ("wide.tif", "outside the 16-bit range")):
        assert load_sample(str(tmp_path / name)) is None
        assert why in caplog.text


@pytest.mark.parametrize("cache", [False, True])
def test_a_16_bit_png_is_read_scaled_not_clipped(tmp_path, cache):
    for name, value in (("a", 40000), ("b", 1000)):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(np.full((40, 40), value, np.uint16)).save(
            tmp_path / "data" / name / "0.png"
        )
    cache_dir = tmp_path / "cache" if cache else None
    loader, _ = make_loader(str(tmp_path / "data"), DATA_CONFIG, 2, workers=0, cache_dir=cache_dir)
    images, labels, unreadable = next(iter(loader))
    assert isinstance(loader.dataset, imagecache.CachedImages) == cache and unreadable == 0
    if cache:
        images = loader.dataset.normalize(images)
    pixels = (images * 255).round().to(torch.uint8)  # [2, 3, 32, 32]
    assert labels.tolist() == [0, 1]
    assert pixels[0].unique().tolist() == [156] and pixels[1].unique().tolist() == [4]


# -- file names that are not UTF-8 ------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_hashed_and_read(tmp_path):
    data = tmp_path / "data"
    write_png(data / "a" / "0.png")
    write_png(data / "b" / "0.png")
    try:
        with open(os.fsencode(data / "a") + b"/caf\xe9.png", "wb") as f:
            Image.new("RGB", (40, 40), (1, 2, 3)).save(f, format="PNG")
    except OSError:
        pytest.skip("this file system refuses a file name that is not UTF-8")
    before = identity.data_fingerprint(str(data))
    assert len(before) == 12
    spec = make_spec(TINY, data=str(data))
    assert spec.data_fingerprint == before
    loader, _ = make_loader(str(data), DATA_CONFIG, 4, workers=0, cache_dir=tmp_path / "cache")
    assert isinstance(loader.dataset, imagecache.CachedImages)
    images, labels, unreadable = next(iter(loader))
    assert len(images) == 3 and unreadable == 0 and labels.tolist() == [0, 0, 1]


# -- a checkpoint given as a folder -----------------------------------------------------------


def test_a_checkpoint_folder_says_so_and_names_its_weights_file(
    tmp_path, capsys, assert_one_line_error
):
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save(timm.create_model(TINY).state_dict(), folder / "best.pth")
    (folder / "log.txt").write_text("not weights")
    message = f"--checkpoint {folder} is a folder (it holds best.pth): pass the weights file"
    with pytest.raises(UserError, match=r"is a folder .* pass the weights file"):
        build_model(TINY, checkpoint=str(folder))
    with pytest.raises(UserError, match=re.escape(message)):
        validate(
            expand(build_config(None, overrides={"models": [TINY], "checkpoint": str(folder)}))
        )
    assert_one_line_error(
        main(run_args(tmp_path, "--checkpoint", str(folder))), capsys.readouterr().err, message
    )
    with pytest.raises(UserError, match="does not exist"):
        build_model(TINY, checkpoint=str(tmp_path / "missing.pth"))


# -- a server that never answers --------------------------------------------------------------


@pytest.fixture
def silent_server(tmp_path, monkeypatch):
    """A server on 127.0.0.1 that accepts every connection and never answers; torch hub's
    cache in a fresh folder."""
    server = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_checkpoint_url_that_never_answers_times_out_in_one_line(silent_server, monkeypatch):
    monkeypatch.setenv("PPT_BENCH_TIMEOUT", "1")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"no answer within 1 s \(set PPT_BENCH_TIMEOUT") as err:
        make_spec(TINY, checkpoint=f"{silent_server}/w.pth")  # its id names the content
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value) and str(err.value).startswith("could not download")


def test_pretrained_weights_that_never_come_time_out(silent_server, monkeypatch):
    create = timm.create_model

    def from_silent_hub(name, pretrained=False, **kwargs):
        if pretrained:  # the hub clients read with urllib (torch hub) or their own timeout
            urllib.request.urlopen(f"{silent_server}/weights.pth").read()
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(ppt_bench.models.build.timm, "create_model", from_silent_hub)
    monkeypatch.setenv("PPT_BENCH_TIMEOUT", "0.5")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"pretrained weights .*no answer within 0\.5 s"):
        build_model(f"{TINY}.r160_in1k")
    assert time.monotonic() - start < 10
    assert socket.getdefaulttimeout() is None  # the limit holds for the download alone
    monkeypatch.setenv("PPT_BENCH_TIMEOUT", "soon")
    with pytest.raises(UserError, match="PPT_BENCH_TIMEOUT='soon' is not a positive number"):
        build_model(f"{TINY}.r160_in1k")


# -- the image cache's free-space margin ------------------------------------------------------


def test_a_disk_without_room_for_the_cache_says_the_figures_and_what_to_do(
    tmp_path, monkeypatch, caplog
):
    for name in ("a", "b"):
        write_png(tmp_path / "data" / name / "0.png")
    free = imagecache.FREE_MARGIN  # room for the entry, but not beside the margin
    monkeypatch.setattr(
        imagecache.shutil, "disk_usage", lambda p: SimpleNamespace(total=2 * free, free=free)
    )
    caplog.set_level(logging.WARNING, logger="ppt_bench.data.imagecache")
    loader, _ = make_loader(str(tmp_path / "data"), DATA_CONFIG, 2, workers=0,
                            cache_dir=tmp_path / "cache")  # fmt: skip
    assert not isinstance(loader.dataset, imagecache.CachedImages)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "ppt_bench.data.imagecache"]
    assert "2 images need 6.1 kB plus 67.1 MB kept free on the disk, and 67.1 MB is free" in warning
    assert "--cache-dir (or XDG_CACHE_HOME)" in warning and "\n" not in warning
