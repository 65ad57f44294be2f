"""Minibatch SGD on sampled data against the gradient flow, and the data models of Appendix D."""

import numpy as np
import pytest

from directpred.theory import GaussianViews, Scrambling, make_data, simulate_linear, simulate_sgd


def test_data_model_moments_match_X_and_Xp():
    """Sampled E[x1x1ᵀ] → X + X' and E[x2x1ᵀ] → X, within ~5 standard errors (N = 200k)."""
    rng = np.random.default_rng(0)
    n, N = 4, 200_000
    for data in (
        make_data("anisotropic", n, 0.3),
        make_data("additive", n, 0.3),
        make_data("scrambling", n, 0.0),
    ):
        x1, x2 = data.sample(rng, N)
        tol = 5 * 2.0 / np.sqrt(N) * max(1.0, np.abs(data.X + data.Xp).max())
        np.testing.assert_allclose(x1.T @ x1 / N, data.X + data.Xp, atol=tol)
        np.testing.assert_allclose(x2.T @ x1 / N, data.X, atol=tol)


def test_scrambling_statistics_follow_appendix_D():
    """With Σx = I: Σ^d = P^c and Σ^s = Σx, so Σ^d[Σ^s]⁻¹ = P^c (App. D)."""
    d = Scrambling(np.eye(6), np.eye(6)[:, 3:])
    np.testing.assert_allclose(d.X, np.diag([1, 1, 1, 0, 0, 0.0]))
    np.testing.assert_allclose(d.X + d.Xp, np.eye(6))


def test_sgd_tracks_gradient_flow_with_large_batch_small_step():
    """Same init, lr = dt: the SGD–flow gap shrinks like 1/sqrt(batch) and is a few % at batch 2048."""
    rng = np.random.default_rng(1)
    n1, n2 = 5, 3
    W, Wp, Wa = 0.5 * rng.normal(size=(n2, n1)), 0.5 * rng.normal(size=(n2, n2)), np.zeros((n2, n1))
    data = GaussianViews(np.diag(np.linspace(1.0, 0.5, n1)), 0.2 * np.eye(n1))
    kw = dict(alpha_p=1.0, eta=0.02, beta=0.5, steps=600, record_every=600)
    flow = simulate_linear(W, Wp, Wa, data.X, data.Xp, dt=0.01, **kw)
    gaps = {}
    for batch in (16, 2048):
        sgd = simulate_sgd(W, Wp, Wa, data, lr=0.01, batch=batch, seed=3, **kw)
        gaps[batch] = np.linalg.norm(sgd.W[-1] - flow.W[-1]) / np.linalg.norm(flow.W[-1] - W)
    assert gaps[2048] < 0.08, gaps
    assert gaps[16] > 3 * gaps[2048], gaps


def test_additive_noise_fixed_point_and_scrambling_learns_clean_subspace():
    """App. D, η = 0: at convergence Wa = W and Wp W Σ^s = W Σ^d (so Wp W = W Σ^d[Σ^s]⁻¹). With scrambling and
    η = 0 that fixed-point manifold lets W keep scrambled directions in the null space of Wp; a small
    weight decay
    removes them, so the rows of W end in the clean subspace (span(U) is scrambled)."""
    rng = np.random.default_rng(2)
    n1, n2 = 6, 3
    W, Wp = 0.5 * rng.normal(size=(n2, n1)), np.eye(n2) + 0.1 * rng.normal(size=(n2, n2))
    data = make_data("additive", n1, 0.2)
    Ss, Sd = data.X + data.Xp, data.X
    tr = simulate_linear(
        W,
        Wp,
        W.copy(),
        data.X,
        data.Xp,
        alpha_p=1.0,
        eta=0.0,
        beta=1.0,
        dt=0.05,
        steps=6000,
        record_every=6000,
    )
    Wf, Wpf, Waf = tr.W[-1], tr.Wp[-1], tr.Wa[-1]
    assert np.abs(Wpf @ Wf @ Ss - Wf @ Sd).max() < 1e-4 * np.abs(Wf).max()
    assert np.abs(Waf - Wf).max() < 1e-4
    sc = make_data("scrambling", n1, 0.0)
    tr = simulate_linear(
        W, Wp, W.copy(), sc.X, sc.Xp, alpha_p=1.0, eta=0.05, beta=1.0, dt=0.05, steps=6000, record_every=6000
    )
    Wf = tr.W[-1]
    assert np.linalg.norm(Wf) > 0.5  # not collapsed
    leak0 = np.linalg.norm(W @ sc.U) / np.linalg.norm(W)
    leak = np.linalg.norm(Wf @ sc.U) / np.linalg.norm(Wf)
    assert leak0 > 0.3 and leak < 1e-2


def test_sgd_and_data_models_reject_bad_input():
    # A negative sigma2 was clipped to 0 by the square root (views identical, silently); n1=0 built an empty model;
    # weights that do not fit the data failed inside numpy's matmul; Wp=None with the predictor became a NaN matrix.
    with pytest.raises(ValueError, match="sigma2 \\(the augmentation variance\\) must be >= 0, got -0.1"):
        make_data("isotropic", 3, -0.1)
    with pytest.raises(ValueError, match="n1 \\(the input dimension\\) must be an integer >= 1, got 0"):
        make_data("isotropic", 0, 0.1)
    data = make_data("isotropic", 2, 0.1)
    kw = dict(alpha_p=1.0, eta=0.0, beta=0.1, lr=0.1, steps=2, batch=4)
    with pytest.raises(ValueError, match=r"W \(n2, n1\) must have n1 = 2 columns, the data model's dimension"):
        simulate_sgd(np.eye(3), np.eye(3), np.eye(3), data, **kw)
    with pytest.raises(ValueError, match=r"Wp must have shape \(2, 2\) for W of shape \(2, 2\), got \(3, 3\)"):
        simulate_sgd(np.eye(2), np.eye(3), np.eye(2), data, **kw)
    with pytest.raises(ValueError, match="Wp is required when predictor=True"):
        simulate_sgd(np.eye(2), None, np.eye(2), data, **kw)
    with pytest.raises(ValueError, match=r"Wa must have the shape of W \(2, 2\), got \(3, 2\)"):
        simulate_sgd(np.eye(2), np.eye(2), np.ones((3, 2)), data, **kw)
    assert simulate_sgd(np.eye(2), None, None, data, predictor=False, **kw).Wp.shape == (3, 2, 2)


def test_scrambling_refuses_an_n1_with_nothing_to_scramble():
    """make_data("scrambling", 1, 0.1) scrambled n1 // 2 = 0 coordinates and X' divided by k = 0: NaN with a
    RuntimeWarning."""
    with pytest.raises(ValueError) as info:
        make_data("scrambling", 1, 0.1)
    assert str(info.value) == (
        "n1 (the input dimension) must be an integer >= 2 for the scrambling data model (it scrambles the last "
        "n1 // 2 coordinates), got 1"
    )
    assert np.array_equal(make_data("scrambling", 2, 0.1).Xp, np.diag([0.0, 1.0]))  # n1 = 2: one scrambled coordinate
    assert make_data("isotropic", 1, 0.1).X.shape == (1, 1)  # the other models take n1 = 1
