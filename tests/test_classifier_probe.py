"""benchmarks/classifier.py --supplement: the converged probe's fit and the alternative rates
(no model needed), and the committed supplement against the committed main result."""

import json

import pytest
import torch
from conftest import BENCH, import_benchmark


@pytest.fixture(scope="module")
def cls():
    return import_benchmark("classifier")


def test_alternative_rates_are_each_seeds_best_and_the_runner_up(cls):
    selection = {"0.0003": [1.29, 1.48], "0.001": [0.79, 1.26], "0.003": [0.24, 0.255],
                 "0.01": [3.13, 0.192]}
    # seed 1 prefers 0.01; 0.001 is the runner-up by mean
    assert cls.alternative_rates(selection, 0.003) == [0.001, 0.01]
    agreeing = {"0.001": [0.5, 0.6], "0.003": [0.2, 0.25], "0.01": [0.4, 0.3]}
    assert cls.alternative_rates(agreeing, 0.003) == [0.01]


def test_the_probe_reaches_the_stationary_point_of_its_objective(cls):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    y = (x @ torch.randn(6, 3, generator=gen)).argmax(-1)
    l2 = 1e-2
    w, info = cls.fit_probe(x, y, l2, classes=3)
    assert info["grad_max"] < 1e-6
    # at the optimum of CE + l2/2 ||W||^2: l2 W = -grad CE = Xᵀ(onehot - softmax) / n
    p = torch.softmax(x.double() @ w.T, -1)
    onehot = torch.nn.functional.one_hot(y, 3).double()
    assert torch.allclose(l2 * w, (onehot - p).T @ x.double() / len(x), atol=1e-8)


def test_the_committed_supplement_belongs_to_the_committed_result():
    results = BENCH / "results"
    main = json.loads((results / "classifier-cpu.json").read_text())
    supp = json.loads((results / "classifier_supplement-cpu.json").read_text())
    assert supp["main_result"]["git_commit"] == main["git_commit"]
    assert supp["report_seeds"] == main["report_seeds"]
    assert not supp["git_commit"].endswith("+dirty")
    probe = supp["converged_probe"]
    assert probe["grad_max"] < 1e-6
    chosen = probe["selection"][f"{probe['best_l2']:g}"]["validation"]["loss"]
    losses = [v["validation"]["loss"] for v in probe["selection"].values()]
    assert chosen == min(losses)
    l2s = sorted(float(v) for v in probe["selection"])
    assert l2s[0] < probe["best_l2"] < l2s[-1], "the probe's best L2 is at an edge of its grid"
    assert len(probe["test"]["correct"]) == len(main["report"]["2"]["test"]["after"]["correct"])
    for rate, runs in supp["lora_alternatives"].items():
        assert float(rate) != main["best_lr"] and set(runs) == {str(s) for s in main["report_seeds"]}
