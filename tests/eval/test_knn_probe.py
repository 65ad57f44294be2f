"""kNN against a brute-force reference; the linear probe on separable data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from directpred.eval import KNNClassifier, LinearProbe, NotFittedError
from directpred.eval.stream_eval import knn_stream


def brute_force_knn(train, labels, query, k, t, n_classes):
    preds = []
    for q in query:
        sims = [float(torch.dot(q / q.norm(), x / x.norm())) for x in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * n_classes
        for i in order:
            votes[int(labels[i])] += math.exp(sims[i] / t)
        preds.append(max(range(n_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    query = torch.randn(25, 5, generator=g)
    for k, t in ((1, 0.1), (7, 0.1), (20, 0.5)):
        knn = KNNClassifier(k=k, temperature=t, chunk=8).fit(train, labels)
        assert torch.equal(knn.predict(query), brute_force_knn(train, labels, query, k, t, 3))


def test_knn_with_k_above_the_training_set_says_so_and_votes_with_every_image():
    g = torch.Generator().manual_seed(2)
    train, labels = torch.randn(36, 5, generator=g), torch.randint(0, 3, (36,), generator=g)
    query = torch.randn(25, 5, generator=g)
    with pytest.warns(UserWarning, match=r"kNN: k=200 is more than the 36 labelled training images; k=36 is used"):
        knn = KNNClassifier(k=200, temperature=0.5).fit(train, labels)
    assert torch.equal(knn.predict(query), brute_force_knn(train, labels, query, 36, 0.5, 3))


def test_knn_is_scale_invariant_and_perfect_on_its_training_points():
    g = torch.Generator().manual_seed(1)
    train, labels = torch.randn(40, 8, generator=g), torch.randint(0, 4, (40,), generator=g)
    knn = KNNClassifier(k=1).fit(train, labels)
    assert knn.score(3.0 * train, labels) == 1.0


@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e36])
def test_knn_on_huge_or_tiny_finite_features_is_the_knn_of_the_features(scale):
    """Finite features beyond about 1e18 (a diverging run on its way to inf) overflowed F.normalize's norm and became
    zero vectors: every similarity 0, a silent chance-level score. Scaled by any finite factor, the features give
    the unscaled predictions, in memory and streamed; a zero row stays a zero row (no NaN)."""
    x, y = _blobs()
    ref = KNNClassifier(k=5).fit(x[:60], y[:60]).predict(x[60:])
    assert (ref == y[60:]).float().mean() > 0.9
    assert torch.equal(KNNClassifier(k=5).fit(scale * x[:60], y[:60]).predict(scale * x[60:]), ref)
    batches = [(scale * x[:30], y[:30]), (scale * x[30:60], y[30:60])]
    assert knn_stream(scale * x[60:], y[60:], iter(batches), num_classes=3, k=5) == int((ref == y[60:]).sum()) / 30
    zero = torch.zeros(1, x.shape[1])
    assert torch.isfinite(KNNClassifier(k=5).fit(x[:60], y[:60]).predict_scores(zero)).all()


def test_streamed_knn_refuses_unlabelled_training_rows_as_the_in_memory_knn_does():
    x, y = _blobs()
    unlabelled = y[:30].clone()
    unlabelled[4] = -1
    with pytest.raises(ValueError, match=r"kNN: 1 training labels are -1 \(unlabelled\); drop those images first"):
        knn_stream(x[60:], y[60:], iter([(x[:30], unlabelled)]), num_classes=3, k=5)


def test_linear_probe_separable_data_and_history():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=g) * 5 + 100  # far from zero: standardisation matters
    y = torch.randint(0, 3, (600,), generator=g)
    x = centers[y] + torch.randn(600, 10, generator=g)
    probe = LinearProbe(epochs=10, lr=1e-2, batch_size=64).fit(x[:500], y[:500], x[500:], y[500:])
    assert len(probe.history_) == 10 and probe.history_[-1] > 0.95
    # history_[e] is the test accuracy after epoch e: a probe stopped there scores it, and the trained probe's
    # own score is the last entry; best_accuracy_ is the best epoch, not the last.
    short = LinearProbe(epochs=3, lr=1e-2, batch_size=64).fit(x[:500], y[:500], x[500:], y[500:])
    assert short.history_ == probe.history_[:3] and short.score(x[500:], y[500:]) == probe.history_[2]
    assert probe.score(x[500:], y[500:]) == probe.history_[-1]
    assert probe.best_accuracy_ == max(probe.history_) and short.best_accuracy_ == max(probe.history_[:3])
    assert probe.history_[0] < probe.history_[-1]  # it learned over the epochs
    again = LinearProbe(epochs=10, lr=1e-2, batch_size=64).fit(x[:500], y[:500], x[500:], y[500:])
    assert again.history_ == probe.history_  # seeded: reproducible


def test_linear_probe_standardises_like_standard_scaler_also_one_sample():
    """The authors' StandardScaler: mean and population std (numpy's default); a single training sample (std 0)
    leaves the probe finite instead of NaN, and one class is predicted everywhere."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 4, generator=g) * 3 + 1, torch.tensor([0, 1, 2, 0, 1, 2, 0])
    probe = LinearProbe(epochs=2).fit(x, y)
    torch.testing.assert_close(probe.mean_, torch.from_numpy(x.numpy().mean(0)))
    torch.testing.assert_close(probe.std_, torch.from_numpy(x.numpy().std(0)))
    one = LinearProbe(epochs=3).fit(x[:1], y[:1], x, y)
    assert all(torch.isfinite(p).all() for p in one.linear_.parameters())
    assert one.predict(x).tolist() == [0] * 7 and one.history_ == pytest.approx([3 / 7] * 3)


def test_a_feature_constant_on_the_training_set_gets_scale_one_and_cannot_take_over_at_test_time():
    """scikit-learn's StandardScaler sets scale 1 for a zero-variance feature. Clamped to 1e-6 instead, a ReLU channel
    dead on every training image but firing weakly (0.05) on test images became 5e4 after scaling: test accuracy
    fell from 0.42 to 0.26 in this set-up. Now the firing channel moves the accuracy by less than 2 points."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    y, yt = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    x = (centers[y] + torch.randn(400, 16, generator=g)).relu()
    xt = (centers[yt] + torch.randn(400, 16, generator=g)).relu()
    x[:, 0], x[:, 1] = 0.0, 2.5  # dead on every training image; constant non-zero
    probe = LinearProbe(epochs=50).fit(x, y)
    assert probe.std_[0] == 1.0 and probe.std_[1] == 1.0
    torch.testing.assert_close(probe.std_[2:], torch.from_numpy(x[:, 2:].numpy().std(0)))  # the others unchanged
    silent, firing = xt.clone(), xt.clone()
    silent[:, 0], firing[:, 0] = 0.0, 0.05
    assert probe.score(silent, yt) > 0.3  # learned (4 classes: chance 0.25)
    assert abs(probe.score(firing, yt) - probe.score(silent, yt)) < 0.02


@pytest.mark.parametrize("t", [0.01, 0.003])
def test_knn_with_a_small_temperature_matches_brute_force(t):
    # exp(cos / T) overflows float32 below T ~ 0.012: every vote became inf and the prediction arbitrary.
    g = torch.Generator().manual_seed(3)
    train, labels = torch.randn(80, 6, generator=g), torch.randint(0, 4, (80,), generator=g)
    query = torch.randn(30, 6, generator=g)
    knn = KNNClassifier(k=9, temperature=t, chunk=7).fit(train, labels)
    assert torch.isfinite(knn.predict_scores(query)).all()
    assert torch.equal(knn.predict(query), brute_force_knn(train, labels, query, 9, t, 4))
    # the streamed kNN (ImageNet) computes the same votes from streamed training batches
    ref = int((brute_force_knn(train, labels, query, 9, t, 4) == labels[:30]).sum()) / 30
    batches = iter([(train[:50], labels[:50]), (train[50:], labels[50:])])
    assert knn_stream(query, labels[:30], batches, num_classes=4, k=9, temperature=t) == ref


def test_knn_and_probe_take_numpy_and_list_inputs_like_tensors():
    # scikit-learn's contract, which the docstrings promise: array-likes work (they raised AttributeError).
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    q, yq = torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
    knn = KNNClassifier(k=7).fit(x, y)
    knn_np = KNNClassifier(k=7).fit(x.numpy(), y.numpy())
    knn_list = KNNClassifier(k=7).fit(x.tolist(), y.tolist())
    assert torch.equal(knn_np.predict(q.numpy()), knn.predict(q))
    assert torch.equal(knn_list.predict(q.tolist()), knn.predict(q))
    assert knn.score(q, yq.tolist()) == knn.score(q, yq) == knn_np.score(q.numpy(), yq.numpy().astype("float32"))
    probe = LinearProbe(epochs=2, batch_size=16).fit(x, y, q, yq)
    probe_np = LinearProbe(epochs=2, batch_size=16).fit(x.numpy(), y.numpy(), q.numpy(), yq.tolist())
    assert torch.equal(probe_np.linear_.weight, probe.linear_.weight) and probe_np.history_ == probe.history_
    assert probe_np.score(q.numpy(), yq.numpy()) == probe.score(q, yq)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"k": 0}, r"kNN: k=0 must be an integer >= 1 \(eval.knn_k\)"),
        ({"temperature": 0.0}, r"kNN: temperature=0.0 must be > 0 \(eval.knn_t\)"),
        ({"temperature": -0.1}, r"kNN: temperature=-0.1 must be > 0"),
        ({"chunk": 0}, r"kNN: chunk=0 must be an integer >= 1"),
        ({"k": 5.0}, r"kNN: k=5.0 must be an integer >= 1 \(eval.knn_k\)"),  # passed, then a TypeError in topk
        ({"k": True}, r"kNN: k=True must be an integer >= 1"),
        ({"chunk": 8.0}, r"^kNN: chunk=8.0 must be an integer >= 1$"),  # a TypeError in range()
    ],
)
def test_knn_rejects_hyperparameters_that_gave_a_silent_wrong_accuracy(kw, match):
    # k=0 voted for nobody and predicted class 0 everywhere; T=0 divided by zero.
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(ValueError, match=match):
        KNNClassifier(**kw).fit(x, y)


def test_knn_and_probe_reject_labels_that_do_not_match_the_features():
    x = torch.randn(20, 4)
    y = torch.arange(20) % 3
    cases = [
        (y[:10], r"labels must be a 1-D array of 20 class indices \(one per feature row\), got shape \(10,\)"),
        (y.view(-1, 1), r"got shape \(20, 1\)"),
        (y - 1, r"labels must be class indices >= 0, got -1 in 7 of 20 rows \(drop unlabelled rows first\)"),
        (y.float() + 0.5, "labels must be integer class indices, got non-integer values such as 0.5"),
    ]
    for labels, match in cases:
        with pytest.raises(ValueError, match=match):
            KNNClassifier(k=3).fit(x, labels)
        with pytest.raises(ValueError, match=match.replace("labels", "y_train", 1)):
            LinearProbe(epochs=1).fit(x, labels)
    knn, probe = KNNClassifier(k=3).fit(x, y), LinearProbe(epochs=1).fit(x, y)
    with pytest.raises(ValueError, match="kNN: features have 5 columns, the training ones 4"):
        knn.predict(torch.randn(3, 5))
    with pytest.raises(ValueError, match="LinearProbe: x has 5 columns, the training features 4"):
        probe.predict(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        knn.score(x, y[:3])
    with pytest.raises(ValueError, match="give both x_test and y_test"):
        LinearProbe(epochs=1).fit(x, y, x)
    with pytest.raises(ValueError, match=r"LinearProbe: batch_size=0 must be an integer >= 1"):
        LinearProbe(batch_size=0).fit(x, y)


def test_unlabelled_test_rows_are_refused_not_counted_as_misses():
    """A -1 (unlabelled) test label never equals a prediction: kNN scored 0.5 on a set half of which was -1 and
    the rest all right. Refused now, naming the argument and the count, as for the training labels."""
    x, y = _blobs()
    y_test = y.clone()
    y_test[:30] = -1
    knn, probe = KNNClassifier(k=1).fit(x, y), LinearProbe(epochs=1).fit(x, y)
    assert knn.score(x[30:], y[30:]) == 1.0  # each row its own nearest neighbour: the labelled rows are all right
    msg = r"must be class indices >= 0, got -1 in 30 of 90 rows \(drop unlabelled rows first\)$"
    with pytest.raises(ValueError, match="^labels " + msg):
        knn.score(x, y_test)
    with pytest.raises(ValueError, match="^y " + msg):
        probe.score(x, y_test)
    with pytest.raises(ValueError, match="^y_test " + msg):
        LinearProbe(epochs=1).fit(x, y, x, y_test)
    with pytest.raises(ValueError, match=r"^labels must be class indices >= 0, got -3 in 1 of 90 rows"):
        knn.score(x, torch.cat([y[:89], torch.tensor([-3])]))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"epochs": 2.0}, r"^LinearProbe: epochs=2.0 must be an integer >= 1 \(eval.linear_epochs\)$"),
        ({"batch_size": 16.0}, r"^LinearProbe: batch_size=16.0 must be an integer >= 1 \(eval.linear_batch_size\)$"),
        ({"epochs": True}, r"^LinearProbe: epochs=True must be an integer >= 1"),
    ],
)
def test_probe_refuses_counts_that_are_not_integers(kw, match):
    """An integral float passed the old value check (2.0 == 2) and then broke range() with a TypeError."""
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(ValueError, match=match):
        LinearProbe(**kw).fit(x, y)


def test_probe_and_knn_take_numpy_integers():
    """Integers of any kind (numpy's included, as a sweep or array code may hand them) are counts: the same fit."""
    x, y = _blobs()
    a = LinearProbe(epochs=2, batch_size=16).fit(x, y)
    b = LinearProbe(epochs=np.int64(2), batch_size=np.int32(16)).fit(x, y)
    assert torch.equal(a.linear_.weight, b.linear_.weight)
    assert torch.equal(
        KNNClassifier(k=np.int64(5), chunk=np.int64(7)).fit(x, y).predict(x), KNNClassifier(k=5).fit(x, y).predict(x)
    )


def _blobs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=g) * 4
    y = torch.randint(0, 3, (90,), generator=g)
    return centers[y] + torch.randn(90, 6, generator=g), y


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_knn_on_nonfinite_training_features_warns_and_scores_nan(bad):
    """One NaN/inf training row made every test row's votes NaN and the argmax arbitrary: the score looked like
    chance (a plausible number); it is NaN now, with one warning that counts the rows."""
    x, y = _blobs()
    clean = KNNClassifier(k=5).fit(x[:60], y[:60]).score(x[60:], y[60:])
    assert clean > 0.9  # the blobs are separable: a finite reference
    x_bad = x.clone()
    x_bad[[4, 9], 2] = bad
    with pytest.warns(RuntimeWarning) as record:
        knn = KNNClassifier(k=5).fit(x_bad[:60], y[:60])
    assert [str(w.message) for w in record] == [
        "kNN: 2 of the 60 rows of the training features are non-finite (NaN or inf): every prediction is "
        "meaningless and score() returns NaN (features of a diverged model?)"
    ]
    assert math.isnan(knn.score(x[60:], y[60:]))


def test_knn_and_probe_score_nonfinite_test_features_as_nan_with_one_warning():
    x, y = _blobs()
    x_test = x[60:].clone()
    x_test[0] = float("nan")
    knn = KNNClassifier(k=5).fit(x[:60], y[:60])
    probe = LinearProbe(epochs=30, lr=3e-2, batch_size=32).fit(x[:60], y[:60])
    for est, who in ((knn, "kNN.score"), (probe, "LinearProbe.score")):
        with pytest.warns(RuntimeWarning) as record:
            assert math.isnan(est.score(x_test, y[60:]))
        assert len(record) == 1 and str(record[0].message).startswith(f"{who}: 1 of the 30 rows of ")
        assert est.score(x[60:], y[60:]) > 0.9  # the estimator itself is fine: finite rows score normally


def test_linear_probe_on_nonfinite_features_has_nan_history_and_warns_once():
    x, y = _blobs()
    x_train = x[:60].clone()
    x_train[7, 0] = float("inf")
    with pytest.warns(RuntimeWarning) as record:
        probe = LinearProbe(epochs=4, lr=1e-2, batch_size=32).fit(x_train, y[:60], x[60:], y[60:])
    assert [str(w.message) for w in record] == [
        "LinearProbe.fit: 1 of the 60 rows of x_train are non-finite (NaN or inf): the probe is meaningless; "
        "score() and history_ give NaN (features of a diverged model?)"
    ]
    assert len(probe.history_) == 4 and all(math.isnan(a) for a in probe.history_)
    assert math.isnan(probe.best_accuracy_) and probe.nonfinite_rows_ == 1
    x_test = x[60:].clone()
    x_test[[1, 2]] = float("nan")
    with pytest.warns(RuntimeWarning) as record:  # once for the 4 epochs' test scores, not once per epoch
        probe = LinearProbe(epochs=4, lr=1e-2, batch_size=32).fit(x[:60], y[:60], x_test, y[60:])
    assert [str(w.message) for w in record] == [
        "LinearProbe.fit: 2 of the 30 rows of x_test are non-finite (NaN or inf): history_ holds NaN "
        "(features of a diverged model?)"
    ]
    reference = LinearProbe(epochs=4, lr=1e-2, batch_size=32).fit(x[:60], y[:60])  # the same probe, no test set
    assert all(math.isnan(a) for a in probe.history_)
    assert probe.score(x[60:], y[60:]) == reference.score(x[60:], y[60:]) > 1 / 3


def test_streamed_knn_scores_nonfinite_features_as_nan():
    x, y = _blobs()
    batches = [(x[:30], y[:30]), (x[30:60], y[30:60])]
    assert knn_stream(x[60:], y[60:], iter(batches), num_classes=3, k=5) > 0.9
    poisoned = [(x[:30], y[:30]), (x[30:60].clone().index_fill_(0, torch.tensor([3]), float("nan")), y[30:60])]
    with pytest.warns(RuntimeWarning, match=r"kNN: 1 training feature rows are non-finite \(NaN or inf\)"):
        assert math.isnan(knn_stream(x[60:], y[60:], iter(poisoned), num_classes=3, k=5))


@pytest.mark.parametrize("est", [KNNClassifier(k=3), LinearProbe(epochs=1)], ids=["knn", "probe"])
@pytest.mark.parametrize("call", ["predict", "score"])
def test_predict_or_score_before_fit_says_call_fit_first(est, call):
    """Was an AttributeError on ``features_``/``mean_``, naming an attribute rather than the fix. Like
    scikit-learn's NotFittedError, it is both a ValueError and an AttributeError."""
    args = (torch.randn(4, 6),) if call == "predict" else (torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(NotFittedError) as info:
        getattr(est, call)(*args)
    name = type(est).__name__
    assert str(info.value) == f"this {name} is not fitted yet: call fit() first, then predict() or score()"
    assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)


def test_features_straight_out_of_a_forward_pass_are_frozen_inputs():
    """Features that carry an autograd graph (``net(x)`` outside ``no_grad``): the probe's second epoch ran
    ``backward`` through the graph again (RuntimeError) and the kNN bank kept the graph alive; both now detach."""
    x, y = _blobs()
    net = torch.nn.Linear(x.shape[1], x.shape[1])
    feats = net(x)
    assert feats.requires_grad
    probe = LinearProbe(epochs=2, seed=0).fit(feats[:60], y[:60], feats[60:], y[60:])
    plain = LinearProbe(epochs=2, seed=0).fit(feats[:60].detach(), y[:60], feats[60:].detach(), y[60:])
    assert probe.history_ == plain.history_
    knn = KNNClassifier(k=5).fit(feats[:60], y[:60])
    assert not knn.features_.requires_grad and not knn.predict_scores(feats[60:]).requires_grad
    assert net.weight.grad is None  # nothing flowed back into the network


def test_knn_keeps_its_own_copy_of_the_training_labels():
    x, y = _blobs()
    labels = y[:60].clone()
    knn = KNNClassifier(k=5).fit(x[:60], labels)
    before = knn.predict(x[60:])
    labels.zero_()  # the caller reuses its tensor
    assert torch.equal(knn.predict(x[60:]), before)


def test_accuracies_are_exact_shares_not_float32_divisions():
    """2 of 3 right is 2/3 exactly (float32's mean gave 0.6666666865, so 66.66666865 % in summary.json)."""
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    test = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.2]])
    y_test = torch.tensor([0, 1, 1])  # the third is a miss
    assert KNNClassifier(k=1).fit(train, torch.tensor([0, 1])).score(test, y_test) == 2 / 3
    streamed = knn_stream(test, y_test, iter([(train, torch.tensor([0, 1]))]), num_classes=2, k=1)
    assert streamed == 2 / 3
    probe = LinearProbe(epochs=30, lr=0.1, seed=0).fit(train.repeat(4, 1), torch.tensor([0, 1]).repeat(4))
    assert probe.score(test, y_test) == 2 / 3


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"k": 0}, r"kNN: k=0 must be an integer >= 1 \(eval.knn_k\)"),
        ({"k": 2.0}, r"kNN: k=2.0 must be an integer >= 1"),
        ({"temperature": 0.0}, r"kNN: temperature=0.0 must be > 0 \(eval.knn_t\)"),
        ({"temperature": -1.0}, r"kNN: temperature=-1.0 must be > 0"),
        ({"test_labels": torch.tensor([0, -1, 1, 0])}, r"test_labels must be class indices >= 0, got -1"),
    ],
)
def test_streamed_knn_checks_its_arguments_as_the_in_memory_knn_does(kw, match):
    """knn_stream returned a number for k=0 (the share of class 0), T<=0, and counted unlabelled (-1) test rows
    as misses, where KNNClassifier refuses each."""
    x, y = torch.randn(12, 3), torch.arange(12) % 2
    args = {"k": 3, "temperature": 0.1, "test_labels": y[:4]} | kw
    with pytest.raises(ValueError, match=match):
        knn_stream(x[:4], args.pop("test_labels"), iter([(x[4:], y[4:])]), num_classes=2, **args)
