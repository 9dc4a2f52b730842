"""Comparisons between two implementations of the same computation, scaled to what they compare.

Two correct float32 implementations (JAX vs PyTorch, the packed forward vs the model's eval
forward, 1 vs N devices) differ by rounding: summation order, fused multiply-adds, another
reduction tree. That difference grows with the *size* of the values summed, not with each
element's own size: a logit of 0.15 computed in the same sum as logits of 200 carries the rounding
of 200. An absolute bound (``atol=1e-4``) or an element-wise relative one (``rtol``) on such
values passes or fails with the machine's thread schedule and XLA's code generation. So every
cross-implementation check here bounds the difference by a fraction of the largest magnitude in
the compared tensor (or a scale the caller names), ``|a - b| <= rel * scale``, and, for logits,
also asks for the same prediction wherever the top-2 margin is larger than that bound (a
near-tie may legitimately flip).

(Not a test module: imported by the tests that compare implementations.)
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["PARAM_REL", "assert_close_to_scale", "assert_same_predictions", "assert_logits_match"]

# Final params/BN statistics of the tiny run continued on another device count or process count
# vs the uninterrupted run: the means over devices add the same numbers in another order, and the
# last-bit differences grow through the remaining Adam steps (Adam divides by sqrt(v), so a
# coordinate whose gradient is ~0 can move by up to the learning rate on noise alone). Bounded by
# 1e-3 of the largest value of the compared tree (params, or state): observed differences are
# ~1e-5 of it; a skipped step, a wrong batch or a lost BN update moves values by percents.
PARAM_REL = 1e-3


def assert_close_to_scale(actual, desired, rel: float, *, scale=None, err_msg: str = "") -> float:
    """Assert ``max|actual - desired| <= rel * scale``; ``scale`` defaults to ``max|desired|``.

    Returns the bound used (for callers that also check predictions against it).
    """
    a = np.asarray(actual, np.float64)
    b = np.asarray(desired, np.float64)
    assert a.shape == b.shape, f"{err_msg} shapes differ: {a.shape} vs {b.shape}"
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), f"{err_msg} non-finite values"
    s = float(np.max(np.abs(b))) if scale is None else float(scale)
    bound = rel * s
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    if os.environ.get("QAT_JAX_TEST_REPORT_NUMERICS"):  # margins, for choosing a bound
        print(f"numerics: {err_msg} max|a - b| / scale = {err / max(s, 1e-30):.3g} (rel {rel:g})")
    assert err <= bound, (
        f"{err_msg} max|a - b| = {err:.3g} > {rel:g} * scale {s:.4g} = {bound:.3g} "
        f"(worst at {np.unravel_index(np.argmax(np.abs(a - b)), a.shape)})"
    )
    return bound


def assert_same_predictions(actual, desired, bound: float, err_msg: str = "") -> None:
    """Same argmax (last axis) for every row whose top-2 margin in ``desired`` exceeds 2*bound."""
    a = np.asarray(actual, np.float64)
    b = np.asarray(desired, np.float64)
    top2 = np.sort(b, axis=-1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0]) > 2 * bound
    same = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
    bad = np.flatnonzero(decided & ~same)
    assert bad.size == 0, f"{err_msg} predictions differ in rows {bad[:10].tolist()}"


def assert_logits_match(actual, desired, rel: float, err_msg: str = "") -> None:
    """Logits of two implementations: scaled closeness and the same predictions."""
    bound = assert_close_to_scale(actual, desired, rel, err_msg=err_msg)
    assert_same_predictions(actual, desired, bound, err_msg=err_msg)
