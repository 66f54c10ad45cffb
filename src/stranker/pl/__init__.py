"""Plotting."""

from ._kaplan_meier import kaplan_meier

__all__: list[str] = ["kaplan_meier"]
