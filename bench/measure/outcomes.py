"""What an accuracy run keeps per image, and the unreduced model's outputs, stored beside the CSV.

Per image, an accuracy run keeps its label, its top-1 prediction, whether the label is in its
top 5, its cross-entropy loss, the unreduced model's top-1 prediction and the KL divergence from
the unreduced model's distribution (:class:`Outcomes`): enough for the intervals of its own
figures and for paired tests against the baseline or another method on the same images. The
unreduced model's log-probabilities on the evaluated images (:class:`Reference`) are computed
once per :attr:`~ppt_bench.results.spec.RunSpec.reference_key` (model, weights and data by their
content, images, seed, dtype, device, machine) and read by every method's run.

Both live in a folder beside the results CSV (:func:`store_folder`: ``results/x.csv`` ->
``results/x.outcomes/``; beside its target where the CSV is a symbolic link), as
``<run_id>.npz`` and ``reference-<key>.npz``, each written atomically, so a resumed sweep finds
them again. Each file carries the key it was made for (the run id; the reference key) and is
checked on read: a reference that is cut short, or that another key's file replaced, counts as
absent, so the run computes it anew and replaces it; outcomes that are damaged or another run's
are refused with one line, never used.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppt_bench.core import stats
from ppt_bench.core.atomic import atomic_write, locked, target
from ppt_bench.core.errors import UserError

SUFFIX = ".outcomes"
KEY = "key"  # the entry of a stored file that holds what it was made for
# What reading a missing, cut-short or foreign file raises: such a file counts as absent.
UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def store_folder(out_csv: str | os.PathLike) -> Path:
    """The folder that holds the per-image files of the runs in ``out_csv``: beside the file
    that rows are written to (a symbolic link's target), named after it."""
    out_csv = target(out_csv)
    return out_csv.with_name(out_csv.stem + SUFFIX)


@dataclass
class Outcomes:
    """One accuracy run, image by image (``[N]`` arrays, in the loader's order).

    Attributes:
        label: the true class (meaningless on synthetic data).
        pred: the run's top-1 class.
        top5: whether the label is among the run's 5 best classes.
        loss: cross-entropy against the label (nats).
        ref_pred: the unreduced model's top-1 class.
        kl: ``KL(softmax(reference) || softmax(logits))`` (nats).
    """

    label: np.ndarray
    pred: np.ndarray
    top5: np.ndarray
    loss: np.ndarray
    ref_pred: np.ndarray
    kl: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.label.size)

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label

    @property
    def reference_correct(self) -> np.ndarray:
        return self.ref_pred == self.label

    def estimates(self, labeled: bool = True) -> dict[str, stats.Estimate]:
        """The run's accuracy figures with their 95% intervals; without real labels only the
        label-free ones (agreement, KL)."""
        out = {
            "top1": stats.proportion(self.correct),
            "top5": stats.proportion(self.top5),
            "loss": stats.mean(self.loss),
            "agreement_top1": stats.proportion(self.pred == self.ref_pred),
            "kl": stats.mean(self.kl),
        }
        if not labeled:
            return {k: out[k] for k in ("agreement_top1", "kl")}
        return out

    def against_reference(self) -> stats.Paired:
        """This run against the unreduced model on the same images."""
        return stats.paired(self.correct, self.reference_correct)

    def to_bytes(self, run_id: str = "") -> bytes:
        """The arrays as an ``.npz`` file, with the id of the run they are of when given."""
        buf = io.BytesIO()
        key = {KEY: np.array(run_id)} if run_id else {}
        np.savez_compressed(buf, **{f.name: getattr(self, f.name) for f in fields(self)}, **key)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Outcomes:
        with np.load(io.BytesIO(data)) as npz:
            return cls.from_npz(npz)

    @classmethod
    def from_npz(cls, npz: Any) -> Outcomes:
        """The arrays of an open ``.npz`` file (``np.load``)."""
        return cls(**{f.name: npz[f.name] for f in fields(cls)})


@dataclass
class Reference:
    """The unreduced model's outputs on the evaluated images.

    Attributes:
        log_probs: ``[N, K]`` float32 log-softmax of its logits.
        labels: ``[N]`` the labels the loader gave with them (to check that a stored reference
            covers the same images, in the same order).
    """

    log_probs: torch.Tensor
    labels: torch.Tensor
    source: str = ""  # the file it was read from, for messages

    def covers(self, labels: torch.Tensor) -> bool:
        """Whether these are the labels of the reference's images, in its order."""
        return self.labels.shape == labels.shape and torch.equal(self.labels, labels.cpu())

    def mismatch(self) -> UserError:
        where = f" in {self.source}" if self.source else ""
        return UserError(
            f"the stored unreduced-model outputs{where} do not match the images evaluated now "
            "(the data changed under the same file names?): delete that file and run again"
        )


class RunStore:
    """The per-image files of one results CSV (see the module docstring).

    Args:
        folder: where the files go (created on the first write).

    Attributes:
        references_computed: references this store wrote.
        references_read: stored references read back.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.references_computed = 0
        self.references_read = 0

    @classmethod
    def beside(cls, out_csv: str | os.PathLike) -> RunStore:
        return cls(store_folder(out_csv))

    def outcomes_path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.npz"

    def trace_path(self, run_id: str) -> Path:
        """The Chrome trace of the run's profiled forwards (``cost``), in ``traces/``."""
        return self.folder / "traces" / f"{run_id}.json.gz"

    def reference_path(self, key: str) -> Path:
        return self.folder / f"reference-{key}.npz"

    def save_outcomes(self, run_id: str, outcomes: Outcomes) -> None:
        self._write(self.outcomes_path(run_id), outcomes.to_bytes(run_id))

    def load_outcomes(self, run_id: str, n_images: int | None = None) -> Outcomes | None:
        """The run's outcomes, or None when it has no file.

        Args:
            run_id: the run.
            n_images: the images its results row says it evaluated, checked when given (the
                only check a file written before the files carried their run id can get).

        Raises:
            UserError: the file is damaged or holds another run's outcomes.
        """
        path = self.outcomes_path(run_id)
        if not path.exists():
            return None
        try:
            with np.load(path) as npz:
                made_for = str(npz[KEY]) if KEY in npz.files else run_id
                outcomes = Outcomes.from_npz(npz)
        except UNREADABLE as err:
            raise _refused(path, f"is damaged ({type(err).__name__})") from None
        if made_for != run_id:
            raise _refused(path, f"holds the outcomes of run {made_for}, not of run {run_id}")
        if n_images is not None and outcomes.n_images != n_images:
            raise _refused(
                path, f"holds {outcomes.n_images} images where run {run_id} evaluated {n_images}"
            )
        return outcomes

    def load_reference(self, key: str) -> Reference | None:
        """The unreduced model's outputs stored under ``key``, or None when there is no file,
        or only one that is damaged, was made for another key or predates the key check: the run
        then computes them anew and replaces it."""
        path = self.reference_path(key)
        try:
            with np.load(path) as npz:
                made_for = str(npz[KEY]) if KEY in npz.files else ""
                arrays = (torch.from_numpy(npz["log_probs"]), torch.from_numpy(npz["labels"]))
        except UNREADABLE:
            return None
        if made_for != key or arrays[0].shape[:1] != arrays[1].shape:
            return None
        self.references_read += 1
        return Reference(*arrays, source=str(path))

    def save_reference(self, key: str, reference: Reference) -> None:
        """Store (or replace) the unreduced model's outputs under ``key``."""
        buf = io.BytesIO()
        log_probs, labels = reference.log_probs.numpy(), reference.labels.numpy()
        np.savez(buf, log_probs=log_probs, labels=labels, **{KEY: np.array(key)})
        self._write(self.reference_path(key), buf.getvalue())
        self.references_computed += 1

    @contextlib.contextmanager
    def reference_lock(self, key: str) -> Iterator[None]:
        """Held by a run that computes the outputs under ``key``: runs in other processes that
        share the folder (Ray trials on one machine) wait for it, then read its file instead of
        computing them again. An uncontended lock costs nothing; the lock file stays."""
        path = self.folder / f".reference-{key}.lock"
        with contextlib.ExitStack() as held:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                held.enter_context(locked(path))
            except OSError as err:
                raise self._unwritable(path, err) from None
            yield

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(data), binary=True)
        except OSError as err:
            raise self._unwritable(path, err) from None

    @staticmethod
    def _unwritable(path: Path, err: OSError) -> UserError:
        reason = err.strerror or type(err).__name__
        return UserError(
            f"cannot write {path} ({reason}): write the results to a folder you can write with "
            "--out"
        )


def _refused(path: Path, why: str) -> UserError:
    """The one line for a stored outcomes file that cannot be used."""
    return UserError(
        f"the per-image outcomes file {path} {why}: delete it (its run's paired tests are then "
        "left out) or run that run again into a new results file"
    )
