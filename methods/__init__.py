"""Token reduction methods behind one registry.

>>> import timm
>>> from ppt_bench.methods import create_method
>>> model = create_method("ppt", r=50, locations=(3, 6, 9), threshold=7e-5).apply(
...     timm.create_model("deit_small_patch16_224"))
"""

from __future__ import annotations

from ppt_bench.methods import contract
from ppt_bench.methods.base import Method
from ppt_bench.methods.contract import *  # noqa: F403 - what a method and the patch exchange
from ppt_bench.methods.patch import is_patched, patch
from ppt_bench.methods.registry import (
    create_method,
    get_method_class,
    list_methods,
    method_params,
    register_method,
    registered_methods,
)

__all__ = [
    *contract.__all__,
    "Method",
    "create_method",
    "get_method_class",
    "is_patched",
    "list_methods",
    "method_params",
    "patch",
    "register_method",
    "registered_methods",
]
