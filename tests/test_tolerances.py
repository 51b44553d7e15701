"""The rounding bounds of tests/tolerances.py: they hold, and they are not slack."""

import numpy as np
import pytest

from cmdcli import CMD, fitting
from tests.tolerances import (
    EPS32,
    assert_kernel_result,
    gamma,
    kernel_bounds,
    statistics_bounds,
)


@pytest.fixture(scope="module")
def fit():
    rng = np.random.default_rng(5)
    W = rng.normal(size=(20_000, 8)).cumsum(axis=1).astype(np.float32)
    return W, CMD(n_modes=3, seed=0, workers=1).fit(W)


def test_gamma_is_highams():
    assert gamma(1) == pytest.approx(EPS32 / 2)
    assert gamma(1000) == pytest.approx(1000 * EPS32 / 2, rel=1e-3)


def test_a_fit_is_within_its_bounds_and_the_bounds_are_tight(fit):
    W, model = fit
    bounds = kernel_bounds(W, model.references_)
    assert_kernel_result(model.a_, model.b_, model.modes_, bounds)
    a_ref, b_ref = bounds.exact_for(model.modes_.astype(np.int64))
    a_tol, b_tol = bounds.tolerances_for(model.modes_.astype(np.int64))
    # A worst case over summation orders, yet within a few T of what is seen: the
    # largest error reaches a sizeable share of its bound somewhere.
    assert np.max(np.abs(model.a_ - a_ref) / a_tol) > 0.02
    assert np.max(np.abs(model.b_ - b_ref) / b_tol) > 0.02
    # and b's bound follows the terms, not b: small b, relatively large bound
    small = np.abs(b_ref) < 0.05
    assert small.any() and np.all(b_tol[small] > EPS32 * np.abs(b_ref[small]))


def test_bounds_catch_an_error_beyond_rounding(fit):
    W, model = fit
    bounds = kernel_bounds(W, model.references_)
    modes = model.modes_.astype(np.int64)
    _, b_tol = bounds.tolerances_for(modes)
    b = model.b_.copy()
    b[17] += 4 * b_tol[17]
    with pytest.raises(AssertionError, match="b of 1 weights beyond float32 rounding"):
        assert_kernel_result(model.a_, b, modes, bounds)
    wrong = modes.copy()
    decided = np.flatnonzero(bounds.decided)
    wrong[decided[0]] = (wrong[decided[0]] + 1) % model.n_modes_
    with pytest.raises(AssertionError, match="another mode"):
        assert_kernel_result(model.a_, model.b_, wrong, bounds)


def test_statistics_within_bounds(fit):
    W, model = fit
    sb = statistics_bounds(
        W, model.references_, model.a_, model.b_, model.modes_, columns_per_sum=fitting.cpu_chunk(8)
    )
    s = model.statistics_
    assert np.all(np.abs(s.sse_per_checkpoint - sb.sse_per_checkpoint) <= sb.sse_per_checkpoint_tol)
    assert np.all(np.abs(s.gram - sb.gram) <= sb.gram_tol)
    assert abs(model.explained_variance_ - sb.explained_variance) <= sb.explained_variance_tol
    assert sb.explained_variance_tol < 1e-3
