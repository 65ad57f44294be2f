"""Learning-dynamics theory of BYOL/SimSiam (Tian, Chen, Ganguli, ICML 2021, §2-3 and Appendices A, B, D).

Numerical and functional: pure right-hand sides ``rhs(t, y, params)`` on float64 numpy arrays, simulations
returning :class:`Trajectory` arrays; plotting lives only in :mod:`directpred.theory.plots`.

Entry points:
    * :func:`simulate_linear`: the full linear model, Eqs. 2-4, with the paper's ablations, a closed-form W_p
      (DirectPred's Eq. 18, DirectCopy: :func:`closed_form_predictor`) and IsoLoss's gradient;
    * :func:`simulate_sgd`: the same model trained by minibatch SGD on sampled data;
    * :func:`simulate_reduced`: the per-eigenmode dynamics, Eqs. 11-13;
    * :func:`simulate_matrix`: the (Wp, F) flow, Eq. 7 / Eq. 62;
    * fixed points, threshold and invariants: :func:`fixed_points`, :func:`p_star`, :func:`eta_threshold`,
      :func:`invariant_parabola`, :func:`K_matrix`, :func:`track`.
"""

from directpred.theory.dynamics import (
    LinearParams,
    Trajectory,
    closed_form_predictor,
    flow_params,
    integrate,
    linear_field,
    rhs_linear,
    simulate_linear,
)
from directpred.theory.invariants import (
    K_matrix,
    alignment,
    balance,
    balance_prediction,
    commutator,
    commutator_norm,
    ema_ratio,
    feature_correlation,
    theorem1_applies,
    track,
)
from directpred.theory.reduced import (
    K_mode,
    closed_form_modes,
    delta_mode,
    eta_threshold,
    fixed_points,
    integral_of_motion,
    invariant_parabola,
    isoloss_fixed_point,
    jacobian_ps,
    p_star,
    parabola_constant,
    rhs_closed_form,
    rhs_parabola,
    rhs_ps,
    rhs_reduced,
    simulate_matrix,
    simulate_reduced,
)
from directpred.theory.sgd import GaussianViews, Scrambling, make_data, simulate_sgd

__all__ = [
    "GaussianViews",
    "K_matrix",
    "K_mode",
    "LinearParams",
    "Scrambling",
    "Trajectory",
    "alignment",
    "balance",
    "balance_prediction",
    "closed_form_modes",
    "closed_form_predictor",
    "commutator",
    "commutator_norm",
    "delta_mode",
    "ema_ratio",
    "eta_threshold",
    "feature_correlation",
    "fixed_points",
    "flow_params",
    "integral_of_motion",
    "integrate",
    "invariant_parabola",
    "isoloss_fixed_point",
    "jacobian_ps",
    "linear_field",
    "make_data",
    "p_star",
    "parabola_constant",
    "rhs_closed_form",
    "rhs_linear",
    "rhs_parabola",
    "rhs_ps",
    "rhs_reduced",
    "simulate_linear",
    "simulate_matrix",
    "simulate_reduced",
    "simulate_sgd",
    "theorem1_applies",
    "track",
]
