"""``RunSpec``: everything that defines one run, validated on construction.

Its fields are the per-run settings of ``ppt-bench run``, each declared once with
:func:`~ppt_bench.core.settings.setting` (its key, flag, help and what it is to the run's identity),
and the identity of the experiment (the content hashes of the weights and data, the machine),
which the one factory of specs, :func:`ppt_bench.sweeps.grid.make_spec`, fills in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ppt_bench.core.defaults import COMPILE_MODES, DEFAULT_ROUNDS, DTYPES
from ppt_bench.core.errors import UserError
from ppt_bench.core.settings import REFERENCE, RUN, SCHEDULE, Setting, setting, settings_of
from ppt_bench.measure import metrics as metric_groups


@dataclass(frozen=True)
class RunSpec:
    """One run: a model with one method and its parameters, measured on one configuration.

    Each setting's help is in its declaration below (and in ``ppt-bench run --help``). Beside
    them: ``method`` (the registry name) and ``params`` (its parameters, validated by
    ``create_method`` and kept as the method holds them, so that settings that mean the same
    reduction get one run id: ``locations=[9, 3]`` is ``[3, 9]``; the run id leaves out those the
    method declares ``SCHEDULE``, ``field(metadata={"identity": SCHEDULE})``, which say how it
    computes and not what, such as atc's ``cluster_path``), and the experiment's identity:
    ``checkpoint_sha256`` (the content hash of the weights), ``data_fingerprint`` (of the data
    set's files, :mod:`ppt_bench.core.identity`) and ``machine`` (this machine's name, or the Ray
    cluster's address), filled in by :func:`ppt_bench.sweeps.grid.make_spec`.
    """

    model: str = setting(
        None,
        "timm model name; `ppt-bench list --models 'deit*'` shows the ones the patch supports",
        key="models",
        flag="--model",
        metavar="NAME",
        axis=True,
        identity=REFERENCE,
        example=["deit_small_patch16_224"],
    )
    # The fields that are no settings say what they are to the run's identity.
    method: str = field(default="baseline", metadata={"identity": RUN})
    params: dict[str, Any] = field(default_factory=dict, metadata={"identity": RUN})
    data: str | None = setting(
        None,
        "ImageFolder root (ImageNet val layout), digits (the built-in data set) or synthetic "
        "(cost-only runs on generated inputs, the default)",
        identity=REFERENCE,
        example="/data/imagenet/val",
    )
    single_class: bool = setting(
        False,
        "accept an ImageFolder --data of a single class folder, refused otherwise as a likely "
        "mistake (every image would get the same label)",
        identity=SCHEDULE,
    )
    checkpoint: str | None = setting(
        None,
        "weights to load into the model: a local path or an http(s) URL",
        identity=REFERENCE,
        metavar="PATH|URL",
        example="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
    )
    device: str = setting("cpu", "cpu, cuda or cuda:N", identity=REFERENCE, example="cuda")
    dtype: str = setting(
        "fp32", "autocast dtype (fp32: none)", axis=True, identity=REFERENCE, choices=DTYPES
    )
    compile: str = setting(
        "none",
        "torch.compile mode (a bare --compile: default), none (eager), or cudagraph: the eager "
        "forward captured in a CUDA graph; true means default and false none",
        axis=True,
        choices=COMPILE_MODES,
        cli={"nargs": "?", "const": "default"},
    )
    batch_size: int = setting(
        64,
        "images per forward; each is a separate run (speed depends on it)",
        key="batch_sizes",
        flag="--batch-size",
        metavar="N",
        axis=True,
        example=[64, 256],
    )
    seed: int = setting(0, "seed for synthetic data and random methods", identity=REFERENCE)
    metrics: tuple[str, ...] = setting(
        ("accuracy", "macs", "tokens"),
        "metric groups: accuracy, macs, throughput, latency, memory, tokens, cost",
        many=True,
        example=["accuracy", "macs", "tokens", "throughput"],
    )
    n_images: int | None = setting(
        None,
        "evaluate at most N images (default: all)",
        identity=REFERENCE,
        metavar="N",
    )
    sweep: str = setting(
        "",
        "name of the sweep, which names its default output files (default: the config file's "
        "name, else its models, methods and data)",
        key="sweep_name",
        identity=SCHEDULE,
        example="deit-small-ppt",
    )
    workers: int = setting(4, "DataLoader workers", identity=SCHEDULE)
    checkpoint_sha256: str = field(default="", metadata={"identity": REFERENCE})
    data_fingerprint: str = field(default="", metadata={"identity": REFERENCE})
    machine: str = field(default="", metadata={"identity": REFERENCE})
    cache: bool = setting(
        True,
        "decode an ImageFolder once into the preprocessed-image cache and read it from there "
        "in every run; --no-cache decodes the images in every run",
        identity=SCHEDULE,
    )
    cache_dir: str | None = setting(
        None,
        "folder of the image cache (default $XDG_CACHE_HOME/ppt-bench/images); a shared file "
        "system shares it between the nodes of a cluster",
        identity=SCHEDULE,
        metavar="DIR",
        example=None,
    )
    rounds: int = setting(
        DEFAULT_ROUNDS,
        "timed rounds of throughput, each a reduced model's loop and the unreduced model's in "
        "turn; the speedup is the median of the per-round ratios with its 95% interval, which "
        "needs 6 or more",
        identity=SCHEDULE,
    )
    # The budget the parameters were resolved for (:mod:`ppt_bench.sweeps.budget`), which the budget
    # columns record: ``{"budget": "macs=0.7", "target_gmacs": ..., "share": ...}`` (and a speed
    # budget's measured ``speedup``); empty otherwise. Only its label enters the run id: the
    # rest is what the resolution measured.
    budget: dict[str, Any] = field(default_factory=dict, metadata={"identity": RUN})

    def __post_init__(self) -> None:
        # Imported here: the methods import torch, and `ppt-bench --help` reads the settings
        # declared above without it.
        from ppt_bench.methods import create_method

        if not isinstance(self.model, str) or not self.model:
            raise UserError("a run needs a model name, e.g. --model deit_small_patch16_224")
        method = create_method(self.method, **self.params)  # a MethodError names the choices
        # The parameters as the method holds them (block lists sorted, a schedule by its full
        # name, a whole number where one is meant): settings that mean the same reduction are
        # the same run, with one run id.
        held = method.params()
        object.__setattr__(self, "params", {key: held[key] for key in self.params})
        # The parameters the run id leaves out: those whose field the method declares SCHEDULE,
        # as a spec's own settings (how it computes, not what: atc's cluster_path).
        schedule = {
            f.name for f in dataclasses.fields(method) if f.metadata.get("identity") == SCHEDULE
        }
        object.__setattr__(self, "_schedule_params", frozenset(schedule))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        bad = [m for m in self.metrics if m not in metric_groups.GROUPS]
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
        for name in ("cache", "single_class"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.cache_dir is not None and (
            not isinstance(self.cache_dir, str) or not self.cache_dir
        ):
            raise UserError(f"cache_dir must be a folder path, got {self.cache_dir!r}")

    @functools.cached_property
    def run_id(self) -> str:
        """A stable hash of what the run measures: the same spec always gets the same id
        (computed once: a spec is not changed, only replaced)."""
        d = {k: v for k, v in self.to_dict().items() if _IDENTITY[k] != SCHEDULE}
        d["params"] = {k: v for k, v in d["params"].items() if k not in self._schedule_params}
        d.pop("budget")
        if self.budget:  # a run without a budget keeps the id it had before budgets existed
            d["budget"] = self.budget["budget"]
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def reference_key(self) -> str:
        """A hash of what decides the unreduced model's outputs on this run's images: the
        weights and the data by their content, and the machine; whatever the method or batch
        size."""
        if not self.machine:
            raise ValueError(
                "a RunSpec needs its identity: make it with ppt_bench.sweeps.grid.make_spec"
            )
        d = {k: v for k, v in self.to_dict().items() if _IDENTITY[k] == REFERENCE}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (lists for tuples), copies of the mutable ones."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["metrics"] = list(self.metrics)
        d["params"] = {
            k: list(v) if isinstance(v, (tuple, list)) else v for k, v in self.params.items()
        }
        d["budget"] = dict(self.budget)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(**d)

    def replace(self, **changes: Any) -> RunSpec:
        """The same run with some fields changed. The weights and the data cannot change here:
        their identity is computed by :func:`ppt_bench.sweeps.grid.make_spec`, so make a new
        spec."""
        moved = sorted({"data", "checkpoint"} & set(changes))
        if moved:
            raise ValueError(f"changing {moved} changes the experiment: use make_spec")
        return dataclasses.replace(self, **changes)


def _identity_of(f: dataclasses.Field) -> str:
    if "setting" in f.metadata:
        return f.metadata["setting"][1].get("identity", RUN)
    return f.metadata["identity"]


# What each field is to a run's identity (:data:`~ppt_bench.core.settings.RUN`, ``REFERENCE``,
# ``SCHEDULE``), from its declaration.
_IDENTITY = {f.name: _identity_of(f) for f in dataclasses.fields(RunSpec)}


def run_settings() -> list[Setting]:
    """The per-run settings of ``ppt-bench run``, in declaration order."""
    return settings_of(RunSpec)
