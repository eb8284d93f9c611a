"""``RunSpec``: everything that defines one run, validated on construction."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ppt_bench import metrics as metric_groups
from ppt_bench.dtypes import DTYPES
from ppt_bench.errors import UserError
from ppt_bench.throughput import DEFAULT_ROUNDS

# "default", "reduce-overhead", "max-autotune": torch.compile modes; "cudagraph": the eager
# forward captured in a CUDA graph (no compilation, no Python launch overhead).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "cudagraph")
# Fields that only say how a run is scheduled or named, not what it measures.
_NOT_IN_RUN_ID = ("sweep", "workers", "cache", "cache_dir", "rounds")
# What decides the unreduced model's outputs on the evaluated images: runs that agree on these
# share one reference (:attr:`RunSpec.reference_key`), whatever their method or batch size.
_REFERENCE_FIELDS = (
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "data",
    "data_fingerprint",
    "n_images",
    "seed",
    "dtype",
    "device",
)


@dataclass(frozen=True)
class RunSpec:
    """One run: a model with one method and its parameters, measured on one configuration.

    Args:
        model: timm model name (``deit_small_patch16_224``; a ``name.tag`` selects pretrained
            weights when a hub is reachable).
        method: registry name of the token reduction method.
        params: the method's parameters (validated by ``create_method``).
        data: ImageFolder root (ImageNet val layout), ``"digits"`` for the built-in dataset, or
            None / ``"synthetic"`` for cost-only runs on generated inputs.
        checkpoint: weights as a local path or URL (DeiT release files nest them under ``model``).
        batch_size: images per forward.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``fp32``, or ``fp16`` / ``bf16`` under autocast.
        compile: how the timed model runs, one of :data:`COMPILE_MODES`; ``True`` means
            ``"default"`` (``torch.compile``), ``False`` means ``"none"`` (eager).
        seed: seed for synthetic data and random methods.
        metrics: metric groups (:mod:`ppt_bench.metrics`); ``memory`` (peak CUDA memory) needs
            a CUDA device.
        n_images: evaluate at most this many images (None: all).
        sweep: name of the sweep this run belongs to (not part of ``run_id``).
        workers: DataLoader workers (not part of ``run_id``).
        checkpoint_sha256: content hash of a local checkpoint (:mod:`ppt_bench.identity`).
        data_fingerprint: hash of the data set's file list (:mod:`ppt_bench.identity`).
        machine: where the run is measured: this machine's name, or the Ray cluster's address.
        cache: read ImageFolder images through the preprocessed-image cache
            (:mod:`ppt_bench.imagecache`; not part of ``run_id``: the images are the same).
        cache_dir: the cache's folder; None: the user cache directory (not part of ``run_id``).
        rounds: timed rounds of throughput, alternating with the unreduced model's (not part of
            ``run_id``: it sets the precision, not what is measured).
        budget: the budget this run's parameters were resolved for (:mod:`ppt_bench.budget`):
            ``{"budget": "macs=0.7", "target_gmacs": ..., "share": ...}``; empty otherwise.
    """

    model: str
    method: str = "baseline"
    params: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    checkpoint: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "fp32"
    compile: bool | str = False
    seed: int = 0
    metrics: tuple[str, ...] = ("accuracy", "macs", "tokens")
    n_images: int | None = None
    sweep: str = ""
    workers: int = 4
    checkpoint_sha256: str = ""
    data_fingerprint: str = ""
    machine: str = ""
    cache: bool = True
    cache_dir: str | None = None
    rounds: int = DEFAULT_ROUNDS
    budget: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ppt_bench.methods import create_method

        if not isinstance(self.model, str) or not self.model:
            raise UserError("a run needs a model name, e.g. --model deit_small_patch16_224")
        create_method(self.method, **self.params)  # raises MethodError naming valid choices
        object.__setattr__(self, "metrics", tuple(self.metrics))
        bad = [m for m in self.metrics if m not in metric_groups.names()]
        if bad or not self.metrics:
            raise UserError(
                f"unknown metrics {bad}: choose from {', '.join(metric_groups.names())}"
            )
        mode = {True: "default", False: "none"}.get(self.compile, self.compile)
        if mode not in COMPILE_MODES:
            raise UserError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        object.__setattr__(self, "compile", mode)
        if mode == "cudagraph" and not self.device.startswith("cuda"):
            raise UserError("compile=cudagraph captures CUDA graphs: use it with --device cuda")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise UserError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        for name in self.metrics:
            if metric_groups.get(name).cuda_only and not self.device.startswith("cuda"):
                raise UserError(
                    f"the {name} metric is measured on CUDA only: drop {name} from --metrics "
                    "or use --device cuda"
                )
        for name in ("batch_size", "n_images"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise UserError(f"rounds must be a positive integer, got {self.rounds!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise UserError(f"workers must be an integer >= 0, got {self.workers!r}")
        if not isinstance(self.cache, bool):
            raise UserError(f"cache must be true or false, got {self.cache!r}")
        if self.cache_dir is not None and (
            not isinstance(self.cache_dir, str) or not self.cache_dir
        ):
            raise UserError(f"cache_dir must be a folder path, got {self.cache_dir!r}")

    @property
    def run_id(self) -> str:
        """A stable hash of what the run measures: the same spec always gets the same id."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_RUN_ID}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def reference_key(self) -> str:
        """A hash of what decides the unreduced model's outputs on this run's images: the
        weights and the data by their content (hashed now where the spec does not carry the
        hashes, as a spec made outside a sweep does not) and the machine."""
        from ppt_bench import identity

        d = {k: v for k, v in self.to_dict().items() if k in _REFERENCE_FIELDS}
        d["checkpoint_sha256"] = self.checkpoint_sha256 or identity.checkpoint_digest(
            self.checkpoint
        )
        d["data_fingerprint"] = self.data_fingerprint or identity.data_fingerprint(self.data)
        d["machine"] = self.machine or identity.machine()
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["metrics"] = list(self.metrics)
        d["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(**d)

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)
