"""Fast checks of the quality / engine benchmarks' scoring and statistics (no server)."""
from __future__ import annotations

import json
import random

import pytest

from cp_engine.devtools.stats import bootstrap_ci, paired_bootstrap_ci
from benchmarks.quality.bench import (clean_prediction, exact_match, f1_score, markdown, normalize_answer,
                                summarize)


def test_normalize_drops_case_punctuation_articles():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a pear") == "apple pear"


def test_exact_match_and_f1():
    assert exact_match("the PET.", "PET") == 1.0
    assert exact_match("PET bottles", "PET") == 0.0
    assert f1_score("Tony Robinson", "Tony Robinson") == 1.0
    # precision 1/3, recall 1/1 -> 2 * (1/3) / (4/3) = 0.5
    assert f1_score("Robinson was writer", "Robinson") == pytest.approx(0.5)
    assert f1_score("nothing shared", "Robinson") == 0.0
    assert f1_score("", "Robinson") == 0.0


def test_yes_no_answers_count_only_when_exact():
    assert f1_score("yes", "yes") == 1.0
    assert f1_score("yes it is", "yes") == 0.0  # HotpotQA's rule: no partial credit
    assert f1_score("no", "no idea") == 0.0


def test_clean_prediction_takes_first_line_without_prefix():
    assert clean_prediction("The answer is: 2001.\nBecause ...") == "2001"
    assert clean_prediction("\n  Answer: PET  ") == "PET"
    assert clean_prediction("Final answer - Paris") == "Paris"
    assert clean_prediction("") == ""


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    rng = random.Random(1)
    vals = [rng.random() for _ in range(200)]
    a, b = bootstrap_ci(vals), bootstrap_ci(vals)
    assert a == b
    mean, lo, hi = a
    assert lo < mean < hi
    assert hi - lo < 0.2
    assert bootstrap_ci([0.5] * 30) == (0.5, 0.5, 0.5)


def test_bootstrap_ci_covers_the_true_mean_most_of_the_time():
    covered = 0
    for seed in range(40):
        rng = random.Random(seed)
        vals = [float(rng.random() < 0.3) for _ in range(150)]
        _, lo, hi = bootstrap_ci(vals, n_boot=400, seed=seed)
        covered += lo <= 0.3 <= hi
    assert covered >= 34  # nominal 95%: allow sampling noise over 40 trials


def test_paired_bootstrap_of_identical_arms_is_zero():
    vals = [random.Random(3).random() for _ in range(50)]
    assert paired_bootstrap_ci(vals, vals) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0], [1.0, 2.0])


def _arm(name, ids, f1):
    return {"arm": name, "n": len(ids), "ids": ids, "f1": f1, "em": f1, "predictions": [""] * len(ids),
            "prompt_tokens": 100 * len(ids), "cached_tokens": 0, "recomputed_tokens": 100 * len(ids),
            "wall_s": 1.0}


def test_summary_pairs_partial_arms_on_common_questions():
    off = _arm("off", [0, 1, 2, 3], [1.0, 0.0, 1.0, 0.0])
    on = _arm("reorder+annotate", [0, 1], [1.0, 1.0])  # interrupted: two questions answered
    row = summarize(on, off)
    assert row["paired_n"] == 2
    assert row["f1_delta_vs_off"][0] == pytest.approx(50.0)
    assert "recomputed_ratio_vs_off" not in row  # different question sets: no token ratio
    doc = {"config": {"model_name": "m", "questions": 4, "k": 10, "max_tokens": 8, "started": "now",
                      "machine": "x"}, "arms": {"off": off, "reorder+annotate": on}, "wall_s": 2}
    table = markdown(doc)
    assert "| reorder+annotate | 2 |" in table and "+50.0" in table
    json.dumps(doc)  # the results document stays JSON-serialisable
