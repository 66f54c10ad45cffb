"""Renamed arguments: the old name keeps working for one release, with a FutureWarning."""

from __future__ import annotations

import warnings
from typing import Any

_UNSET: Any = object()


def renamed(func: str, old: str, new: str, old_value: Any, new_value: Any, default: Any) -> Any:
    """Return the value of a renamed argument: ``new_value``, or ``old_value`` with a FutureWarning.

    ``old_value`` is :data:`_UNSET` when the old name was not passed; ``default`` replaces an unset
    ``new_value``. Passing both names is an error.
    """
    if old_value is _UNSET:
        return default if new_value is _UNSET else new_value
    if new_value is not _UNSET:
        raise TypeError(f"{func}() got both `{old}=` and `{new}=`; `{old}=` is the old name of `{new}=`.")
    warnings.warn(
        f"{func}(): `{old}=` is renamed `{new}=`; the old name will be removed in the next release.",
        FutureWarning,
        stacklevel=3,
    )
    return old_value
