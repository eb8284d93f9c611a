"""Per-image outcomes and the unreduced model's outputs: computed once per sweep, kept beside
the results file, found again on resume (counted, not timed)."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from torch import nn

import ppt_bench.engine.evaluate as evaluate_module
from ppt_bench.measure.outcomes import Reference, RunStore, store_folder
from ppt_bench.methods import get_method_class, is_patched
from ppt_bench.results.records import read_results
from ppt_bench.runners.local import LocalRunner
from ppt_bench.sweeps.grid import make_spec

DIGITS = "vit_digits_patch4_32"  # random weights: counting passes needs no trained model
EIGHT = ("ppt", "merge", "prune", "tome", "evit", "topk", "random", "tofu")


def specs(methods=EIGHT, baseline=True, n_images=48, batch_size=16, **more):
    """An accuracy sweep on the digits test set: the baseline, then each method at the first
    value of its demo grid."""
    common = {
        **dict(model=DIGITS, data="digits", n_images=n_images, batch_size=batch_size, workers=0),
        **dict(metrics=("accuracy",), sweep="t"),
        **more,
    }
    runs = [make_spec(method="baseline", **common)] if baseline else []
    for name in methods:
        key, values = get_method_class(name).demo_grid
        runs.append(make_spec(method=name, params={key: values[0]}, **common))
    return runs


@pytest.fixture
def passes(monkeypatch):
    """Counts the passes over the data, and those of an unreduced model: the baseline's own,
    and the unreduced model run beside a reduced one (``reference`` given as a model)."""
    counts = {"runs": 0, "unreduced": 0, "beside": 0}
    accuracy = evaluate_module.evaluate_accuracy

    def counted(model, loader, reference=None, *args, **kwargs):
        beside = isinstance(reference, nn.Module)
        assert not (beside and is_patched(reference))
        counts["runs"] += 1
        counts["beside"] += beside
        counts["unreduced"] += (not is_patched(model)) + beside
        return accuracy(model, loader, reference, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_accuracy", counted)
    return counts


def test_an_eight_method_sweep_runs_the_unreduced_model_once(tmp_path, passes):
    csv = tmp_path / "t.csv"
    summary = LocalRunner(csv, progress=False).run(specs())
    assert summary.ok == 9
    # The baseline's own pass is the reference of the eight methods: no second pass.
    assert passes == {"runs": 9, "unreduced": 1, "beside": 0}
    store = RunStore.beside(csv)
    assert store.folder == store_folder(csv) == tmp_path / "t.outcomes"
    assert len(list(store.folder.glob("reference-*.npz"))) == 1
    df = read_results(csv)
    for run_id in df["run_id"].unique():
        outcomes = store.load_outcomes(run_id)
        assert outcomes is not None and outcomes.n_images == 48
        top1 = df[(df["run_id"] == run_id) & (df["metric"] == "top1")]["value"].item()
        assert top1 == pytest.approx(100 * outcomes.correct.mean())


def test_without_a_baseline_the_first_method_computes_the_reference_for_all(tmp_path, passes):
    LocalRunner(tmp_path / "t.csv", progress=False).run(specs(baseline=False))
    assert passes == {"runs": 8, "unreduced": 1, "beside": 1}


def test_a_resumed_sweep_reuses_the_stored_outcomes_and_reference(tmp_path, passes):
    csv = tmp_path / "t.csv"
    LocalRunner(csv, progress=False).run(specs(methods=EIGHT[:3]))
    store = RunStore.beside(csv)
    stamps = {p.name: p.stat().st_mtime_ns for p in store.folder.glob("*.npz")}
    assert len(stamps) == 4 + 1  # four runs and one reference
    passes.update(runs=0, unreduced=0, beside=0)
    summary = LocalRunner(csv, progress=False).run(specs(methods=EIGHT[:5]))
    assert (summary.skipped, summary.ok) == (4, 2)
    # Two new runs, no pass of the unreduced model: the stored reference is read.
    assert passes == {"runs": 2, "unreduced": 0, "beside": 0}
    after = {p.name: p.stat().st_mtime_ns for p in store.folder.glob("*.npz")}
    assert {k: after[k] for k in stamps} == stamps  # nothing stored was written again
    assert len(after) == len(stamps) + 2


def test_the_stored_reference_gives_what_a_run_of_its_own_gives(tmp_path):
    """Agreement, KL and the paired figures are the same whether a run computes the unreduced
    model itself or reads the sweep's stored outputs."""
    base, tome = specs(methods=("tome",))
    store = RunStore(tmp_path / "store")
    evaluate_module.evaluate(base, progress=False, store=store)
    shared = evaluate_module.evaluate(tome, progress=False, store=store)
    alone = evaluate_module.evaluate(tome, progress=False)
    assert store.references_read == 1 and store.references_computed == 1
    values = [{r["metric"]: (r["value"], r["ci_low"], r["ci_high"]) for r in rows}
              for rows in (shared, alone)]  # fmt: skip
    assert values[0].keys() == values[1].keys()
    for metric in values[0]:
        assert values[0][metric] == pytest.approx(values[1][metric], abs=1e-6), metric


def test_a_stored_reference_for_other_images_is_refused(tmp_path):
    from ppt_bench.core.errors import UserError

    _, tome = specs(methods=("tome",))
    store = RunStore(tmp_path / "store")
    wrong = Reference(torch.zeros(48, 10), torch.full((48,), 9, dtype=torch.long))
    store.save_reference(tome.reference_key, wrong)
    with pytest.raises(UserError, match="do not match the images evaluated now"):
        evaluate_module.evaluate(tome, progress=False, store=store)


def test_reference_key_follows_what_decides_the_unreduced_outputs():
    base, ppt = specs(methods=("ppt",))
    assert base.reference_key == ppt.reference_key == ppt.replace(batch_size=3).reference_key
    for change in (dict(n_images=12), dict(seed=1), dict(dtype="bf16")):
        assert ppt.replace(**change).reference_key != ppt.reference_key, change
    (synthetic,) = specs(methods=(), data="synthetic")
    assert synthetic.reference_key != base.reference_key
    assert ppt.replace(rounds=9).run_id == ppt.run_id  # precision, not what is measured


def test_an_unreadable_reference_counts_as_absent_and_unreadable_outcomes_are_refused(tmp_path):
    from ppt_bench.core.errors import UserError

    store = RunStore(tmp_path / "s")
    assert store.load_outcomes("nope") is None
    store.folder.mkdir()
    store.outcomes_path("cut").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UserError, match=r"outcomes file .*cut\.npz is damaged .*: delete it"):
        store.load_outcomes("cut")
    store.reference_path("cut").write_bytes(b"")
    assert store.load_reference("cut") is None
    store.save_reference("cut", Reference(torch.zeros(2, 3), torch.arange(2)))
    assert torch.equal(store.load_reference("cut").labels, torch.arange(2))  # replaced


def test_token_statistics_alone_need_no_unreduced_model_and_keep_no_outcomes(tmp_path, passes):
    tokens_only = [s.replace(metrics=("tokens",)) for s in specs(methods=("ppt", "tome"))]
    LocalRunner(tmp_path / "t.csv", progress=False).run(tokens_only)
    assert passes == {"runs": 3, "unreduced": 1, "beside": 0}  # the baseline's own pass only
    assert not list(RunStore.beside(tmp_path / "t.csv").folder.glob("*.npz"))


def test_the_reference_key_hashes_the_weights_by_their_content(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one model")
    (first,) = specs(methods=(), checkpoint=str(weights))
    weights.write_bytes(b"another model, same path")
    (second,) = specs(methods=(), checkpoint=str(weights))
    assert second.reference_key != first.reference_key
    with pytest.raises(ValueError, match="make_spec"):  # a spec cannot keep stale hashes
        first.replace(checkpoint=str(tmp_path / "other.pth"))


def test_the_baseline_replaces_a_stored_reference_with_its_own_outputs(tmp_path):
    base, tome = specs(methods=("tome",))
    store = RunStore(tmp_path / "store")
    stale = Reference(torch.zeros(48, 10), torch.zeros(48, dtype=torch.long))
    store.save_reference(base.reference_key, stale)
    evaluate_module.evaluate(base, progress=False, store=store)
    fresh = store.load_reference(base.reference_key)
    assert not torch.equal(fresh.log_probs, stale.log_probs)
    shared = evaluate_module.evaluate(tome, progress=False, store=store)
    alone = evaluate_module.evaluate(tome, progress=False)
    kl = [next(r["value"] for r in rows if r["metric"] == "kl") for rows in (shared, alone)]
    assert kl[0] == pytest.approx(kl[1], abs=1e-6)


def test_a_run_computing_the_reference_holds_the_lock_others_wait_on(tmp_path):

    store, other = RunStore(tmp_path / "s"), RunStore(tmp_path / "s")  # two processes' views
    got_it = threading.Event()

    def second() -> None:
        with other.reference_lock("k"):
            got_it.set()

    with store.reference_lock("k"):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not got_it.wait(0.5)  # blocked while the first computes
    assert got_it.wait(10)
    waiter.join()


def test_a_store_that_cannot_be_written_is_a_one_line_user_error(tmp_path):
    from ppt_bench.core.errors import UserError

    (tmp_path / "file").write_text("not a folder")
    store = RunStore(tmp_path / "file" / "t.outcomes")
    locked = store.reference_lock("k")
    with pytest.raises(UserError, match=r"^cannot write .*: write the results to a folder"):
        locked.__enter__()
    with pytest.raises(UserError, match=r"^cannot write "):
        store.save_reference("k", Reference(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))


def test_a_reference_another_experiments_file_replaced_is_measured_anew(tmp_path):
    """Other weights: other outputs on the same images, with the same labels."""

    from ppt_bench.models.build import build_model

    _, tome = specs(methods=("tome",))
    torch.manual_seed(1)
    weights = tmp_path / "other.pth"
    torch.save(build_model(tome)[0].state_dict(), weights)
    (other,) = specs(methods=("tome",), baseline=False, checkpoint=str(weights))
    store = RunStore(tmp_path / "store")
    evaluate_module.evaluate(tome, progress=False, store=store)
    swapped = store.reference_path(other.reference_key)
    shutil.copy(store.reference_path(tome.reference_key), swapped)
    shared = evaluate_module.evaluate(other, progress=False, store=store)
    alone = evaluate_module.evaluate(other, progress=False)
    kl = [next(r["value"] for r in rows if r["metric"] == "kl") for rows in (shared, alone)]
    assert kl[0] == pytest.approx(kl[1], abs=1e-6)
    assert store.references_read == 0 and store.references_computed == 2
    assert store.load_reference(other.reference_key) is not None  # replaced by its own


def test_a_cut_short_reference_is_measured_anew_once_and_replaced(tmp_path, passes):
    _, tome, merge = specs(methods=("tome", "merge"))
    store = RunStore(tmp_path / "store")
    evaluate_module.evaluate(tome, progress=False, store=store)
    path = store.reference_path(tome.reference_key)
    path.write_bytes(path.read_bytes()[:-100])
    for spec in (tome, merge):
        evaluate_module.evaluate(spec, progress=False, store=store)
    # The cut file's run computes the unreduced outputs again; the run after it reads them.
    assert passes["beside"] == 2 and store.references_read == 1


def _report_args(tmp_path, csv):
    return ["report", str(csv), "--out", str(tmp_path / "r.md")]


def test_outcomes_another_runs_file_replaced_or_cut_short_stop_the_report(
    assert_one_line_error, tmp_path, capsys
):

    from ppt_bench.cli import main

    csv = tmp_path / "t.csv"
    base, tome = specs(methods=("tome",))
    assert LocalRunner(csv, progress=False).run([base, tome]).ok == 2
    store = RunStore.beside(csv)
    mine = store.outcomes_path(tome.run_id)
    shutil.copy(store.outcomes_path(base.run_id), mine)
    code = main(_report_args(tmp_path, csv))
    assert_one_line_error(code, capsys.readouterr().err, f"holds the outcomes of run {base.run_id}")
    mine.write_bytes(store.outcomes_path(base.run_id).read_bytes()[:-50])
    assert_one_line_error(main(_report_args(tmp_path, csv)), capsys.readouterr().err, "is damaged")
    assert not (tmp_path / "r.md").exists()


def test_outcomes_written_before_they_carried_their_run_are_checked_by_their_image_count(
    assert_one_line_error, tmp_path, capsys
):
    from ppt_bench.cli import main

    csv = tmp_path / "t.csv"
    base, tome = specs(methods=("tome",))
    (short,) = specs(methods=(), n_images=16)
    assert LocalRunner(csv, progress=False).run([base, tome]).ok == 2
    store = RunStore.beside(csv)
    evaluate_module.evaluate(short, progress=False, store=store)
    own = store.outcomes_path(tome.run_id)
    own.write_bytes(store.load_outcomes(tome.run_id).to_bytes())  # as written before: no run id
    assert main(_report_args(tmp_path, csv)) == 0
    own.write_bytes(store.load_outcomes(short.run_id).to_bytes())  # 16 images, not 48
    code = main(_report_args(tmp_path, csv))
    assert_one_line_error(code, capsys.readouterr().err, f"16 images where run {tome.run_id}")
