"""DCT token reduction (Fourier Transformer, ACL 2023, as run on ViTs by OpenToMe:
github.com/Westlake-AI/OpenToMe @ 4b791cbc, ``opentome/timm/dct.py`` and
``opentome/tome/dct.py``).

After the MLP of a block, the patch tokens are taken in float32 along the token axis, their
orthonormal DCT-II is truncated to the first ``T - r`` coefficients (the lowest frequencies)
and transformed back by an orthonormal inverse DCT of length ``T - r``: a low-pass resampling
of the token sequence to fewer tokens. Prefix tokens are carried unchanged. Both transforms run
through ``torch.fft`` (Makhoul's algorithm, as in OpenToMe) and the result is cast back to the
model's dtype. Unlike OpenToMe, LayerScale is kept and every prefix token (not only the class
token) is protected.

Cost: torchprofile and fvcore do not count FFTs. :meth:`DCT.uncounted_macs` gives their cost
by formula, ``2 n log2(n)`` multiply-accumulates per length-``n`` FFT and channel
(:func:`transform_macs`), and :func:`ppt_bench.measure.macs.measure_macs` adds it to the counted
figures; :func:`ppt_bench.measure.macs.uncounted_macs` gives the part added.

Tokens after a DCT step are not a subset or a merge of the input tokens: every output token is
a weighted mix of all of them. With source tracking, ``source[i, j]`` is therefore a real
weight, not 0/1: the weight of original patch ``j`` in token ``i`` under the composed transforms
(prefix rows stay one-hot). ``visualize`` draws each patch in the token that weights it most,
which gives runs of neighbouring patches in raster order, the resampling of the sequence; the
``size`` of every token stays 1, so proportional attention does not apply.

For the same reason no output token descends from one input token, so DCT gives no
``Reduced.origin``: on a model with rotary embeddings the patch reduces a one-hot map of the
tokens through the same transform and output token ``i`` takes the position of the input token
that weighs most in it (the first among equals;
:func:`ppt_bench.methods.patch.follow_positions`), which resamples the positions with the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ppt_bench.methods.contract import AFTER_MLP, Examples, Reduced
from ppt_bench.methods.parts import step
from ppt_bench.methods.schedule import Scheduled

if TYPE_CHECKING:
    pass


def dct_ortho(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last axis through one complex FFT: ``[..., n] -> [..., n]``."""
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)  # Makhoul's reordering
    spec = torch.view_as_real(torch.fft.fft(v, dim=-1))  # [..., n, 2]: real, imaginary
    k = -torch.arange(n, dtype=x.dtype, device=x.device) * math.pi / (2 * n)
    out = spec[..., 0] * torch.cos(k) - spec[..., 1] * torch.sin(k)
    scale = torch.full((n,), math.sqrt(2 / n), dtype=x.dtype, device=x.device)
    scale[:1].fill_(math.sqrt(1 / n))
    return out * scale


def idct_ortho(c: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct_ortho` (orthonormal DCT-III) along the last axis."""
    n = c.shape[-1]
    scale = torch.full((n,), math.sqrt(n / 2), dtype=c.dtype, device=c.device)
    scale[:1].fill_(math.sqrt(n))
    re = c * scale
    im = F.pad(-re[..., 1:].flip(-1), (1, 0))  # 0, then -re backwards without re[0]
    k = torch.arange(n, dtype=c.dtype, device=c.device) * math.pi / (2 * n)
    cos, sin = torch.cos(k), torch.sin(k)
    spec = torch.complex(re * cos - im * sin, re * sin + im * cos)
    v = torch.fft.ifft(spec, dim=-1).real
    # Undo Makhoul's reordering: even positions from the front, odd ones from the back.
    order = [i // 2 if i % 2 == 0 else n - 1 - i // 2 for i in range(n)]
    return v[..., order]


@step("merge")
def dct_reduce(x: torch.Tensor, r: int) -> torch.Tensor:
    """Shorten tokens ``[B, T, C]`` to ``[B, T - r, C]`` by DCT truncation, in float32.

    The DCT runs along the token axis, the lowest ``T - r`` coefficients are kept and an inverse
    DCT of length ``T - r`` gives the tokens; the result has ``x``'s dtype.
    """
    t = (x if x.dtype == torch.float32 else x.float()).transpose(1, 2)  # [B, C, T]
    coeffs = dct_ortho(t)[..., : t.shape[-1] - r]
    out = idct_ortho(coeffs).transpose(1, 2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def transform_matrix(num_in: int, num_out: int, device: torch.device) -> torch.Tensor:
    """The linear map of :func:`dct_reduce` on the token axis: ``[num_out, num_in]`` float32,
    entry ``(i, j)`` the weight of input token ``j`` in output token ``i``."""
    eye = torch.eye(num_in, device=device)[None]  # each input token alone, [1, T, T]
    return dct_reduce(eye, num_in - num_out)[0]


def fft_macs(n: int) -> int:
    """Multiply-accumulates of one length-``n`` complex FFT, by formula: ``2 n log2(n)``.

    That is ``n/2 log2(n)`` radix-2 butterflies of one complex multiplication (4 real
    multiply-accumulates) each, the usual count for an FFT of any length.
    """
    return round(2 * n * math.log2(n)) if n > 1 else 0


def transform_macs(num_in: int, num_out: int, dim: int) -> int:
    """Multiply-accumulates of the FFTs in one :func:`dct_reduce` of one image.

    One FFT of length ``T`` (the DCT) and one of length ``T - r`` (the inverse) per channel.
    The twiddle and scale products around them are ordinary elementwise multiplications,
    which torchprofile counts already, so they are not in this figure.
    """
    return dim * (fft_macs(num_in) + fft_macs(num_out))


@dataclass(frozen=True)
class DCT(Scheduled):
    """DCT token reduction after the MLP of every block with ``r > 0``.

    Args:
        r: tokens removed per block, as ToMe's schedule: an int, an ``(r, inflection)`` pair or
            a list with one ``r`` per block (padded with 0). At most half the patch tokens per
            block. Default 13, ToMe's setting for ViT-S.
    """

    description = "DCT (ACL 2023): keep the lowest frequencies of the token sequence, after the MLP"
    family = "merging"
    examples = Examples(reducing={"r": 4}, invalid={"r": (-1, (8, 2.0))})
    reduce_at = AFTER_MLP

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        N, P = x.shape[1], num_prefix
        r = self.block_r(block, N, P)
        if r == 0:
            return Reduced(x, size, source)
        out = torch.cat([x[:, :P], dct_reduce(x[:, P:], r)], dim=1)  # [B, N - r, C]
        if source is not None:
            mix = transform_matrix(N - P, N - P - r, x.device)  # [T - r, T]
            patches = (mix @ source[:, P:].float()).to(source.dtype)  # [B, T - r, N0]
            source = torch.cat([source[:, :P], patches], dim=1)
        return Reduced(out, size[:, : N - r], source)

    def uncounted_macs(self, tokens: tuple[int, ...], num_prefix: int, dim: int) -> int:
        """The DCT and inverse DCT of every reducing block (:func:`transform_macs`)."""
        total = 0
        for block in range(len(tokens) - 1):
            n_in, n_out = tokens[block], tokens[block + 1]
            if n_out < n_in:
                total += transform_macs(n_in - num_prefix, n_out - num_prefix, dim)
        return total
