"""Train/test splits of sections that keep every group (patient) on one side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import InputError
from .._settings import resolve_seed


def split_sections(
    sections: Sequence[Any],
    *,
    groups: Sequence[Any] | None = None,
    test_size: float | int = 0.25,
    seed: int | None = None,
) -> tuple[list[Any], list[Any]]:
    """Split sections into training and test lists, never putting one group on both sides.

    Sections of one patient (or slide, or lab) are correlated: a model tested on a section whose
    neighbour it was trained on looks better than it is. Give each section its group, and whole
    groups are drawn for the test side.

    Parameters
    ----------
    sections
        The sections (any objects: SpatialData, AnnData, names).
    groups
        One label per section (e.g. the patient id); ``None``: each section is its own group.
    test_size
        Fraction of the groups (rounded, at least one, at most all but one) or a number of groups.
    seed
        Random seed of the draw (default ``sr.settings.seed``).

    Returns
    -------
    ``(train, test)``: lists of the given objects, each in input order.
    """
    sections = list(sections)
    n = len(sections)
    labels = np.arange(n) if groups is None else np.asarray(list(groups), dtype=object)
    if len(labels) != n:
        raise InputError(f"`groups` has {len(labels)} labels for {n} sections; give one label per section.")
    if any(g is None or (isinstance(g, float) and np.isnan(g)) for g in labels):
        raise InputError("`groups` holds missing labels; give every section its group.")
    uniq = list(dict.fromkeys(labels.tolist()))
    n_groups = len(uniq)
    if n_groups < 2:
        raise InputError(f"Splitting needs at least 2 groups, got {n_groups}.")
    if isinstance(test_size, bool) or not isinstance(test_size, int | float | np.integer | np.floating):
        raise InputError(
            f"`test_size` must be a fraction in (0, 1) or a number of groups, got {test_size!r}."
        )
    if isinstance(test_size, int | np.integer):
        if not 1 <= test_size < n_groups:
            raise InputError(f"`test_size` must be between 1 and {n_groups - 1} groups, got {test_size}.")
        n_test = int(test_size)
    else:
        if not 0 < test_size < 1:
            raise InputError(f"`test_size` as a fraction must be in (0, 1), got {test_size}.")
        n_test = min(max(int(round(test_size * n_groups)), 1), n_groups - 1)
    rng = np.random.default_rng(resolve_seed(seed))
    test_groups = {uniq[i] for i in rng.permutation(n_groups)[:n_test]}
    is_test = [g in test_groups for g in labels.tolist()]
    return [s for s, t in zip(sections, is_test, strict=True) if not t], [
        s for s, t in zip(sections, is_test, strict=True) if t
    ]
