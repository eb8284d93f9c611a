"""The training loop: determinism, training through a patched model, checkpoints, the CLI."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import Subset

from ppt_bench.commands.train import add_arguments, parse_params, run
from ppt_bench.core.errors import MethodError, UserError
from ppt_bench.data.digits import digits_dataset
from ppt_bench.data.loader import Transformed, batch_loader
from ppt_bench.engine.train import (
    TrainConfig,
    build_for_training,
    build_transforms,
    save_checkpoint,
    train,
)
from ppt_bench.measure.accuracy import evaluate_accuracy
from ppt_bench.methods import create_method
from ppt_bench.models.digits import MODEL_NAME

TINY = TrainConfig(epochs=1, batch_size=32, warmup_epochs=0.5, seed=3)


def tiny_model(seed: int = 0, depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(MODEL_NAME, depth=depth, embed_dim=32, num_heads=2)


def subset(n: int, split: str = "train") -> Subset:
    return Subset(digits_dataset(split), range(n))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    runs = [train(tiny_model(), subset(96), subset(32, "test"), TINY, progress=False) for _ in "ab"]
    other = train(
        tiny_model(), subset(96), None, TrainConfig(**{**vars(TINY), "seed": 4}), progress=False
    )
    a, b, c = (state(r.model) for r in (*runs, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].val_top1 == runs[1].val_top1
    assert not all(torch.equal(a[k], c[k]) for k in a), "the seed does not reach the training"


def test_training_leaves_global_determinism_setting_as_it_was():
    before = torch.are_deterministic_algorithms_enabled()
    train(tiny_model(), subset(32), None, TINY, progress=False)
    assert torch.are_deterministic_algorithms_enabled() == before


def _digit_batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    from timm.data import create_transform, resolve_data_config

    tf = create_transform(**resolve_data_config(model=tiny_model()))
    data = subset(n)
    return torch.stack([tf(data[i][0]) for i in range(n)]), torch.tensor(
        [data[i][1] for i in range(n)]
    )


def test_ppt_patched_model_gets_gradients_through_both_branches_and_learns():
    x, y = _digit_batch()
    probe = create_method("ppt", r=8, locations=(0, 1)).apply(tiny_model())
    probe(x)
    # A threshold at the median variance sends half the images to each branch.
    threshold = probe.reduction_info.stats["score_var"][:, 0].median().item()
    model = create_method("ppt", r=8, locations=(0, 1), threshold=threshold).apply(tiny_model())
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    pooled = model.reduction_info.stats["pooled"][:, 0]
    assert 0 < pooled.sum() < len(pooled), "both branches should be taken"
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = torch.nn.functional.cross_entropy(model(x), y)
    assert after < loss - 0.05


def test_train_applies_the_method_and_keeps_the_state_dict_keys():
    model = tiny_model()
    keys = set(model.state_dict())
    result = train(
        model, subset(64), subset(32, "test"), TINY, create_method("merge", r=8, locations=(0, 1))
    )
    assert result.model.reduction_info is not None
    assert result.model.reduction_info.tokens[-1] < 65
    assert set(result.model.state_dict()) == keys
    assert 0.0 <= result.val_top1 <= 100.0
    assert len(result.history) == 1 and result.history[0].val_top1 == result.val_top1


def test_validation_is_the_evaluation_pass_of_ppt_bench_run():
    result = train(tiny_model(), subset(64), subset(32, "test"), TINY, progress=False)
    _, eval_tf = build_transforms(result.model)
    val_set = Transformed(subset(32, "test"), eval_tf)
    loader = batch_loader(val_set, 64, seed=TINY.seed)
    images, labels, unreadable = next(iter(loader))
    assert (images.shape[0], labels.shape[0], unreadable) == (32, 32, 0)
    val = evaluate_accuracy(result.model, loader, progress=False)
    assert val.figure("top1") == pytest.approx(result.val_top1)
    assert val.figure("loss") == pytest.approx(result.history[-1].val_loss)


def test_save_checkpoint_replaces_atomically_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "w.pth"
    save_checkpoint({"a": torch.ones(2)}, path)
    save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    with pytest.raises(Exception):  # noqa: B017 (pickling a lambda fails in torch's own way)
        save_checkpoint({"a": lambda: 0}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["w.pth"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "changes",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"smoothing": 1.0},
        {"amp_dtype": "fp8"},
        {"augment": "flip"},
        {"device": "tpu"},
    ],
)
def test_bad_train_config_is_a_user_error(changes):
    with pytest.raises(UserError):
        TrainConfig(**changes)


# -- ppt-bench train ---------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_params_are_toml_values():
    items = ["r=16", "locations = [3, 6, 9]", "threshold=7e-5", "branch=pool", "prop_attn=false"]
    assert parse_params(items) == {
        "r": 16,
        "locations": [3, 6, 9],
        "threshold": 7e-5,
        "branch": "pool",
        "prop_attn": False,
    }


@pytest.mark.parametrize("item", ["r", "=3", "r="])
def test_bad_params_are_user_errors(item):
    with pytest.raises(UserError, match="--param"):
        parse_params([item])


def test_defaults_train_the_digits_model():
    args = parse()
    assert (args.model, args.data, args.method) == (MODEL_NAME, "digits", None)
    assert args.epochs == TrainConfig().epochs


@pytest.mark.parametrize(
    ("argv", "error", "match"),
    [
        (["--param", "r=8"], UserError, "needs --method"),
        (["--method", "ppx"], MethodError, "Did you mean 'ppt'"),
        (["--method", "ppt", "--param", "rr=8"], MethodError, "no parameter 'rr'"),
        (["--method", "ppt", "--param", "r=[1,"], UserError, "--param r: '\\[1,' is not valid"),
        (["--method", "ppt", "--param", "r=[1]"], MethodError, "r must be an integer"),
        (["--epochs", "0"], UserError, "epochs"),
        (["--device", "tpu"], UserError, "device"),
        (["--data", "/no/such/folder"], UserError, "train/"),
        (["--model", "vit_no_such_model"], UserError, "unknown model"),
    ],
)
def test_bad_train_command_lines_are_user_errors(argv, error, match):
    with pytest.raises(error, match=match):
        run(parse(*argv))


def _image_tree(root, split: str, classes: tuple[str, ...], per_class: int = 4) -> None:
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (40 * c + i, 0, 0)).save(folder / f"{i}.png")


def test_data_without_val_folder_is_a_user_error(tmp_path):
    _image_tree(tmp_path, "train", ("a", "b"))
    with pytest.raises(UserError, match="no val/ folder"):
        run(parse("--data", str(tmp_path)))


def test_train_command_fine_tunes_a_patched_model_on_an_image_folder(tmp_path, capsys):
    _image_tree(tmp_path, "train", ("a", "b"))
    _image_tree(tmp_path, "val", ("a", "b"), per_class=2)
    out = tmp_path / "w.pth"
    argv = ["--data", str(tmp_path), "--method", "ppt", "--param", "r=8", "--epochs", "1"]
    assert run(parse(*argv, "--batch-size", "4", "--device", "cpu", "--out", str(out))) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["method"] == "ppt" and ckpt["params"] == {"r": 8}
    reference = timm.create_model(MODEL_NAME, num_classes=2)
    reference.load_state_dict(ckpt["model"])  # the patch leaves the weights loadable as they are
    assert "val top-1" in capsys.readouterr().out
    # Training goes on from the 2-class checkpoint (the digits model has 10 classes).
    again = tmp_path / "again.pth"
    argv = [*argv, "--batch-size", "4", "--device", "cpu", "--checkpoint", str(out)]
    assert run(parse(*argv, "--out", str(again))) == 0
    assert torch.load(again, weights_only=True)["model"]["head.weight"].shape[0] == 2


def test_unreadable_images_are_skipped_and_counted_in_training_and_validation(tmp_path, capsys):
    _image_tree(tmp_path, "train", ("a", "b"))
    _image_tree(tmp_path, "val", ("a", "b"), per_class=2)
    (tmp_path / "train" / "a" / "bad.jpg").write_bytes(b"junk")
    (tmp_path / "val" / "b" / "bad.jpg").write_bytes(b"junk")
    out = tmp_path / "w.pth"
    argv = ["--data", str(tmp_path), "--epochs", "1", "--batch-size", "1", "--device", "cpu"]
    assert run(parse(*argv, "--out", str(out))) == 0
    assert "skipped unreadable images: 1 in train/, 1 in val/" in capsys.readouterr().out
    assert out.is_file()
    for path in (tmp_path / "train").rglob("*.png"):
        path.write_bytes(b"junk")
    with pytest.raises(UserError, match="no training image could be decoded"):
        run(parse(*argv, "--out", str(out)))


@pytest.mark.parametrize("out", ["folder", "file/w.pth"])
def test_an_unwritable_out_is_a_user_error_before_training(tmp_path, monkeypatch, out):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("an ordinary file")
    monkeypatch.setattr("ppt_bench.commands.train.train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(UserError, match="--out"):
        run(parse("--out", str(tmp_path / out)))


def test_an_out_without_room_for_the_weights_is_a_user_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("ppt_bench.commands.train.train", lambda *a, **k: pytest.fail("trained"))
    nearly_full = SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000)
    monkeypatch.setattr("shutil.disk_usage", lambda path: nearly_full)
    with pytest.raises(UserError, match=r"^--out .*w\.pth: .* has 0\.0 MB free and the file needs"):
        run(parse("--out", str(tmp_path / "w.pth")))


def test_weights_that_cannot_be_saved_after_training_are_kept_and_said_where(tmp_path, monkeypatch):
    """A disk that fills up during the training: the weights go to the cache (else the
    temporary folder), and the one-line error says where."""
    _image_tree(tmp_path, "train", ("a", "b"))
    _image_tree(tmp_path, "val", ("a", "b"), per_class=2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def full(state, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("ppt_bench.commands.train.save_checkpoint", full)
    out = tmp_path / "out" / "w.pth"
    argv = ["--data", str(tmp_path), "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    with pytest.raises(UserError) as err:
        run(parse(*argv, "--out", str(out)))
    message = str(err.value)
    kept = next((tmp_path / "cache" / "ppt-bench" / "unsaved").glob("w-*.pth"))
    assert message.startswith(f"cannot write --out {out} (No space left on device): the trained")
    assert message.endswith(f"are kept in {kept}; move them where they belong")
    assert "\n" not in message and not out.exists()
    state = torch.load(kept, weights_only=True)
    assert state["model"].keys() == timm.create_model(MODEL_NAME, num_classes=2).state_dict().keys()
    assert f"val top-1 {state['val_top1']:.2f}%" in message


def test_training_keeps_a_checkpoint_head_that_fits_the_data_and_replaces_others(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model(MODEL_NAME, num_classes=2)
    path = str(tmp_path / "two.pth")
    torch.save({"model": trained.state_dict()}, path)
    same = build_for_training(MODEL_NAME, path, num_classes=2)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in same.state_dict().items())
    other = build_for_training(MODEL_NAME, path, num_classes=3)
    assert other.head.weight.shape[0] == 3
    qkv = "blocks.0.attn.qkv.weight"
    assert torch.equal(other.state_dict()[qkv], trained.state_dict()[qkv])
    assert build_for_training(MODEL_NAME, None, num_classes=4).num_classes == 4


@pytest.mark.slow
def test_torchrun_trains_data_parallel_on_cpu_and_only_rank_0_saves(tmp_path):
    _image_tree(tmp_path, "train", ("a", "b"), per_class=8)
    _image_tree(tmp_path, "val", ("a", "b"), per_class=2)
    out = tmp_path / "ddp.pth"
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import argparse, os
            from ppt_bench.commands.train import add_arguments, run
            parser = argparse.ArgumentParser()
            add_arguments(parser)
            argv = ["--data", {str(tmp_path)!r}, "--method", "ppt", "--param", "r=8",
                    "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", {str(out)!r}]
            assert run(parser.parse_args(argv)) == 0
            # One write per line: the two processes share the pipe.
            rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
            print(f"done rank {{rank}} of {{world}}", flush=True)
            """
        )
    )
    # --standalone rendezvous on a free local port: other jobs on the machine may hold 29500.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    assert "done rank 0 of 2" in proc.stdout and "done rank 1 of 2" in proc.stdout
    assert proc.stdout.count("val top-1") == 1  # rank 0 alone reports and saves
    assert torch.load(out, weights_only=True)["method"] == "ppt"
