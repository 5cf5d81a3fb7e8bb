"""P against PI, PD and PID on SmolLM2: sentiment on SST-2, behaviour on CAA.

1. Sentiment. r(k) from SST-2 training sentences (all layers). Each controller
   family is tuned on validation prompts (negative SST-2 dev sentences cut to
   their first words) under one fluency budget (perplexity at most ``--budget``
   x the unsteered perplexity): P by a grid over alpha, PI, PD and PID by
   successive halving over alpha and their gains. The chosen settings are
   then evaluated on held-out test prompts with ``--seeds`` sampling seeds;
   the report gives the positive rate and perplexity per family (mean and
   spread over seeds) and each family's gain over P in percentage points,
   paired by seed, both against P's chosen setting and against P's front on
   the test prompts at the same perplexity (P run at ``--p-front`` alphas,
   interpolated). The validation trials give the Pareto fronts (table and
   plot).
2. Behaviour (CAA). Vectors measured on the answer letter of the generate
   files (refusal, sycophancy); the probability of the behaviour-matching
   letter on the test files, unsteered, with P and with PID, towards and away
   from the behaviour.

The test prompts are never used for tuning. Writes ``results.json``,
``pareto.png`` and ``pareto.md`` under ``--out``.

    .venv/bin/python benchmarks/pid_vs_p.py --threads 2
"""

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--budget", type=float, default=1.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--caa-items", type=int, default=200)
    parser.add_argument("--caa-alphas", type=float, nargs="+", default=[-0.15, 0.15])
    parser.add_argument("--skip-caa", action="store_true")
    parser.add_argument(
        "--p-front", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25]
    )
    parser.add_argument("--out", type=Path, default=Path("runs/pid_vs_p"))
    parser.add_argument(
        "--replot", action="store_true", help="redraw the figures from results.json"
    )
    args = parser.parse_args()
    if args.replot:
        from controllens.tuning import SearchResult, plot_pareto

        results = json.loads((args.out / "results.json").read_text())
        plot_test(results, args.out / "test.png")
        validation = results["validation"]
        plot_pareto(
            {
                family: list(SearchResult.from_dict(search).trials)
                for family, search in validation["searches"].items()
            },
            args.out / "pareto.png",
            baseline=validation["unsteered"]["perplexity"],
            limit=float(results["settings"]["budget"]),
            title="SmolLM2, SST-2 validation prompts (all rungs)",
        )
        return
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from controllens import Gains, Steering, contrastive_means, load_bridge
    from controllens.data import load_labelled_tsv, sst2_prompts
    from controllens.evaluate import scorer_accuracy
    from controllens.tuning import (
        FluencyBudget,
        GenerationEvaluator,
        Range,
        SearchSpace,
        grid_search,
        markdown_table,
        plot_pareto,
        successive_halving,
    )

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_bridge()
    sst2 = args.data / "sst2"
    scorer, scorer_name = _scorer(sst2)
    accuracy = scorer_accuracy(scorer, sst2 / "dev.tsv")
    print(f"scorer {scorer_name}: SST-2 dev accuracy {accuracy:.3f}", flush=True)

    data = load_labelled_tsv(sst2 / "train_sample.tsv", limit=args.n_train)
    means = contrastive_means(model, data, progress=False)
    prompts = sst2_prompts(sst2 / "dev.tsv", args.n_val + args.n_test, 5)
    val, test = prompts[: args.n_val], prompts[args.n_val :]
    base = Steering.from_means(means, gains=Gains.p(1.0), alpha=0.1)
    generation = {"max_new_tokens": args.new_tokens, "seed": args.seeds[0]}
    evaluate = GenerationEvaluator(model, base, val, scorer=scorer, **generation)
    unsteered = evaluate.unsteered(len(val))
    objective = FluencyBudget(baseline=unsteered["perplexity"], ratio=args.budget)
    print(
        f"validation unsteered: positive {unsteered['score']:.2f}, perplexity "
        f"{unsteered['perplexity']:.2f}, budget {objective.limit:.2f}",
        flush=True,
    )

    def show(trial):
        print(
            f"  {trial.family:<3} {trial.config} n={trial.budget}: positive "
            f"{trial.metrics['score']:.2f}, perplexity "
            f"{trial.metrics['perplexity']:.2f}",
            flush=True,
        )

    alphas = Range(low=0.03, high=0.4, log=True)
    spaces = {
        "P": SearchSpace(params={"kp": [1.0], "alpha": [0.05, 0.1, 0.15, 0.2, 0.3]}),
        "PI": SearchSpace(
            params={
                "kp": [1.0],
                "ki": Range(low=0.005, high=0.2, log=True),
                "alpha": alphas,
            }
        ),
        "PD": SearchSpace(
            params={
                "kp": [1.0],
                "kd": Range(low=0.1, high=2.0, log=True),
                "alpha": alphas,
            }
        ),
        "PID": SearchSpace(
            params={
                "kp": [1.0],
                "ki": Range(low=0.005, high=0.2, log=True),
                "kd": Range(low=0.1, high=2.0, log=True),
                "alpha": alphas,
            }
        ),
    }
    searches = {}
    for family, space in spaces.items():
        print(f"tuning {family}", flush=True)
        if family == "P":
            result = grid_search(
                evaluate, space, len(val), objective=objective, callback=show
            )
        else:
            result = successive_halving(
                evaluate,
                space,
                budgets=(args.n_val // 4, args.n_val // 2, args.n_val),
                n_candidates=args.candidates,
                seed=args.seeds[0],
                objective=objective,
                callback=show,
            )
        searches[family] = result
    trials = {family: list(result.trials) for family, result in searches.items()}
    plot_pareto(
        trials,
        args.out / "pareto.png",
        baseline=unsteered["perplexity"],
        limit=args.budget,
        title="SmolLM2, SST-2 validation prompts (all rungs)",
    )
    (args.out / "pareto.md").write_text(
        markdown_table([t for rows in trials.values() for t in rows])
    )

    print(f"testing on {len(test)} held-out prompts, seeds {args.seeds}", flush=True)
    chosen = {family: result.best.config for family, result in searches.items()}
    test_rows = {}
    for family in ("unsteered", *chosen):
        runs = []
        for seed in args.seeds:
            tester = GenerationEvaluator(
                model,
                base,
                test,
                scorer=scorer,
                max_new_tokens=args.new_tokens,
                seed=seed,
            )
            if family == "unsteered":
                runs.append(tester.unsteered(len(test)))
            else:
                runs.append(tester(chosen[family], len(test)))
        test_rows[family] = runs
        print(f"  {family:<9} {_summary(runs)}", flush=True)
    gains_over_p = {
        family: [
            100 * (row["score"] - p["score"])
            for row, p in zip(test_rows[family], test_rows["P"], strict=True)
        ]
        for family in chosen
        if family != "P"
    }
    for family, points in gains_over_p.items():
        print(f"  {family} - P (chosen settings): {points} points", flush=True)

    # P's front on the test prompts, to compare at matched perplexity
    print(f"P front on the test prompts, alphas {args.p_front}", flush=True)
    front = []
    for alpha in args.p_front:
        runs = [
            GenerationEvaluator(
                model,
                base,
                test,
                scorer=scorer,
                max_new_tokens=args.new_tokens,
                seed=seed,
            )({"kp": 1.0, "alpha": alpha}, len(test))
            for seed in args.seeds
        ]
        front.append({"alpha": alpha, "runs": runs})
        print(f"  P alpha={alpha:<5} {_summary(runs)}", flush=True)
    matched = _matched_gains(test_rows, front, args.seeds)
    for family, row in matched.items():
        print(
            f"  {family} - P at matched perplexity: {row['points']} points "
            f"(mean {row['mean']:+.1f}, per seed)",
            flush=True,
        )

    caa = {} if args.skip_caa else _caa(model, args, Gains)

    results = {
        "model": means.model_name,
        "scorer": {"name": scorer_name, "sst2_dev_accuracy": accuracy},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "validation": {
            "unsteered": unsteered,
            "limit": objective.limit,
            "searches": {f: r.to_dict() for f, r in searches.items()},
        },
        "chosen": chosen,
        "test": test_rows,
        "gain_over_p_points": gains_over_p,
        "p_front_test": front,
        "gain_over_p_at_matched_perplexity": matched,
        "caa": caa,
        "seconds": time.perf_counter() - started,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot_test(results, args.out / "test.png")
    print(f"wrote {args.out} in {results['seconds']:.0f} s", flush=True)


def _scorer(sst2: Path):
    """The embedding classifier (VADER, with a warning, when it is missing)."""
    from controllens.evaluate import sentiment_scorer

    scorer = sentiment_scorer(sst2 / "train_sample.tsv", progress=False)
    return scorer, scorer.name


def plot_test(results, path):
    """P's front on the test prompts against the chosen PI, PD and PID
    settings: mean over seeds, bars one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def stats(runs, key):
        values = [r[key] for r in runs]
        return np.mean(values), np.std(values, ddof=1) if len(values) > 1 else 0.0

    fig, ax = plt.subplots(figsize=(5.5, 4))
    front = results["p_front_test"]
    x = [stats(p["runs"], "perplexity") for p in front]
    y = [stats(p["runs"], "score") for p in front]
    ax.errorbar(
        [m for m, _ in x],
        [m for m, _ in y],
        xerr=[s for _, s in x],
        yerr=[s for _, s in y],
        marker="o",
        label="P, alpha " + ", ".join(str(p["alpha"]) for p in front),
    )
    for family, runs in results["test"].items():
        if family == "P":
            continue
        (mx, sx), (my, sy) = stats(runs, "perplexity"), stats(runs, "score")
        ax.errorbar(mx, my, xerr=sx, yerr=sy, marker="s", linestyle="", label=family)
    ax.set(
        xlabel="perplexity under the unsteered model",
        ylabel="positive rate (embedding classifier)",
        title="SmolLM2, held-out SST-2 dev prompts",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _matched_gains(test_rows, front, seeds):
    """Each family's positive rate minus P's at the same perplexity, per seed.

    P's front on the test prompts (one point per alpha) is interpolated
    linearly in perplexity, seed by seed; a family outside the front's
    perplexity range is compared with its nearest end.
    """
    import numpy as np

    matched = {}
    for family, runs in test_rows.items():
        if family in ("unsteered", "P"):
            continue
        points = []
        for i, _ in enumerate(seeds):
            ppl = np.array([p["runs"][i]["perplexity"] for p in front])
            score = np.array([p["runs"][i]["score"] for p in front])
            order = np.argsort(ppl)
            at = np.interp(runs[i]["perplexity"], ppl[order], score[order])
            points.append(round(100 * (runs[i]["score"] - float(at)), 1))
        matched[family] = {"points": points, "mean": float(np.mean(points))}
    return matched


def _summary(runs):
    score = [r["score"] for r in runs]
    perplexity = [r["perplexity"] for r in runs]
    spread = statistics.stdev if len(runs) > 1 else (lambda values: 0.0)
    distinct = [r["distinct_2"] for r in runs]
    return (
        f"positive {statistics.mean(score):.3f} +- {spread(score):.3f}, "
        f"perplexity {statistics.mean(perplexity):.2f} +- {spread(perplexity):.2f}, "
        f"distinct-2 {statistics.mean(distinct):.3f}"
    )


def _caa(model, args, Gains):
    """Behaviour probability on the CAA test files, P against PID, both ways."""
    from controllens import Steering, contrastive_means
    from controllens.data import ContrastiveTexts, load_caa
    from controllens.evaluate import behaviour_probability

    caa = args.data / "caa"
    families = {"P": Gains.p(1.0), "PID": Gains.pid(1.0, 0.05, 0.5)}
    results = {}
    for behaviour in ("refusal", "sycophancy"):
        texts = load_caa(caa / "generate" / behaviour / "generate_dataset.json")
        n = min(args.caa_items, len(texts.target))
        texts = ContrastiveTexts(target=texts.target[:n], source=texts.source[:n])
        means = contrastive_means(model, texts, aggregation="last", progress=False)
        test = caa / "test" / behaviour / "test_dataset_ab.json"
        rows = {"unsteered": behaviour_probability(model, test, progress=False)}
        for family, gains in families.items():
            for alpha in args.caa_alphas:
                steering = Steering.from_means(
                    means, method="caa", gains=gains, alpha=alpha
                )
                rows[f"{family} alpha={alpha}"] = behaviour_probability(
                    model, test, steering, progress=False
                )
        results[behaviour] = {name: r.summary() for name, r in rows.items()}
        for name, r in rows.items():
            print(
                f"  {behaviour:<10} {name:<16} P(matching letter) {r.mean:.3f} "
                f"(raw {r.mean_raw:.3f}, on the two letters {r.mean_mass:.3f})",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
