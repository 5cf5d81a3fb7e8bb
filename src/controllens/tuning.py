"""Searching controller gains and steering strength on validation prompts.

The machinery is model-agnostic: the caller supplies
``evaluate(config, budget) -> metrics``, where ``config`` maps parameter names
(``kp``, ``ki``, ``kd``, ``alpha``, ...) to values and ``budget`` is how much
validation data to spend (typically a number of prompts). Metrics are a
mapping of floats with at least ``score`` (for example the share of positive
continuations) and, for a fluency budget, ``perplexity``.
:class:`GenerationEvaluator` is such a function for a TransformerLens model.

Three searches share one result type: :func:`grid_search` (every grid point at
one budget), :func:`successive_halving` (many candidates on a small budget, the
best fraction promoted to larger ones; Jamieson and Talwalkar, AISTATS 2016)
and :func:`bayesian_search` (optuna's TPE sampler when the optional ``optuna``
package is installed, seeded random search otherwise). Every search is
deterministic given its seed; the seed is stored with the trials.
"""

import itertools
import json
import logging
import math
import numbers
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from controllens.controllers import Gains
from controllens.steering import Steering

__all__ = [
    "STEERING_PARAMETERS",
    "FluencyBudget",
    "GenerationEvaluator",
    "Range",
    "SearchResult",
    "SearchSpace",
    "Trial",
    "apply_config",
    "bayesian_search",
    "grid_search",
    "markdown_table",
    "pareto_front",
    "plot_pareto",
    "successive_halving",
]

logger = logging.getLogger(__name__)

#: Parameters a steering search knows, in the order tables show them.
STEERING_PARAMETERS = ("kp", "ki", "kd", "alpha", "integral_bound")
# gains are non-negative (Gains checks the same); the anti-windup bound positive
_NON_NEGATIVE = ("kp", "ki", "kd")
_POSITIVE = ("integral_bound",)

Config = dict[str, float]
Metrics = Mapping[str, float]
Evaluate = Callable[[Config, int], Metrics]
Objective = Callable[[Metrics], float]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected a number for {what}, received {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"Expected a finite number for {what}, received {value}.")
    return float(value)


def _check_value(name: str, value: float, what: str) -> None:
    if name in _NON_NEGATIVE and value < 0:
        raise ValueError(
            f"Gain {name} must be >= 0, received {value} in {what}. Steer the "
            "other way by swapping target and source, or search a negative alpha."
        )
    if name in _POSITIVE and value <= 0:
        raise ValueError(
            f"{name} must be > 0, received {value} in {what}; leave the parameter "
            "out of the space for no bound."
        )


@dataclass(frozen=True, kw_only=True)
class Range:
    """A continuous interval of one parameter, for sampling.

    Attributes:
        low: Smallest value.
        high: Largest value (>= ``low``).
        log: Sample uniformly in log space (needs ``low > 0``).
        num: Points to place on the interval for a grid search (evenly, or
            evenly in log space); None: the range cannot be grid searched.

    Examples:
        >>> Range(low=0.05, high=0.4, log=True, num=4).grid_values()
        (0.05, 0.1, 0.2, 0.4)
    """

    low: float
    high: float
    log: bool = False
    num: int | None = None

    def __post_init__(self) -> None:
        low = _number(self.low, "Range.low")
        high = _number(self.high, "Range.high")
        if high < low:
            raise ValueError(
                f"Expected Range low <= high, received low={low}, high={high}."
            )
        if self.log and low <= 0:
            raise ValueError(
                f"A log Range needs low > 0, received low={low}; use log=False "
                "or a positive lower end."
            )
        if self.num is not None and (
            isinstance(self.num, bool) or not isinstance(self.num, int) or self.num < 1
        ):
            raise ValueError(f"Range.num must be an int >= 1, received {self.num!r}.")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def grid_values(self) -> tuple[float, ...]:
        """``num`` points from ``low`` to ``high`` (both ends included)."""
        if self.num is None:
            raise ValueError(
                f"{self} has no grid points: give it num=..., or sample it with "
                "successive_halving(candidates='random') or bayesian_search."
            )
        if self.num == 1 or self.low == self.high:
            return (self.low,)
        steps = range(self.num)
        if self.log:
            ratio = math.log(self.high / self.low) / (self.num - 1)
            values = [self.low * math.exp(ratio * i) for i in steps]
        else:
            width = (self.high - self.low) / (self.num - 1)
            values = [self.low + width * i for i in steps]
        # the ends exactly, and no float noise such as 0.30000000000000004
        values[0], values[-1] = self.low, self.high
        return tuple(float(f"{v:.12g}") for v in values)

    def sample(self, rng: random.Random) -> float:
        """One value drawn from the interval."""
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Which parameters to search, each over grid values or a :class:`Range`.

    A parameter with one value is pinned: it is recorded in every trial's
    config (so tables and plots know a trial's controller family) without being
    searched.

    Attributes:
        params: Parameter name -> a sequence of values, or a :class:`Range`.
            Names must be among :data:`STEERING_PARAMETERS` or ``extra_names``.
        extra_names: Other parameter names the caller's ``evaluate`` knows;
            their values only need to be finite.

    Examples:
        >>> space = SearchSpace(params={"kp": (0.5, 1.0), "alpha": (0.1, 0.2),
        ...                             "ki": (0.02,)})
        >>> space.size
        4
        >>> space.grid()[:2]
        [{'kp': 0.5, 'alpha': 0.1, 'ki': 0.02}, {'kp': 0.5, 'alpha': 0.2, 'ki': 0.02}]
        >>> SearchSpace(params={"kq": (1.0,)})
        Traceback (most recent call last):
        ...
        ValueError: Unknown parameter 'kq'; valid choices: 'kp', 'ki', 'kd', \
'alpha', 'integral_bound'. Pass extra_names=('kq',) if your evaluate knows it.
    """

    params: Mapping[str, Sequence[float] | Range]
    extra_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.params, Mapping):
            raise TypeError(
                "Expected params as a mapping of parameter name -> values or "
                f"Range, received {type(self.params).__name__}."
            )
        valid = STEERING_PARAMETERS + tuple(self.extra_names)
        if not self.params:
            raise ValueError(
                "The search space is empty: expected at least one parameter "
                f"among {', '.join(map(repr, valid))}, received none. Example: "
                "SearchSpace(params={'alpha': (0.1, 0.2)})."
            )
        checked: dict[str, tuple[float, ...] | Range] = {}
        for name, values in self.params.items():
            if name not in valid:
                raise ValueError(
                    f"Unknown parameter {name!r}; valid choices: "
                    f"{', '.join(map(repr, valid))}. Pass extra_names=({name!r},) "
                    "if your evaluate knows it."
                )
            checked[name] = self._check(name, values)
        object.__setattr__(self, "params", checked)
        object.__setattr__(self, "extra_names", tuple(self.extra_names))

    @staticmethod
    def _check(name: str, values: Any) -> tuple[float, ...] | Range:
        if isinstance(values, Range):
            for end in (values.low, values.high):
                _check_value(name, end, f"the range of {name}")
            return values
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise TypeError(
                f"Expected a sequence of values or a Range for {name}, received "
                f"{values!r}."
            )
        if not values:
            raise ValueError(
                f"Parameter {name} has no values: expected at least one; drop it "
                "from the space to keep the evaluator's default."
            )
        numbers_ = tuple(_number(v, f"the values of {name}") for v in values)
        for value in numbers_:
            _check_value(name, value, f"the values of {name}")
        if len(set(numbers_)) != len(numbers_):
            raise ValueError(
                f"The values of {name} repeat: received {numbers_}; give each "
                "value once."
            )
        return numbers_

    @property
    def names(self) -> tuple[str, ...]:
        """The searched parameter names, in the order given."""
        return tuple(self.params)

    @property
    def size(self) -> int | None:
        """Number of grid points; None when a range has no ``num``."""
        sizes = [
            len(v) if not isinstance(v, Range) else v.num for v in self.params.values()
        ]
        return None if None in sizes else math.prod(sizes)

    def grid(self) -> list[Config]:
        """Every grid point, the last parameter varying fastest."""
        axes = [
            v.grid_values() if isinstance(v, Range) else v for v in self.params.values()
        ]
        return [
            dict(zip(self.names, point, strict=True))
            for point in itertools.product(*axes)
        ]

    def sample(self, n: int, seed: int) -> list[Config]:
        """``n`` configurations drawn at random, deterministic given ``seed``.

        A space of value lists only is sampled without replacement from its
        grid, so no configuration is evaluated twice.
        """
        n = _count(n, "n")
        rng = random.Random(seed)
        if not any(isinstance(v, Range) for v in self.params.values()):
            grid = self.grid()
            if n > len(grid):
                raise ValueError(
                    f"The space holds {len(grid)} distinct configurations, "
                    f"received n={n}; ask for at most {len(grid)} or give a "
                    "parameter a Range."
                )
            picked = sorted(rng.sample(range(len(grid)), n))
            return [grid[i] for i in picked]
        return [
            {
                name: v.sample(rng) if isinstance(v, Range) else rng.choice(v)
                for name, v in self.params.items()
            }
            for _ in range(n)
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (ranges as dicts, values as lists)."""
        return {
            name: asdict(v) if isinstance(v, Range) else list(v)
            for name, v in self.params.items()
        }


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {what} as an int >= 1, received {value!r}.")
    return value


@dataclass(frozen=True, kw_only=True)
class FluencyBudget:
    """Objective: the concept score, penalised beyond a perplexity budget.

    Within the budget (perplexity <= ``ratio`` x the unsteered perplexity) the
    objective is the score itself; beyond it, ``penalty`` is subtracted for
    every 100% the perplexity exceeds the limit, so a setting slightly over the
    budget can still beat a much weaker one within it, and a broken one cannot.

    Attributes:
        baseline: Perplexity of the unsteered model on the same prompts.
        ratio: The budget, as a multiple of ``baseline``.
        penalty: Score lost per 100% of perplexity beyond the limit.
        score_key: Metric to maximise.
        perplexity_key: Metric the budget applies to.

    Examples:
        >>> objective = FluencyBudget(baseline=6.0, ratio=1.5)
        >>> objective({"score": 0.8, "perplexity": 9.0})  # at the limit, 9.0
        0.8
        >>> round(objective({"score": 0.9, "perplexity": 9.9}), 3)  # 10% over
        0.5
        >>> objective.feasible({"score": 0.9, "perplexity": 9.9})
        False
    """

    baseline: float
    ratio: float = 1.5
    penalty: float = 4.0
    score_key: str = "score"
    perplexity_key: str = "perplexity"

    def __post_init__(self) -> None:
        for name in ("baseline", "ratio"):
            value = _number(getattr(self, name), f"FluencyBudget.{name}")
            if value <= 0:
                raise ValueError(f"FluencyBudget.{name} must be > 0, received {value}.")
            object.__setattr__(self, name, value)
        penalty = _number(self.penalty, "FluencyBudget.penalty")
        if penalty < 0:
            raise ValueError(f"FluencyBudget.penalty must be >= 0, received {penalty}.")
        object.__setattr__(self, "penalty", penalty)

    @property
    def limit(self) -> float:
        """The largest perplexity within the budget."""
        return self.ratio * self.baseline

    def feasible(self, metrics: Metrics) -> bool:
        """Whether ``metrics`` stay within the perplexity budget."""
        return _metric(metrics, self.perplexity_key) <= self.limit

    def __call__(self, metrics: Metrics) -> float:
        score = _metric(metrics, self.score_key)
        excess = _metric(metrics, self.perplexity_key) / self.limit - 1
        return score - self.penalty * max(excess, 0.0)


def _metric(metrics: Metrics, key: str) -> float:
    if key not in metrics:
        raise ValueError(
            f"The metrics have no {key!r}: received keys {sorted(metrics)}. Return "
            f"{key!r} from evaluate, or pass an objective that uses the keys "
            "evaluate returns."
        )
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected metric {key!r} as a number, received {value!r}.")
    return float(value)


def _score(metrics: Metrics) -> float:
    return _metric(metrics, "score")


@dataclass(frozen=True, kw_only=True)
class Trial:
    """One evaluation: a configuration at a budget, and what it measured.

    Attributes:
        config: Parameter values evaluated.
        budget: The budget it was evaluated with (validation prompts).
        metrics: What ``evaluate`` returned.
        objective: The objective's value (higher is better).
        candidate: Index of the configuration among the search's candidates;
            the same configuration keeps its index across halving rounds.
        rung: Round of successive halving (0 for the other searches).
        seconds: Wall time of the evaluation.

    Examples:
        >>> trial = Trial(config={"kp": 1.0, "ki": 0.02}, budget=8,
        ...               metrics={"score": 0.5}, objective=0.5)
        >>> trial.family
        'PI'
    """

    config: Config
    budget: int
    metrics: dict[str, float]
    objective: float
    candidate: int = 0
    rung: int = 0
    seconds: float = 0.0

    @property
    def family(self) -> str:
        """``"P"``, ``"PI"``, ``"PD"`` or ``"PID"`` from the gains in ``config``.

        Absent gains count as ``Gains``' defaults (``ki = kd = 0``): pin gains
        as one-value parameters of the space so that each trial records them.
        """
        config = self.config
        return (
            "P" + ("I" if config.get("ki") else "") + ("D" if config.get("kd") else "")
        )


def _rank(trial: Trial) -> float:
    # NaN (a failed or diverging evaluation) ranks below everything
    return -math.inf if math.isnan(trial.objective) else trial.objective


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """The trials of one search, with what is needed to reproduce it.

    Attributes:
        method: ``"grid"``, ``"halving"``, ``"bayesian"`` or ``"random"``.
        seed: The search's seed (None for a grid search, which draws nothing).
        space: The search space, as :meth:`SearchSpace.to_dict` gives it.
        objective: A description of the objective.
        trials: Every evaluation, in the order run.

    Examples:
        >>> space = SearchSpace(params={"alpha": (0.1, 0.2, 0.3)})
        >>> result = grid_search(lambda c, b: {"score": c["alpha"]}, space, 4)
        >>> result.best.config
        {'alpha': 0.3}
        >>> SearchResult.from_json(result.to_json()) == result
        True
    """

    method: str
    seed: int | None
    space: dict[str, Any]
    objective: str
    trials: tuple[Trial, ...] = field(default=())

    @property
    def final_trials(self) -> tuple[Trial, ...]:
        """The trials run at the largest budget of the search."""
        if not self.trials:
            return ()
        top = max(trial.budget for trial in self.trials)
        return tuple(trial for trial in self.trials if trial.budget == top)

    @property
    def best(self) -> Trial:
        """The trial with the highest objective at the largest budget (the
        earliest one on a tie)."""
        final = self.final_trials
        if not final:
            raise ValueError("The search ran no trial, so it has no best one.")
        return max(final, key=_rank)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchResult":
        """The inverse of :meth:`to_dict`."""
        trials = tuple(Trial(**trial) for trial in data["trials"])
        return cls(**{**data, "trials": trials})

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text, also written to ``path`` when given.

        Non-finite numbers are written as ``NaN`` / ``Infinity``, as Python's
        ``json`` module reads them.
        """
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "SearchResult":
        """Read a result from JSON text or from a file written by :meth:`to_json`."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def _describe(objective: Objective | None) -> str:
    if objective is None:
        return "score"
    return getattr(objective, "__name__", None) or repr(objective)


class _Runner:
    """Calls ``evaluate`` and turns what it returns into trials."""

    def __init__(
        self,
        evaluate: Evaluate,
        objective: Objective | None,
        callback: Callable[[Trial], None] | None,
    ) -> None:
        if not callable(evaluate):
            raise TypeError(
                "Expected evaluate as a function (config, budget) -> metrics, "
                f"received {type(evaluate).__name__}."
            )
        self.evaluate = evaluate
        self.objective = objective or _score
        self.callback = callback
        self.trials: list[Trial] = []

    def __call__(
        self, config: Config, budget: int, *, candidate: int, rung: int = 0
    ) -> Trial:
        started = time.perf_counter()
        metrics = self.evaluate(dict(config), budget)
        seconds = time.perf_counter() - started
        if not isinstance(metrics, Mapping):
            raise TypeError(
                "Expected evaluate to return a mapping of metric name -> number, "
                f"received {type(metrics).__name__}."
            )
        metrics = {key: _metric(metrics, key) for key in metrics}
        trial = Trial(
            config=dict(config),
            budget=budget,
            metrics=metrics,
            objective=float(self.objective(metrics)),
            candidate=candidate,
            rung=rung,
            seconds=seconds,
        )
        logger.info(
            "trial %d (rung %d, budget %d) %s: %s -> %.4g",
            candidate,
            rung,
            budget,
            config,
            metrics,
            trial.objective,
        )
        self.trials.append(trial)
        if self.callback is not None:
            self.callback(trial)
        return trial


def grid_search(
    evaluate: Evaluate,
    space: SearchSpace,
    budget: int,
    *,
    objective: Objective | None = None,
    callback: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Evaluate every grid point of ``space`` at one budget.

    Args:
        evaluate: ``(config, budget) -> metrics``.
        space: The values to try; every :class:`Range` needs ``num``.
        budget: The budget for every evaluation.
        objective: ``metrics -> float`` to maximise; None: ``metrics["score"]``.
            See :class:`FluencyBudget`.
        callback: Called with each :class:`Trial` as it finishes.

    Returns:
        The trials, in grid order.

    Examples:
        >>> def evaluate(config, budget):  # best at kp=1, alpha=0.2
        ...     return {"score": 1 - (config["kp"] - 1) ** 2
        ...                        - (config["alpha"] - 0.2) ** 2}
        >>> space = SearchSpace(params={"kp": (0.5, 1.0, 1.5),
        ...                             "alpha": Range(low=0.1, high=0.3, num=3)})
        >>> result = grid_search(evaluate, space, budget=8)
        >>> len(result.trials), result.best.config
        (9, {'kp': 1.0, 'alpha': 0.2})
    """
    budget = _count(budget, "budget")
    run = _Runner(evaluate, objective, callback)
    for index, config in enumerate(space.grid()):
        run(config, budget, candidate=index)
    return SearchResult(
        method="grid",
        seed=None,
        space=space.to_dict(),
        objective=_describe(objective),
        trials=tuple(run.trials),
    )


def successive_halving(
    evaluate: Evaluate,
    space: SearchSpace,
    *,
    budgets: Sequence[int],
    candidates: Literal["random", "grid"] = "random",
    n_candidates: int | None = None,
    eta: int = 3,
    seed: int = 0,
    objective: Objective | None = None,
    callback: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Successive halving: cheap evaluations first, more budget for the best.

    All candidates are evaluated at ``budgets[0]``; the best ``1/eta`` of them
    (at least one) move on to ``budgets[1]``, and so on. Rank ties go to the
    earlier candidate. Let ``evaluate`` use the *first* ``budget`` validation
    prompts, so that each round's prompts contain the previous round's.

    Args:
        evaluate: ``(config, budget) -> metrics``.
        space: Where candidates come from.
        budgets: Strictly increasing budgets, one per round.
        candidates: ``"random"``: ``n_candidates`` draws from the space;
            ``"grid"``: the grid points (a seeded random subset of
            ``n_candidates`` of them when given).
        n_candidates: Number of candidates (required for ``"random"``).
        eta: Keep the best ``len(round) // eta`` candidates after each round.
        seed: Seed of the candidate draw.
        objective: ``metrics -> float`` to maximise; None: ``metrics["score"]``.
        callback: Called with each :class:`Trial` as it finishes.

    Returns:
        Every trial, round after round; :attr:`SearchResult.best` is the best
        candidate of the last round.

    Examples:
        >>> space = SearchSpace(params={"alpha": Range(low=0.0, high=1.0, num=9)})
        >>> result = successive_halving(
        ...     lambda config, budget: {"score": -abs(config["alpha"] - 0.6)},
        ...     space, budgets=(4, 12, 36), candidates="grid")
        >>> [len([t for t in result.trials if t.rung == r]) for r in range(3)]
        [9, 3, 1]
        >>> result.best.config, result.best.budget
        ({'alpha': 0.625}, 36)
    """
    budgets = tuple(_count(b, "each budget") for b in budgets)
    if not budgets or any(a >= b for a, b in itertools.pairwise(budgets)):
        raise ValueError(
            f"Expected strictly increasing budgets, one per round, received "
            f"{budgets}. Example: budgets=(8, 24, 72)."
        )
    eta = _count(eta, "eta")
    if eta < 2:
        raise ValueError(f"Expected eta >= 2 (keep 1/eta per round), received {eta}.")
    if candidates == "random":
        if n_candidates is None:
            raise ValueError(
                "candidates='random' needs n_candidates, received None; for "
                "example n_candidates=27 with eta=3."
            )
        configs = space.sample(n_candidates, seed)
    elif candidates == "grid":
        configs = space.grid()
        if n_candidates is not None and _count(n_candidates, "n") < len(configs):
            picked = sorted(
                random.Random(seed).sample(range(len(configs)), n_candidates)
            )
            configs = [configs[i] for i in picked]
    else:
        raise ValueError(
            f"Unknown candidates {candidates!r}; valid choices: 'random', 'grid'."
        )

    run = _Runner(evaluate, objective, callback)
    alive = list(range(len(configs)))
    for rung, budget in enumerate(budgets):
        results = [run(configs[i], budget, candidate=i, rung=rung) for i in alive]
        ranked = sorted(results, key=lambda t: (-_rank(t), t.candidate))
        keep = max(1, len(alive) // eta)
        alive = sorted(trial.candidate for trial in ranked[:keep])
    return SearchResult(
        method="halving",
        seed=seed,
        space=space.to_dict(),
        objective=_describe(objective),
        trials=tuple(run.trials),
    )


def bayesian_search(
    evaluate: Evaluate,
    space: SearchSpace,
    budget: int,
    *,
    n_trials: int,
    n_startup: int = 5,
    seed: int = 0,
    objective: Objective | None = None,
    callback: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Bayesian optimisation with optuna's TPE sampler, if optuna is installed.

    Without optuna (an optional extra: ``pip install "controllens[tune]"``) it
    warns and falls back to seeded random search over the same space, recorded
    as ``method="random"``. Value lists are searched as categories, ranges as
    continuous (log) intervals.

    Args:
        evaluate: ``(config, budget) -> metrics``.
        space: The search space.
        budget: The budget for every evaluation.
        n_trials: Number of evaluations.
        n_startup: Random trials before TPE starts modelling.
        seed: Seed of the sampler.
        objective: ``metrics -> float`` to maximise; None: ``metrics["score"]``.
        callback: Called with each :class:`Trial` as it finishes.

    Returns:
        The trials in the order run.

    Examples:
        >>> space = SearchSpace(params={"kp": Range(low=0.0, high=2.0),
        ...                             "alpha": (0.1, 0.2, 0.4)})
        >>> def evaluate(config, budget):
        ...     return {"score": -abs(config["kp"] - 1) - abs(config["alpha"] - 0.2)}
        >>> result = bayesian_search(evaluate, space, 8, n_trials=30, seed=1)
        >>> result.method in {"bayesian", "random"}, len(result.trials)
        (True, 30)
        >>> result.best.objective > -0.2
        True
    """
    budget = _count(budget, "budget")
    n_trials = _count(n_trials, "n_trials")
    run = _Runner(evaluate, objective, callback)
    try:
        import optuna
    except ImportError:
        warnings.warn(
            "optuna is not installed: bayesian_search falls back to seeded random "
            'search. Install it with `pip install "controllens[tune]"`.',
            stacklevel=2,
        )
        optuna = None

    if optuna is None:
        for index, config in enumerate(space.sample(n_trials, seed)):
            run(config, budget, candidate=index)
    else:
        _optuna_search(optuna, run, space, budget, n_trials, n_startup, seed)
    return SearchResult(
        method="random" if optuna is None else "bayesian",
        seed=seed,
        space=space.to_dict(),
        objective=_describe(objective),
        trials=tuple(run.trials),
    )


def _optuna_search(
    optuna: Any,
    run: _Runner,
    space: SearchSpace,
    budget: int,
    n_trials: int,
    n_startup: int,
    seed: int,
) -> None:
    def suggest(trial: Any) -> float:
        config = {}
        for name, values in space.params.items():
            if isinstance(values, Range):
                config[name] = trial.suggest_float(
                    name, values.low, values.high, log=values.log
                )
            else:
                config[name] = float(trial.suggest_categorical(name, list(values)))
        result = run(config, budget, candidate=trial.number)
        return -math.inf if math.isnan(result.objective) else result.objective

    sampler = optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=_count(n_startup, "n_startup")
    )
    # optuna logs every trial at INFO; ours are logged already
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(suggest, n_trials=n_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _coordinates(point: Any, score: str, perplexity: str) -> tuple[float, float]:
    if isinstance(point, Trial):
        point = point.metrics
    if isinstance(point, Mapping):
        return _metric(point, score), _metric(point, perplexity)
    if isinstance(point, Sequence) and len(point) == 2:
        return _number(point[0], "a score"), _number(point[1], "a perplexity")
    raise TypeError(
        "Expected Trials, metric mappings or (score, perplexity) pairs, received "
        f"{point!r}."
    )


def pareto_front(
    points: Sequence[Any], *, score: str = "score", perplexity: str = "perplexity"
) -> list[Any]:
    """The points no other point beats on both score (up) and perplexity (down).

    A point is dominated when another has a score at least as high and a
    perplexity at least as low, and differs in one of them. Points that tie
    exactly are all kept; points with a NaN score or perplexity (a failed
    evaluation) are left out.

    Args:
        points: :class:`Trial` objects, metric mappings or
            ``(score, perplexity)`` pairs.
        score: Metric key of the score (for Trials and mappings).
        perplexity: Metric key of the perplexity.

    Returns:
        The non-dominated points, as given, by increasing perplexity (then
        decreasing score, then input order).

    Examples:
        >>> pareto_front([(0.5, 6.0), (0.7, 8.0), (0.4, 7.0), (0.7, 9.0),
        ...               (0.5, 6.0)])
        [(0.5, 6.0), (0.5, 6.0), (0.7, 8.0)]
    """
    coordinates = [_coordinates(p, score, perplexity) for p in points]
    order = sorted(
        (
            i
            for i, (s, p) in enumerate(coordinates)
            if not (math.isnan(s) or math.isnan(p))
        ),
        key=lambda i: (coordinates[i][1], -coordinates[i][0], i),
    )
    front = []
    best_score = -math.inf
    best_at = None  # (score, perplexity) of the point that set best_score
    for i in order:
        s, p = coordinates[i]
        # sorted by perplexity, a point survives when it beats every score
        # seen so far, or exactly ties the point that set the record
        if s > best_score or (s, p) == best_at:
            front.append(points[i])
            if s > best_score:
                best_score, best_at = s, (s, p)
    return front


def _format(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(
    trials: Sequence[Trial],
    *,
    digits: int = 3,
    score: str = "score",
    perplexity: str = "perplexity",
) -> str:
    """A markdown table of trials: family, parameters, budget, metrics.

    When every trial has a score and a perplexity, a ``front`` column marks the
    trials on the Pareto front of their family at their budget.

    Examples:
        >>> trials = [Trial(config={"alpha": a}, budget=8, objective=s,
        ...                 metrics={"score": s, "perplexity": p})
        ...           for a, s, p in [(0.1, 0.5, 6.0), (0.2, 0.4, 7.0)]]
        >>> print(markdown_table(trials))
        | family | alpha | budget | score | perplexity | objective | front |
        |---|---|---|---|---|---|---|
        | P | 0.1 | 8 | 0.5 | 6 | 0.5 | yes |
        | P | 0.2 | 8 | 0.4 | 7 | 0.4 |  |
    """
    params = list(dict.fromkeys(k for t in trials for k in t.config))
    params.sort(
        key=lambda k: (
            STEERING_PARAMETERS.index(k)
            if k in STEERING_PARAMETERS
            else len(STEERING_PARAMETERS)
        )
    )
    metrics = list(dict.fromkeys(k for t in trials for k in t.metrics))
    with_front = all(score in t.metrics and perplexity in t.metrics for t in trials)
    on_front: set[int] = set()
    if with_front:
        groups: dict[tuple[str, int], list[Trial]] = {}
        for trial in trials:
            groups.setdefault((trial.family, trial.budget), []).append(trial)
        for group in groups.values():
            front = pareto_front(group, score=score, perplexity=perplexity)
            on_front.update(id(t) for t in front)

    header = ["family", *params, "budget", *metrics, "objective"]
    header += ["front"] if with_front else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in trials:
        row = [trial.family]
        row += [_format(trial.config.get(k, ""), digits) for k in params]
        row += [str(trial.budget)]
        row += [_format(trial.metrics.get(k, ""), digits) for k in metrics]
        row += [_format(trial.objective, digits)]
        row += (["yes" if id(trial) in on_front else ""]) if with_front else []
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_pareto(
    trials: Sequence[Trial] | Mapping[str, Sequence[Trial]],
    path: str | Path | None = None,
    *,
    baseline: float | None = None,
    limit: float | None = None,
    score: str = "score",
    perplexity: str = "perplexity",
    title: str | None = None,
) -> Any:
    """Score against perplexity, with one Pareto front per controller family.

    Args:
        trials: Trials grouped by :attr:`Trial.family`, or a mapping of label ->
            trials to group them yourself (for example one search per family).
        path: Where to save the figure (PNG, PDF, ...); None: do not save.
        baseline: Unsteered perplexity; when given, the x axis shows perplexity
            as a multiple of it.
        limit: Perplexity budget (in the units of the x axis) drawn as a
            vertical line.
        score: Metric key of the score.
        perplexity: Metric key of the perplexity.
        title: Figure title.

    Returns:
        The matplotlib ``Figure`` (drawn with the Agg canvas, outside pyplot,
        so nothing stays open).

    Examples:
        >>> trials = [Trial(config={"alpha": a, "ki": ki}, budget=8, objective=s,
        ...                 metrics={"score": s, "perplexity": p})
        ...           for a, ki, s, p in [(0.1, 0.0, 0.5, 6.0), (0.2, 0.0, 0.7, 8.0),
        ...                               (0.1, 0.02, 0.6, 7.0)]]
        >>> figure = plot_pareto(trials, baseline=5.0, limit=1.5)
        >>> figure.axes[0].get_legend_handles_labels()[1]
        ['P front', 'P trials', 'PI front', 'PI trials', 'budget']
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(trials, Mapping):
        groups = {str(label): list(group) for label, group in trials.items()}
    else:
        groups = {}
        for trial in trials:
            groups.setdefault(trial.family, []).append(trial)
    scale = 1.0
    if baseline is not None:
        scale = _number(baseline, "baseline")
        if scale <= 0:
            raise ValueError(
                f"Expected a positive baseline perplexity, received {scale}."
            )

    figure = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    for index, (label, group) in enumerate(sorted(groups.items())):
        color = f"C{index}"
        points = [_coordinates(t, score, perplexity) for t in group]
        front = pareto_front(points)
        axis.plot(
            [p / scale for _, p in front],
            [s for s, _ in front],
            color=color,
            marker="o",
            label=f"{label} front",
        )
        axis.scatter(
            [p / scale for _, p in points],
            [s for s, _ in points],
            color=color,
            alpha=0.3,
            label=f"{label} trials",
        )
    if limit is not None:
        axis.axvline(
            _number(limit, "limit"), color="grey", linestyle="--", label="budget"
        )
    axis.set(
        xlabel="perplexity / unsteered" if baseline is not None else "perplexity",
        ylabel=score,
        title=title or "score against fluency",
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def apply_config(steering: Steering, config: Mapping[str, float]) -> Steering:
    """A copy of ``steering`` with the gains and strength a config sets.

    Parameters absent from ``config`` keep the steering's values.

    Args:
        steering: A :class:`~controllens.steering.Steering`.
        config: Values of ``kp``, ``ki``, ``kd``, ``integral_bound``, ``alpha``.

    Examples:
        >>> import torch
        >>> base = Steering(errors=torch.randn(2, 8), layers=(0, 1),
        ...                 gains=Gains.p(1.0), alpha=0.1)
        >>> tuned = apply_config(base, {"ki": 0.02, "kd": 0.5, "alpha": 0.2})
        >>> tuned.gains.name, tuned.gains.kp, tuned.alpha
        ('PID', 1.0, 0.2)
    """
    unknown = sorted(set(config) - set(STEERING_PARAMETERS))
    if unknown:
        raise ValueError(
            f"Unknown steering parameters {unknown}; valid choices: "
            f"{', '.join(map(repr, STEERING_PARAMETERS))}. Handle other "
            "parameters in your own evaluate."
        )
    gains = steering.gains
    gains = Gains(
        kp=config.get("kp", gains.kp),
        ki=config.get("ki", gains.ki),
        kd=config.get("kd", gains.kd),
        integral_bound=config.get("integral_bound", gains.integral_bound),
    )
    return steering.replace(gains=gains, alpha=config.get("alpha", steering.alpha))


class GenerationEvaluator:
    """``evaluate(config, budget)`` by steered generation on validation prompts.

    Each call continues the first ``budget`` prompts with ``steering`` changed
    by the config (:func:`apply_config`), and returns the share of
    continuations the scorer calls positive (``score``) and their mean
    perplexity under the unsteered model (``perplexity``), and distinct-2
    of the continuations (``distinct_2``, repetition). Sampling is seeded,
    so every configuration draws from the same random stream.

    Args:
        model: A TransformerBridge (or HookedTransformer).
        steering: The steering whose gains and alpha the search changes.
        prompts: Validation prompts; a budget may not exceed their number.
        scorer: Anything with ``positive(texts) -> list[bool]``; None: VADER.
        **generate_kwargs: Passed to :func:`controllens.evaluate.generate`
            (``max_new_tokens``, ``seed``, ``temperature``, ``batch_size``).

    Examples:
        >>> import torch
        >>> from controllens.testing import tiny_bridge
        >>> model = tiny_bridge()
        >>> steering = Steering(errors=torch.randn(1, 32), layers=(1,))
        >>> evaluate = GenerationEvaluator(model, steering, ["ab", "cd", "ef"],
        ...                                max_new_tokens=3)
        >>> metrics = evaluate({"alpha": 2.0}, 2)
        >>> sorted(metrics), 0 <= metrics["score"] <= 1
        (['distinct_2', 'perplexity', 'score'], True)
        >>> sorted(evaluate.unsteered(2))
        ['distinct_2', 'perplexity', 'score']
    """

    def __init__(
        self,
        model: Any,
        steering: Steering,
        prompts: Sequence[str],
        *,
        scorer: Any | None = None,
        **generate_kwargs: Any,
    ) -> None:
        from controllens.evaluate import VaderScorer

        if not prompts:
            raise ValueError("Expected at least one validation prompt, received none.")
        self.model = model
        self.steering = steering
        self.prompts = tuple(prompts)
        self.scorer = scorer if scorer is not None else VaderScorer()
        self.generate_kwargs = {"progress": False, **generate_kwargs}

    def _measure(self, steering: Steering | None, budget: int) -> dict[str, float]:
        from controllens.evaluate import continuation_perplexity, distinct_n, generate

        budget = _count(budget, "budget")
        if budget > len(self.prompts):
            raise ValueError(
                f"Budget {budget} exceeds the {len(self.prompts)} validation "
                "prompts; give more prompts or a smaller budget."
            )
        prompts = self.prompts[:budget]
        out = generate(self.model, prompts, steering, **self.generate_kwargs)
        positive = self.scorer.positive(out.texts)
        perplexity = continuation_perplexity(self.model, out)
        return {
            "score": sum(positive) / len(positive),
            "perplexity": float(perplexity.mean()),
            "distinct_2": distinct_n(out.texts, 2),
        }

    def __call__(self, config: Mapping[str, float], budget: int) -> dict[str, float]:
        """Metrics of the steering a config gives, on ``budget`` prompts."""
        return self._measure(apply_config(self.steering, config), budget)

    def unsteered(self, budget: int) -> dict[str, float]:
        """Metrics of the unsteered model on the same prompts (for a baseline)."""
        return self._measure(None, budget)
