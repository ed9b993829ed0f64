"""benchmarks/show_work_runner_up.py: the runner-up rate of an answer form (synthetic result,
no model)."""

from __future__ import annotations

import pytest
from conftest import import_benchmark

# validation result_nll of the two selection seeds, by rate
CURVE = {1e-3: (5.128, 5.063), 3e-3: (4.152, 3.897), 1e-2: (6.463, 5.628)}


def _work(best=3e-3, drop=0):
    runs = [{"form": "bare", "lr": lr, "seed": s, "phase": "selection",
             "validation": {"result_nll": v}}
            for lr, vals in CURVE.items() for s, v in zip((0, 1), vals)]
    return {"runs": runs[drop:], "grid": {"bare": sorted(CURVE)}, "selection_seeds": [0, 1],
            "best_lr": {"bare": best}}


def test_form_ranking_orders_rates_by_mean_validation_loss():
    mod = import_benchmark("show_work_runner_up")
    assert mod.form_ranking(_work(), "bare") == [3e-3, 1e-3, 1e-2]   # 4.02 < 5.10 < 6.05


def test_form_ranking_refuses_a_wrong_choice_or_a_missing_seed():
    mod = import_benchmark("show_work_runner_up")
    with pytest.raises(ValueError, match="not the best"):
        mod.form_ranking(_work(best=1e-3), "bare")
    with pytest.raises(ValueError, match="incomplete"):
        mod.form_ranking(_work(drop=1), "bare")
