"""``evaluate`` end to end, ``failed_rows``, and ``build_model`` (names, tags, checkpoints)."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import timm
import torch
from PIL import Image

import ppt_bench.models.build
from ppt_bench.core.errors import UserError
from ppt_bench.core.identity import file_digest
from ppt_bench.engine.evaluate import evaluate
from ppt_bench.models.build import build_model
from ppt_bench.results.records import (
    COLUMNS,
    append_rows,
    error_message,
    failed_rows,
    read_results,
    unit_of,
)
from ppt_bench.results.spec import RunSpec
from ppt_bench.sweeps.grid import make_spec

TINY = "test_vit"  # timm's 6-block test ViT, 160 px
PPT = {"r": 20, "locations": [1, 3], "threshold": 1e-4}
ALL_CPU_METRICS = ("accuracy", "macs", "tokens", "throughput", "latency")  # memory: CUDA only


@pytest.fixture(autouse=True)
def few_timing_iterations(monkeypatch):
    monkeypatch.setenv("PPT_BENCH_WARMUP", "1")
    monkeypatch.setenv("PPT_BENCH_ITERS", "3")


def by_metric(rows: list[dict]) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows}


@pytest.fixture(scope="module")
def synthetic_rows() -> dict[str, list[dict]]:
    common = dict(model=TINY, batch_size=4, n_images=8, workers=0, metrics=ALL_CPU_METRICS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PPT_BENCH_WARMUP", "1")
        mp.setenv("PPT_BENCH_ITERS", "3")
        return {
            "baseline": evaluate(RunSpec(method="baseline", **common)),
            "ppt": evaluate(RunSpec(method="ppt", params=PPT, **common)),
        }


@pytest.mark.parametrize("method", ["baseline", "ppt"])
def test_evaluate_rows_follow_the_schema(synthetic_rows, method, tmp_path):
    rows = synthetic_rows[method]
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert all(r["status"] == "ok" and r["unit"] == unit_of(r["metric"]) for r in rows)
    assert {(r["dataset"], r["n_images"], r["batch_size"]) for r in rows} == {("synthetic", 8, 4)}
    metrics = by_metric(rows)
    expected = {"agreement_top1", "kl", "gmacs", "gmacs_fvcore", "gmacs_single_input"}
    expected |= {"param_count", "samples_per_sec", "cpu_threads", "latency_p50_ms"}
    expected |= {"latency_p90_ms", "timing_rounds"} | {f"tokens_block_{i}" for i in range(6)}
    if method == "ppt":  # timed in pairs with the unreduced model
        expected |= {"pooled_frac_block_1", "pooled_frac_block_3"}
        expected |= {"speedup", "baseline_samples_per_sec"}
    # Synthetic labels mean nothing: no top-1.
    assert set(metrics) == expected
    append_rows(tmp_path / "r.csv", rows)
    assert len(read_results(tmp_path / "r.csv")) == len(rows)


def test_baseline_agrees_with_itself_and_ppt_costs_less(synthetic_rows):
    base, ppt = by_metric(synthetic_rows["baseline"]), by_metric(synthetic_rows["ppt"])
    assert (base["agreement_top1"], base["kl"]) == (100.0, 0.0)
    assert 0.0 <= ppt["agreement_top1"] <= 100.0 and ppt["kl"] >= 0.0
    assert ppt["gmacs"] < base["gmacs"]
    assert ppt["param_count"] == base["param_count"]
    assert [ppt[f"tokens_block_{i}"] for i in range(6)] == [101, 81, 81, 61, 61, 61]
    assert base["tokens_block_5"] == 101


def test_evaluate_is_reproducible_from_the_seed():
    spec = RunSpec(
        model=TINY, method="ppt", params=PPT, batch_size=4, n_images=4, workers=0,
        metrics=("accuracy", "tokens"),
    )  # fmt: skip
    first, again = by_metric(evaluate(spec)), by_metric(evaluate(spec))
    assert first == again


def test_evaluate_on_an_image_folder(tmp_path):
    for label, colour in enumerate(["red", "green", "blue"]):
        (tmp_path / "imgs" / f"class{label}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (48, 40), colour).save(
                tmp_path / "imgs" / f"class{label}" / f"{i}.png"
            )
    (tmp_path / "imgs" / "class0" / "broken.jpg").write_bytes(b"not a jpeg")
    spec = RunSpec(
        model=TINY, method="ppt", params=PPT, data=str(tmp_path / "imgs"), batch_size=4,
        workers=0, metrics=("accuracy",),
    )  # fmt: skip
    rows = evaluate(spec)
    metrics = by_metric(rows)
    assert set(metrics) == {
        *("top1", "top5", "loss", "agreement_top1", "kl", "unreadable_images"),
        *("delta_top1", "p_value"),  # against the unreduced model on the same images
    }
    assert metrics["unreadable_images"] == 1
    assert {(r["dataset"], r["n_images"]) for r in rows} == {("imgs", 6)}
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100


def test_failed_rows_record_the_error():
    spec = make_spec(TINY, data="/no/such/folder")
    with pytest.raises(UserError) as info:
        evaluate(spec)
    rows = failed_rows(spec, info.value)
    assert len(rows) == 1 and set(rows[0]) == set(COLUMNS)
    assert rows[0]["status"] == "failed" and rows[0]["metric"] == ""
    assert "/no/such/folder" in rows[0]["error"]
    assert error_message(RuntimeError("bad\nthing")) == "RuntimeError: bad"
    assert error_message(KeyError()) == "KeyError"
    assert failed_rows(spec, "worker died: signal 9")[0]["error"] == "worker died: signal 9"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="CUDA is not available"):
        evaluate(RunSpec(model=TINY, device="cuda", metrics=("macs",)))


def test_unknown_model_suggests_a_name():
    with pytest.raises(UserError, match=r"Did you mean.*deit_small_patch16_224"):
        build_model("deit_smal_patch16_224")


def test_pretrained_tag_without_a_hub_says_to_pass_a_checkpoint(monkeypatch):
    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return create(name, pretrained=False, **kwargs)

    create = timm.create_model
    monkeypatch.setattr(ppt_bench.models.build.timm, "create_model", offline)
    with pytest.raises(UserError, match="--checkpoint"):
        build_model(f"{TINY}.r160_in1k")


def save_checkpoint(path, nested: str | None, prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    weights = timm.create_model(TINY).state_dict()
    state = {prefix + k: v for k, v in weights.items()}
    torch.save(state if nested is None else {nested: state, "epoch": 3}, path)
    return weights


@pytest.mark.parametrize(
    ("nested", "prefix"), [(None, ""), ("model", "module."), ("state_dict", ""), ("model_ema", "")]
)
def test_checkpoint_from_a_file(tmp_path, nested, prefix):
    weights = save_checkpoint(tmp_path / "w.pth", nested, prefix)
    model, config = build_model(TINY, checkpoint=str(tmp_path / "w.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert config["input_size"] == (3, 160, 160) and not model.training


def test_a_checkpoint_fine_tuned_on_other_classes_sets_the_head(tmp_path):
    torch.manual_seed(7)
    weights = timm.create_model(TINY, num_classes=3).state_dict()
    path = str(tmp_path / "three.pth")
    torch.save({"model": weights}, path)
    for model, _ in (
        build_model(TINY, checkpoint=path),
        build_model(RunSpec(TINY, checkpoint=path)),
    ):
        assert model.num_classes == 3
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert build_model(TINY, num_classes=5)[0].num_classes == 5
    with pytest.raises(UserError, match=r"does not fit .*size mismatch for head\.weight"):
        build_model(TINY, checkpoint=path, num_classes=5)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder served over http from 127.0.0.1, and torch hub's cache in a fresh folder."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_checkpoint_from_a_url(served):
    root, base = served
    weights = save_checkpoint(root / "w.pth", "model")
    model, _ = build_model(RunSpec(model=TINY, checkpoint=f"{base}/w.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_urls_with_the_same_file_name_are_two_checkpoints(served):
    root, base = served
    (root / "v2").mkdir()
    v1 = save_checkpoint(root / "digits.pth", None)
    torch.manual_seed(8)
    v2 = timm.create_model(TINY).state_dict()
    torch.save(v2, root / "v2" / "digits.pth")
    for name, weights in (("digits.pth", v1), ("v2/digits.pth", v2)):
        url, file = f"{base}/{name}", root / name
        spec = make_spec(TINY, checkpoint=url)  # the first spec of a URL downloads it
        assert spec.checkpoint_sha256 == file_digest(file)  # never '' before a download
        assert make_spec(TINY, checkpoint=url).run_id == spec.run_id  # so a resume skips it
        model, _ = build_model(spec)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_a_url_that_cannot_be_downloaded_is_one_line(served):
    _, base = served
    with pytest.raises(UserError, match=r"could not download checkpoint .*missing\.pth") as err:
        make_spec(TINY, checkpoint=f"{base}/missing.pth")
    assert "\n" not in str(err.value)


def test_the_cause_of_a_failed_download_is_quoted_whole(tmp_path, monkeypatch):
    """The reason was cut at 120 characters, mid-word."""
    reason = (
        "certificate verify failed: unable to get local issuer certificate for the proxy that "
        "this network sends every request through (_ssl.c:1006)"
    )

    def refused(url, dst, progress=True):
        raise OSError(reason)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refused)
    with pytest.raises(UserError) as err:
        make_spec(TINY, checkpoint="https://example.org/w.pth")
    assert str(err.value) == (
        f"could not download checkpoint https://example.org/w.pth ({reason}); check the URL and "
        "the network, or pass a local file"
    )


def test_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_model(TINY, checkpoint=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="could not read"):
        build_model(TINY, checkpoint=str(tmp_path / "junk.pth"))
    torch.save({"model": timm.create_model("test_vit2").state_dict()}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit"):
        build_model(TINY, checkpoint=str(tmp_path / "other.pth"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["baseline", "ppt"])
def test_evaluate_on_cuda(method):
    spec = RunSpec(
        model=TINY, method=method, params={} if method == "baseline" else PPT, batch_size=8,
        n_images=16, device="cuda", dtype="fp16", workers=0, metrics=(*ALL_CPU_METRICS, "memory"),
    )  # fmt: skip
    metrics = by_metric(evaluate(spec))
    assert metrics["peak_mem_mb"] > 0 and "cpu_threads" not in metrics
    assert metrics["samples_per_sec"] > 0 and metrics["latency_p50_ms"] > 0
    assert 0 <= metrics["agreement_top1"] <= 100


def test_compile_wraps_only_the_timed_model(monkeypatch):
    compiled = []

    def fake_compile(model, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    spec = RunSpec(model=TINY, compile=True, batch_size=2, metrics=("throughput", "macs"))
    metrics = by_metric(evaluate(spec))
    assert len(compiled) == 1 and metrics["samples_per_sec"] > 0 and metrics["gmacs"] > 0
