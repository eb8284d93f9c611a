"""Build a timm model with its weights and its own data config.

Weights come from a pretrained tag (``deit_small_patch16_224.fb_in1k``, needs a reachable hub) or
from ``checkpoint``: a local path or an http(s) URL, holding a plain state dict or one nested
under ``model`` (DeiT release files), ``state_dict`` or ``model_ema``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import clean_state_dict, split_model_name_tag

from ppt_bench.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from ppt_bench.spec import RunSpec

_logger = logging.getLogger(__name__)

# Where a checkpoint may keep its weights, in order of preference.
STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


def register_project_models() -> None:
    """Import the module that registers the project's own timm models, once it exists."""
    if importlib.util.find_spec("ppt_bench.digits") is not None:
        importlib.import_module("ppt_bench.digits")


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


def _create(name: str, pretrained: bool) -> nn.Module:
    if not pretrained:
        return timm.create_model(name, pretrained=False)
    try:
        return timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(
            f"could not download pretrained weights for {name!r} ({type(err).__name__}); "
            "without a reachable hub pass the weights with --checkpoint PATH_OR_URL"
        ) from err


def _load_file(checkpoint: str) -> Any:
    """The object stored in a checkpoint file or URL, loaded onto the CPU."""
    is_url = checkpoint.startswith(("http://", "https://"))
    if not is_url and not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint {checkpoint!r} is not a file or an http(s) URL")
    # Training checkpoints (DeiT's main.py) also store their argparse arguments.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            if is_url:
                return torch.hub.load_state_dict_from_url(
                    checkpoint, map_location="cpu", weights_only=True
                )
            return torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged or foreign file fails in many ways (struct, EOF...)
            raise UserError(
                f"could not read checkpoint {checkpoint!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:120] if str(err) else 'unreadable'}); "
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


def load_checkpoint(model: nn.Module, checkpoint: str) -> None:
    """Load weights from a local path or URL into ``model``, strictly."""
    state_dict = extract_state_dict(_load_file(checkpoint))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {checkpoint!r} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); check --model"
        )
    _logger.info("loaded %d tensors from %s", len(state_dict), checkpoint)


def build_model(
    spec_or_name: RunSpec | str, checkpoint: str | None = None, pretrained: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model in eval mode on the CPU, and its timm data config.

    Args:
        spec_or_name: a :class:`~ppt_bench.spec.RunSpec` (its ``model`` and ``checkpoint``) or a
            timm model name; a ``name.tag`` asks for that pretrained tag.
        checkpoint: weights as a local path or http(s) URL (overrides a spec's checkpoint).
        pretrained: download timm's default pretrained weights.

    Returns:
        ``(model, data_config)``; the config (``input_size``, ``interpolation``, ``mean``,
        ``std``, ``crop_pct``, ``crop_mode``) comes from ``timm.data.resolve_data_config``.

    Raises:
        UserError: unknown name, weights that cannot be downloaded or read, or that do not fit.
    """
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.model
    if checkpoint is None and not isinstance(spec_or_name, str):
        checkpoint = spec_or_name.checkpoint
    register_project_models()
    check_model_name(name)
    tagged = bool(split_model_name_tag(name)[1])
    model = _create(name, pretrained=(pretrained or tagged) and checkpoint is None)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.eval()
    return model, resolve_data_config({}, model=model)
