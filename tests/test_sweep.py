"""lora_edu.sweep: the runner-up rate, the robust comparison, provenance checks (synthetic
sweep files, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_edu.sweep import Sweep, robust_difference

# validation result_nll of the two selection seeds, from the sweep's first 30 runs
SELECTION = {"full": {1e-4: (1.9896, 1.8576), 3e-4: (2.0155, 1.8125), 1e-3: (4.2802, 3.5303)},
             "lora_qv_r8": {1e-3: (3.0766, 2.7201), 3e-3: (2.4837, 2.2155),
                            1e-2: (2.8742, 2.9938)}}


def _run(method, lr, seed, phase, nll, em=0.5, prose=0.8):
    return {"method": method, "implementation": "lora_edu", "lr": lr, "seed": seed,
            "phase": phase, "validation": {"result_nll": nll},
            "test": {"result_nll": nll, "exact_match": em}, "prose_loss": prose,
            "chat_loss": 0.7}


def _sweep(best=True, report=None):
    runs = [_run(m, lr, s, "selection", v) for m, curve in SELECTION.items()
            for lr, vals in curve.items() for s, v in zip((0, 1), vals)]
    for (m, lr), values in (report or {}).items():
        runs += [_run(m, lr, s, "report", v, em=e) for s, (v, e) in zip((10, 11, 12), values)]
    data = {"git_commit": "abc", "date": "2026-12-07", "selection_seeds": [0, 1],
            "report_seeds": [10, 11, 12], "steps": 80, "batch_size": 8, "runs": runs,
            "grid": {m: sorted(c) for m, c in SELECTION.items()},
            "best_lr": {"full": 3e-4, "lora_qv_r8": 3e-3} if best else {}}
    return Sweep(data)


def test_runner_up_is_second_lowest_mean():
    s = _sweep()
    assert s.runner_up_lr("full") == 1e-4          # 1.9236 against 1.9140
    assert s.runner_up_lr("lora_qv_r8") == 1e-3    # 2.898 against 2.934 at 1e-2
    assert [lr for lr, _ in s.selection_ranking("full")] == [3e-4, 1e-4, 1e-3]
    assert s.selection_gap("full").winner is None  # two seeds: within the noise
    assert _sweep(best=False).runner_up_lr("full") == 1e-4   # a partial sweep has no best_lr


def test_ranking_refuses_an_incomplete_or_inconsistent_selection():
    s = _sweep()
    s.data["runs"] = s.data["runs"][1:]            # full 1e-4 lost a seed
    with pytest.raises(ValueError, match="incomplete"):
        s.selection_ranking("full")
    s = _sweep()
    s.data["best_lr"]["full"] = 1e-3
    with pytest.raises(ValueError, match="chose"):
        s.selection_ranking("full")


def test_robust_difference_needs_every_rate_to_agree():
    chosen = {("full", 3e-4): [(1.0, .6), (1.1, .6), (1.2, .6)],
              ("lora_qv_r8", 3e-3): [(2.0, .5), (2.1, .5), (2.3, .5)]}
    s = _sweep(report=chosen)
    same = Sweep({**_sweep(report={("full", 1e-4): [(1.5, .6), (1.6, .6), (1.6, .6)],
                                   ("lora_qv_r8", 1e-3): [(2.4, .5), (2.5, .5), (2.6, .5)]}
                           ).data, "best_lr": {"full": 1e-4, "lora_qv_r8": 1e-3}})
    rd = robust_difference(s, same, "full", "lora_qv_r8", "result_nll")
    assert len(rd.cases) == 4 and rd.winner == "a" and rd.robust
    assert "the same verdict at the 3 other combinations" in rd.sentence("full", "r8", unit="nats")
    flip = Sweep({**same.data, "runs": [
        {**r, "test": {**r["test"], "result_nll": r["test"]["result_nll"] + 5 * (r["method"] == "full")}}
        for r in same.data["runs"]]})
    rd = robust_difference(s, flip, "full", "lora_qv_r8", "result_nll")
    assert rd.winner is None and not rd.robust
    text = rd.sentence("full", "r8")
    # the opening names no winner that the end of the sentence takes back
    assert text.startswith("no robust winner between full and r8") and "beats" not in text
    assert "full at 0.0003, r8 at 0.003: full better, \u22121.033 [" in text
    only = robust_difference(s, None, "full", "lora_qv_r8", "result_nll")
    assert len(only.cases) == 1 and only.winner == "a"
    assert np.isclose(only.chosen.mean, -1.0333, atol=1e-3)


def test_load_refuses_dirty_and_checks_runner_up(tmp_path, monkeypatch):
    import lora_edu.sweep as sw

    monkeypatch.setattr(sw, "RESULT_DIRS", (tmp_path,))
    s = _sweep(report={("full", 3e-4): [(1, .5)] * 3})
    (tmp_path / "real_sweep-cpu.json").write_text(json.dumps({**s.data, "git_commit": "abc+dirty"}))
    with pytest.raises(ValueError, match="clean commit"):
        Sweep.load()
    (tmp_path / "real_sweep-cpu.json").write_text(json.dumps(s.data))
    main = Sweep.load()
    assert "run time not recorded" in main.provenance() if "command" in main.data else True
    ru = {**s.data, "runs": [_run("full", 1e-4, k, "report", 1.0) for k in (10, 11, 12)],
          "best_lr": {"full": 1e-4}, "source_git_commit": "abc", "source_date": "2026-12-07"}
    (tmp_path / "runner_up-cpu.json").write_text(json.dumps(ru))
    assert main.at_runner_up().best_lr == {"full": 1e-4}
    (tmp_path / "runner_up-cpu.json").write_text(json.dumps({**ru, "best_lr": {"full": 1e-3}}))
    with pytest.raises(ValueError, match="runner-up"):
        main.at_runner_up()
    (tmp_path / "runner_up-cpu.json").write_text(json.dumps({**ru, "source_date": "x"}))
    with pytest.raises(ValueError, match="re-run"):
        main.at_runner_up()


def test_provenance_without_seconds_says_so():
    s = _sweep()
    s.data.update(command="python x.py", device="cpu", cpu_count=2, torch="2")
    assert "nan" not in s.provenance() and "not recorded" in s.provenance()
    s.data["seconds"] = 7200
    assert "2.0 hours" in s.provenance()


def test_cluster_interval_is_wider_when_items_are_clustered():
    from lora_edu.sweep import cluster_interval

    rng = np.random.default_rng(0)
    clustered = np.repeat(rng.integers(0, 2, 10), 20)          # 10 clusters of 20 equal items
    table = np.tile(clustered, (3, 1)).astype(float)
    wide = cluster_interval(table, np.repeat(np.arange(10), 20))
    narrow = cluster_interval(table, np.arange(200))
    assert wide.estimate == narrow.estimate == table.mean()
    assert (wide.high - wide.low) > 2 * (narrow.high - narrow.low)
    with pytest.raises(ValueError, match="cluster label"):
        cluster_interval(table, np.arange(5))


def test_resume_keeps_only_runs_of_the_same_clean_commit(tmp_path):
    """benchmarks/_provenance.resumed_runs: a cut-short file of this clean commit resumes by
    key; another commit's file, or a dirty tree, is refused rather than mixed in."""
    from conftest import import_benchmark

    prov = import_benchmark("_provenance")
    out = tmp_path / "x.json"
    assert prov.resumed_runs(out, {"git_commit": "abc"}, lambda r: r["k"]) == {}
    out.write_text(json.dumps({"git_commit": "abc", "date": "d0", "runs": [{"k": 1}, {"k": 2}]}))
    result = {"git_commit": "abc"}
    assert set(prov.resumed_runs(out, result, lambda r: r["k"])) == {1, 2}
    assert result["resumed_from"] == "d0"
    for commit in ("def", "abc+dirty", None):
        with pytest.raises(SystemExit, match="same clean commit"):
            prov.resumed_runs(out, {"git_commit": commit}, lambda r: r["k"])


def test_metric_over_a_subset_of_kinds_reads_the_per_question_scores():
    """Sweep.metric(kinds=...): the mean of the per-question scores over those kinds, per seed;
    over every kind it equals the split's summary; a bad request is refused."""
    s = _sweep()
    kinds = ["within_month", "within_month", "year_end", "leap_day"]
    nll = {10: [1.0, 3.0, 9.0, 7.0], 11: [2.0, 2.0, 8.0, 8.0], 12: [1.0, 1.0, 6.0, 4.0]}
    exact = {10: "1100", 11: "1000", 12: "0100"}
    s.data["data"] = {"test_kinds": kinds}
    s.data["runs"] += [{**_run("full", 3e-4, seed, "report", float(np.mean(v))),
                        "test_items": {"result_nll": v, "exact": exact[seed]}}
                       for seed, v in nll.items()]
    assert np.allclose(s.metric("full", "result_nll", kinds=["within_month"]), [2.0, 2.0, 1.0])
    assert np.allclose(s.metric("full", "result_nll", kinds=kinds), s.metric("full", "result_nll"))
    assert np.allclose(s.metric("full", "exact_match", kinds=["within_month"]), [1.0, 0.5, 0.5])
    # a weighted mix of the per-kind means: within month 2, 2, 1; year end 9, 8, 6; leap 7, 8, 4
    mix = s.metric("full", "result_nll", kinds={"within_month": 0.5, "year_end": 0.25,
                                                "leap_day": 0.25})
    assert np.allclose(mix, [0.5 * 2 + 0.25 * 9 + 0.25 * 7, 0.5 * 2 + 0.25 * 8 + 0.25 * 8,
                             0.5 * 1 + 0.25 * 6 + 0.25 * 4])
    with pytest.raises(ValueError, match="no test question"):
        s.metric("full", "result_nll", kinds=["month_end"])
    with pytest.raises(ValueError, match="no test question"):
        s.metric("full", "result_nll", kinds={"month_end": 1.0, "within_month": 1.0})
    with pytest.raises(ValueError, match="kinds needs"):
        s.metric("full", "prose_loss", kinds=["within_month"])
