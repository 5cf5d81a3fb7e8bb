import json
import math
import sys

import pytest
import torch

from controllens.controllers import Gains
from controllens.steering import Steering
from controllens.tuning import (
    FluencyBudget,
    GenerationEvaluator,
    Range,
    SearchResult,
    SearchSpace,
    Trial,
    apply_config,
    bayesian_search,
    grid_search,
    markdown_table,
    pareto_front,
    plot_pareto,
    successive_halving,
)


def _bowl(config, budget):
    """A synthetic objective with its optimum at kp=1, ki=0.05, alpha=0.2."""
    distance = (
        (config["kp"] - 1.0) ** 2
        + (config["ki"] - 0.05) ** 2 * 100
        + (config["alpha"] - 0.2) ** 2 * 10
    )
    return {"score": 1.0 - distance, "perplexity": 5.0 + config["alpha"] * 10}


def _trial(score, perplexity, **config):
    metrics = {"score": score, "perplexity": perplexity}
    return Trial(config=config, budget=8, metrics=metrics, objective=score)


SPACE = SearchSpace(
    params={
        "kp": (0.5, 1.0, 1.5),
        "ki": Range(low=0.0, high=0.1, num=3),
        "alpha": Range(low=0.05, high=0.4, log=True, num=4),
    }
)


# grid search


def test_grid_search_finds_the_known_optimum_of_a_synthetic_objective():
    result = grid_search(_bowl, SPACE, budget=4)
    assert len(result.trials) == SPACE.size == 36
    assert result.best.config == {"kp": 1.0, "ki": 0.05, "alpha": 0.2}
    assert result.method == "grid" and result.seed is None


def test_grid_search_passes_the_budget_and_a_fresh_config_to_evaluate():
    seen = []

    def evaluate(config, budget):
        seen.append((dict(config), budget))
        config["kp"] = -1.0  # must not leak into the recorded trial
        return {"score": 0.0}

    result = grid_search(evaluate, SearchSpace(params={"kp": (0.5, 1.0)}), 7)
    assert seen == [({"kp": 0.5}, 7), ({"kp": 1.0}, 7)]
    assert [t.config for t in result.trials] == [{"kp": 0.5}, {"kp": 1.0}]


@pytest.mark.parametrize(
    ("range_", "expected"),
    [
        (Range(low=0.0, high=1.0, num=5), (0.0, 0.25, 0.5, 0.75, 1.0)),
        (Range(low=0.01, high=1.0, log=True, num=3), (0.01, 0.1, 1.0)),
        (Range(low=0.3, high=0.3, num=4), (0.3,)),
    ],
    ids=["linear", "log", "degenerate"],
)
def test_range_grid_values_include_both_ends(range_, expected):
    assert range_.grid_values() == pytest.approx(expected)


# successive halving


def test_halving_promotes_the_best_third_at_each_budget():
    calls = []

    def evaluate(config, budget):
        calls.append((config["alpha"], budget))
        return {"score": -abs(config["alpha"] - 0.6)}

    space = SearchSpace(params={"alpha": Range(low=0.0, high=1.0, num=9)})
    result = successive_halving(
        evaluate, space, budgets=(4, 12, 36), candidates="grid", eta=3
    )
    alphas = space.grid()
    assert calls[:9] == [(c["alpha"], 4) for c in alphas]
    # nearest to 0.6: 0.625, 0.5, 0.75 (candidates 5, 4, 6), in candidate order
    assert calls[9:] == [(0.5, 12), (0.625, 12), (0.75, 12), (0.625, 36)]
    assert [t.candidate for t in result.trials if t.rung == 1] == [4, 5, 6]
    assert result.best.candidate == 5 and result.best.budget == 36


@pytest.mark.parametrize(
    ("n", "eta", "budgets", "per_round"),
    [
        (10, 3, (1, 3, 9), [10, 3, 1]),
        (5, 2, (1, 2, 4), [5, 2, 1]),
        (4, 2, (1, 2, 4, 8), [4, 2, 1, 1]),
    ],
    ids=["floor", "halves", "last-survivor-goes-on"],
)
def test_halving_keeps_len_over_eta_rounded_down_and_at_least_one(
    n, eta, budgets, per_round
):
    space = SearchSpace(params={"kp": Range(low=0.0, high=1.0)})
    result = successive_halving(
        _constant_score_of_kp, space, budgets=budgets, n_candidates=n, eta=eta
    )
    assert [sum(t.rung == r for t in result.trials) for r in range(len(budgets))] == (
        per_round
    )
    assert [t.budget for t in result.trials if t.rung == len(budgets) - 1] == [
        budgets[-1]
    ]


def test_halving_ranks_each_round_on_that_rounds_budget():
    # candidate 0 looks best on the smallest budget, candidate 1 on more data
    scores = {1: [0.9, 0.8, 0.1, 0.2], 2: [0.3, 0.7], 4: [0.7]}

    def evaluate(config, budget):
        rung = [t for t in (1, 2, 4) if t == budget][0]
        alive = {1: [0, 1, 2, 3], 2: [0, 1], 4: [1]}[rung]
        return {"score": scores[rung][alive.index(int(config["kp"]))]}

    space = SearchSpace(params={"kp": (0.0, 1.0, 2.0, 3.0)})
    result = successive_halving(
        evaluate, space, budgets=(1, 2, 4), candidates="grid", eta=2
    )
    assert [(t.rung, t.candidate) for t in result.trials] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
        (1, 1),
        (2, 1),
    ]
    assert result.best.config == {"kp": 1.0}


def test_halving_breaks_ties_in_favour_of_the_earlier_candidate():
    space = SearchSpace(params={"alpha": (0.1, 0.2, 0.3, 0.4)})
    result = successive_halving(
        lambda c, b: {"score": 1.0}, space, budgets=(1, 2), candidates="grid", eta=2
    )
    assert [t.candidate for t in result.trials if t.rung == 1] == [0, 1]


def test_halving_with_random_candidates_is_deterministic_given_the_seed():
    space = SearchSpace(
        params={"kp": Range(low=0.5, high=2.0), "alpha": (0.1, 0.2, 0.3)}
    )
    runs = [
        successive_halving(
            _constant_score_of_kp, space, budgets=(2, 6), n_candidates=9, seed=seed
        )
        for seed in (3, 3, 4)
    ]
    configs = [[t.config for t in run.trials] for run in runs]
    assert configs[0] == configs[1] != configs[2]
    assert runs[0].seed == 3 and runs[0].method == "halving"
    assert all(
        0.5 <= c["kp"] <= 2.0 and c["alpha"] in (0.1, 0.2, 0.3) for c in configs[0]
    )


def _constant_score_of_kp(config, budget):
    return {"score": config["kp"]}


def test_halving_on_a_grid_subset_draws_distinct_grid_points():
    result = successive_halving(
        _bowl, SPACE, budgets=(1, 3), candidates="grid", n_candidates=10, seed=0
    )
    first = [t.config for t in result.trials if t.rung == 0]
    grid = SPACE.grid()
    assert len(first) == 10 and all(c in grid for c in first)
    assert len({tuple(c.values()) for c in first}) == 10


def test_log_ranges_are_sampled_inside_their_interval():
    space = SearchSpace(params={"alpha": Range(low=0.01, high=1.0, log=True)})
    values = [c["alpha"] for c in space.sample(200, seed=0)]
    assert 0.01 <= min(values) and max(values) <= 1.0
    # log-uniform: about half the draws fall below the geometric middle, 0.1
    assert 70 < sum(v < 0.1 for v in values) < 130


# Bayesian optimisation


def test_bayesian_search_is_deterministic_given_the_seed():
    pytest.importorskip("optuna")
    space = SearchSpace(params={"kp": Range(low=0.0, high=2.0), "ki": (0.0, 0.05)})
    runs = [
        bayesian_search(_constant_score_of_kp, space, 4, n_trials=12, seed=seed)
        for seed in (0, 0, 1)
    ]
    configs = [[t.config for t in run.trials] for run in runs]
    assert configs[0] == configs[1] != configs[2]
    assert runs[0].method == "bayesian"


def test_bayesian_search_falls_back_to_random_search_without_optuna(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now fails
    space = SearchSpace(params={"kp": Range(low=0.0, high=2.0)})
    with pytest.warns(UserWarning, match="optuna is not installed"):
        result = bayesian_search(_constant_score_of_kp, space, 4, n_trials=5, seed=2)
    assert result.method == "random" and result.seed == 2
    assert [t.config for t in result.trials] == space.sample(5, seed=2)


# the fluency objective


def test_fluency_budget_keeps_the_score_within_budget_and_penalises_beyond():
    objective = FluencyBudget(baseline=6.0, ratio=1.5, penalty=4.0)
    assert objective.limit == 9.0
    assert objective({"score": 0.7, "perplexity": 8.0}) == 0.7
    # 50% beyond the limit costs 2.0
    assert objective({"score": 0.9, "perplexity": 13.5}) == pytest.approx(-1.1)


def test_grid_search_with_a_fluency_budget_picks_the_best_feasible_setting():
    def evaluate(config, budget):  # stronger steering: more positive, less fluent
        alpha = config["alpha"]
        return {"score": min(1.0, 0.4 + alpha), "perplexity": 6.0 * (1 + 2 * alpha)}

    space = SearchSpace(params={"alpha": (0.1, 0.2, 0.3, 0.4)})
    objective = FluencyBudget(baseline=6.0, ratio=1.5)
    result = grid_search(evaluate, space, 8, objective=objective)
    assert result.best.config == {"alpha": 0.2}
    assert max(result.trials, key=lambda t: t.metrics["score"]).config["alpha"] == 0.4
    assert "FluencyBudget(baseline=6.0" in result.objective


# Pareto front


def test_pareto_front_of_hand_made_points():
    points = [(0.5, 6.0), (0.7, 8.0), (0.4, 7.0), (0.7, 9.0), (0.9, 12.0)]
    assert pareto_front(points) == [(0.5, 6.0), (0.7, 8.0), (0.9, 12.0)]


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(0.5, 6.0), (0.5, 6.0)], [(0.5, 6.0), (0.5, 6.0)]),
        ([(0.5, 7.0), (0.5, 6.0)], [(0.5, 6.0)]),
        ([(0.5, 6.0), (0.6, 6.0)], [(0.6, 6.0)]),
        ([(0.6, 6.0), (0.5, 6.0), (0.6, 6.0), (0.6, 7.0)], [(0.6, 6.0), (0.6, 6.0)]),
        ([], []),
    ],
    ids=["exact-tie", "same-score", "same-perplexity", "tie-and-dominated", "empty"],
)
def test_pareto_front_keeps_exact_ties_and_drops_weak_ties(points, expected):
    assert pareto_front(points) == expected


def test_pareto_front_returns_trials_and_leaves_out_failed_evaluations():
    good, weak, broken = _trial(0.8, 7.0), _trial(0.6, 8.0), _trial(0.9, math.nan)
    assert pareto_front([weak, broken, good]) == [good]
    assert pareto_front([{"score": 0.1, "perplexity": 2.0}]) == [
        {"score": 0.1, "perplexity": 2.0}
    ]


# results, tables and plots


def test_search_result_survives_a_json_round_trip(tmp_path):
    result = successive_halving(
        _bowl, SPACE, budgets=(2, 4), candidates="random", n_candidates=4, seed=7
    )
    path = tmp_path / "search.json"
    result.to_json(path)
    loaded = SearchResult.from_json(path)
    assert loaded == result
    data = json.loads(path.read_text())
    assert data["seed"] == 7 and data["space"]["ki"]["num"] == 3
    assert loaded.best == result.best


def test_markdown_table_marks_the_front_of_each_family():
    trials = [
        _trial(0.5, 6.0, alpha=0.1),
        _trial(0.4, 7.0, alpha=0.2),
        _trial(0.45, 6.5, alpha=0.1, ki=0.02, kd=0.5),
    ]
    lines = markdown_table(trials).splitlines()
    assert lines[0] == (
        "| family | ki | kd | alpha | budget | score | perplexity | objective | front |"
    )
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| P", "| P", "| PID"]
    assert [line.endswith("| yes |") for line in lines[2:]] == [True, False, True]


def test_plot_pareto_draws_one_front_per_family(tmp_path):
    trials = [
        _trial(0.5, 6.0, alpha=0.1),
        _trial(0.7, 8.0, alpha=0.2),
        _trial(0.4, 7.0, alpha=0.3),
        _trial(0.6, 7.0, alpha=0.1, ki=0.02, kd=0.5),
    ]
    path = tmp_path / "pareto.png"
    figure = plot_pareto(trials, path, baseline=2.0)
    assert path.read_bytes()[:4] == b"\x89PNG"
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert sorted(lines) == ["P front", "PID front"]
    assert list(lines["P front"].get_xdata()) == [3.0, 4.0]  # perplexity / 2
    assert list(lines["P front"].get_ydata()) == [0.5, 0.7]


# bad input


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({}, ValueError, "empty: expected at least one parameter among 'kp'"),
        ({"kq": (1.0,)}, ValueError, "Unknown parameter 'kq'; valid choices: 'kp', "),
        ({"ki": (0.1, -0.1)}, ValueError, "Gain ki must be >= 0, received -0.1"),
        ({"kd": Range(low=-1.0, high=1.0)}, ValueError, "Gain kd must be >= 0"),
        ({"integral_bound": (0.0,)}, ValueError, "integral_bound must be > 0"),
        ({"alpha": ()}, ValueError, "alpha has no values"),
        ({"alpha": (0.1, 0.1)}, ValueError, "values of alpha repeat"),
        ({"alpha": (0.1, math.inf)}, ValueError, "finite number for the values"),
    ],
    ids=[
        "empty",
        "unknown-name",
        "negative-gain",
        "negative-range",
        "zero-bound",
        "no-values",
        "repeated",
        "infinite",
    ],
)
def test_bad_search_spaces_are_refused_with_a_clear_error(params, error, match):
    with pytest.raises(error, match=match):
        SearchSpace(params=params)


def test_extra_names_admit_parameters_of_the_callers_own():
    space = SearchSpace(params={"layer": (3.0, 5.0)}, extra_names=("layer",))
    assert space.grid() == [{"layer": 3.0}, {"layer": 5.0}]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(low=1.0, high=0.5), "low <= high"),
        (dict(low=0.0, high=1.0, log=True), "log Range needs low > 0"),
        (dict(low=0.0, high=1.0, num=0), "num must be an int >= 1"),
    ],
    ids=["reversed", "log-at-zero", "no-points"],
)
def test_bad_ranges_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Range(**kwargs)


def test_grid_search_refuses_a_range_without_grid_points():
    space = SearchSpace(params={"alpha": Range(low=0.1, high=0.4)})
    with pytest.raises(ValueError, match="has no grid points: give it num="):
        grid_search(_bowl, space, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(budgets=(8, 8)), "strictly increasing budgets"),
        (dict(budgets=()), "strictly increasing budgets"),
        (dict(budgets=(0, 8)), "each budget as an int >= 1"),
        (dict(budgets=(2, 4), eta=1), "eta >= 2"),
        (dict(budgets=(2, 4), candidates="random"), "needs n_candidates"),
        (
            dict(budgets=(2, 4), candidates="random", n_candidates=99),
            "holds 36 distinct configurations",
        ),
    ],
    ids=["flat", "none", "zero", "eta", "no-count", "too-many"],
)
def test_successive_halving_refuses_bad_settings(kwargs, match):
    fixed = SearchSpace(params={"kp": (0.5, 1.0, 1.5), "alpha": tuple(range(1, 13))})
    with pytest.raises(ValueError, match=match):
        successive_halving(_bowl, fixed, **kwargs)


def test_metrics_without_a_score_name_the_keys_received():
    space = SearchSpace(params={"alpha": (0.1,)})
    with pytest.raises(ValueError, match=r"no 'score': received keys \['ppl'\]"):
        grid_search(lambda c, b: {"ppl": 6.0}, space, 8)
    with pytest.raises(TypeError, match="return a mapping"):
        grid_search(lambda c, b: 0.5, space, 8)


# steering


def test_apply_config_changes_only_the_parameters_given():
    base = Steering(
        errors=torch.randn(2, 8),
        layers=(0, 1),
        gains=Gains(kp=0.9, integral_bound=2.0),
        alpha=0.1,
    )
    tuned = apply_config(base, {"ki": 0.02, "alpha": 0.3})
    assert tuned.gains == Gains(kp=0.9, ki=0.02, integral_bound=2.0)
    assert tuned.alpha == 0.3 and base.alpha == 0.1
    with pytest.raises(ValueError, match="Unknown steering parameters \\['gain'\\]"):
        apply_config(base, {"gain": 1.0})


class _CountingScorer:
    def __init__(self):
        self.seen = []

    def positive(self, texts):
        self.seen.append(len(texts))
        return [i % 2 == 0 for i in range(len(texts))]


def test_generation_evaluator_uses_the_first_budget_prompts(tiny_bridge):
    steering = Steering(
        errors=torch.randn(1, 32, generator=torch.Generator().manual_seed(0)),
        layers=(1,),
    )
    scorer = _CountingScorer()
    evaluate = GenerationEvaluator(
        tiny_bridge, steering, ["ab", "cd", "ef"], scorer=scorer, max_new_tokens=3
    )
    off = evaluate({"alpha": 0.0}, 2)
    assert off == evaluate.unsteered(2)  # alpha 0: the same seeded samples
    assert off["score"] == 0.5 and scorer.seen == [2, 2]
    assert (
        evaluate({"alpha": 8.0}, 3)["perplexity"] != evaluate.unsteered(3)["perplexity"]
    )
    with pytest.raises(ValueError, match="Budget 4 exceeds the 3 validation"):
        evaluate({"alpha": 1.0}, 4)
