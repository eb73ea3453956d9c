"""attnlib.compare: summaries over seeds, the seed-spread test, the per-class table and log-log slopes,
checked against values worked out by hand and against records written the way attnlib.experiments writes them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from attnlib import compare
from attnlib.experiments import load_results, record_path


def record(head, seed, miou, iou):
    return {"head": head, "seed": seed, "test": {"miou": miou, "iou": iou}}


def test_seed_summary_is_the_mean_and_the_sample_standard_deviation():
    s = compare.seed_summary([0.2, 0.4, 0.6])
    assert s["mean"] == pytest.approx(0.4)
    assert s["std"] == pytest.approx(0.2)  # sqrt(((-.2)² + 0 + .2²) / (3 - 1))
    assert (s["min"], s["max"], s["n"]) == (0.2, 0.6, 3)
    assert math.isnan(compare.seed_summary([0.3])["std"])  # one seed says nothing about the spread


@pytest.mark.parametrize("bad", [[], [0.1, float("nan")], [[0.1, 0.2]]])
def test_seed_summary_refuses_what_is_not_a_list_of_numbers(bad):
    with pytest.raises(ValueError, match="seed_summary: expected"):
        compare.seed_summary(bad)


def test_separated_needs_ranges_that_do_not_overlap():
    assert compare.separated([0.5, 0.6, 0.7], [0.1, 0.2, 0.49]) == 1
    assert compare.separated([0.1, 0.2, 0.49], [0.5, 0.6, 0.7]) == -1
    assert compare.separated([0.1, 0.5, 0.7], [0.2, 0.3, 0.4]) == 0  # the means differ, the ranges overlap
    assert compare.separated([0.3, 0.5], [0.1, 0.3]) == 0  # a tie at the edge is an overlap
    with pytest.raises(ValueError, match="at least 2 seeds for b"):
        compare.separated([0.1, 0.2], [0.3])


def test_separated_pairs_lists_each_separated_pair_once_higher_first():
    values = {"fcn": [0.10, 0.12, 0.11], "nonlocal": [0.20, 0.25, 0.22], "gcnet": [0.11, 0.21, 0.15]}
    assert compare.separated_pairs(values) == [("nonlocal", "fcn")]


def test_metric_reads_the_test_metric_or_a_function_of_the_record():
    records = [record("fcn", 0, 0.25, {}), record("fcn", 1, 0.5, {})]
    assert compare.metric(records) == [0.25, 0.5]
    assert compare.metric(records, lambda r: r["seed"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"test\['pixel_accuracy'\]"):
        compare.metric(records, "pixel_accuracy")


def test_class_iou_averages_over_the_seeds_that_define_a_class(tmp_path):
    iou = [{"Sky": 0.8, "Car": None}, {"Sky": 0.6, "Car": 0.3}, {"Sky": 0.7, "Car": None}]
    for seed, (m, i) in enumerate(zip([0.2, 0.3, 0.4], iou)):
        for head, shift in (("fcn", 0.0), ("nonlocal", 0.1)):
            path = record_path(tmp_path, "quick", head, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            shifted = {k: None if v is None else v + shift for k, v in i.items()}
            path.write_text(json.dumps(record(head, seed, m + shift, shifted)))
    results = load_results("quick", tmp_path)
    assert list(results) == ["fcn", "nonlocal"] and [r["seed"] for r in results["fcn"]] == [0, 1, 2]
    table = compare.class_iou(results, ["Sky", "Car"])
    np.testing.assert_allclose(table, [[0.7, 0.3], [0.8, 0.4]])
    assert compare.seed_summary(compare.metric(results["nonlocal"]))["mean"] == pytest.approx(0.4)
    never = {"fcn": [record("fcn", 0, 0.1, {"Sky": 0.5, "Car": None})]}
    assert np.isnan(compare.class_iou(never, ["Sky", "Car"])[0, 1])
    with pytest.raises(ValueError, match="class 'Road'"):
        compare.class_iou(never, ["Road"])


def test_loglog_slope_recovers_the_exponent():
    n = np.array([32.0, 48, 64, 96, 128]) ** 2
    assert compare.loglog_slope(n, 3 * n**2) == pytest.approx(2.0)
    assert compare.loglog_slope(n, 5 * n**1.5) == pytest.approx(1.5)
    assert 1.0 < compare.loglog_slope(n, n + n**2 / 1000) < 2.0  # a linear and a quadratic term
    with pytest.raises(ValueError, match="positive"):
        compare.loglog_slope([1, 2], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        compare.loglog_slope([1, 2, 3], [1, 2])
