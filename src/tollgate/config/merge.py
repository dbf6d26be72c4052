"""Deep merge of JSON trees, as DIAL merges its config files (compatibility C2)."""

from __future__ import annotations

from typing import Any


def deep_merge(base: Any, update: Any, *, overwrite_arrays: bool) -> Any:
    """Objects merge key by key, arrays concatenate (or are replaced), later scalars win.

    Neither input is modified; the result shares no containers with `update`'s objects.
    """
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = (
                deep_merge(base[key], value, overwrite_arrays=overwrite_arrays)
                if key in base
                else value
            )
        return merged
    if isinstance(base, list) and isinstance(update, list) and not overwrite_arrays:
        return base + update
    return update
