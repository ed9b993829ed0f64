"""benchmarks/combine_tasks.py --evaluate: how λ is chosen on validation (no model needed)."""

import math

import pytest
from conftest import import_benchmark


@pytest.fixture(scope="module")
def ct():
    return import_benchmark("combine_tasks")


def fake_scores(monkeypatch, ct, token_peak: float, exact_peak: float) -> None:
    """Validation scores that depend on λ only: per-token accuracy peaks at ``token_peak``,
    exact match at ``exact_peak`` (on a log scale); ``inf`` makes a measure rise forever."""
    def curve(lam, peak):
        return 1 / (1 + abs(math.log2(lam / peak))) if math.isfinite(peak) else lam / 100

    def summary(lam):
        row = {"token_accuracy": curve(lam, token_peak),
               "exact_match": curve(lam, exact_peak), "loss": 0.0}
        return {"reverse": row, "shift": row}

    monkeypatch.setattr(ct, "combination", lambda adapters, pair, method, i: i)
    monkeypatch.setattr(ct, "score", lambda model, batches, combo, lam: lam)
    monkeypatch.setattr(ct, "summary", summary)


def test_each_measure_gets_its_own_lambda_and_the_grid_grows_to_both(monkeypatch, ct):
    fake_scores(monkeypatch, ct, token_peak=0.5, exact_peak=0.25)
    got = ct.choose_lambda(None, {}, {}, "independent", "cat", [0.7, 1.0, 1.4])
    tok, em = got["by_measure"]["token_accuracy"], got["by_measure"]["exact_match"]
    assert tok["chosen"] == pytest.approx(0.495) and em["chosen"] == pytest.approx(0.2475)
    assert got["chosen"] == tok["chosen"] and got["runner_up"] == tok["runner_up"]
    # the grid was extended past exact match's best, so neither choice is at an edge
    assert min(got["lambdas"]) < em["chosen"] and not tok["at_edge"] and not em["at_edge"]
    assert got["lambdas"] == sorted(float(k) for k in got["grid"])
    # the runner-up is the second best on the same measure
    for by in (tok, em):
        assert by["runner_up"] != by["chosen"] and by["runner_up_value"] <= by["value"]


def test_a_best_at_the_bound_stops_there_and_says_so(monkeypatch, ct):
    fake_scores(monkeypatch, ct, token_peak=math.inf, exact_peak=1.0)
    got = ct.choose_lambda(None, {}, {}, "shared", "ties", [0.7, 1.0, 1.4])
    tok = got["by_measure"]["token_accuracy"]
    assert tok["chosen"] == max(got["lambdas"]) and tok["at_edge"]
    assert tok["chosen"] * 2 ** 0.5 > ct.LAMBDA_BOUNDS[1]
    assert not got["by_measure"]["exact_match"]["at_edge"]


def test_unscored_lambdas_are_the_grid_minus_what_was_scored(ct):
    mod = ct
    evaluation = {"selection": {"independent": {"cat": {"lambdas": [0.35, 0.5, 0.7, 1.0]}}},
                  "test": {"independent": {"cat": {"at": {"0.5": [], "0.7": []}}}}}
    assert mod.unscored_lambdas(evaluation, "independent", "cat") == [0.35, 1.0]
