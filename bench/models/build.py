"""Build a timm model with its weights and its own data config.

Weights come from a pretrained tag (``deit_small_patch16_224.fb_in1k``, needs a reachable hub) or
from ``checkpoint``: a local path or an http(s) URL, holding a plain state dict or one nested
under ``model`` (DeiT release files), ``state_dict`` or ``model_ema``. A checkpoint's classifier
head sets the model's number of classes, so a model fine-tuned on other classes loads as it is.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from functools import cache
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import clean_state_dict, get_pretrained_cfg, split_model_name_tag

from ppt_bench.core import identity, network
from ppt_bench.core.errors import PatchError, UserError, first_line
from ppt_bench.methods.contract import ViTInfo
from ppt_bench.methods.patch import check_patchable, uses_rope, vit_info
from ppt_bench.models import digits  # noqa: F401 - registers vit_digits_patch4_32 with timm

if TYPE_CHECKING:
    from torch import nn

    from ppt_bench.results.spec import RunSpec

_logger = logging.getLogger(__name__)

# Where a checkpoint may keep its weights, in order of preference.
STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
# The names of files torch.save writes weights to, to point at in a folder given as checkpoint.
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def check_model_name(name: str) -> None:
    """Raise :class:`UserError` with a close match if timm has no architecture ``name``."""
    arch, _ = split_model_name_tag(name)
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown model {name!r}.{hint} List models with `ppt-bench list --models 'deit*'`"
    )


def _create(name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    seconds = network.timeout()  # a bad PPT_BENCH_TIMEOUT says so itself
    try:
        with network.time_limit():
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # the hub clients fail in many ways (OSError, httpx's own errors)
        reason = network.waited(seconds) if network.timed_out(err) else type(err).__name__
        raise UserError(
            f"could not download pretrained weights for {name!r} ({reason}); without a "
            "reachable hub pass the weights with --checkpoint PATH_OR_URL"
        ) from err


def check_checkpoint_path(checkpoint: str) -> None:
    """Raise :class:`UserError` unless ``checkpoint`` is an http(s) URL or an existing file; a
    folder gets a message of its own, naming the weights files it holds."""
    if identity.is_url(checkpoint) or os.path.isfile(checkpoint):
        return
    if os.path.isdir(checkpoint):
        try:
            found = sorted(n for n in os.listdir(checkpoint) if n.endswith(WEIGHTS_SUFFIXES))
        except OSError:
            found = []
        names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        held = f" (it holds {names})" if found else ""
        raise UserError(
            f"--checkpoint {checkpoint} is a folder{held}: pass the weights file itself, a "
            "state dict saved with torch.save (.pth, .pt or .bin), or its URL"
        )
    if os.path.exists(checkpoint):
        raise UserError(
            f"--checkpoint {checkpoint} is not a regular file: pass a weights file or a URL"
        )
    raise UserError(
        f"--checkpoint {checkpoint} does not exist: pass a weights file or an http(s) URL"
    )


def _load_file(checkpoint: str) -> Any:
    """The object stored in a checkpoint file or URL (downloaded once, see
    :func:`~ppt_bench.core.identity.checkpoint_file`), loaded onto the CPU."""
    check_checkpoint_path(checkpoint)
    path = identity.checkpoint_file(checkpoint)
    # Training checkpoints (DeiT's main.py) also store their argparse arguments.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged or foreign file fails in many ways (struct, EOF...)
            raise UserError(
                f"could not read checkpoint {checkpoint!r} ({type(err).__name__}: "
                f"{first_line(err) if str(err).strip() else 'unreadable'}); "
                "pass a PyTorch state dict file (or a URL to one)"
            ) from err


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint: plain, or nested under one of :data:`STATE_DICT_KEYS`.

    Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``) are removed.
    """
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return clean_state_dict(obj)


def read_checkpoint(checkpoint: str) -> dict[str, torch.Tensor]:
    """The weights stored in a checkpoint file or URL (see :func:`extract_state_dict`)."""
    return extract_state_dict(_load_file(checkpoint))


def head_classes(name: str, state_dict: dict[str, torch.Tensor]) -> int | None:
    """Outputs of the classifier head that ``state_dict`` holds for the timm model ``name``.

    The head is the one timm's config of ``name`` names (``head`` for a ViT); None when the
    config names none or the state dict lacks it.
    """
    cfg = get_pretrained_cfg(name)
    head = cfg.classifier if cfg is not None else None
    if isinstance(head, (tuple, list)):  # distilled models: (head, head_dist), the same size
        head = head[0]
    weight = state_dict.get(f"{head}.weight") if head else None
    return None if weight is None else int(weight.shape[0])


def load_checkpoint(model: nn.Module, state_dict: dict[str, torch.Tensor], checkpoint: str) -> None:
    """Load ``state_dict``, read from ``checkpoint``, into ``model``: every tensor must fit."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # a tensor of another shape (another size or head)
        lines = [line.strip() for line in str(err).splitlines()]
        mismatch = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise UserError(
            f"checkpoint {checkpoint!r} does not fit {type(model).__name__}: "
            f"{mismatch.rstrip('.')}; check --model"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"checkpoint {checkpoint!r} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); check --model"
        )
    _logger.info("loaded %d tensors from %s", len(state_dict), checkpoint)


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Raise :class:`UserError` naming the first floating-point tensor of ``tensors`` that holds
    a NaN or an infinity (a model with such weights predicts nothing: its loss is NaN and its
    top-1 the share of one class). Tensors on the meta device hold no values and pass.

    Args:
        tensors: ``(name, tensor)`` pairs, as ``named_parameters`` or a state dict's items.
        source: where they come from, for the message (``checkpoint 'w.pth'``).
    """
    for name, tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.is_meta:
            continue
        # A NaN or an infinity anywhere makes the sum non-finite: one reduction, ten times
        # faster than isfinite (0.07 s against 0.6 s for ViT-B on one CPU thread); a sum that
        # overflows is told apart below.
        if bool(torch.isfinite(torch.sum(tensor, dtype=torch.float32))):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor.numel() - int(finite.sum())
            raise UserError(
                f"{source} holds non-finite values (NaN or inf) in {name} ({bad} of "
                f"{tensor.numel()}): pass weights without them"
            )


def build_model(
    spec_or_name: RunSpec | str,
    checkpoint: str | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model in eval mode on the CPU, and its timm data config.

    Args:
        spec_or_name: a :class:`~ppt_bench.results.spec.RunSpec` (its ``model`` and ``checkpoint``)
            or a timm model name; a ``name.tag`` asks for that pretrained tag.
        checkpoint: weights as a local path or http(s) URL (overrides a spec's checkpoint).
        pretrained: download timm's default pretrained weights.
        num_classes: outputs of the classifier head, passed to ``timm.create_model``. None:
            as many as the checkpoint's head has, else timm's default for the model.

    Returns:
        ``(model, data_config)``; the config (``input_size``, ``interpolation``, ``mean``,
        ``std``, ``crop_pct``, ``crop_mode``) comes from ``timm.data.resolve_data_config``.

    Raises:
        UserError: unknown name, weights that cannot be downloaded or read, that do not fit, or
            that hold a NaN or an infinity (:func:`check_finite`).
    """
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.model
    if checkpoint is None and not isinstance(spec_or_name, str):
        checkpoint = spec_or_name.checkpoint
    check_model_name(name)
    state_dict = None if checkpoint is None else read_checkpoint(checkpoint)
    if state_dict is not None and num_classes is None:
        num_classes = head_classes(name, state_dict)
    tagged = bool(split_model_name_tag(name)[1])
    from_hub = (pretrained or tagged) and checkpoint is None
    model = _create(name, from_hub, num_classes)
    if state_dict is not None:
        load_checkpoint(model, state_dict, checkpoint)
    if checkpoint:
        source = f"checkpoint {checkpoint!r}"
    else:
        source = f"the pretrained weights of {name!r}" if from_hub else f"model {name!r}"
    check_finite(_named_tensors(model), source)
    model.eval()
    return model, resolve_data_config({}, model=model)


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A model's parameters, then its buffers, by name."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def check_weights(name: str, checkpoint: str | None) -> None:
    """Check once, before a sweep, that a model's weights can be had and fit it.

    A checkpoint is read and loaded into the model built on the meta device (shapes and keys
    only, no memory); a pretrained tag is fetched (or found in the hub's cache) once, so that a
    hub that cannot be reached fails the sweep before its runs instead of each run.

    Raises:
        UserError: weights that cannot be read or downloaded, that hold a NaN or an infinity,
            or that do not fit the model.
    """
    check_model_name(name)
    if checkpoint is None:
        if split_model_name_tag(name)[1]:
            _create(name, pretrained=True, num_classes=None)
        return
    state_dict = read_checkpoint(checkpoint)
    check_finite(state_dict.items(), f"checkpoint {checkpoint!r}")
    num_classes = head_classes(name, state_dict)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    with warnings.catch_warnings():  # copying into meta tensors is a no-op, as meant here
        warnings.simplefilter("ignore", UserWarning)
        load_checkpoint(model, state_dict, checkpoint)


# -- inspecting a model without building its weights ------------------------------------------


def find_model(name: str) -> None:
    """Raise :class:`UserError` unless timm (or ppt-bench's digits model) knows ``name``."""
    check_model_name(name)


# timm modules whose models are VisionTransformer (sub)classes or Eva models (EVA-02, DINOv3,
# PE, vit_*_rope_*) the patch may accept; "digits" is ppt_bench.models.digits, which
# registers vit_digits_patch4_32.
VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit", "eva", "digits")


@cache
def _inspect(name: str) -> tuple[ViTInfo | None, bool, str]:
    """``(info, rope, why)``: the shape of a model the patch can reduce and whether it uses
    rotary position embeddings, or ``(None, False, why)`` with the one-line reason it cannot."""
    find_model(name)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        check_patchable(model)
    except PatchError as err:
        return None, False, str(err)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
        return None, False, f"it cannot be built without weights ({type(err).__name__})"
    return vit_info(model, name), uses_rope(model), ""


def describe_vit(name: str) -> ViTInfo | None:
    """The shape of a model the patch can reduce, or None for any other model
    (:func:`unpatchable_reason` says why).

    The model is built on the meta device: no memory, no weights, tens of milliseconds.
    """
    return _inspect(name)[0]


def has_rope(name: str) -> bool:
    """Whether the patchable model ``name`` uses rotary position embeddings (an ``Eva``)."""
    return _inspect(name)[1]


def unpatchable_reason(name: str) -> str:
    """Why the patch cannot reduce model ``name``, in one line ("" when it can)."""
    return _inspect(name)[2]


def patchable_models(pattern: str, limit: int) -> tuple[list[ViTInfo], int]:
    """Patchable timm ViTs matching ``pattern``: the first ``limit`` found, and the candidates.

    Returns:
        ``(models, candidates)``: at most ``limit`` models, and how many names matched in the
        ViT modules (each checked only while fewer than ``limit`` were found).
    """
    names = sorted({n for m in VIT_MODULES for n in timm.list_models(pattern, module=m)})
    found = []
    for name in names:
        if len(found) == limit:
            break
        info = describe_vit(name)
        if info is not None:
            found.append(info)
    return found, len(names)
