import numpy as np

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
