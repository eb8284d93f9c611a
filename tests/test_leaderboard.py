"""The leaderboard of a sweep run at budgets, from planted runs and per-image outcomes."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ppt_bench.core import stats
from ppt_bench.core.stats import Estimate
from ppt_bench.measure.outcomes import Outcomes, RunStore
from ppt_bench.results.leaderboard import holm
from ppt_bench.results.records import append_rows, make_rows
from ppt_bench.results.report import write_report
from ppt_bench.results.spec import RunSpec

N = 1000
MODEL = "deit_tiny_patch16_224"


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted: 0.01 x4, 0.03 x3, 0.04 x2, 0.5 x1, each at least the one before
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []


def _correct(best: np.ndarray, only_best: int, only_other: int) -> np.ndarray:
    """Outcomes that differ from ``best`` on ``only_best`` images it gets right and
    ``only_other`` images it gets wrong."""
    other = best.copy()
    right, wrong = np.flatnonzero(best), np.flatnonzero(~best)
    other[right[:only_best]] = False
    other[wrong[:only_other]] = True
    return other


def _write_run(
    path, store, method, params, correct, *, speedup=None, budget=True, compile="none"
) -> str:
    spec = RunSpec(
        MODEL,
        method,
        params,
        data="digits",
        batch_size=64,
        compile=compile,
        budget={"budget": "macs=0.7", "target_gmacs": 0.88, "share": 0.69} if budget else {},
    )
    outcomes = Outcomes(
        label=np.zeros(N, dtype=np.int64),
        pred=np.where(correct, 0, 1 + np.arange(N) % 5),
        top5=np.ones(N, dtype=bool),
        loss=np.ones(N),
        ref_pred=np.zeros(N, dtype=np.int64),  # the unreduced model: always right
        kl=np.zeros(N),
    )
    against = outcomes.against_reference()
    metrics = {
        "top1": stats.proportion(outcomes.correct),
        "delta_top1": against.delta,
        "p_value": against.p_value,
        "agreement_top1": stats.proportion(outcomes.pred == outcomes.ref_pred),
        "gmacs": 0.87 if budget else 1.26,
    }
    if speedup is not None:
        metrics["speedup"] = speedup
    append_rows(path, make_rows(spec, metrics, dataset="digits", n_images=N))
    store.save_outcomes(spec.run_id, outcomes)
    return spec.run_id


def _table(section: str) -> list[dict[str, str]]:
    """The rows of the markdown table in a report's section, by header."""
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in r.strip("|").split("|")), strict=True))
        for r in rows[1:]
    ]


def test_planted_leaderboard_ranks_and_marks_the_ties(tmp_path):
    """tome is best (700 of 1000 right); evit loses 2 and gains 1 (p = 1); ppt
    loses 20 and gains 8 (McNemar p in [0.025, 0.05): beaten before the correction, tied
    after it, Holm doubling its p as the third smallest of four); prune and random lose about
    80 and gain about 10 (beaten, tied with each other)."""
    path = tmp_path / "r.csv"
    store = RunStore.beside(path)
    best = np.arange(N) < 700
    evit = _correct(best, 2, 1)
    ppt = _correct(best, 20, 8)
    prune = _correct(best, 80, 10)
    rand = _correct(best, 81, 10)
    p_ppt = stats.paired(best, ppt).p_value
    assert 0.025 <= p_ppt < 0.05  # significant alone, not once doubled
    assert stats.paired(prune, rand).p_value == 1.0  # prune and random tie with each other
    _write_run(path, store, "baseline", {}, np.ones(N, dtype=bool), budget=False)
    _write_run(path, store, "tome", {"r": 10}, best, speedup=Estimate(1.50, 1.45, 1.55))
    _write_run(path, store, "evit", {"keep_rate": 0.75}, evit, speedup=Estimate(1.52, 1.50, 1.56))
    _write_run(path, store, "ppt", {"r": 42}, ppt, speedup=Estimate(1.30, 1.25, 1.35))
    _write_run(path, store, "prune", {"r": 42}, prune, speedup=Estimate(1.20, 1.10, 1.30))
    _write_run(path, store, "random", {"r": 42}, rand, speedup=Estimate(1.21, 1.12, 1.51))
    report = write_report(path, tmp_path / "r.md")
    text = report.markdown.read_text()
    assert "~" not in text  # no interpolated cell in a sweep at budgets
    section = text[text.index("### At macs=0.7") :].split("\n## ")[0]  # up to the next section
    table = _table(section)
    got = [(row["rank"], row["method"]) for row in table]
    assert got == [
        ("1=", "tome"),
        ("1=", "evit (tied)"),
        ("1=", "ppt (tied)"),
        ("4", "prune"),
        ("5", "random"),
    ], got
    ppt_row = table[2]
    assert float(ppt_row["p vs best (Holm)"]) == pytest.approx(2 * p_ppt, rel=1e-3)
    # Speed: evit is fastest, tome's interval overlaps evit's, random's reaches it too; the
    # others' do not.
    speed = {row["method"].split()[0]: row["speedup @64"] for row in table}
    assert speed["evit"].endswith("(fastest)")
    assert speed["tome"].endswith("(tied)") and speed["random"].endswith("(tied)")
    assert not re.search(r"\((tied|fastest)\)", speed["ppt"] + speed["prune"])
    sentence = section.splitlines()[2]
    assert sentence.startswith("At macs=0.7 (0.88 GMACs), tome is the most accurate (70.00%)")
    assert "evit and ppt are not significantly behind it" in sentence
    assert "beats the other 2 significantly" in sentence
    assert "Fastest at batch size 64: evit (1.52x), with tome and random within its interval" in (
        sentence
    )


def test_runs_in_two_compile_modes_get_a_leaderboard_each(tmp_path):
    """The same budget timed eager and compiled: one leaderboard per compile mode, each with its
    own runs' speedups and its own fastest, never the two modes' figures averaged."""
    path = tmp_path / "r.csv"
    store = RunStore.beside(path)
    right = np.arange(N) < 700
    planted = {  # compile mode -> method -> speedup
        "none": {"tome": Estimate(1.20, 1.15, 1.25), "evit": Estimate(1.40, 1.35, 1.45)},
        "default": {"tome": Estimate(1.60, 1.55, 1.65), "evit": Estimate(1.30, 1.25, 1.35)},
    }
    for mode, speedups in planted.items():
        _write_run(path, store, "baseline", {}, right, budget=False, compile=mode)
        for method, speedup in speedups.items():
            params = {"r": 10} if method == "tome" else {"keep_rate": 0.75}
            _write_run(path, store, method, params, right, speedup=speedup, compile=mode)
    text = write_report(path, tmp_path / "r.md").markdown.read_text()
    for mode, speedups in planted.items():
        heading = f"### At macs=0.7 (0.88 GMACs), compile {mode}"
        assert text.count(heading) == 1, text
        section = text[text.index(heading) :].split("\n#")[0]
        assert section.splitlines()[2].startswith(f"At macs=0.7 (0.88 GMACs) with compile {mode},")
        cells = {row["method"].split()[0]: row["speedup @64"] for row in _table(section)}
        fastest = max(speedups, key=lambda m: speedups[m].value)
        for method, speedup in speedups.items():
            cell = f"{speedup.value:.2f}x [{speedup.low:.2f}, {speedup.high:.2f}]"
            assert cells[method] == cell + (" (fastest)" if method == fastest else ""), cells


def test_a_clear_winner_is_alone_in_first_place():
    import pandas as pd

    from ppt_bench.results.leaderboard import Entry, leaderboard_table, rank_rows

    best = np.arange(N) < 800
    worse = _correct(best, 100, 0)

    def of(correct: np.ndarray) -> Outcomes:
        zeros = np.zeros(N, dtype=np.int64)
        return Outcomes(zeros, np.where(correct, 0, 1), correct, np.ones(N), zeros, np.zeros(N))

    outcomes = {"a": of(best), "b": of(worse)}
    runs = pd.DataFrame({"top1": [80.0], "batch_size": [1]})
    entries = [
        Entry("merge", "{}", Estimate(70.0), 1.0, 0.7, runs, "b"),
        Entry("tome", "{}", Estimate(80.0), 1.0, 0.7, runs, "a"),
    ]
    ranked = rank_rows(entries, outcomes)
    assert [(e.method, e.rank, e.tied) for e in ranked] == [("tome", 1, True), ("merge", 2, False)]
    lines = leaderboard_table(ranked, []).splitlines()
    assert lines[2].startswith("| 1 ") and "| tome " in lines[2]
    assert lines[3].startswith("| 2 ") and "| merge " in lines[3]
