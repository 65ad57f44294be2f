"""DirectPred / DirectCopy against independent float64 numpy computations (paper Eqs. 18-19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from directpred.heads import CorrelationEstimator, DirectCopy, DirectPred, PartitionedDirectPred
from directpred.methods.siamese import Encoder, OnlineBranch


def reference_corr(batches, rho):
    """Eq. 19 with the first batch taken as is, in float64 numpy."""
    F = None
    for z in batches:
        z = z.double().numpy()
        term = z.T @ z / z.shape[0]
        F = term if F is None else rho * F + (1 - rho) * term
    return F


def reference_wp(F, eps, mode="code", c=0.0):
    s, U = np.linalg.eigh(F)
    s = np.clip(s, 0, None)
    if mode == "code" and c != 0:  # the authors' dyn_eps_inside branch: (s/s_max - c).clamp(1e-4).sqrt()
        p = np.sqrt(np.clip(s / s.max() - c, 1e-4, None)) + eps
    elif mode == "code":
        p = np.clip(np.sqrt(s / s.max()) + eps, 1e-4, None)
    else:
        p = np.sqrt(np.clip(s - c, 0, None)) + eps * s.max()
    return U @ np.diag(p) @ U.T, s, U, p


def batches(n=5, b=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g)  # anisotropic features so the spectrum is spread
    return [torch.randn(b, d, generator=g) @ A for _ in range(n)]


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9])
def test_corr_is_eq19_moving_average(rho):
    zs = batches()
    dp = DirectPred(8, rho=rho)
    for z in zs:
        dp.update(z)
    np.testing.assert_allclose(dp.corr.double().numpy(), reference_corr(zs, rho), rtol=1e-5, atol=1e-5)
    assert int(dp.count) == len(zs)


def test_cumulative_average_is_mean_of_batch_terms():
    zs = batches(n=7)
    est = CorrelationEstimator(8, average="cumulative")
    for z in zs:
        est.update(z)
    expected = np.mean([(z.double().T @ z.double() / z.shape[0]).numpy() for z in zs], axis=0)
    np.testing.assert_allclose(est.corr.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_zero_mean_gives_covariance():
    zs = [z + 3.0 for z in batches(n=1)]
    est = CorrelationEstimator(8, zero_mean=True)
    est.update(zs[0])
    z = zs[0].double().numpy()
    expected = z.T @ z / len(z) - np.outer(z.mean(0), z.mean(0))
    np.testing.assert_allclose(est.matrix().double().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "mode,eps,c",
    [
        ("code", 0.1, 0.0),
        ("code", 0.0, 0.0),
        ("code", 0.01, -0.05),
        ("code", 0.0, 0.05),
        ("paper", 0.1, 0.0),
        ("paper", 0.0, 0.1),
    ],
)
def test_weight_matches_independent_eigendecomposition(mode, eps, c):
    zs = batches(n=3)
    dp = DirectPred(8, rho=0.3, eps=eps, eps_mode=mode, c=c)
    for z in zs:
        dp.update(z)
    F = reference_corr(zs, 0.3)
    W_ref, s, U, p = reference_wp(F, eps, mode, c)
    W = dp.weight.detach().double().numpy()
    np.testing.assert_allclose(W, W.T, atol=1e-6)  # symmetric
    np.testing.assert_allclose(W, W_ref, rtol=1e-4, atol=1e-4 * np.abs(W_ref).max())
    # Eigenvectors of F^ are eigenvectors of W_p with eigenvalues p_j (the eigenvalue map).
    np.testing.assert_allclose(W @ U, U * p, atol=1e-4 * max(1.0, p.max()))


def test_code_mode_is_scale_invariant_and_paper_mode_is_not():
    z = batches(n=1)[0]
    a, b = DirectPred(8, eps=0.1), DirectPred(8, eps=0.1)
    a.update(z)
    b.update(10 * z)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    a, b = DirectPred(8, eps=0.1, eps_mode="paper"), DirectPred(8, eps=0.1, eps_mode="paper")
    a.update(z)
    b.update(10 * z)
    assert not torch.allclose(a.weight * 10, b.weight, rtol=1e-3)  # sqrt(s) scales by 10, eps*s_max by 100


@pytest.mark.parametrize("freq", [1, 2, 5])
def test_freq_gating_sets_weight_on_calls_0_freq_2freq(freq):
    zs = batches(n=11)
    dp = DirectPred(8, freq=freq)
    assert dp.weight.requires_grad == (freq > 1)  # hybrid: gradient steps in between
    set_calls = []
    for k, z in enumerate(zs):
        with torch.no_grad():
            dp.weight.add_(1.0)  # stands in for a gradient step between updates
        before = dp.weight.detach().clone()
        dp.update(z)
        expected = torch.from_numpy(reference_wp(reference_corr(zs[: k + 1], 0.3), 0.1)[0]).float()
        if torch.allclose(dp.weight, expected, atol=1e-4):
            set_calls.append(k)
        else:
            torch.testing.assert_close(dp.weight.detach(), before)  # untouched between settings
    assert set_calls == list(range(0, len(zs), freq))


def test_no_update_in_eval_mode():
    torch.manual_seed(0)
    enc = Encoder(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    branch = OnlineBranch(enc, DirectPred(8))
    x = torch.randn(16, 3, 2, 2)
    branch.train()
    branch(x, x + 0.1)
    corr, count, weight = branch.predictor.corr.clone(), int(branch.predictor.count), branch.predictor.weight.clone()
    branch.eval()
    with torch.no_grad():
        branch(torch.randn(16, 3, 2, 2), torch.randn(16, 3, 2, 2))
    torch.testing.assert_close(branch.predictor.corr, corr)
    assert int(branch.predictor.count) == count
    torch.testing.assert_close(branch.predictor.weight, weight)


def test_forward_is_z_times_weight_transpose():
    dp = DirectPred(8)
    dp.update(batches(n=1)[0])
    z = torch.randn(5, 8)
    torch.testing.assert_close(dp(z), z @ dp.weight.T)


def test_state_dict_carries_predictor_state():
    a = DirectPred(8, freq=3)
    for z in batches(n=4):
        a.update(z)
    b = DirectPred(8, freq=3)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.corr, a.corr)
    assert int(b.count) == int(a.count)
    z = batches(n=1, seed=3)[0]
    a.update(z)
    b.update(z)
    torch.testing.assert_close(b.weight, a.weight)


def test_directcopy_is_normalised_correlation_plus_eps():
    zs = batches(n=3)
    dc = DirectCopy(8, rho=0.3, eps=0.25)
    for z in zs:
        dc.update(z)
    F = reference_corr(zs, 0.3)
    expected = F / np.linalg.eigvalsh(F).max() + 0.25 * np.eye(8)
    np.testing.assert_allclose(dc.weight.detach().double().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.linalg.eigvalsh(dc.weight.detach().double().numpy()).max() == pytest.approx(1.25, rel=1e-5)


def test_partitioned_cells_hold_masked_correlations():
    zs = batches(n=2, d=6)
    pdp = PartitionedDirectPred(6, partitions=3, rho=0.5, seed=1)
    for z in zs:
        pdp.update(z)
    planes = pdp.planes.double().numpy()
    theta = None
    cell = {}
    for z in zs:
        z = z.double().numpy()
        m = (z @ planes).mean(0)
        theta = m if theta is None else 0.5 * theta + 0.5 * m
        side = (z @ planes) >= theta
        for i in range(3):
            for s, mask in ((0, side[:, i]), (1, ~side[:, i])):
                if mask.sum() == 0:
                    continue
                term = z[mask].T @ z[mask] / mask.sum()
                cell[i, s] = term if (i, s) not in cell else 0.5 * cell[i, s] + 0.5 * term
    for (i, s), F in cell.items():
        np.testing.assert_allclose(pdp.cell_corr[i, s].double().numpy(), F, rtol=1e-4, atol=1e-4)
    # The prediction averages, over hyperplanes, the DirectPred matrix of the sample's cell.
    z = torch.randn(4, 6)
    side = (z @ pdp.planes) >= pdp.theta
    expected = torch.stack(
        [torch.stack([pdp.cell_weight[i, 0 if side[b, i] else 1] @ z[b] for i in range(3)]).mean(0) for b in range(4)]
    )
    torch.testing.assert_close(pdp(z), expected, rtol=1e-4, atol=1e-5)


def test_degenerate_inputs_keep_weight_finite_and_symmetric():
    dp = DirectPred(8)
    dp.update(torch.zeros(16, 8))  # F^ = 0
    assert torch.isfinite(dp.weight).all()
    dp.update(torch.ones(16, 8))  # rank one
    W = dp.weight.detach()
    assert torch.isfinite(W).all() and torch.allclose(W, W.T, atol=1e-6)
    with pytest.raises(FloatingPointError):
        dp.update(torch.full((16, 8), float("nan")))


def test_nonfinite_statistics_say_which_process_inputs_caused_them(monkeypatch):
    est = CorrelationEstimator(4)
    nan_row = torch.ones(8, 4).index_fill_(0, torch.tensor([3]), float("nan"))
    with pytest.raises(FloatingPointError, match=r"^NaN/inf in the predictor's inputs f \(the network has diverged\)$"):
        est.update(nan_row)
    with pytest.raises(FloatingPointError, match=r"^the predictor's inputs f reach \|f\| = 1e\+20, whose squares "):
        est.update(torch.full((8, 4), 1e20))  # 1e40 > float32's 3.4e38

    def another_process_nan(stats: torch.Tensor) -> torch.Tensor:  # what the all-reduce adds from a NaN on rank 1
        return stats.add_(float("nan"))

    monkeypatch.setattr("directpred.heads.correlation.distributed.all_reduce_sum", another_process_nan)
    with pytest.raises(FloatingPointError) as exc:
        est.update(torch.full((8, 4), -1.5))
    assert str(exc.value) == (
        "NaN/inf or a float32 overflow in E_B[f f^T] from another process's predictor inputs f; this process's are "
        "finite, |f| <= 1.5 (the network has diverged)"
    )
    assert int(est.count) == 0 and not est.corr.any()  # nothing folded in


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("kind", ["directpred", "directcopy", "optimal", "partitioned"])
def test_predictor_moved_to_another_dtype_updates_like_float32(kind, dtype, tol):
    # The protocol promises that .to() just works: OptimalPredictor and PartitionedDirectPred crashed on update
    # after .double() / .half() (float32 statistics folded into buffers of the module's dtype).
    from directpred.heads import OptimalPredictor

    def make() -> torch.nn.Module:
        if kind == "optimal":
            return OptimalPredictor(8, rho=0.3)
        if kind == "partitioned":
            return PartitionedDirectPred(8, partitions=3, seed=1)
        return DirectPred(8) if kind == "directpred" else DirectCopy(8)

    ref, moved = make(), make().to(dtype)
    zs = batches(n=3)
    for z in zs:
        kw = {"z_target": 2 * z.flip(1)} if kind == "optimal" else {}
        ref.update(z, **kw)
        moved.update(z.to(dtype), **{k: v.to(dtype) for k, v in kw.items()})
    assert moved.weight.dtype == dtype and int(moved.count) == 3
    q = batches(n=1, seed=5)[0]
    out = moved(q.to(dtype))
    assert out.dtype == dtype
    # relative to the whole output: the half-precision F^ is rounded to 3 digits, which a solve can amplify locally
    assert float((out.float() - ref(q)).norm() / ref(q).norm()) < tol


@pytest.mark.parametrize("kind", ["directpred", "directcopy", "optimal", "partitioned"])
def test_update_with_an_empty_or_wrong_width_batch_says_so_and_keeps_the_state(kind):
    # An empty batch raised "max(): Expected reduction dim..." (or, for the optimal predictor, claimed that the
    # network had diverged); a wrong width raised a reshape or matmul error.
    from directpred.heads import OptimalPredictor

    pred = {
        "directpred": lambda: DirectPred(8),
        "directcopy": lambda: DirectCopy(8),
        "optimal": lambda: OptimalPredictor(8),
        "partitioned": lambda: PartitionedDirectPred(8, partitions=2),
    }[kind]()
    z = batches(n=1)[0]
    pred.update(z, z_target=z) if kind == "optimal" else pred.update(z)
    before = {k: v.clone() for k, v in pred.state_dict().items()}
    for bad, match in [
        (torch.zeros(0, 8), r"the predictor's update got an empty batch z of shape \(0, 8\)"),
        (torch.randn(4, 7), r"expected z of shape \(B, 8\), got \(4, 7\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            pred.update(bad, z_target=bad) if kind == "optimal" else pred.update(bad)
    after = pred.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's values by the host (item, bool, int, tolist): each a device sync on a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t: torch.Tensor) -> list:
            self.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)  # reads the data without an aten op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("partitions", [1, 4])
def test_partitioned_update_reads_the_host_twice_beyond_its_eigendecompositions(partitions, monkeypatch):
    """Every update synced with the device for the empty-batch check (proj[-1] == 0) and three times per cell; now:
    the step count, and one read of all cells' counts (which also gives the empty-batch check), beyond what
    DirectPred's own update and the cells' 2n eigendecompositions (DirectPred's target_weight) read."""

    def reads(update) -> int:
        with _HostReads(monkeypatch) as mode:
            update()
        return mode.count

    zs = batches(n=2)
    dp, part = DirectPred(8), PartitionedDirectPred(8, partitions=partitions)
    for pred in (dp, part):
        pred.update(zs[0])
    eigh_reads = reads(lambda: dp.target_weight(dp.corr))
    assert reads(lambda: part.update(zs[1])) == reads(lambda: dp.update(zs[1])) + 2 + 2 * partitions * eigh_reads


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DirectPred(8, eps=float("nan")), "eps=nan must be >= 0"),  # W_p became NaN
        (lambda: DirectPred(8, freq=1.5), "freq=1.5 must be an integer >= 1"),  # gated on count % 1.5
        (lambda: DirectCopy(8, freq=0), "freq=0 must be an integer >= 1"),
        (lambda: DirectPred(8, eigh_dtype=torch.float16), "eigh_dtype=torch.float16 must be torch.float32 or"),
        (lambda: DirectPred(0), r"dim=0 \(the feature dimension d\) must be an integer >= 1"),
        (lambda: PartitionedDirectPred(8, partitions=0), "partitions=0 must be an integer >= 1"),  # NaN output
        # the cells ignored it: moving averages with rho whatever average said
        (lambda: PartitionedDirectPred(8, partitions=1, average="cumulative"), "average='cumulative': the partitions"),
    ],
)
def test_predictor_constructors_reject_arguments_that_gave_silent_nonsense(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_integral_float_freq_gates_like_the_int():
    a, b = DirectPred(8, freq=2), DirectPred(8, freq=2.0)
    assert b.freq == 2 and isinstance(b.freq, int)
    for z in batches(n=3):
        a.update(z)
        b.update(z)
        assert torch.equal(a.weight, b.weight)
