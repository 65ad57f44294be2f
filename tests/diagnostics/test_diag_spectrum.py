"""The metric functions of directpred.diagnostics.metrics against independent computations on known matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from directpred.diagnostics import metrics as spectrum
from directpred.heads import MLP, DirectPred, LinearPredictor, PartitionedDirectPred


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return torch.from_numpy(q)


def test_eigen_spectrum_descending_and_reconstructs():
    U = random_orthogonal(6)
    s = torch.tensor([5.0, 4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    F = (U * s) @ U.T
    s_hat, U_hat = spectrum.eigen_spectrum(F.float())
    assert torch.allclose(s_hat, s, atol=1e-5)
    # each recovered eigenvector equals the true one up to sign
    assert torch.allclose((U_hat * U).sum(0).abs(), torch.ones(6, dtype=torch.float64), atol=1e-5)


def test_alignment_is_one_for_a_commuting_pair():
    U = random_orthogonal(8, seed=1)
    s = torch.linspace(4, 0.1, 8, dtype=torch.float64)
    F = (U * s) @ U.T
    W_p = (U * s.sqrt()) @ U.T  # DirectPred's W_p: same eigenvectors, p_j = sqrt(s_j)
    _, U_F = spectrum.eigen_spectrum(F)
    cos = spectrum.cosines_along(W_p, U_F)
    assert torch.allclose(cos, torch.ones(8, dtype=torch.float64), atol=1e-10)
    assert spectrum.alignment_summary(cos, s)["alignment"] == pytest.approx(1.0)


@pytest.mark.parametrize("theta", [0.0, 0.3, math.pi / 4, 1.2])
def test_alignment_of_a_rotation_is_its_cosine(theta):
    # W_p = R(theta) in each 2-D block: W_p u = cos(theta) u + sin(theta) u_perp, so cos(W_p u, u) = cos theta
    d = 6
    R = torch.zeros(d, d, dtype=torch.float64)
    c, s_ = math.cos(theta), math.sin(theta)
    for k in range(0, d, 2):
        R[k : k + 2, k : k + 2] = torch.tensor([[c, -s_], [s_, c]])
    cos = spectrum.cosines_along(R, torch.eye(d, dtype=torch.float64))
    assert torch.allclose(cos, torch.full((d,), c, dtype=torch.float64), atol=1e-12)
    # the same in a random basis: V R V^T against the eigenvectors V of F = V diag(s) V^T
    V = random_orthogonal(d, seed=2)
    F = (V * torch.arange(d, 0, -1, dtype=torch.float64)) @ V.T
    _, U_F = spectrum.eigen_spectrum(F)
    cos = spectrum.cosines_along(V @ R @ V.T, U_F)
    assert torch.allclose(cos, torch.full((d,), c, dtype=torch.float64), atol=1e-10)


def test_alignment_of_a_negative_eigenvalue_is_minus_one():
    W = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    assert spectrum.cosines_along(W, torch.eye(2, dtype=torch.float64)).tolist() == pytest.approx([1.0, -1.0])


def test_alignment_weighted_summary():
    cos = torch.tensor([1.0, 0.0], dtype=torch.float64)
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    out = spectrum.alignment_summary(cos, s)
    assert out["alignment"] == pytest.approx(0.5)
    assert out["alignment_weighted"] == pytest.approx(0.75)


def test_asymmetry():
    A = torch.randn(5, 5, dtype=torch.float64)
    assert spectrum.asymmetry(A + A.T) == pytest.approx(0.0, abs=1e-12)
    assert spectrum.asymmetry(A - A.T) == pytest.approx(2.0)
    ref = np.linalg.norm(A.numpy() - A.numpy().T) / np.linalg.norm(A.numpy())
    assert spectrum.asymmetry(A) == pytest.approx(ref)


def test_sqrt_law_fit_on_directpred():
    # DirectPred with eps=0 sets p_j = sqrt(s_j / s_max): slope 1/2 and correlation 1 (Eq. 18)
    U = random_orthogonal(16, seed=3)
    s = torch.logspace(0, -3, 16, dtype=torch.float64)
    F = (U * s) @ U.T
    dp = DirectPred(16, eps=0.0)
    W_p = dp.target_weight(F.float()).double()
    s_hat, U_hat = spectrum.eigen_spectrum(F)
    fit = spectrum.sqrt_law_fit(spectrum.rayleigh_eigenvalues(W_p, U_hat), s_hat)
    assert fit["p_s_slope"] == pytest.approx(0.5, abs=1e-3)
    assert fit["p_sqrt_s_corr"] == pytest.approx(1.0, abs=1e-6)
    # p_j = s_j (a different law) gives slope 1
    fit = spectrum.sqrt_law_fit(s, s)
    assert fit["p_s_slope"] == pytest.approx(1.0)


def test_sqrt_law_fit_undefined_for_the_identity():
    s = torch.logspace(0, -3, 8, dtype=torch.float64)
    p = torch.ones(8, dtype=torch.float64) + 1e-16 * torch.randn(8, dtype=torch.float64)
    assert math.isnan(spectrum.sqrt_law_fit(p, s)["p_sqrt_s_corr"])
    assert spectrum.pearson(s, 2 * s + 1) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_rankme_of_rank_k_embedding(k):
    # k orthonormal directions with equal weight: the singular values are k equal numbers -> RankMe = k
    N, d = 200, 32
    Q = random_orthogonal(N, seed=4)[:, :k]
    V = random_orthogonal(d, seed=5)[:k]
    Z = 3.0 * Q @ V
    assert spectrum.rankme(Z) == pytest.approx(k, rel=1e-3)
    # a random rank-k embedding (unequal singular values) stays below k and near it
    Zr = torch.randn(N, k, dtype=torch.float64) @ torch.randn(k, d, dtype=torch.float64)
    assert 0.6 * k <= spectrum.rankme(Zr) <= k + 1e-3


def test_rankme_matches_numpy_formula():
    Z = torch.randn(50, 20, dtype=torch.float64)
    sig = np.linalg.svd(Z.numpy(), compute_uv=False)
    q = sig / sig.sum() + 1e-7
    assert spectrum.rankme(Z) == pytest.approx(float(np.exp(-(q * np.log(q)).sum())))


def test_normalized_std_collapsed_and_isotropic():
    d = 64
    const = torch.randn(1, d).expand(500, d)
    assert spectrum.normalized_std(const) == pytest.approx(0.0, abs=1e-7)
    iso = torch.randn(20000, d, generator=torch.Generator().manual_seed(0))
    assert spectrum.normalized_std(iso) * math.sqrt(d) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("tied", [False, True])
def test_mlp_mean_jacobian_matches_autograd(tied):
    torch.manual_seed(0)
    d, hidden, B = 6, 10, 32
    mlp = MLP(d, hidden, d, bn_affine=True, tied=tied).double()
    with torch.no_grad():
        mlp.bn.weight.uniform_(0.5, 1.5)
        mlp.bn.bias.uniform_(-0.5, 0.5)
    z = torch.randn(B, d, dtype=torch.float64)
    a = mlp.fc1(z)
    mean, var = a.mean(0).detach(), a.var(0, unbiased=False).detach()

    def per_sample(x: torch.Tensor) -> torch.Tensor:  # the MLP with this batch's BN statistics held fixed
        pre = (mlp.fc1(x) - mean) / (var + mlp.bn.eps).sqrt() * mlp.bn.weight + mlp.bn.bias
        W2 = mlp.fc1.weight.t() if tied else mlp.fc2.weight
        return torch.nn.functional.linear(torch.relu(pre), W2, mlp.fc2.bias)

    J = torch.stack([torch.autograd.functional.jacobian(per_sample, z[b]) for b in range(B)]).mean(0)
    assert torch.allclose(spectrum.mlp_mean_jacobian(mlp, z), J, atol=1e-10)


def test_partitioned_predictor_is_read_as_its_batch_mean_jacobian_not_the_global_weight():
    d = 6
    pdp = PartitionedDirectPred(d, partitions=3, rho=0.3, seed=4)
    for _ in range(3):
        pdp.update(torch.randn(64, d) + torch.linspace(-1, 1, d))
    pdp.eval()
    z1, z2 = torch.randn(32, d), torch.randn(32, d) + 0.5

    def mean_jacobian(z: torch.Tensor) -> torch.Tensor:  # autograd, sample by sample
        return torch.stack(
            [torch.autograd.functional.jacobian(pdp, z[b : b + 1]).reshape(d, d) for b in range(32)]
        ).mean(0)

    torch.testing.assert_close(pdp.mean_weight(z1), mean_jacobian(z1), rtol=1e-5, atol=1e-6)
    W, kind = spectrum.predictor_matrix(pdp, z1, z2)
    assert kind == "partitions"
    torch.testing.assert_close(W, (mean_jacobian(z1) + mean_jacobian(z2)) / 2, rtol=1e-5, atol=1e-6)
    assert (W - pdp.weight).abs().max() > 1e-3  # the global F^'s own matrix, which predicts nothing, is not it
    assert spectrum.predictor_matrix(pdp) == (None, "none")  # no batch, no mean


def test_predictor_matrix_kinds():
    lin = LinearPredictor(4)
    W, kind = spectrum.predictor_matrix(lin)
    assert kind == "weight" and torch.equal(W, lin.weight.detach())
    W, kind = spectrum.predictor_matrix(MLP(4, 8, 4), torch.randn(16, 4))
    assert kind == "jacobian" and W.shape == (4, 4)
    assert spectrum.predictor_matrix(MLP(4, 8, 4))[1] == "none"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_inputs_give_no_value_instead_of_a_linalg_error(bad):
    """A diverged run's F^, W_p or batch (NaN or inf) made eigh and svdvals raise torch.linalg.LinAlgError and lost
    the report: now the metrics built on the non-finite input are NaN (null in the log, as for other undefined
    values) and those that do not read it are unchanged."""
    import json
    import warnings

    from directpred.diagnostics.hook import diagnostic_row

    d = 6
    U = random_orthogonal(d, seed=2)
    F = ((U * torch.linspace(3, 0.2, d, dtype=torch.float64)) @ U.T).float()
    W = ((U * torch.linspace(3, 0.2, d, dtype=torch.float64).sqrt()) @ U.T).float()
    z = torch.randn(32, d, generator=torch.Generator().manual_seed(0))
    clean = diagnostic_row(F, W, h=z, z=z)
    assert clean["rankme_z"] is not None and clean["alignment"] == pytest.approx(1.0)

    def poisoned(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[1, 2] = bad
        return x

    W_keys = ("alignment", "alignment_weighted", "asymmetry", "commutator", "p_s_slope", "p_sqrt_s_corr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        bad_F = diagnostic_row(poisoned(F), W, h=z, z=z)
        bad_W = diagnostic_row(F, poisoned(W), h=z, z=z)
        bad_z = diagnostic_row(F, W, h=poisoned(z), z=poisoned(z))
        assert math.isnan(spectrum.rankme(poisoned(z)))
        s, U_hat = spectrum.eigen_spectrum(poisoned(F))
        assert s.shape == (d,) and U_hat.shape == (d, d) and bool(s.isnan().all() and U_hat.isnan().all())
        assert math.isnan(spectrum.asymmetry(poisoned(W)))
    for row in (bad_F, bad_W, bad_z):
        json.dumps(row, allow_nan=False)  # strict JSON: the non-finite values are nulls
    # F^ non-finite: its spectrum and everything paired with it is missing; the batch signals are untouched
    assert bad_F["s"] == [None] * d and bad_F["s_max"] is None and bad_F["F_rank"] is None
    assert bad_F["asymmetry"] == clean["asymmetry"]  # W_p alone
    assert all(bad_F[k] is None for k in W_keys if k != "asymmetry")
    assert (bad_F["rankme_z"], bad_F["z_std_ratio"]) == (clean["rankme_z"], clean["z_std_ratio"])
    # W_p non-finite: F^'s spectrum stays, everything of W_p is missing
    assert (bad_W["s"], bad_W["F_rank"]) == (clean["s"], clean["F_rank"])
    assert bad_W["wp_eig"] == [None] * d and all(bad_W[k] is None for k in W_keys)
    # one non-finite row of the batch: RankMe and the std are missing, F^ and W_p's metrics are not
    assert all(bad_z[k] is None for k in ("rankme_h", "rankme_z", "h_std", "z_std", "z_std_ratio"))
    assert {k: bad_z[k] for k in W_keys} == {k: clean[k] for k in W_keys}
