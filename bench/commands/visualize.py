"""Pictures of what each method keeps: ``ppt-bench visualize``.

For a model, a list of methods and a few images, each method runs with source tracking and the
tokens left after each of its reduction blocks are drawn on the image, in the style of the PPT
and ToMe figures: pruned patches are blanked (hatched grey), patches pooled into one token are
tinted with that token's colour and outlined, patches that are still their own token are left as
they are. One PNG per image: a row per method, a column per reduction location, the input first.

The picture after location ``k`` is exact: the patched model is run through its blocks up to
and including that location (the later blocks cannot change what the earlier ones did) and its
``reduction_info.source`` is read.
"""

from __future__ import annotations

import argparse
import colorsys
import copy
import logging
import math
import re
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from timm.data import create_transform

from ppt_bench.core.decode import DECODE_ERRORS, decode_image
from ppt_bench.core.errors import UserError, check_output_path
from ppt_bench.core.keyvalue import parse_assignment
from ppt_bench.data.digits import digits_dataset
from ppt_bench.methods import Method, create_method
from ppt_bench.models.build import build_model

if TYPE_CHECKING:
    from torch import nn

    from ppt_bench.methods import Method

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
# What a --out file may end in: formats matplotlib writes without extra tools.
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".pdf", ".svg")
DEFAULT_METHODS = ("ppt", "prune", "merge", "evit")
BLANK = (0.42, 0.6)  # the two greys of the hatching over a pruned patch
TINT = 0.55  # weight of a pooled group's colour over the image


# -- layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Pixel layout of a grid figure; :meth:`panel_box` is where each panel lands in the PNG.

    Args:
        rows: methods.
        cols: the input column plus the most locations of any method.
        panel: side of one square panel, in pixels.
    """

    rows: int
    cols: int
    panel: int = 160
    gap: int = 8
    label: int = 150  # left margin for the method names
    title: int = 22  # above each panel: the block and token count
    header: int = 34  # above the grid: model and image
    footer: int = 24  # below the grid: the legend

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the PNG in pixels."""
        width = self.label + self.cols * (self.panel + self.gap)
        height = self.header + self.rows * (self.title + self.panel + self.gap) + self.footer
        return width, height

    def panel_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` pixels of panel ``(row, col)``, as for ``PIL.crop``."""
        left = self.label + col * (self.panel + self.gap)
        top = self.header + row * (self.title + self.panel + self.gap) + self.title
        return left, top, left + self.panel, top + self.panel


# -- drawing ----------------------------------------------------------------------------------


def token_owner(source: torch.Tensor, num_prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """Which token stands for each original patch.

    Args:
        source: ``[N, N0]`` 0/1, the original tokens each token stands for (one image).
        num_prefix: ``P``; prefix rows and columns are left out.

    Returns:
        ``owner [N0 - P]``: the index of the patch token covering each patch, -1 if the patch was
        pruned; and ``sizes [N - P]``: how many patches each patch token covers.
    """
    s = source[num_prefix:, num_prefix:].float().cpu()  # [N - P, N0 - P]
    owner = s.argmax(dim=0).numpy()
    owner[(s.sum(dim=0) == 0).numpy()] = -1
    return owner, s.sum(dim=1).numpy()


def group_colour(key: int) -> np.ndarray:
    """A bright colour per group, well apart for nearby keys (golden-ratio hues)."""
    hue = (key * 0.618033988749895) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.95))


def draw_panel(image: np.ndarray, owner: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Draw one reduction state on an image.

    Args:
        image: ``[H, W, 3]`` floats in [0, 1], the model input resolution (or an integer
            multiple of it).
        owner: ``[gh, gw]`` token index per patch, -1 for a pruned patch.
        sizes: ``[N - P]`` patches per token.

    Returns:
        ``[H, W, 3]``: pruned patches hatched grey, pooled groups tinted and outlined.
    """
    H, W, _ = image.shape
    gh, gw = owner.shape
    pix = np.kron(owner, np.ones((H // gh, W // gw), dtype=owner.dtype))
    pix = np.pad(pix, ((0, H - pix.shape[0]), (0, W - pix.shape[1])), mode="edge")  # [H, W]
    # Pixels on a token's border: a neighbour (left, right, up or down) belongs to another token.
    border = np.zeros(pix.shape, dtype=bool)
    border[:, :-1] |= pix[:, :-1] != pix[:, 1:]
    border[:, 1:] |= pix[:, 1:] != pix[:, :-1]
    border[:-1] |= pix[:-1] != pix[1:]
    border[1:] |= pix[1:] != pix[:-1]
    out = image.copy()
    # Hatched rather than flat grey, so that a pruned patch never looks like part of the image.
    yy, xx = np.indices(pix.shape)
    hatch = np.where((yy + xx) // 4 % 2 == 0, *BLANK)
    out[pix < 0] = hatch[pix < 0, None]
    for token in np.unique(owner[owner >= 0]):
        if sizes[token] <= 1:
            continue
        mask = pix == token
        colour = group_colour(int(np.flatnonzero(owner.ravel() == token)[0]))
        out[mask] = (1 - TINT) * image[mask] + TINT * colour
        out[mask & border] = 0.4 * colour
    return out


def upscale(image: np.ndarray, min_side: int = 160) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so that small inputs stay legible."""
    factor = max(1, math.ceil(min_side / min(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def save_grid(
    path: Path,
    image: np.ndarray,
    rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]],
    header: str,
) -> Layout:
    """Write one PNG: per row a label, the input image, then the titled panels.

    Args:
        path: the PNG to write.
        image: ``[H, W, 3]`` input image in [0, 1].
        rows: ``(label, [(panel title, [H, W, 3] panel), ...])`` per method.
        header: the line above the grid.

    Returns:
        The layout used, whose :meth:`Layout.panel_box` locates each panel in the PNG.
    """
    cols = 1 + max((len(panels) for _, panels in rows), default=0)
    layout = Layout(rows=len(rows), cols=cols)
    width, height = layout.size
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.text(layout.gap / width, 1 - 10 / height, header, va="top", fontsize=10)
    fig.text(
        layout.gap / width,
        4 / height,
        "hatched grey: pruned patch    tinted and outlined: patches pooled into one token",
        fontsize=8,
        color="0.3",
    )

    def add_panel(row: int, col: int, picture: np.ndarray, title: str) -> None:
        left, top, right, bottom = layout.panel_box(row, col)
        ax = fig.add_axes(
            (left / width, 1 - bottom / height, (right - left) / width, (bottom - top) / height)
        )
        ax.imshow(np.clip(picture, 0, 1), interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        ax.set_title(title, fontsize=8, pad=3)

    for r, (label, panels) in enumerate(rows):
        _, top, _, bottom = layout.panel_box(r, 0)
        fig.text(
            layout.gap / width,
            1 - (top + bottom) / 2 / height,
            textwrap.fill(label, 22),
            va="center",
            fontsize=9,
        )
        add_panel(r, 0, image, "input")
        for c, (title, picture) in enumerate(panels, start=1):
            add_panel(r, c, picture, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return layout


# -- running the methods ----------------------------------------------------------------------


def sources_per_location(
    model: nn.Module, method: Method, x: torch.Tensor
) -> list[tuple[int, int, torch.Tensor]]:
    """Run ``method`` on a copy of ``model`` and read the tokens after each reduction block.

    The copy runs its first ``block + 1`` blocks for each location: the blocks after a location
    cannot change what happened up to it, so each picture is exact.

    Args:
        model: an unpatched timm ViT.
        method: the method.
        x: a batch of inputs ``[B, 3, H, W]``.

    Returns:
        Per location: ``(block, tokens left, source [B, N_k, N0])``.
    """
    patched = method.apply(copy.deepcopy(model), trace_source=True)
    plan = getattr(patched, "reduction_plan", None)
    if plan is None:  # a method that leaves the model as it is
        return []
    blocks = patched.blocks
    out = []
    with torch.inference_mode():
        for loc in plan.locations:
            patched.blocks = blocks[: loc + 1]
            patched(x)
            source = patched.reduction_info.source
            out.append((loc, int(source.shape[1]), source))
    return out


def method_label(name: str, params: dict[str, Any]) -> str:
    """``"tome r=13"``: the method and the parameters the user gave."""
    return " ".join([name, *(f"{k}={v}" for k, v in params.items())])


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """Read ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (values as TOML: ``[3,6,9]``, ``true``)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    params: dict[str, Any] = {}
    # Split on commas outside brackets, so that lists keep theirs.
    usage = "NAME or NAME:KEY=VALUE,... (e.g. tome:r=13)"
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):
        key, value = parse_assignment(item, f"--method {name}", usage)
        params[key] = value
    return name, params


# -- models and images ------------------------------------------------------------------------


def load_model(
    name: str, checkpoint: str | Path | None = None, seed: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm ViT in eval mode: with a checkpoint's weights, else randomly initialised (seeded).

    Args:
        name: timm model name (the project's own, such as the digits model, included).
        checkpoint: a state dict file or URL (see :func:`ppt_bench.models.build.build_model`).
        seed: seeds the random initialisation.

    Returns:
        ``(model, data_config)`` as :func:`ppt_bench.models.build.build_model` returns them.
    """
    torch.manual_seed(seed)
    return build_model(name, checkpoint=None if checkpoint is None else str(checkpoint))


def load_images(images: str | Path | Sequence[Any], n_images: int = 2) -> list[tuple[str, Any]]:
    """``(name, PIL RGB image)`` pairs from files, a folder, ``"digits"`` or PIL images.

    Files that cannot be decoded are skipped, with one warning that counts them; it is an error
    only when no image is left.

    Args:
        images: ``"digits"`` (the built-in test split), an ImageFolder-style folder (the first
            ``n_images`` readable image files in sorted order, searched recursively), one image
            file, or a list of image files and PIL images.
        n_images: how many to take from ``"digits"`` or a folder.
    """
    if isinstance(images, (str, Path)):
        if str(images) == "digits":
            data = digits_dataset(split="test")
            return [(f"digits-{i}", data[i][0]) for i in range(min(n_images, len(data)))]
        path = Path(images)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}")
            return _read_images(files, n_images, limit=n_images)
        images = [path]
    return _read_images(images, n_images)


def _read_images(
    items: Sequence[Any], n_images: int, limit: int | None = None
) -> list[tuple[str, Any]]:
    """Read files, folders (``n_images`` each) and PIL images, up to ``limit`` (all when None),
    skipping the files that cannot be decoded."""
    out: list[tuple[str, Any]] = []
    unreadable: list[tuple[Path, Exception]] = []
    for item in items:
        if limit is not None and len(out) >= limit:
            break
        if isinstance(item, Image.Image):
            out.append((f"image-{len(out)}", item.convert("RGB")))
            continue
        path = Path(item)
        if path.is_dir():
            out.extend(load_images(path, n_images))
            continue
        try:
            out.append((path.stem, decode_image(str(path))))
        except FileNotFoundError:
            raise UserError(f"image {path} does not exist") from None
        except DECODE_ERRORS as err:
            unreadable.append((path, err))
    if unreadable and not out:
        path, err = unreadable[0]
        more = f" (nor {len(unreadable) - 1} other images)" if len(unreadable) > 1 else ""
        raise UserError(f"cannot read image {path}: {err}{more}; pass readable image files")
    if unreadable:
        names = ", ".join(str(p) for p, _ in unreadable)
        _logger.warning("skipped %d unreadable image(s): %s", len(unreadable), names)
    return out


def preprocess(
    data_config: dict[str, Any], images: Sequence[Image.Image]
) -> tuple[torch.Tensor, list]:
    """The model's own eval transform: a batch ``[B, 3, H, W]`` and the pictures it shows.

    Args:
        data_config: the model's timm data config, as :func:`ppt_bench.models.build.build_model`
            returns it.
        images: PIL RGB images.

    Returns:
        The normalised batch and, per image, the resized and cropped image ``[H, W, 3]`` in
        [0, 1] that the model sees.
    """
    transform = create_transform(**data_config)
    x = torch.stack([transform(im) for im in images])
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    shown = (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return x, list(shown)


# -- the whole job ----------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """Raise :class:`UserError` unless ``out`` is a figure file or a folder that can be written.

    A figure file ends in one of :data:`FIGURE_SUFFIXES`; any other name with a suffix must be
    an existing folder (``--out results.csv`` is a mistake, not a folder to create).
    """
    figure = out.suffix.lower() in FIGURE_SUFFIXES
    if not figure and out.suffix and not out.is_dir():
        raise UserError(
            f"--out {out}: a figure file must end in {', '.join(FIGURE_SUFFIXES)} (formats "
            "matplotlib writes); pass a folder for one .png per image"
        )
    check_output_path(out, "--out", directory=not figure)


def output_paths(out: Path, names: Sequence[str]) -> list[Path]:
    """``out.png`` for one image, ``out-<k>.png`` for several (any of :data:`FIGURE_SUFFIXES`);
    a folder gets ``<name>.png``, ``<name>-2.png`` for the second image of that name."""
    if out.suffix.lower() in FIGURE_SUFFIXES:
        if len(names) == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(names))]
    seen: Counter[str] = Counter()
    paths = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        seen[stem] += 1
        paths.append(out / (f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png"))
    return paths


def visualize(
    model_name: str,
    methods: Sequence[tuple[str, dict[str, Any]]],
    images: str | Path | Sequence[Any],
    out: Path,
    checkpoint: str | Path | None = None,
    *,
    n_images: int = 2,
    seed: int = 0,
    built: tuple[nn.Module, dict[str, Any]] | None = None,
) -> list[Path]:
    """Draw what each method keeps at each of its locations; one PNG per image.

    Args:
        model_name: timm model name (random weights unless ``checkpoint`` is given).
        methods: ``(name, params)`` per row.
        images: see :func:`load_images`.
        out: a ``.png`` path (or another of :data:`FIGURE_SUFFIXES`; numbered when there are
            several images) or a folder.
        checkpoint: weights for the model.
        n_images: images taken from ``"digits"`` or a folder.
        seed: seeds the random initialisation.
        built: a model and its timm data config, as :func:`ppt_bench.models.build.build_model`
            returns them, to use instead of building ``model_name`` (its name is still shown).

    Returns:
        The PNGs written.
    """
    if not methods:
        raise UserError("visualize needs at least one method, e.g. --method ppt")
    check_out(Path(out))
    created = [(name, params, create_method(name, **params)) for name, params in methods]
    model, data_config = built or load_model(model_name, checkpoint, seed)
    named = load_images(images, n_images)
    paths = output_paths(Path(out), [n for n, _ in named])
    for path in paths:
        check_output_path(path, "--out")
    x, shown = preprocess(data_config, [im for _, im in named])
    P = model.num_prefix_tokens
    grid = tuple(model.patch_embed.grid_size)

    rows: list[list[tuple[str, list[tuple[str, np.ndarray]]]]] = [[] for _ in named]
    for name, params, method in created:
        states = sources_per_location(model, method, x)
        for i in range(len(named)):
            base = upscale(shown[i])
            panels = []
            for block, tokens, source in states:
                owner, sizes = token_owner(source[i], P)
                panels.append(
                    (
                        f"block {block}: {tokens} tokens",
                        draw_panel(base, owner.reshape(grid), sizes),
                    )
                )
            rows[i].append((method_label(name, params), panels))

    weights = f"checkpoint {Path(checkpoint).name}" if checkpoint else "random weights"
    for (image_name, _), image, image_rows, path in zip(named, shown, rows, paths, strict=True):
        save_grid(path, upscale(image), image_rows, f"{model_name} ({weights}): {image_name}")
    return paths


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ppt-bench visualize``."""
    parser.add_argument(
        "--model", required=True, help="timm model name, e.g. deit_small_patch16_224"
    )
    parser.add_argument(
        "--checkpoint", help="weights: a state dict file or URL; without it the weights are random"
    )
    parser.add_argument(
        "--method",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help="a method and its parameters, e.g. ppt or tome:r=13 or evit:keep_rate=0.5; repeat "
        f"for one row each (default: {', '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        default=["digits"],
        help="image files, an ImageFolder folder, or 'digits' (the built-in set; default)",
    )
    parser.add_argument(
        "--n-images", type=int, default=2, help="images taken from a folder or digits (default 2)"
    )
    parser.add_argument(
        "--out",
        default="reports/figures/visualize",
        help="a .png (or .jpg, .pdf, .svg, ...) file, numbered for several images, or a folder "
        "(default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run(args: argparse.Namespace) -> int:
    """``ppt-bench visualize``: write the PNGs and print their paths (a :class:`UserError`
    reaches ``ppt-bench``'s one-line handler, as every command's does)."""
    if args.n_images < 1:
        raise UserError(f"--n-images must be at least 1, got {args.n_images}")
    methods = [parse_method(m) for m in (args.method or DEFAULT_METHODS)]
    images = args.images[0] if len(args.images) == 1 else args.images
    paths = visualize(
        args.model,
        methods,
        images,
        Path(args.out),
        args.checkpoint,
        n_images=args.n_images,
        seed=args.seed,
    )
    for path in paths:
        print(path)
    return 0
