import numpy as np
import pytest

from gateway.routing.matcher import decide


def test_best_above_threshold_is_chosen() -> None:
    routes = {"code": np.array([[1.0, 0.0]]), "legal": np.array([[0.0, 1.0]])}
    d = decide(np.array([0.9, 0.1]), routes, threshold=0.5)
    assert d.chosen == "code"
    assert set(d.scores) == {"code", "legal"}


def test_below_threshold_goes_to_base() -> None:
    routes = {"code": np.array([[1.0, 0.0]])}
    assert decide(np.array([0.0, 1.0]), routes, threshold=0.5).chosen is None


def test_no_candidates_goes_to_base() -> None:
    d = decide(np.array([1.0, 0.0]), {}, threshold=0.0)
    assert d.chosen is None and d.scores == {}


def test_a_score_is_the_mean_of_the_two_best_examples() -> None:
    routes = {"code": np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), "one": np.array([[0.8, 0.6]])}
    d = decide(np.array([1.0, 0.0]), routes, threshold=0.0)
    assert d.scores["code"] == pytest.approx((1.0 + 0.6) / 2)  # the third example does not count
    assert d.scores["one"] == pytest.approx(0.8)  # a single example is its own score
    assert d.chosen == "code"


def test_unnormalised_vectors_score_as_cosines() -> None:
    d = decide(np.array([3.0, 0.0]), {"code": np.array([[5.0, 0.0], [0.0, 0.0]])}, threshold=0.0)
    assert d.scores["code"] == pytest.approx(0.5)  # a zero example counts as 0, not as NaN
