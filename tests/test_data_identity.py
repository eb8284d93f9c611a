"""A run's data is what it reads: the loader, the data's fingerprint and the image cache's key
list the same files (torchvision's), links are followed and checked, and what cannot be read as
an image is skipped or refused with one line, never measured under another data set's id."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
from test_imagecache import CLASSES, DATA_CONFIG, write_image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ppt_bench.cli import main
from ppt_bench.core import identity
from ppt_bench.core.errors import UserError
from ppt_bench.core.folder import IMAGE_EXTENSIONS
from ppt_bench.data.loader import TolerantImageFolder, make_loader
from ppt_bench.results.records import read_results
from ppt_bench.runners.local import LocalRunner
from ppt_bench.sweeps.grid import make_spec


def write_classes(root: Path, seed: int = 0, per_class: int = 2) -> Path:
    """``per_class`` PNGs in each class folder of :data:`CLASSES`."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            write_image(root / name / f"{i}.png", seed=seed + 10 * c + i)
    return root


def test_the_listing_is_torchvisions_with_links_hidden_folders_and_nesting(tmp_path):
    tree = write_classes(tmp_path / "data")
    (tree / ".hidden").mkdir()  # a class to torchvision, so to ppt-bench too
    write_image(tree / ".hidden" / "h.jpg", seed=1)
    for sub in ("sub", "sub x", "sub/deeper"):
        (tree / "ant" / sub).mkdir()
        write_image(tree / "ant" / sub / "n.PNG", seed=2)
    (tree / "ant" / "notes.txt").write_text("not an image")
    write_classes(tmp_path / "elsewhere", seed=50)
    (tree / "dog").symlink_to(tmp_path / "elsewhere" / "bee")  # a class folder that is a link
    (tree / "bee" / "alias.png").symlink_to(tree / "ant" / "0.png")
    ours = TolerantImageFolder(str(tree))
    theirs = ImageFolder(str(tree), allow_empty=True)
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS
    assert ours.classes == theirs.classes and ".hidden" in ours.classes
    assert ours.samples == theirs.samples and len(ours.samples) == 6 + 1 + 3 + 2 + 1
    assert len(ours.listing.stamps) == len(ours.samples)
    assert ours.listing.outside == [str(tree / "dog" / f"{i}.png") for i in range(2)]


def _sweep(data: Path, csv: Path) -> tuple[list, object]:
    common = dict(data=str(data), batch_size=8, workers=0, metrics=("accuracy",), sweep="s")
    specs = [
        make_spec("test_vit", **common),
        make_spec("test_vit", "tome", {"r": 2}, **common),
    ]
    return specs, LocalRunner(csv, progress=False).run(specs)


def _values(csv: Path, specs: list) -> dict[tuple[str, str], float]:
    rows = read_results(csv)
    rows = rows[rows["run_id"].isin([s.run_id for s in specs])].to_dict("records")
    return {(r["method"], r["metric"]): r["value"] for r in rows}


def test_class_folders_that_are_links_pointed_at_other_images_are_measured_again(tmp_path):
    """The links' targets are what is read, so they are what the run id names: pointed at
    other images, the runs are new (not 'already done') and measure the new images."""
    write_classes(tmp_path / "a", seed=0)
    write_classes(tmp_path / "b", seed=500)
    data = tmp_path / "data"
    data.mkdir()
    for name in CLASSES:
        (data / name).symlink_to(tmp_path / "a" / name)
    csv = tmp_path / "r.csv"
    first_specs, first = _sweep(data, csv)
    for name in CLASSES:
        (data / name).unlink()
        (data / name).symlink_to(tmp_path / "b" / name)
    second_specs, second = _sweep(data, csv)
    assert (first.ok, second.ok, second.skipped) == (2, 2, 0)
    assert {s.run_id for s in first_specs}.isdisjoint(s.run_id for s in second_specs)
    plain_specs, plain = _sweep(tmp_path / "b", tmp_path / "plain.csv")  # b itself, no links
    assert plain.ok == 2
    assert _values(csv, second_specs) == _values(tmp_path / "plain.csv", plain_specs)
    assert _values(csv, first_specs) != _values(csv, second_specs)


def _run(tree: Path, out: Path, *flags: str) -> int:
    argv = ["run", "--model", "test_vit", "--data", str(tree), "--metrics", "accuracy"]
    return main([*argv, "--batch-size", "8", "--out", str(out), "--no-report", *flags])


def test_a_loop_of_links_is_one_line_and_exit_2(tmp_path, capsys, assert_one_line_error):
    tree = write_classes(tmp_path / "data")
    (tree / "ant" / "again").symlink_to(tree / "ant")
    out = tmp_path / "r.csv"
    assert_one_line_error(_run(tree, out), capsys.readouterr().err, "the data folder loops")
    assert not out.exists()
    with pytest.raises(UserError, match="loops"):
        make_loader(str(tree), DATA_CONFIG, 4, workers=0)


def test_links_that_leave_the_data_folder_are_one_warning(tmp_path, caplog):
    write_classes(tmp_path / "elsewhere")
    tree = write_classes(tmp_path / "data")
    (tree / "dog").symlink_to(tmp_path / "elsewhere" / "ant")
    (tree / "bee" / "alias.png").symlink_to(tree / "ant" / "0.png")  # inside: no warning
    caplog.set_level(logging.WARNING, logger="ppt_bench.data.loader")
    for _ in range(2):  # once, not once per run
        loader, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0)
    assert len(loader.dataset) == 2 * len(CLASSES) + 1 + 2
    messages = [r.getMessage() for r in caplog.records if r.name == "ppt_bench.data.loader"]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "2 images" in messages[0] and "outside" in messages[0]
    assert str(tmp_path / "elsewhere" / "ant") in messages[0]


def test_a_fifo_named_like_an_image_is_skipped_not_waited_for(tmp_path, caplog):
    tree = write_classes(tmp_path / "data")
    fifo = tree / "ant" / "pipe.png"
    os.mkfifo(fifo)
    caplog.set_level(logging.WARNING, logger="ppt_bench.data.loader")
    counts: dict[str, int] = {}

    def load() -> None:
        counts["fingerprint"] = len(identity.data_fingerprint(str(tree)))
        for cache in (None, tmp_path / "cache"):
            loader, _ = make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=cache)
            counts[str(cache)] = sum(len(labels) for _, labels, _ in loader)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=60)
    hung = thread.is_alive()
    if hung:  # let the reader blocked on the FIFO go, so that the test ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
    assert not hung, "reading the data waited on a FIFO"
    n = 2 * len(CLASSES)
    assert counts == {"fingerprint": 12, "None": n, str(tmp_path / "cache"): n}
    messages = [r.getMessage() for r in caplog.records if r.name == "ppt_bench.data.loader"]
    assert len(messages) == 1 and "not regular files" in messages[0] and str(fifo) in messages[0]


@pytest.mark.parametrize("inside", [".cache", "cache", "ant/.cache"])
def test_an_image_cache_inside_the_data_folder_is_refused(tmp_path, capsys, assert_one_line_error,
                                                          inside):  # fmt: skip
    """ImageFolder would take a cache folder in the data root (hidden or not) for a class and
    shift the labels of the classes after it."""
    tree = write_classes(tmp_path / "data")
    out = tmp_path / "r.csv"
    code = _run(tree, out, "--cache-dir", str(tree / inside))
    assert_one_line_error(code, capsys.readouterr().err, "inside --data")
    assert not out.exists() and not (tree / inside).exists()
    with pytest.raises(UserError, match="outside the data folder"):
        make_loader(str(tree), DATA_CONFIG, 4, workers=0, cache_dir=tree / inside)
    assert sorted(p.name for p in tree.iterdir()) == sorted(CLASSES)
