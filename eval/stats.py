"""Rates with their uncertainty: every rate a report gives carries its count, its n and a 95% interval.

The Wilson score interval (Wilson, 1927) stays inside [0, 1] and does not collapse at 0 or n
successes: 0 of 8 is compatible with a true rate up to 32%, 0 of 64 up to 5.7%.
"""

from __future__ import annotations

import math

__all__ = ["Z95", "rate", "rate_text", "wilson"]

Z95 = 1.959963984540054  # the standard normal's 97.5% point


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95% by default); (0, 1) for n = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def rate(k: int, n: int) -> dict:
    """{"rate", "k", "n", "ci95": [low, high]}: a rate as reports write it."""
    low, high = wilson(k, n)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": [low, high]}


def rate_text(k: int, n: int) -> str:
    """`12.5% (1/8; 95% CI 2.2-47.1%)`."""
    low, high = wilson(k, n)
    shown = f"{k / n:.1%}" if n else "n/a"
    return f"{shown} ({k}/{n}; 95% CI {low:.1%}-{high:.1%})"
