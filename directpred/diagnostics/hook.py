"""Training diagnostics: predictor spectrum, eigenspace alignment (paper Fig. 2), collapse early warning.

The training loop calls :meth:`Diagnostics.observe` after every step. On ordinary steps it only folds the
step's projections into its own running F^ (for predictors that keep none; DirectPred and DirectCopy keep F^
in ``corr`` and it is read from there). Every ``diag.every`` steps it returns a row of metrics (see
:func:`diagnostic_row`), which the loop writes to ``metrics.jsonl`` (kind ``"diag"``) and TensorBoard, and it
applies the collapse rule.

Collapse rule (documented in docs/diagnostics.md with the measurements behind the thresholds). A report step
is *collapsed-looking* when all three hold:

* ``z_std_ratio < 0.08``: the per-dimension std of the l2-normalised projections, times sqrt(d), is below
  8 % of its value for outputs spread over the sphere (collapsed outputs give ~0);
* ``rankme_z < 0.08 min(N, d)``: the RankMe effective rank of the batch's projections (N = 2B samples of both
  views) has fallen to a small fraction of its maximum;
* ``loss_per_term < 0.05``: the loss, per ``2 - 2 cos`` term, is near its minimum 0 (mean cosine between the
  prediction and the other view's target above 0.975), i.e. the objective has been solved trivially.

In multi-process runs F^ is global (all-reduced) and the three batch signals are averaged over the ranks
before the rule is applied, so every rank flags (and stops) at the same step. The run is flagged
``collapsed`` at the second *consecutive* collapsed-looking report step (one noisy batch does not trigger it).
The flag is sticky, recorded in ``summary.json`` with the step and the evidence, printed once from rank 0,
and with ``diag.stop_on_collapse`` the loop stops the run.

Final verdict. When training ends (also with ``diag.every=0``) the loop computes one more report on the final
state (the last step's batch), logs it (kind ``"diag_final"``: rows and TensorBoard tags of its own, apart from the
periodic ``diag`` curves) and judges it alone: ``summary.json``'s
``collapsed`` is true if the periodic rule fired during training (or stopped the run) **or** the final report is
collapsed-looking. The final signals are in ``summary.json`` as ``final_z_std_ratio``, ``final_rankme_z``,
``final_loss_per_term`` and ``final_looks_collapsed``.

Dimensional-collapse warning (docs/diagnostics.md, "Dimensional-collapse warning", with the runs behind the levels). The
rule above is for *complete* collapse, all outputs at one point. A run can instead keep a spread-out but
low-dimensional representation (RankMe of a few while ``z_std_ratio`` stays at 0.1-0.5). A report step *looks
dimensionally collapsed* when both hold:

* ``rankme_h < 0.15 min(N, D)``: the backbone's representations (N = 2B rows of width D) span few directions;
* ``rankme_z < 0.05 min(N, d)``: so do the projections.

It is judged like the collapse rule (second consecutive report step, or the final report alone, ranks averaged
over processes) and recorded apart from it: ``dim_collapsed``, ``dim_collapse_step``, ``dim_collapse_evidence``
and ``final_looks_dim_collapsed`` in ``summary.json``. It warns and never stops the run.

Over 300 lines: the periodic hook and the final verdict read the same statistics and must judge them alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from directpred import distributed
from directpred.config import Config
from directpred.diagnostics import metrics as spectrum
from directpred.heads import CorrelationEstimator
from directpred.methods import Siamese, StepOutput

log = logging.getLogger(__name__)

STD_RATIO_MAX = 0.08  # z_std_ratio below this looks collapsed (measured: see docs/diagnostics.md)
RANK_FRACTION_MAX = 0.08  # rankme_z below this fraction of min(N, d) looks collapsed
LOSS_PER_TERM_MAX = 0.05  # 2 - 2 cos below this: mean cosine above 0.975
CONSECUTIVE = 2  # collapsed-looking report steps in a row before the run is flagged
DIM_RANK_H_FRACTION = 0.15  # rankme_h below this fraction of min(N, D) ...
DIM_RANK_Z_FRACTION = 0.05  # ... and rankme_z below this fraction of min(N, d): dimensionally collapsed


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the small (d x d) linear algebra on one thread.

    Measured on a 2-core machine shared with other jobs: ``eigh`` of a 128 x 128 matrix took 0.8 s with 2
    threads (OpenMP threads waiting on a busy core) and 1.7 ms with one.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _r(x: float | torch.Tensor) -> float | None:
    """Round for the log (6 significant digits); non-finite values become None (JSON null)."""
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _rl(v: torch.Tensor) -> list[float | None]:
    return [_r(x) for x in v.tolist()]


def diagnostic_row(
    F_hat: torch.Tensor, W_p: torch.Tensor | None, *, h: torch.Tensor | None = None, z: torch.Tensor | None = None
) -> dict[str, Any]:
    """All diagnostics of one moment of training, as a flat JSON-serialisable dict.

    Args:
        F_hat: running correlation of the predictor's inputs (d, d).
        W_p: the predictor matrix (d, d) (``weight``, or the batch-mean Jacobian of the MLP or the partitioned
            DirectPred: :func:`~directpred.diagnostics.metrics.predictor_matrix`), or None.
        h: representations (backbone features) of a batch (N, D), for ``rankme_h`` / ``h_std_ratio``.
        z: projections (the predictor's input) of a batch (N, d), for ``rankme_z`` / ``z_std_ratio``.

    Returns:
        ``s`` (F^'s eigenvalues, descending), ``s_max``, ``F_rank`` (RankMe of ``F^^{1/2}``, whose singular
            values are ``sqrt(s_j)``); with W_p: ``wp_eig`` (eigenvalues of its symmetric part, descending),
            ``p`` (Rayleigh quotients u_j^T W_p u_j), ``align`` (cos(W_p u_j, u_j) in the order of ``s``),
            ``alignment``, ``alignment_weighted``, ``asymmetry``, ``commutator``
            (``||[F^, W_p]||_F / (||F^||_F ||W_p||_F)``, Theorem 3's quantity), ``p_s_slope``, ``p_sqrt_s_corr``;
            with h/z: ``rankme_h``, ``rankme_z``,
            ``h_std``, ``z_std``, ``z_std_ratio`` (``z_std * sqrt(d)``, ~1 healthy, ~0 collapsed), ``h_rank_max``
            (min(N, D)), ``z_rank_max`` (min(N, d)).
    """
    row: dict[str, Any] = {}
    s, U = spectrum.eigen_spectrum(F_hat)
    row["s"] = _rl(s)
    row["s_max"] = _r(s[0])
    row["F_rank"] = _r(spectrum.rankme(torch.diag(s.clamp(min=0).sqrt())))
    if W_p is not None:
        W = W_p.detach().double()
        row["wp_eig"] = _rl(spectrum.eigen_spectrum(W)[0])
        p = spectrum.rayleigh_eigenvalues(W, U)
        cos = spectrum.cosines_along(W, U)
        row["p"] = _rl(p)
        row["align"] = _rl(cos)
        row.update({k: _r(v) for k, v in spectrum.alignment_summary(cos, s).items()})
        row["asymmetry"] = _r(spectrum.asymmetry(W))
        Fd = F_hat.detach().double()
        denom = float(Fd.norm() * W.norm())
        row["commutator"] = _r(float((Fd @ W - W @ Fd).norm()) / denom if denom > 0 else float("nan"))
        row.update({k: _r(v) for k, v in spectrum.sqrt_law_fit(p, s).items()})
    if h is not None:
        row["rankme_h"] = _r(spectrum.rankme(h))
        row["h_std"] = _r(spectrum.normalized_std(h))
        row["h_rank_max"] = min(h.shape[0], h.shape[1])
    if z is not None:
        d = z.shape[1]
        row["rankme_z"] = _r(spectrum.rankme(z))
        row["z_std"] = _r(spectrum.normalized_std(z))
        row["z_std_ratio"] = _r(spectrum.normalized_std(z) * math.sqrt(d))
        row["z_rank_max"] = min(z.shape[0], d)
    return row


def looks_collapsed(row: dict[str, Any]) -> bool:
    """The per-report-step test of the collapse rule (module docstring) on a :func:`diagnostic_row`."""
    ratio, rank, rank_max = row.get("z_std_ratio"), row.get("rankme_z"), row.get("z_rank_max")
    loss = row.get("loss_per_term")
    if ratio is None or rank is None or rank_max is None or loss is None:
        return False
    return ratio < STD_RATIO_MAX and rank < RANK_FRACTION_MAX * rank_max and loss < LOSS_PER_TERM_MAX


def looks_dim_collapsed(row: dict[str, Any]) -> bool:
    """The per-report-step test of the dimensional-collapse rule (module docstring) on a :func:`diagnostic_row`:
    the representations and the projections both span only a small fraction of the directions they could."""
    rank_h, h_max = row.get("rankme_h"), row.get("h_rank_max")
    rank_z, z_max = row.get("rankme_z"), row.get("z_rank_max")
    if rank_h is None or h_max is None or rank_z is None or z_max is None:
        return False
    return rank_h < DIM_RANK_H_FRACTION * h_max and rank_z < DIM_RANK_Z_FRACTION * z_max


def _g(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return "n/a" if v is None else f"{v:.3g}"


def collapse_evidence(row: dict[str, Any]) -> str:
    """The signals behind a collapse flag, with the thresholds they are below."""
    return (
        f"z_std_ratio={_g(row, 'z_std_ratio')} (< {STD_RATIO_MAX}; ~1 healthy, 0 collapsed), "
        f"rankme_z={_g(row, 'rankme_z')} of max {row['z_rank_max']} "
        f"(< {RANK_FRACTION_MAX * row['z_rank_max']:.3g}), "
        f"loss per term={_g(row, 'loss_per_term')} (< {LOSS_PER_TERM_MAX})"
    )


def dim_collapse_evidence(row: dict[str, Any]) -> str:
    """The signals behind a dimensional-collapse flag, with the thresholds they are below."""
    return (
        f"rankme_h={_g(row, 'rankme_h')} of max {row['h_rank_max']} "
        f"(< {DIM_RANK_H_FRACTION * row['h_rank_max']:.3g}), "
        f"rankme_z={_g(row, 'rankme_z')} of max {row['z_rank_max']} "
        f"(< {DIM_RANK_Z_FRACTION * row['z_rank_max']:.3g}), "
        f"z_std_ratio={_g(row, 'z_std_ratio')} (spread within those directions)"
    )


@dataclass
class Watch:
    """One rule's verdict over a run: a periodic report flags the run at the ``CONSECUTIVE``-th report in a row
    that the rule's test passes, the final report alone flags it too, and a flag is sticky.

    Args:
        looks: the per-report test (:func:`looks_collapsed` or :func:`looks_dim_collapsed`).
        evidence: the signals behind a flag, as text (:func:`collapse_evidence`, :func:`dim_collapse_evidence`).
    """

    looks: Callable[[dict[str, Any]], bool]
    evidence: Callable[[dict[str, Any]], str]
    flagged: bool = False
    step: int | None = None
    why: str = ""
    streak: int = 0  # consecutive report steps that pass the test

    def periodic(self, step: int, row: dict[str, Any]) -> bool:
        """Judge a periodic report; True when this report flags the run."""
        if self.flagged:
            return False
        self.streak = self.streak + 1 if self.looks(row) else 0
        if self.streak < CONSECUTIVE:
            return False
        self.flagged, self.step = True, step
        self.why = f"{self.evidence(row)}, {CONSECUTIVE} report steps in a row"
        return True

    def final(self, step: int, row: dict[str, Any]) -> tuple[bool, bool]:
        """Judge the final report alone: (whether it passes the test, whether it flags the run now)."""
        looks = self.looks(row)
        if not looks or self.flagged:
            return looks, False
        self.flagged, self.step, self.why = True, step, f"final report: {self.evidence(row)}"
        return True, True

    def state_dict(self) -> dict[str, Any]:
        """The verdict so far, under the keys checkpoints have always used for the collapse rule."""
        return {
            "collapsed": self.flagged,
            "collapse_step": self.step,
            "collapse_evidence": self.why,
            "streak": self.streak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys (an older checkpoint) mean "not flagged"."""
        self.flagged = bool(state.get("collapsed", False))
        self.step = state.get("collapse_step")
        self.why = state.get("collapse_evidence", "")
        self.streak = int(state.get("streak", 0))


def replay(rows: Iterable[dict[str, Any]], *, h_rank_max: int | None = None) -> dict[str, int | None]:
    """Judge a run's logged rows (``metrics.jsonl``, in order) with today's rules, as training would have.

    ``diag`` rows are judged as periodic reports, a ``diag_final`` row as the final report; other rows are
    ignored. Returns ``collapse_step`` and ``dim_collapse_step``: the step each rule flags the run, or None.
    This is how docs/diagnostics.md judges runs logged before a rule existed or changed. A run extended after it
    finished has a ``diag_final`` row in the middle of its log: as training does, the replay goes on from the state
    before that report once the next ``diag`` row shows the run went on.

    Args:
        rows: the logged rows.
        h_rank_max: min(N, D) for rows logged before they carried ``h_rank_max`` (N = 2 x the per-process
            batch, D = the backbone's feature width); without it such rows are never dimensionally collapsed.
    """
    watches = {
        "collapse_step": Watch(looks_collapsed, collapse_evidence),
        "dim_collapse_step": Watch(looks_dim_collapsed, dim_collapse_evidence),
    }
    before_final: dict[str, Watch] | None = None  # the state before the last final report
    for row in rows:
        if h_rank_max is not None and "h_rank_max" not in row:
            row = {**row, "h_rank_max": h_rank_max}
        kind = row.get("kind")
        if kind == "diag" and before_final is not None:  # the run was extended past its final report
            watches, before_final = before_final, None
        elif kind == "diag_final":
            before_final = {key: replace(watch) for key, watch in watches.items()}
        for watch in watches.values():
            if kind == "diag":
                watch.periodic(int(row["step"]), row)
            elif kind == "diag_final":
                watch.final(int(row["step"]), row)
    return {key: watch.step for key, watch in watches.items()}


COLLAPSE_WARNING = (
    "All projections point (nearly) the same way; the representation is unlikely to recover. See "
    "docs/diagnostics.md (diag.stop_on_collapse=true stops such runs)."
)
# The same warning when diag.stop_on_collapse is set (it advised setting it before): what happens now.
COLLAPSE_STOP = (
    "All projections point (nearly) the same way; the representation is unlikely to recover. "
    "diag.stop_on_collapse=true: the run stops here and evaluates. See docs/diagnostics.md."
)
DIM_WARNING = (
    "The representation spans only a few directions: not one point (the collapse rule does not fire), but in most "
    'runs measured in docs/diagnostics.md ("Dimensional-collapse warning") such representations ended below an '
    "untrained network in linear-probe accuracy, and none more than 3.7 points above it. Training continues "
    "(diag.stop_on_collapse is for complete collapse)."
)


class Diagnostics:
    """Diagnostics of one training run (see the module docstring for the two rules).

    Args:
        cfg: the run's :class:`directpred.config.Config` (uses ``diag.every``, ``diag.rho``).
        method: the :class:`directpred.methods.Siamese` being trained.

    In a training loop ``observe`` is called every step; it returns a row every ``diag.every`` steps, else None.
    ``collapse`` and ``dim`` hold the two rules' verdicts (:class:`Watch`).

    Examples:
        >>> diag = Diagnostics(cfg, method)  # doctest: +SKIP
        >>> row = diag.observe(step, out)  # doctest: +SKIP
    """

    def __init__(self, cfg: Config, method: Siamese) -> None:
        self.every = int(cfg.diag.every)
        self.collapse_advice = COLLAPSE_STOP if cfg.diag.stop_on_collapse else COLLAPSE_WARNING
        self.loss_terms = 2 if cfg.method.symmetric_loss else 1  # two_view_loss sums the two views' terms
        self.method = method
        predictor = method.predictor
        self.own_estimator: CorrelationEstimator | None = None
        if not isinstance(predictor, CorrelationEstimator):
            dim = cfg.projector.out_dim
            self.own_estimator = CorrelationEstimator(dim, rho=cfg.diag.rho)
        self.collapse = Watch(looks_collapsed, collapse_evidence)
        self.dim = Watch(looks_dim_collapsed, dim_collapse_evidence)  # the dimensional-collapse warning
        self.last_row: dict[str, Any] = {}
        self.final_row: dict[str, Any] = {}

    @property
    def collapsed(self) -> bool:
        """The collapse verdict so far (what ``diag.stop_on_collapse`` acts on)."""
        return self.collapse.flagged

    @property
    def collapse_step(self) -> int | None:
        return self.collapse.step

    @property
    def streak(self) -> int:
        return self.collapse.streak

    def _F_hat(self) -> torch.Tensor:
        if self.own_estimator is not None:
            return self.own_estimator.matrix()
        predictor = self.method.predictor
        if not isinstance(predictor, CorrelationEstimator):  # __init__ kept an estimator of its own for it
            raise TypeError(f"{type(predictor).__name__} keeps no F^")
        return predictor.matrix()

    @torch.no_grad()
    def observe(self, step: int, out: StepOutput) -> dict[str, Any] | None:
        """Fold one training step's output in; every ``diag.every`` steps return the metrics row.

        Args:
            step: the global step just completed (1-based, as the loop counts).
            out: the step's :class:`directpred.methods.siamese.StepOutput`.
        """
        report = self.every > 0 and step % self.every == 0
        if (self.own_estimator is None or self.every <= 0) and not report:
            return None  # the predictor keeps F^ itself (or diag.every=0): nothing to do on an ordinary step
        # (2B, d): both views, as the predictor's own F^ sees them
        z = torch.cat([out.z1.detach(), out.z2.detach()]).float()
        if self.own_estimator is not None:
            if self.own_estimator.corr.device != z.device:
                self.own_estimator.to(z.device)
            self.own_estimator.update(z)  # all-reduces: called on every rank every step
        if not report:
            return None
        row = self._row(out, z)
        if self.collapse.periodic(step, row):
            self._warn("the run looks COLLAPSED at step %d: %s. %s", step, self.collapse.why, self.collapse_advice)
        if self.dim.periodic(step, row):
            self._warn("the run shows DIMENSIONAL COLLAPSE at step %d: %s. %s", step, self.dim.why, DIM_WARNING)
        row["collapsed"] = int(self.collapse.flagged)
        row["dim_collapsed"] = int(self.dim.flagged)
        self.last_row = {k: v for k, v in row.items() if not isinstance(v, list)}
        return row

    @staticmethod
    def _warn(message: str, *args: Any) -> None:
        if distributed.is_main():  # every rank decides alike (signals averaged); one prints
            log.warning(message, *args)

    def _row(self, out: StepOutput, z: torch.Tensor) -> dict[str, Any]:
        """The metrics row of one step's output (batch signals averaged over ranks)."""
        h = torch.cat([out.h1.detach(), out.h2.detach()]).float()
        predictor = self.method.predictor
        W_p, _ = spectrum.predictor_matrix(predictor, out.z1, out.z2)
        with single_thread():
            row = diagnostic_row(self._F_hat().float().cpu(), None if W_p is None else W_p.cpu(), h=h.cpu(), z=z.cpu())
        loss = float(out.loss.detach())
        row["loss"] = _r(loss)
        row["loss_per_term"] = _r(loss / self.loss_terms)
        if distributed.is_distributed():  # batch signals are per rank: average them so all ranks decide alike
            keys = ("z_std_ratio", "rankme_z", "rankme_h", "loss", "loss_per_term")
            vals = torch.tensor([math.nan if row[k] is None else float(row[k]) for k in keys], device=z.device)
            vals = distributed.all_reduce_sum(vals) / distributed.world_size()
            row.update({k: _r(v) for k, v in zip(keys, vals.tolist())})
        return row

    @torch.no_grad()
    def final_report(self, step: int, out: StepOutput) -> dict[str, Any]:
        """The report on the final state (the last step's output), judged on its own: the run's verdict becomes
        ``collapsed`` if the periodic rule fired during training OR this final report looks collapsed (a run
        shorter than two report periods can otherwise never be flagged); likewise ``dim_collapsed``. Call once,
        on every rank, after the last step; :meth:`observe` must already have seen ``out``."""
        z = torch.cat([out.z1.detach(), out.z2.detach()]).float()
        if self.own_estimator is not None and int(self.own_estimator.count) == 0:  # diag.every=0: no F^ kept yet
            if self.own_estimator.corr.device != z.device:
                self.own_estimator.to(z.device)
            self.own_estimator.update(z)
        row = self._row(out, z)
        looks, flags = self.collapse.final(step, row)
        if flags:
            self._warn(
                "the final state looks COLLAPSED (step %d): %s. See docs/diagnostics.md.", step, self.collapse.why
            )
        looks_dim, flags_dim = self.dim.final(step, row)
        if flags_dim:
            self._warn("the final state shows DIMENSIONAL COLLAPSE (step %d): %s. %s", step, self.dim.why, DIM_WARNING)
        row["looks_collapsed"] = int(looks)
        row["collapsed"] = int(self.collapse.flagged)
        row["looks_dim_collapsed"] = int(looks_dim)
        row["dim_collapsed"] = int(self.dim.flagged)
        self.final_row = {k: v for k, v in row.items() if not isinstance(v, list)}
        return row

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` gets: ``collapsed`` (the verdict: the periodic rule fired, or the final report
        looks collapsed), ``collapse_step``, ``collapse_evidence``, the same three for the dimensional-collapse
        warning (``dim_collapsed``, ``dim_collapse_step``, ``dim_collapse_evidence``), the last periodic report's
        scalar diagnostics under ``diag_*`` and the final report's signals under ``final_*``."""
        out: dict[str, Any] = {
            "collapsed": self.collapse.flagged,
            "collapse_step": self.collapse.step,
            "collapse_evidence": self.collapse.why,
            "dim_collapsed": self.dim.flagged,
            "dim_collapse_step": self.dim.step,
            "dim_collapse_evidence": self.dim.why,
        }
        for k in ("alignment", "alignment_weighted", "asymmetry", "p_s_slope", "rankme_h", "rankme_z", "z_std_ratio"):
            if k in self.last_row:
                out[f"diag_{k}"] = self.last_row[k]
        final_keys = ("z_std_ratio", "rankme_z", "z_rank_max", "rankme_h", "h_rank_max", "loss_per_term")
        for k in (*final_keys, "looks_collapsed", "looks_dim_collapsed"):
            if k in self.final_row:
                out[f"final_{k}"] = self.final_row[k]
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the detector (and the F^ estimate) after a resume."""
        return {
            **self.collapse.state_dict(),  # at the top level, as checkpoints before the dimensional rule have it
            "dim": self.dim.state_dict(),
            "last_row": self.last_row,
            "final_row": self.final_row,  # the final report, for a run resumed after its last checkpoint
            "estimator": None
            if self.own_estimator is None
            else {k: v.cpu() for k, v in self.own_estimator.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.collapse.load_state_dict(state)
        self.dim.load_state_dict(state.get("dim") or {})  # absent before the dimensional-collapse warning
        self.last_row = dict(state.get("last_row", {}))
        self.final_row = dict(state.get("final_row", {}))
        est = state.get("estimator")
        if est is not None and self.own_estimator is not None:
            device = self.own_estimator.corr.device
            self.own_estimator.load_state_dict({k: v.to(device) for k, v in est.items()})
