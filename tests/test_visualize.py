"""``ppt-bench visualize``: the PNGs, the panels in them, and the command-line entry."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import resolve_data_config

from ppt_bench.cli import main
from ppt_bench.commands import visualize as vis
from ppt_bench.models.build import build_model


def _image_files(folder, n: int, size: int = 80) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"class{i % 2}" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size + 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _panel(png: Image.Image, layout: vis.Layout, row: int, col: int) -> np.ndarray:
    left, top, right, bottom = layout.panel_box(row, col)
    # A few pixels in from the edge, away from any antialiasing of the panel border.
    return np.asarray(png.crop((left + 3, top + 3, right - 3, bottom - 3)), dtype=np.int16)


def test_visualize_writes_one_grid_per_image(make_model, tmp_path):
    model = make_model("deit_tiny", img_size=64)  # 4x4 patches, 12 blocks
    config = {**resolve_data_config({}, model=model), "input_size": (3, 64, 64)}
    files = _image_files(tmp_path / "images", 2)
    methods = [
        ("prune", {"r": 4, "locations": [1, 5]}),
        ("random", {"r": 4, "locations": [1, 5]}),
        ("tome", {"r": [3, 2]}),
        ("evit", {"keep_rate": 0.5, "locations": [2]}),
    ]
    paths = vis.visualize(
        "deit_tiny_patch16_224",
        methods,
        files,
        tmp_path / "out" / "grid.png",
        built=(model, config),
    )
    assert [p.name for p in paths] == ["grid-0.png", "grid-1.png"]
    layout = vis.Layout(rows=4, cols=3)  # the input and at most two locations
    pictures = []
    for path in paths:
        with Image.open(path) as im:
            png = im.convert("RGB")
        assert png.size == layout.size
        inputs = [_panel(png, layout, row, 0) for row in range(4)]
        assert all(np.array_equal(inputs[0], other) for other in inputs[1:])
        after = [_panel(png, layout, row, 1) for row in range(4)]
        for row in range(4):
            assert np.abs(after[row] - inputs[row]).mean() > 1, f"row {row} shows no reduction"
            for other in range(row):
                assert not np.array_equal(after[row], after[other]), (row, other)
        # The second location of prune drops more patches than the first.
        assert np.abs(_panel(png, layout, 0, 2) - after[0]).mean() > 1
        pictures.append(inputs[0])
    assert not np.array_equal(pictures[0], pictures[1])  # two images, two pictures


def test_draw_panel_blanks_pruned_and_tints_pooled_patches():
    image = np.full((8, 8, 3), 0.2)
    owner = np.array([[0, 0], [-1, 1]])  # token 0 pools two patches, one patch is pruned
    out = vis.draw_panel(image, owner, sizes=np.array([2.0, 1.0]))
    assert np.array_equal(out[4:, 4:], image[4:, 4:])  # its own token: unchanged
    pruned = out[4:, :4]
    assert set(np.unique(pruned)) == set(vis.BLANK)  # hatched
    pooled = out[:4, :]
    assert not np.allclose(pooled, 0.2)
    interior = out[1:3, 1:3]  # away from the outline
    assert np.allclose(interior, (1 - vis.TINT) * 0.2 + vis.TINT * vis.group_colour(0))


def test_token_owner_reads_a_source_matrix():
    # 1 prefix token, 4 patches: token 1 holds patches 0 and 2, token 2 holds patch 3, 1 pruned.
    source = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.float32)
    owner, sizes = vis.token_owner(source, num_prefix=1)
    assert owner.tolist() == [0, -1, 0, 1]
    assert sizes.tolist() == [2, 1]


def test_sources_per_location_are_the_states_after_each_block(make_model):
    model = make_model("deit_tiny", img_size=64)
    from ppt_bench.methods import create_method

    method = create_method("prune", r=3, locations=(2, 7))
    x = torch.randn(2, 3, 64, 64)
    states = vis.sources_per_location(model, method, x)
    assert [(block, tokens) for block, tokens, _ in states] == [(2, 14), (7, 11)]
    full = method.apply(make_model("deit_tiny", img_size=64), trace_source=True)
    with torch.inference_mode():
        full(x)
    assert torch.equal(states[-1][2], full.reduction_info.source)
    assert len(model.blocks) == 12 and not hasattr(model, "reduction_plan")  # left untouched


def test_images_go_through_the_data_config_of_the_built_model(tmp_path):
    model, config = vis.load_model("test_vit")
    assert config == build_model("test_vit")[1] and not model.training
    images = [im for _, im in vis.load_images(_image_files(tmp_path, 2))]
    x, shown = vis.preprocess(config, images)
    assert x.shape == (2, 3, 160, 160) and shown[0].shape == (160, 160, 3)
    # Nothing else decides: another size and normalisation in the config, another batch.
    other = {**config, "input_size": (3, 48, 48), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    x, shown = vis.preprocess(other, images)
    assert x.shape == (2, 3, 48, 48) and np.allclose(shown[1], x[1].permute(1, 2, 0).numpy())


def test_load_images_from_a_folder_and_files(tmp_path):
    files = _image_files(tmp_path, 3)
    named = vis.load_images(tmp_path, n_images=2)
    assert [n for n, _ in named] == ["img0", "img2"]  # sorted: class0/img0, class0/img2
    assert all(im.mode == "RGB" for _, im in named)
    assert [n for n, _ in vis.load_images([files[1]])] == ["img1"]
    with pytest.raises(vis.UserError, match="does not exist"):
        vis.load_images([tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(vis.UserError, match="cannot read image"):
        vis.load_images([tmp_path / "bad.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(vis.UserError, match="no image files"):
        vis.load_images(tmp_path / "empty")


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    _image_files(tmp_path, 3)
    (tmp_path / "class0" / "bad.jpg").write_bytes(b"junk")
    (tmp_path / "class1" / "a.png").write_bytes(b"junk")
    named = vis.load_images(tmp_path, n_images=3)
    assert [n for n, _ in named] == ["img0", "img2", "img1"]  # the first 3 readable ones
    assert "skipped 2 unreadable image(s)" in caplog.text and "bad.jpg" in caplog.text
    for path in tmp_path.rglob("img*.png"):
        path.write_bytes(b"junk")
    with pytest.raises(vis.UserError, match=r"cannot read image .* \(nor 4 other images\)"):
        vis.load_images(tmp_path, n_images=3)


def test_parse_method_reads_toml_values():
    assert vis.parse_method("ppt") == ("ppt", {})
    assert vis.parse_method("evit:keep_rate=0.5,locations=[3,6,9],fuse=false") == (
        "evit",
        {"keep_rate": 0.5, "locations": [3, 6, 9], "fuse": False},
    )
    assert vis.parse_method("tome:r=[8,-1.0]") == ("tome", {"r": [8, -1.0]})
    with pytest.raises(vis.UserError, match="NAME:KEY=VALUE"):
        vis.parse_method("tome:r")
    with pytest.raises(vis.UserError, match=r"--method tome r: '\[8' is not valid TOML"):
        vis.parse_method("tome:r=[8")


def test_output_paths():
    assert vis.output_paths(vis.Path("a/b.png"), ["x"]) == [vis.Path("a/b.png")]
    assert vis.output_paths(vis.Path("a/b.pdf"), ["x", "y"]) == [
        vis.Path("a/b-0.pdf"),
        vis.Path("a/b-1.pdf"),
    ]
    assert vis.output_paths(vis.Path("a"), ["x y", "z", "z"]) == [
        vis.Path("a/x_y.png"),
        vis.Path("a/z.png"),
        vis.Path("a/z-2.png"),  # same file name in two class folders
    ]


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vis.add_arguments(parser)
    return parser.parse_args(argv)


def test_run_from_the_command_line(tmp_path, capsys):
    files = _image_files(tmp_path, 1, size=160)
    out = tmp_path / "figs"
    methods = ["--method", "prune:r=10,locations=[1,3]", "--method", "merge:r=10,locations=[2]"]
    args = _cli(["--model", "test_vit", *methods, "--images", str(files[0]), "--out", str(out)])
    assert vis.run(args) == 0
    written = out / "img0.png"
    assert capsys.readouterr().out.strip() == str(written)
    with Image.open(written) as im:
        assert im.size == vis.Layout(rows=2, cols=3).size


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "ppt:locations=[3,6,9]"], "outside the model's blocks"),
        (["--images", "/nonexistent/x.png"], "does not exist"),
        (["--n-images", "0"], "--n-images must be at least 1"),
    ],
)
def test_run_reports_user_errors(tmp_path, capsys, assert_one_line_error, argv, message):
    files = _image_files(tmp_path, 1, size=160)
    argv = ["--model", "test_vit", "--images", str(files[0]), "--out", str(tmp_path), *argv]
    assert_one_line_error(main(["visualize", *argv]), capsys.readouterr().err, message)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("file.csv/a.png", "file.csv is a file, not a folder"),
        ("file.csv", "a figure file must end in .png"),
        ("noext", "is a file, not a folder"),
        ("folder.png", "is a folder: pass a file path"),
    ],
)
def test_an_unwritable_out_is_a_user_error_before_any_work(
    tmp_path, capsys, monkeypatch, assert_one_line_error, out, message
):
    files = _image_files(tmp_path, 1, size=160)
    (tmp_path / "file.csv").write_text("keep me")
    (tmp_path / "noext").write_text("keep me")
    (tmp_path / "folder.png").mkdir()
    monkeypatch.setattr(vis, "load_model", lambda *a: pytest.fail("built the model"))
    argv = ["--model", "test_vit", "--images", str(files[0]), "--out", str(tmp_path / out)]
    assert_one_line_error(main(["visualize", *argv]), capsys.readouterr().err, message)
    assert (tmp_path / "file.csv").read_text() == "keep me"


def test_run_with_a_checkpoint(tmp_path, capsys):
    import timm

    files = _image_files(tmp_path, 1, size=160)
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save({"model": timm.create_model("test_vit").state_dict()}, good)
    torch.save(timm.create_model("test_vit2").state_dict(), bad)
    common = ["--model", "test_vit", "--method", "topk:r=20,locations=[2]"]
    common += ["--images", str(files[0]), "--out", str(tmp_path / "fig.png")]
    assert vis.run(_cli([*common, "--checkpoint", str(good)])) == 0
    with Image.open(tmp_path / "fig.png") as im:
        assert im.size == vis.Layout(rows=1, cols=2).size
    capsys.readouterr()
    assert main(["visualize", *common, "--checkpoint", str(bad)]) == 2
    assert "does not fit" in capsys.readouterr().err
