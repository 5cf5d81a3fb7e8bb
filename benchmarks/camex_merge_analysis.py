"""Merge analysis of an upcycled SmolLM2 MoE on tinyshakespeare validation text.

SmolLM2-135M-Instruct's MLPs at a few layers are upcycled into experts (noisy
copies of the dense MLP, ``camex.upcycle``), given a random seeded router so
that routing is not degenerate, exported as a Mixtral checkpoint
(``camex.save_mixtral``) and loaded as a TransformerBridge. On the last 10% of
tinyshakespeare (calibration windows first, held-out windows after them) it
measures routing statistics, expert similarity, per-layer KL and loss change
of flat, Ties and curvature-aware (diagonal Fisher, Kronecker-factored)
merge probes, the cost of merging the most similar pair, and a greedy merge
plan. Figures go to ``--out`` as PNGs, numbers to ``results.json``.

Neuron-split upcycling (``split=True``) cannot be exported to Mixtral
(``to_mixtral`` needs full-width experts), so the experts here are noisy copies.

    .venv/bin/python benchmarks/camex_merge_analysis.py --threads 2
"""

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from controllens.camex import (  # noqa: E402
    PROBE_METHODS,
    MoEConfig,
    UpcycleConfig,
    estimate_curvature,
    expert_similarity,
    merge_group,
    merge_plan,
    merge_probe,
    routing_stats,
    save_mixtral,
    token_windows,
    upcycle,
)
from controllens.camex.layers import moe_layers  # noqa: E402
from controllens.models import load_bridge, load_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="20,28")
    parser.add_argument("--n-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--router-std", type=float, default=0.05)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--heldout-windows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--budget", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "camex_analysis")
    return parser.parse_args()


def build(args: argparse.Namespace, layers: tuple[int, ...], folder: Path):
    model, tokenizer = load_hf()
    moe = MoEConfig(
        n_experts=args.n_experts,
        method="mixture",
        router="noisy_top_k",
        top_k=args.top_k,
    )
    config = UpcycleConfig(layers=layers, moe=moe, noise_std=args.noise, seed=args.seed)
    upcycle(model, config)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for _, layer in moe_layers(model):
            weight = layer.router.weight
            noise = torch.randn(weight.shape, generator=generator)
            weight.copy_(args.router_std * noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_mixtral(model, folder / "smollm2-moe", tokenizer)
        del model
        return load_bridge(path), tokenizer


def heatmaps(tables, titles, path: Path, vmin=None, vmax=None) -> None:
    fig, axes = plt.subplots(
        1, len(tables), figsize=(3.2 * len(tables), 3), squeeze=False
    )
    for ax, table, title in zip(axes[0], tables, titles, strict=True):
        image = ax.imshow(table, vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots(stats, sim, report, out: Path) -> None:
    # routing: load per layer and co-selection
    fig, ax = plt.subplots(figsize=(5, 3))
    load = stats.load.numpy()
    for e in range(load.shape[1]):
        ax.bar(
            [i + 0.8 * e / load.shape[1] for i in range(len(stats.layers))],
            load[:, e],
            width=0.8 / load.shape[1],
            label=f"expert {e}",
        )
    ax.set_xticks(range(len(stats.layers)), [f"layer {k}" for k in stats.layers])
    ax.set_ylabel("share of top-k slots")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "routing_load.png", dpi=120)
    plt.close(fig)
    co = stats.co_selection / stats.n_tokens
    heatmaps(
        list(co.numpy()),
        [f"co-selection, layer {k}" for k in stats.layers],
        out / "routing_coselection.png",
    )
    heatmaps(
        list(sim.output_cka.numpy()),
        [f"output CKA, layer {k}" for k in sim.layers],
        out / "similarity_cka.png",
        0,
        1,
    )
    heatmaps(
        list(sim.weight_cosine.numpy()),
        [f"task-vector cosine, layer {k}" for k in sim.layers],
        out / "similarity_weights.png",
        -1,
        1,
    )
    fig, ax = plt.subplots(figsize=(5, 3))
    methods = list(report.per_layer)
    for j, method in enumerate(methods):
        costs = report.per_layer[method]
        ax.bar(
            [i + 0.8 * j / len(methods) for i in range(len(costs))],
            [c.kl for c in costs.values()],
            width=0.8 / len(methods),
            label=method,
        )
    ax.set_xticks(range(len(stats.layers)), [f"layer {k}" for k in stats.layers])
    ax.set_ylabel("KL (nats / token)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "probe_kl.png", dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.basicConfig(level=logging.WARNING)
    if not DATA.is_file():
        raise SystemExit(f"tinyshakespeare not found at {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)
    layers = tuple(int(k) for k in args.layers.split(","))
    start = time.perf_counter()
    timings = {}

    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        bridge, tokenizer = build(args, layers, Path(folder))
    timings["build"] = time.perf_counter() - start

    text = DATA.read_text()
    validation = text[int(0.9 * len(text)) :]
    n = args.calib_windows + args.heldout_windows
    windows = token_windows(validation, tokenizer, seq_len=args.seq_len, n_windows=n)
    calib, heldout = windows[: args.calib_windows], windows[args.calib_windows :]
    kw = dict(layers=layers, batch_size=args.batch_size)

    def timed(name, fn, *a, **k):
        t = time.perf_counter()
        result = fn(*a, **k)
        timings[name] = time.perf_counter() - t
        print(f"{name}: {timings[name]:.1f} s", flush=True)
        return result

    stats = timed("routing", routing_stats, bridge, windows, progress=True, **kw)
    sim = timed("similarity", expert_similarity, bridge, calib, **kw)
    curvature = timed("curvature", estimate_curvature, bridge, calib, **kw)
    report = timed(
        "probes",
        merge_probe,
        bridge,
        heldout,
        methods=PROBE_METHODS,
        curvature=curvature,
        together=True,
        progress=True,
        **kw,
    )
    groups = {}
    for layer in layers:
        pair = sim.most_similar(layer)
        groups[layer] = {"pair": pair}
        for method in ("flat", "fisher", "kfac"):
            cost = timed(
                f"group {layer} {method}",
                merge_group,
                bridge,
                heldout,
                layer=layer,
                experts=pair,
                method=method,
                curvature=curvature,
                batch_size=args.batch_size,
            )
            groups[layer][method] = vars(cost)
    plan = timed(
        "plan", merge_plan, bridge, heldout, curvature, budget=args.budget, **kw
    )
    plots(stats, sim, report, args.out)

    results = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "n_tokens_heldout": report.n_tokens,
        "routing": stats.to_dict(),
        "weight_cosine": sim.weight_cosine.tolist(),
        "output_cka": sim.output_cka.tolist(),
        "probes": report.to_dict(),
        "merge_most_similar_pair": groups,
        "plan": {
            "groups": {k: [list(g) for g in v] for k, v in plan.groups.items()},
            "predicted": plan.predicted,
            "measured": {k: vars(v) for k, v in plan.measured.items()},
            "together": vars(plan.together),
        },
        "timings_s": timings,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\nbase loss {report.base_loss:.4f} over {report.n_tokens} tokens")
    print("| layer | " + " | ".join(f"{m} KL / dloss" for m in PROBE_METHODS) + " |")
    print("|---" * (len(PROBE_METHODS) + 1) + "|")
    for key in [*layers, "all"]:
        cells = []
        for method in PROBE_METHODS:
            cost = (
                report.together[method]
                if key == "all"
                else report.per_layer[method][key]
            )
            cells.append(f"{cost.kl:.2e} / {cost.delta_loss:+.4f}")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("\nrouting: load CV", [round(v, 3) for v in stats.load_cv.tolist()])
    print("entropy / log N", [round(v, 3) for v in stats.normalized_entropy.tolist()])
    print("most similar pairs and merge cost (KL):")
    for layer, g in groups.items():
        costs = ", ".join(f"{m} {g[m]['kl']:.2e}" for m in ("flat", "fisher", "kfac"))
        print(f"  layer {layer}: experts {g['pair']}: {costs}")
    print(f"plan (budget {args.budget}):", plan.groups)
    print("  predicted dloss", {k: f"{v:.2e}" for k, v in plan.predicted.items()})
    print(
        "  measured KL / dloss",
        {k: f"{v.kl:.2e} / {v.delta_loss:+.4f}" for k, v in plan.measured.items()},
    )
    print(f"total {time.perf_counter() - start:.0f} s; figures in {args.out}")


if __name__ == "__main__":
    main()
