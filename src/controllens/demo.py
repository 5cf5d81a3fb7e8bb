"""The main job: negative-to-positive sentiment steering of SmolLM2, P against PID.

Steps: measure the sentiment error signal r(k) on the SST-2 training sample;
pick P's strength and PID's gains on validation prompts (the most positive
continuations within a perplexity budget); then continue held-out negative
SST-2 dev prompts unsteered, with the chosen P and with the chosen PID, and
score them with a sentiment classifier independent of the steered model (an
embedding classifier fitted on the SST-2 training sample; VADER when the
encoder's package is missing) and with perplexity under the unsteered model.
"""

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from controllens.controllers import Gains
from controllens.data import load_labelled_tsv, sst2_prompts
from controllens.evaluate import (
    Scorer,
    continuation_perplexity,
    generate,
    scorer_accuracy,
    sentiment_scorer,
)
from controllens.steering import Steering
from controllens.vectors import contrastive_means, mean_activations

__all__ = ["DemoConfig", "default_data_dir", "run_demo"]

logger = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """``$CONTROLLENS_DATA``, else ``../shared/data`` beside the checkout.

    Examples:
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"CONTROLLENS_DATA": "~/corpora"}):
        ...     default_data_dir() == Path.home() / "corpora"
        True
    """
    if os.environ.get("CONTROLLENS_DATA"):
        return Path(os.environ["CONTROLLENS_DATA"]).expanduser()
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (candidate / "sst2").is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of :func:`run_demo`; the defaults finish in minutes on 2 cores.

    Examples:
        >>> config = DemoConfig(n_val=4, n_test=8, max_new_tokens=10)
        >>> config.n_val + config.n_test  # SST-2 dev prompts used
        12
        >>> config.data_dir == default_data_dir(), config.out_dir.as_posix()
        (True, 'runs/demo')
    """

    model: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    out_dir: Path = Path("runs/demo")
    n_train: int = 200
    n_val: int = 24
    n_test: int = 60
    prompt_words: int = 5
    max_new_tokens: int = 20
    layers: tuple[int, ...] | None = None
    p_alphas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    pid_grid: tuple[tuple[float, float, float, float], ...] = (
        # (alpha, kp, ki, kd)
        (0.1, 1.0, 0.02, 0.5),
        (0.2, 1.0, 0.02, 0.5),
        (0.1, 1.0, 0.05, 1.0),
        (0.2, 1.0, 0.0, 1.0),
        (0.2, 0.5, 0.05, 1.0),
    )
    perplexity_budget: float = 1.5
    n_dynamics: int = 64
    seed: int = 0
    batch_size: int = 16


def _evaluate(
    model: Any,
    prompts: tuple[str, ...],
    steering: Steering | None,
    config: DemoConfig,
    scorer: Scorer,
) -> dict[str, Any]:
    continuations = generate(
        model,
        prompts,
        steering,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        seed=config.seed,
        progress=False,
    )
    perplexity = continuation_perplexity(model, continuations)
    positive = scorer.positive(continuations.texts)
    return {
        "positive_rate": sum(positive) / len(positive),
        "perplexity": float(perplexity.mean()),
        "texts": list(continuations.texts),
    }


def _select(results: list[dict[str, Any]], limit: float) -> dict[str, Any]:
    """The most positive result within the perplexity limit (else the least
    perplexing one)."""
    within = [r for r in results if r["perplexity"] <= limit]
    if not within:
        return min(results, key=lambda r: r["perplexity"])
    return max(within, key=lambda r: (r["positive_rate"], -r["perplexity"]))


def _error_per_layer(
    model: Any, means: Any, steering: Steering | None, texts: tuple[str, ...]
) -> list[float]:
    """Norm of e(k) = mu_target(k) - mu_steered-source(k) at every layer."""
    context = steering.apply(model) if steering is not None else nullcontext()
    with context:
        steered = mean_activations(model, texts, layers=means.layers, progress=False)
    return (means.mu_target - steered).norm(dim=-1).tolist()


def run_demo(
    config: DemoConfig, *, say: Callable[[str], None] = logger.info
) -> dict[str, Any]:
    """Run the main job and write ``results.json`` and ``layers.png``.

    Args:
        config: What to run.
        say: Where progress lines go (the CLI prints them).

    Returns:
        The results, as also written to ``config.out_dir / "results.json"``.

    Examples:
        Not run here: it loads the embedded SmolLM2 and generates for minutes.

        >>> config = DemoConfig(n_train=50, n_val=8, n_test=16)
        >>> results = run_demo(config)  # doctest: +SKIP
        >>> sorted(results["test"])  # doctest: +SKIP
        ['P', 'PID', 'unsteered']
    """
    from controllens.models import load_bridge

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    sst2 = config.data_dir / "sst2"
    say(f"loading the model ({config.model or 'embedded SmolLM2-135M-Instruct'})")
    model = load_bridge(config.model)

    scorer = sentiment_scorer(sst2 / "train_sample.tsv", progress=False)
    accuracy = scorer_accuracy(scorer, sst2 / "dev.tsv")
    say(f"sentiment scorer: {scorer.name}, accuracy on SST-2 dev {accuracy:.3f}")

    data = load_labelled_tsv(sst2 / "train_sample.tsv", limit=config.n_train)
    say(f"measuring r(k) on {len(data.target)} + {len(data.source)} SST-2 sentences")
    means = contrastive_means(
        model, data, layers=config.layers, batch_size=config.batch_size
    )

    prompts = sst2_prompts(
        sst2 / "dev.tsv", config.n_val + config.n_test, config.prompt_words
    )
    val, test = prompts[: config.n_val], prompts[config.n_val :]

    say(f"tuning on {len(val)} validation prompts")
    baseline = _evaluate(model, val, None, config, scorer)
    limit = config.perplexity_budget * baseline["perplexity"]
    candidates: dict[str, list[dict[str, Any]]] = {"P": [], "PID": []}
    settings = [("P", alpha, Gains.p(1.0)) for alpha in config.p_alphas] + [
        ("PID", alpha, Gains.pid(kp, ki, kd)) for alpha, kp, ki, kd in config.pid_grid
    ]
    for family, alpha, gains in settings:
        steering = Steering.from_means(means, gains=gains, alpha=alpha)
        result = _evaluate(model, val, steering, config, scorer)
        result.update(alpha=alpha, gains=asdict(gains))
        candidates[family].append(result)
        say(
            f"  {family:3s} alpha={alpha:<4} kp={gains.kp} ki={gains.ki} "
            f"kd={gains.kd}: positive {result['positive_rate']:.2f}, "
            f"perplexity {result['perplexity']:.2f}"
        )
    chosen = {family: _select(rows, limit) for family, rows in candidates.items()}

    say(f"evaluating on {len(test)} held-out prompts")
    steerings = {"unsteered": None}
    for family, result in chosen.items():
        steerings[family] = Steering.from_means(
            means, gains=Gains(**result["gains"]), alpha=result["alpha"]
        )
    final = {
        name: _evaluate(model, test, steering, config, scorer)
        for name, steering in steerings.items()
    }

    say("measuring the remaining error per layer")
    dynamics_texts = data.source[: config.n_dynamics]
    dynamics = {
        name: {
            "error_norm": _error_per_layer(model, means, steering, dynamics_texts),
            "push_norm": (
                [0.0] * len(means.layers)
                if steering is None
                else steering.control().norm(dim=-1).tolist()
            ),
        }
        for name, steering in steerings.items()
    }

    results = {
        "model": means.model_name,
        "layers": list(means.layers),
        "scorer": {"name": scorer.name, "sst2_dev_accuracy": accuracy},
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()
        },
        "validation": {"unsteered": baseline, **candidates},
        "chosen": {
            f: {"alpha": r["alpha"], "gains": r["gains"]} for f, r in chosen.items()
        },
        "test": final,
        "prompts": list(test),
        "dynamics": dynamics,
        "seconds": time.perf_counter() - started,
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_layers(results, config.out_dir / "layers.png")
    return results


def plot_layers(results: dict[str, Any], path: Path) -> None:
    """Steering push and remaining error per layer, unsteered, P and PID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results["layers"]
    figure, (push, error) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curves in results["dynamics"].items():
        if name != "unsteered":
            push.plot(layers, curves["push_norm"], marker=".", label=name)
        error.plot(layers, curves["error_norm"], marker=".", label=name)
    push.set(xlabel="layer k", ylabel="||alpha u(k)||", title="steering push")
    error.set(
        xlabel="layer k",
        ylabel="||mu_target(k) - mu_source(k)||",
        title="remaining error on source texts",
    )
    for axis in (push, error):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
