"""``ppt-bench train``: train or fine-tune a timm ViT, optionally with a method applied, and save
its weights (``torchrun`` for several GPUs). The training loop is :mod:`ppt_bench.engine.train`."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ppt_bench.core.defaults import DTYPES
from ppt_bench.core.errors import UserError, check_free_space, check_output_path
from ppt_bench.core.keyvalue import parse_assignment
from ppt_bench.engine.train import (
    AUGMENTS,
    TrainConfig,
    TrainResult,
    build_for_training,
    checkpoint_size,
    is_main_process,
    keep_checkpoint,
    load_datasets,
    save_checkpoint,
    train,
)
from ppt_bench.methods import create_method


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ppt-bench train``."""
    d = TrainConfig()
    parser.add_argument("--model", default="vit_digits_patch4_32", help="timm model name")
    parser.add_argument("--method", help="token reduction method to train with (default: none)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method parameter, VALUE in TOML (r=16, locations=[3,6,9]); repeatable",
    )
    parser.add_argument(
        "--data", default="digits", help="ImageFolder root with train/ and val/, or digits"
    )
    parser.add_argument("--checkpoint", help="initial weights: a local path or an http(s) URL")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    parser.add_argument("--smoothing", type=float, default=d.smoothing, help="label smoothing")
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="images per step, all processes"
    )
    parser.add_argument("--augment", choices=AUGMENTS, default=d.augment)
    parser.add_argument("--amp", choices=DTYPES, default=d.amp_dtype)
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", help="checkpoint to write (default: <model>[-<method>].pth)")


def parse_params(items: list[str]) -> dict[str, Any]:
    """Method parameters from ``KEY=VALUE`` items, read as ``ppt-bench run`` reads ``--param``.

    Values are TOML, and a value that is not TOML is a string:
    ``["r=16", "locations=[3, 6, 9]", "branch=pool"]`` ->
    ``{"r": 16, "locations": [3, 6, 9], "branch": "pool"}``.
    """
    return dict(parse_assignment(item, "--param") for item in items)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated :class:`TrainConfig` from the parsed command line."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        warmup_epochs=args.warmup_epochs,
        smoothing=args.smoothing,
        seed=args.seed,
        workers=args.workers,
        amp_dtype=args.amp,
        device=device,
        augment=args.augment,
    )


def run(args: argparse.Namespace) -> int:
    """``ppt-bench train``: train, print the validation top-1 and write the checkpoint."""
    params = parse_params(args.param)
    if params and not args.method:
        raise UserError("--param needs --method (e.g. --method ppt --param r=16)")
    method = create_method(args.method, **params) if args.method else None
    config = config_from_args(args)
    out = check_output_path(
        args.out or f"{args.model}{'-' + args.method if args.method else ''}.pth", "--out"
    )
    train_set, val_set = load_datasets(args.data)
    torch.manual_seed(config.seed)  # the initial weights of a model trained from scratch
    model = build_for_training(args.model, args.checkpoint, len(train_set.classes))
    check_free_space(out, checkpoint_size(model), "--out")  # before the training, not after
    try:
        result = train(model, train_set, val_set, config, method)
        if is_main_process():
            _save_and_report(result, out, args, config, params)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _save_and_report(
    result: TrainResult,
    out: Path,
    args: argparse.Namespace,
    config: TrainConfig,
    params: dict[str, Any],
) -> None:
    state = {
        "model": result.model.state_dict(),
        "model_name": args.model,
        "method": args.method,
        "params": params,
        "val_top1": result.val_top1,
        "config": asdict(config),
    }
    try:
        path = save_checkpoint(state, out)
    except OSError as err:  # the weights of a whole training are not to be lost here
        reason = err.strerror or type(err).__name__
        kept = keep_checkpoint(state, out)
        if kept is None:
            raise UserError(
                f"cannot write --out {out} ({reason}), nor a copy in the cache or the "
                "temporary folder: the trained weights are lost; free some space and train again"
            ) from None
        raise UserError(
            f"cannot write --out {out} ({reason}): the trained weights (val top-1 "
            f"{result.val_top1:.2f}%) are kept in {kept}; move them where they belong"
        ) from None
    print(
        f"val top-1 {result.val_top1:.2f}% after {config.epochs} epochs "
        f"({result.train_time_s:.0f} s); weights in {path}"
    )
    # An epoch may drop an unreadable image with its last incomplete batch: the most in any epoch.
    skipped_train = max(s.train_unreadable for s in result.history)
    skipped_val = result.history[-1].val_unreadable
    if skipped_train or skipped_val:
        print(
            f"skipped unreadable images: {skipped_train} in train/, {skipped_val} in val/ "
            "(they are named in the warnings above)"
        )
