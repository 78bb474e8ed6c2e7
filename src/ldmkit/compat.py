"""Differences between the supported versions of our dependencies, in one place."""

from __future__ import annotations

from typing import Any


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The ``from_pretrained`` keyword for a weights dtype: diffusers renamed ``torch_dtype`` to ``dtype``
    (0.42 warns on the old name, which goes in 1.0); older releases know only ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}
