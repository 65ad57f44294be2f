"""Fidelity to the authors' code and to independent computations: precision of the statistics path, the c_j
variant's trapped modes, the tied two-layer predictor's gradient, the partition seed, eval-mode updates and the
"optimal" predictor (Table 1)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import torch

from directpred.config import PredictorConfig
from directpred.heads import (
    MLP,
    DirectCopy,
    DirectPred,
    OptimalPredictor,
    PartitionedDirectPred,
    build_predictor,
    directpred_eigenvalues,
)


def _batches(n=3, b=64, d=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g)
    return [scale * torch.randn(b, d, generator=g) @ A for _ in range(n)]


def _targets(zs, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = zs[0].shape[1]
    M = torch.randn(d, d, generator=g)
    return [z @ M.t() + 0.3 * torch.randn(z.shape, generator=g) for z in zs]


PRECISION_CASES = {
    "directpred": lambda: DirectPred(8, rho=0.3, eps=0.1),
    "directpred_freq2": lambda: DirectPred(8, rho=0.3, eps=0.1, freq=2),
    "directcopy": lambda: DirectCopy(8, rho=0.3, eps=0.1),
    "partitions": lambda: PartitionedDirectPred(8, partitions=3, rho=0.3, eps=0.1, seed=2),
    "optimal": lambda: OptimalPredictor(8, rho=0.3, ridge=1e-4),
}


@pytest.mark.parametrize("name", list(PRECISION_CASES))
def test_statistics_under_bf16_autocast_equal_float32(name):
    """update (F^, eigh, W_p, partition terms, the optimal solve) runs in float32 whatever the autocast."""
    zs = _batches()
    ts = _targets(zs)
    ref, amp = PRECISION_CASES[name](), PRECISION_CASES[name]()
    for z, t in zip(zs, ts):
        kw = {"z_target": t} if name == "optimal" else {}
        ref.update(z, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp.update(z, **kw)
    a, b = ref.state_dict(), amp.state_dict()
    for k in a:
        assert b[k].dtype == a[k].dtype, k
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=f"{name}: {k} differs under autocast")


def test_c_variant_trapped_modes_get_the_authors_0_01():
    """Table 7 in the authors' code (dyn_eps_inside, dyn_eps = -c): p_j = sqrt(max(s_j/s_max - c, 1e-4)) + eps."""
    s = torch.tensor([0.0, 0.01, 0.05, 0.0501, 0.3, 1.0, 2.0], dtype=torch.float64)
    for c, eps in ((0.05, 0.0), (0.1, 0.0), (-0.05, 0.0), (0.05, 0.1)):
        p = directpred_eigenvalues(s, eps=eps, c=c).numpy()
        r = s.numpy() / 2.0 - c
        expected = np.where(r <= 1e-4, 0.01, np.sqrt(np.maximum(r, 1e-4))) + eps
        np.testing.assert_allclose(p, expected, rtol=1e-12)
    trapped = directpred_eigenvalues(s, eps=0.0, c=0.05)
    assert trapped[:4].tolist() == [pytest.approx(0.01)] * 4  # s_j/s_max <= c: the authors' 0.01, not 1e-4


def test_tied_mlp_gradient_is_average_of_the_two_layer_gradients():
    """The authors step both layers and tie them to (W1 + W2^T)/2: the tied weight's gradient is (G1 + G2^T)/2."""
    torch.manual_seed(0)
    tied = MLP(6, 10, 6, tied=True, bn_affine=False).double()
    untied = MLP(6, 10, 6, tied=False, bn_affine=False).double()
    with torch.no_grad():
        untied.fc1.weight.copy_(tied.fc1.weight)
        untied.fc1.bias.copy_(tied.fc1.bias)
        untied.fc2.weight.copy_(tied.fc1.weight.t())
        untied.fc2.bias.copy_(tied.fc2.bias)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)
    out_t, out_u = tied(x), untied(x)
    torch.testing.assert_close(out_t, out_u, rtol=1e-12, atol=1e-12)  # same function
    ((out_t - y) ** 2).sum().backward()
    ((out_u - y) ** 2).sum().backward()
    G1, G2 = untied.fc1.weight.grad, untied.fc2.weight.grad
    torch.testing.assert_close(tied.fc1.weight.grad, 0.5 * (G1 + G2.t()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tied.fc1.bias.grad, untied.fc1.bias.grad, rtol=1e-10, atol=1e-12)


def test_partition_planes_follow_the_seed():
    cfg = PredictorConfig(name="directpred", partitions=4)
    a, b, c = (build_predictor(16, cfg, seed=s) for s in (0, 7, 7))
    assert not torch.equal(a.planes, b.planes)
    assert torch.equal(b.planes, c.planes)


def test_build_predictor_given_the_whole_config_names_cfg_predictor():
    """build_predictor(16, cfg) with the whole Config raised AttributeError "'Config' object has no attribute
    'name'"."""
    from directpred.config import Config

    with pytest.raises(TypeError, match=r"not the whole Config: call build_predictor\(dim, cfg.predictor, ...\)"):
        build_predictor(16, Config())
    with pytest.raises(TypeError, match="takes a PredictorConfig .* got dict"):
        build_predictor(16, {"name": "linear"})  # type: ignore[arg-type]
    assert isinstance(build_predictor(16, Config().predictor), DirectPred)


def test_partition_planes_follow_train_seed_through_build_method():
    from directpred.config import load_config
    from directpred.methods import build_method

    over = ["backbone.width=4", "projector.hidden_dim=16", "projector.out_dim=8", "predictor.partitions=3"]
    p0 = build_method(load_config(None, over + ["train.seed=0"])).predictor.planes
    p1 = build_method(load_config(None, over + ["train.seed=1"])).predictor.planes
    p1b = build_method(load_config(None, over + ["train.seed=1"])).predictor.planes
    assert not torch.equal(p0, p1) and torch.equal(p1, p1b)


@pytest.mark.parametrize("name", ["directpred", "directcopy", "partitions", "optimal", "linear", "mlp", "none"])
def test_update_in_eval_mode_is_a_no_op(name):
    over = {"partitions": 3} if name == "partitions" else {}
    cfg = PredictorConfig(name="directpred" if name == "partitions" else name, hidden_dim=16, **over)
    pred = build_predictor(8, cfg)
    zs, ts = _batches(n=2), _targets(_batches(n=2))
    kw = [{"z_target": t} if name == "optimal" else {} for t in ts]
    pred.update(zs[0], **kw[0])  # training mode: statistics move
    before = copy.deepcopy(pred.state_dict())
    pred.eval()
    pred.update(zs[1], **kw[1])
    for k, v in pred.state_dict().items():
        assert torch.equal(v, before[k]), f"{name}: {k} changed by update() in eval mode"


def _reference_optimal(zs, ts, rho, ridge):
    """Eq. 19-style EMA of E[f f^T] and E[f_a f^T] in float64 numpy, then W (F + lam I) = (C + C^T)/2."""
    F = C = None
    for z, t in zip(zs, ts):
        z, t = z.double().numpy(), t.double().numpy()
        f_term, c_term = z.T @ z / len(z), t.T @ z / len(z)
        F = f_term if F is None else rho * F + (1 - rho) * f_term
        C = c_term if C is None else rho * C + (1 - rho) * c_term
    S = 0.5 * (C + C.T)
    A = F + ridge * np.trace(F) / F.shape[0] * np.eye(F.shape[0])
    return scipy.linalg.solve(A, S, assume_a="pos").T, F, S, A


@pytest.mark.parametrize("rho,ridge", [(0.0, 0.0), (0.0, 1e-3), (0.3, 1e-4), (0.9, 0.1)])
def test_optimal_predictor_matches_a_direct_solve(rho, ridge):
    zs = _batches(n=4)
    ts = _targets(zs)
    op = OptimalPredictor(8, rho=rho, ridge=ridge)
    for z, t in zip(zs, ts):
        op.update(z, z_target=t)
    W_ref, F, S, A = _reference_optimal(zs, ts, rho, ridge)
    W = op.weight.detach().double().numpy()
    np.testing.assert_allclose(W, W_ref, rtol=1e-4, atol=1e-4 * np.abs(W_ref).max())
    np.testing.assert_allclose(W @ A, S, atol=1e-4 * np.abs(S).max())  # the normal equations hold
    if rho == 0.0:  # "no EMA": the current batch only
        W_last, *_ = _reference_optimal(zs[-1:], ts[-1:], 0.0, ridge)
        np.testing.assert_allclose(W, W_last, rtol=1e-4, atol=1e-4 * np.abs(W_last).max())


def test_optimal_without_ridge_recovers_a_symmetric_map_like_least_squares():
    """Whitened inputs (F^ = I) and targets f_a = M f (M symmetric): the least-squares regression lstsq(Z, T)
    recovers M, and so does the solve (for F^ = I the symmetrised normal equations are the plain ones)."""
    g = torch.Generator().manual_seed(3)
    Z = torch.linalg.qr(torch.randn(256, 6, generator=g, dtype=torch.float64))[0] * 16.0  # Z^T Z / 256 = I
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    M = B + B.t()
    T = Z @ M.t()
    ls = np.linalg.lstsq(Z.numpy(), T.numpy(), rcond=None)[0].T
    op = OptimalPredictor(6, rho=0.0, ridge=0.0)
    op.update(Z.float(), z_target=T.float())
    np.testing.assert_allclose(op.weight.detach().double().numpy(), ls, rtol=1e-3, atol=1e-3)


def test_optimal_freq_sets_on_calls_0_freq_2freq_and_needs_targets():
    op = OptimalPredictor(8, rho=0.3, freq=3)
    zs = _batches(n=7)
    ts = _targets(zs)
    weights = []
    for z, t in zip(zs, ts):
        op.update(z, z_target=t)
        weights.append(op.weight.detach().clone())
    changed = [i for i in range(len(zs)) if i == 0 or not torch.equal(weights[i], weights[i - 1])]
    assert changed == [0, 3, 6]
    with pytest.raises(ValueError, match="needs z_target"):
        op.update(zs[0])


def test_partition_sides_under_autocast_are_the_float32_ones():
    pdp = PartitionedDirectPred(8, partitions=4, rho=0.3, seed=5)
    for z in _batches():
        pdp.update(z)
    z = _batches(n=1, b=4096, seed=9)[0]  # many samples: some lie within bf16 rounding of a hyperplane
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sides_amp = pdp._sides(z)
    assert torch.equal(sides_amp, (z.double() @ pdp.planes.double()) >= pdp.theta.double())


@pytest.mark.parametrize("mlp_bias", [True, False])
def test_mlp_bias_reaches_both_layers_of_the_two_layer_predictor(mlp_bias):
    """predictor.mlp_bias (Table 3's two-layer "bias"/"no bias" columns) sets both layers' biases: a constant batch
    has zero variance, so BatchNorm (no affine) and ReLU give 0 and the head outputs exactly the second layer's
    bias, which is 0 without biases (up to BatchNorm's rounding)."""
    torch.manual_seed(0)
    head = build_predictor(8, PredictorConfig(name="mlp", hidden_dim=16, mlp_bias=mlp_bias))
    assert (head.fc1.bias is not None, head.fc2.bias is not None) == (mlp_bias, mlp_bias)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
        out = head(torch.ones(4, 8))
    expected = head.fc2.bias.detach().expand(4, 8) if mlp_bias else torch.zeros(4, 8)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)  # BatchNorm's eps and float rounding
    assert (out.abs().max() > 0.01) == mlp_bias
