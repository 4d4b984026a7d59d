"""Medians, spreads and ratios of alternated A/B measurements."""
from __future__ import annotations

import statistics
from typing import Dict, Sequence


def summary(values: Sequence[float]) -> Dict[str, float]:
    """Median with its min-max spread over rounds."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no measurements to summarise")
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratios(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Per-round a/b, summarised: a and b come from the same rounds, measured back to back."""
    if len(a) != len(b):
        raise ValueError(f"ratio of {len(a)} rounds to {len(b)} rounds: measure both in every round")
    return summary([x / y for x, y in zip(a, b)])


def fmt(s: Dict[str, float], digits: int = 2) -> str:
    """'0.63x (0.58-0.71, n=5)'"""
    return f"{s['median']:.{digits}f}x ({s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})"


def fmt_value(s: Dict[str, float], unit: str = "", digits: int = 1) -> str:
    """'40.2 ms (38.1-45.0)', or without a unit '40.2 (38.1-45.0)'."""
    unit = f" {unit}" if unit else ""
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def fmt_pct(s: Dict[str, float]) -> str:
    """A summary of fractions as percentages: '+0.9 % (-0.4 to +2.3)'."""
    return f"{100 * s['median']:+.1f} % ({100 * s['min']:+.1f} to {100 * s['max']:+.1f})"


def rotate(items: Sequence, k: int) -> list:
    """``items`` started at position k: each round runs the candidates in a different order."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])
