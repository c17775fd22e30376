"""Rates with their intervals (eval/stats.py)."""

from __future__ import annotations

import pytest

from eval.stats import rate, rate_text, wilson


def test_wilson_matches_the_textbook_values_and_the_issue_figures():
    """0 of 8 is compatible with ~32% (the 8-image cells), 0 of 64 with 5.7%, 9 of 64 is 7.6-24.6%;
    the interval holds the rate, stays in [0, 1] and narrows with n."""
    assert wilson(0, 8) == (0.0, pytest.approx(0.3244, abs=1e-4))
    assert wilson(0, 64)[1] == pytest.approx(0.0566, abs=1e-4)
    assert wilson(9, 64) == (pytest.approx(0.0758, abs=1e-4), pytest.approx(0.2462, abs=1e-4))
    assert wilson(8, 8) == (pytest.approx(0.6756, abs=1e-4), 1.0)
    for k, n in [(1, 8), (5, 20), (37, 64)]:
        low, high = wilson(k, n)
        assert 0 <= low < k / n < high <= 1
        assert wilson(4 * k, 4 * n)[1] - wilson(4 * k, 4 * n)[0] < high - low
    assert rate(1, 8) == {"rate": 0.125, "k": 1, "n": 8, "ci95": list(wilson(1, 8))}
    assert rate_text(1, 8) == "12.5% (1/8; 95% CI 2.2%-47.1%)"
    with pytest.raises(ValueError):
        wilson(9, 8)
