"""Sweep grids from flags and TOML files: expansion, precedence, validation."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from ppt_bench.core import identity
from ppt_bench.core.errors import MethodError, UserError
from ppt_bench.core.keyvalue import parse_assignment, parse_sweep, parse_value
from ppt_bench.methods import create_method
from ppt_bench.results.spec import run_settings
from ppt_bench.runners.base import grid_hash
from ppt_bench.sweeps.config import (
    SWEEP_SETTINGS,
    SweepConfig,
    build_config,
    example_config,
    load_config,
)
from ppt_bench.sweeps.grid import expand, grid_size, validate

DEIT = "deit_tiny_patch16_224"


def grid(**kwargs):
    kwargs.setdefault("overrides", {"models": [DEIT]})
    return expand(build_config(**kwargs))


def test_values_are_read_as_toml_with_plain_strings_allowed():
    assert parse_value("50") == 50
    assert parse_value("7e-5") == pytest.approx(7e-5)
    assert parse_value("[3,6,9]") == [3, 6, 9]
    assert parse_value("true") is True
    assert parse_value("auto") == "auto"
    assert parse_assignment("locations=[3, 6]", "--param") == ("locations", [3, 6])
    assert parse_sweep("r=[8,16]") == ("r", [8, 16])


@pytest.mark.parametrize("text", ["locations=[3,6", "r=[1,", "t={a=1"])
def test_a_broken_toml_list_or_table_is_an_error_not_a_string(text):
    key, _, value = text.partition("=")
    with pytest.raises(UserError, match=rf"--param {key}: '\{value[0]}.*' is not valid TOML"):
        parse_assignment(text, "--param")
    with pytest.raises(UserError, match=r"--sweep .*: '.*' is not valid TOML"):
        parse_sweep(text)


@pytest.mark.parametrize("text", ["r", "=5", "r="])
def test_assignment_without_key_or_value_is_an_error(text):
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_assignment(text, "--param")


@pytest.mark.parametrize("text", ["r=8", "r=[]"])
def test_sweep_needs_a_list(text):
    with pytest.raises(UserError, match=r"KEY=\[V1,V2"):
        parse_sweep(text)


def test_grid_is_models_x_method_sweeps_x_batch_sizes_with_baselines_first():
    specs = grid(
        overrides={"models": [DEIT, "deit_small_patch16_224"], "batch_sizes": [1, 4]},
        methods=["ppt", "merge"],
        sweeps=[("r", [8, 16]), ("threshold", [0.0, 1.0])],
    )
    # per model and batch size: baseline + ppt (2 r x 2 thresholds) + merge (2 r)
    assert len(specs) == 2 * 2 * (1 + 4 + 2)
    first = specs[:7]
    assert [s.method for s in first] == ["baseline"] + ["ppt"] * 4 + ["merge"] * 2
    assert {(s.model, s.batch_size) for s in first} == {(DEIT, 1)}
    assert all("threshold" not in s.params for s in specs if s.method == "merge")
    assert len({s.run_id for s in specs}) == len(specs)


def test_settings_that_mean_the_same_reduction_are_one_run(spec):
    """Block lists are sets of blocks, a DiffRate schedule has one full name, a whole number is
    a count: the forms a user may write of one reduction get one run id, and make the same
    method."""
    forms = [
        ("ppt", {"locations": [9, 3]}, {"locations": [3, 9]}),
        ("evit", {"locations": [6, 2], "keep_rate": 1}, {"locations": [2, 6], "keep_rate": 1.0}),
        ("mctf", {"locations": [5, 1], "r": 4.0}, {"locations": [1, 5], "r": 4}),
        ("diffrate", {"schedule": "2.9"}, {"schedule": "ViT-S-DeiT/2.9"}),
    ]
    for method, given, canonical in forms:
        run, same = spec(method, given), spec(method, canonical)
        assert run.run_id == same.run_id and run.params == same.params == canonical
        assert create_method(method, **run.params) == create_method(method, **given)
    specs = grid(methods=["ppt"], sweeps=[("locations", [[9, 3], [3, 9]])])
    assert [s.params for s in specs if s.method == "ppt"] == [{"locations": [3, 9]}]
    with pytest.raises(MethodError, match=r"locations must be distinct, got \[3, 3\]"):
        spec("ppt", {"locations": [3, 3]})


def test_dtypes_and_compile_modes_are_grid_axes_with_their_own_baselines(tmp_path):
    specs = grid(
        overrides={
            "models": [DEIT],
            "device": "cuda",
            "dtype": ["bf16", "fp16"],
            "compile": ["none", "cudagraph"],
            "batch_sizes": [1, 8],
        },
        methods=["ppt"],
    )
    assert len(specs) == 2 * 2 * 2 * 2
    configs = [(s.dtype, s.compile, s.batch_size) for s in specs[::2]]
    assert len(set(configs)) == 8
    # every configuration's baseline runs just before the method compared with it
    for base, ppt in zip(specs[::2], specs[1::2], strict=True):
        assert (base.method, ppt.method) == ("baseline", "ppt")
        assert (base.dtype, base.compile, base.batch_size) == (
            ppt.dtype,
            ppt.compile,
            ppt.batch_size,
        )
    # a config file may give one value or a list; booleans are the old compile switch
    path = tmp_path / "s.toml"
    path.write_text(f'models = ["{DEIT}"]\ndtype = "bf16"\ncompile = [false, true]\n')
    specs = expand(build_config(load_config(path)))
    assert [(s.dtype, s.compile) for s in specs] == [("bf16", "none"), ("bf16", "default")]
    with pytest.raises(UserError, match="dtype must be one of"):
        grid(overrides={"models": [DEIT], "dtype": ["bf16", "fp64"]})


def test_param_applies_only_to_methods_that_have_it():
    specs = grid(methods=["ppt", "tome"], params=[("threshold", 1e-4), ("r", 4)])
    by_method = {s.method: s.params for s in specs}
    assert by_method["ppt"] == {"threshold": 1e-4, "r": 4}
    assert by_method["tome"] == {"r": 4}


def test_a_parameter_given_twice_is_an_error():
    with pytest.raises(UserError, match="--param gives r more than once"):
        grid(methods=["ppt"], params=[("r", 4), ("r", 8)])
    with pytest.raises(UserError, match="--sweep gives r more than once"):
        grid(methods=["ppt"], sweeps=[("r", [4]), ("r", [8])])


def test_param_no_selected_method_has_is_an_error():
    with pytest.raises(UserError, match=r"no selected method .*'threshold'"):
        grid(methods=["merge"], params=[("threshold", 1e-4)])
    with pytest.raises(UserError, match="needs a method"):
        grid(params=[("r", 4)])


def test_invalid_param_value_is_an_error_before_anything_runs():
    with pytest.raises(UserError, match="r must be an integer"):
        grid(methods=["ppt"], params=[("r", -1)])


def test_no_baseline_and_duplicates():
    specs = grid(
        overrides={"models": [DEIT], "baseline": False}, methods=["baseline", "ppt", "ppt"]
    )
    assert [s.method for s in specs] == ["baseline", "ppt"]
    with pytest.raises(UserError, match="nothing to run"):
        grid(overrides={"models": [DEIT], "baseline": False})
    with pytest.raises(UserError, match="no model"):
        grid(overrides={}, methods=["ppt"])


def test_example_config_documents_a_valid_sweep(tmp_path, monkeypatch):
    example = tmp_path / "deit-small-ppt.toml"
    example.write_text(example_config())
    config = build_config(load_config(example))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    copy = identity.url_file(config.checkpoint)  # its URL as if downloaded before
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"weights")
    specs = expand(config)
    assert {s.checkpoint_sha256 for s in specs} == {identity.file_digest(copy)}
    # 2 batch sizes x (baseline + ppt 3 r x 3 thresholds + merge 3 r + prune 3 r)
    assert len(specs) == 2 * (1 + 9 + 3 + 3)
    assert config.sweep_name == "deit-small-ppt"
    assert config.out_path == Path("results/deit-small-ppt.csv")
    assert {s.device for s in specs} == {"cuda"}
    ppt = [s for s in specs if s.method == "ppt"]
    assert {s.params["threshold"] for s in ppt} == {3e-5, 7e-5, 1.5e-4}


def test_the_sweep_config_has_one_attribute_of_its_type_per_declared_setting():
    """SweepConfig lists the settings declared on RunSpec and in SWEEP_SETTINGS as attributes
    that readers and IDEs see; the runners' options are in ``runner_options``."""
    declared = {s.key: s for s in (*run_settings(), *SWEEP_SETTINGS)}
    hints = typing.get_type_hints(SweepConfig)
    listed = {f.name for f in dataclasses.fields(SweepConfig)} - {"methods", "runner_options"}
    assert listed == set(declared)
    for key, s in declared.items():
        kind = typing.get_args(hints[key])[0] if s.axis or s.many else hints[key]
        assert kind in (s.kind, s.kind | None), key
    config = build_config(overrides={"models": [DEIT], "ray_address": "head:6379"})
    assert config.batch_sizes == [64] and config.runner_options == {"ray_address": "head:6379"}


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        f'models = ["{DEIT}"]\nbatch_sizes = [8, 16]\n[sweep]\nr = [4, 8]\n'
        "[methods.ppt]\nthreshold = 0.5\n[methods.merge]\n"
    )
    file = load_config(path)
    assert file["sweep_name"] == "s"
    specs = expand(
        build_config(file, overrides={"batch_sizes": [2]}, methods=["ppt"], params=[("r", 1)])
    )
    assert [(s.method, s.params, s.batch_size) for s in specs] == [
        ("baseline", {}, 2),
        ("ppt", {"threshold": 0.5, "r": 1}, 2),
    ]
    assert specs[0].sweep == "s"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("modles = ['x']", "unknown keys \\['modles'\\]"),
        ("models = [", "not valid TOML"),
        ("[methods.ppt]\nsweep = {r = 3}", "value lists"),
        ("[methods.tome.sweep]\nrr = [4, 8]", r"\[methods.tome.sweep\]: tome has no parameter rr"),
        ("[sweep]\nr = 3", "value lists"),
        ("device = 0", "setting 'device' must be of type str"),
        ("workers = true", "setting 'workers' must be of type int"),
    ],
)
def test_bad_config_files(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        build_config(load_config(path), overrides={"models": [DEIT]}, methods=["ppt"])


def test_unreadable_config_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match=r"UTF-8|TOML"):
        load_config(tmp_path / "bin.toml")


def test_relative_paths_become_absolute_so_run_ids_do_not_depend_on_spelling(tmp_path, monkeypatch):
    (tmp_path / "val").mkdir()
    monkeypatch.chdir(tmp_path)
    rel = grid(overrides={"models": [DEIT], "data": "val"})
    abs_ = grid(overrides={"models": [DEIT], "data": str(tmp_path / "val")})
    assert rel[0].data == str((tmp_path / "val").resolve())
    assert rel[0].run_id == abs_[0].run_id
    assert grid(overrides={"models": [DEIT], "data": "digits"})[0].data == "digits"


def test_validate_catches_what_runspec_cannot(tmp_path):
    validate(grid(methods=["ppt"]))
    with pytest.raises(UserError, match="unknown model 'deit_tinyy"):
        validate(grid(overrides={"models": ["deit_tinyy_patch16_224"]}))
    with pytest.raises(UserError, match=r"ppt on deit_tiny_patch16_224 \(12 blocks\)"):
        validate(grid(methods=["ppt"], params=[("locations", [3, 30])]))
    with pytest.raises(UserError, match="not a timm VisionTransformer"):
        validate(grid(overrides={"models": ["resnet18"]}, methods=["ppt"]))
    validate(grid(overrides={"models": ["resnet18"]}))  # a baseline needs no patch
    gap = {"models": ["vit_medium_patch16_gap_256"]}  # no class token
    validate(grid(overrides=gap, methods=["merge", "tome", "random"]))
    with pytest.raises(UserError, match="prune ranks tokens by the class token's attention"):
        validate(grid(overrides=gap, methods=["merge", "prune"]))
    with pytest.raises(UserError, match=r"--data .* is not a directory"):
        validate(grid(overrides={"models": [DEIT], "data": str(tmp_path / "none")}))
    with pytest.raises(UserError, match=r"--checkpoint .* does not exist"):
        validate(grid(overrides={"models": [DEIT], "checkpoint": str(tmp_path / "w.pth")}))


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("flat", "holds images but no class folders"),
        ("empty", "is empty"),
        ("empty_classes", "no images found"),
    ],
)
def test_validate_checks_the_data_layout_before_any_run(tmp_path, layout, message):
    if layout == "flat":
        (tmp_path / "x.png").write_bytes(b"never decoded")
    if layout == "empty_classes":
        (tmp_path / "cat").mkdir()
        (tmp_path / "dog" / "sub").mkdir(parents=True)
        (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=f"--data: .*{message}"):
        validate(grid(overrides={"models": [DEIT], "data": str(tmp_path)}))
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "1.JPEG").write_bytes(b"unreadable images are a run-time matter")
    validate(grid(overrides={"models": [DEIT], "data": str(tmp_path)}))


def test_grid_hash_ignores_order():
    specs = grid(methods=["ppt", "merge"])
    assert grid_hash(specs) == grid_hash(specs[::-1])
    assert grid_hash(specs) != grid_hash(specs[:-1])


def test_budgets_come_from_the_config_file_and_the_flags(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text(f'models = ["{DEIT}"]\nmethods = ["tome"]\nbudget = ["macs=0.70", "gmacs=1"]\n')
    assert build_config(load_config(path)).budget == ["macs=0.7", "gmacs=1"]
    flags = build_config(load_config(path), overrides={"budget": ["speedup=1.5"]})
    assert flags.budget == ["speedup=1.5"]
    assert build_config(None, overrides={"models": [DEIT]}).budget == []
    path.write_text(f'models = ["{DEIT}"]\nbudget = "flops=2"\n')
    with pytest.raises(UserError, match="a budget is gmacs="):
        build_config(load_config(path))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"methods": ["ppt", "tome"], "sweeps": [("r", [2, 4, 8])]},
        {"methods": ["ppt"], "overrides": {"models": [DEIT, "test_vit"], "batch_sizes": [1, 4]}},
        {
            "methods": ["tome"],
            "sweeps": [("r", [1, 2])],
            "overrides": {"models": [DEIT], "baseline": False},
        },
    ],
)
def test_grid_size_counts_the_runs_expand_makes(kwargs):
    config = build_config(
        **kwargs, **({} if "overrides" in kwargs else {"overrides": {"models": [DEIT]}})
    )
    assert grid_size(config) == len(expand(config)) > 1
