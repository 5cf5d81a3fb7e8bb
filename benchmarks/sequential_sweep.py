"""Sequential estimation: one layer-by-layer sweep against one pass per layer.

The reference implementations estimate r(k) sequentially with one forward pass
over the source texts per steered layer, each pass steered at the layers
before it. :func:`controllens.sequential_steering` sweeps the texts through the
model once, layer by layer. This script times, in one process and with a fixed
thread count:

- the sweep, for each requested method, on all layers of SmolLM2;
- one clean pass over the target texts (both approaches need it);
- reference passes over the source texts at ``--sample-layers`` evenly spaced
  layers, each steered at the earlier layers by the sweep's own estimate, and
  running the whole model as the reference code does.

A full forward pass costs the same whatever the layer, so the reference total
is ``target pass + n_layers x (mean reference pass)``; the script also reports
the cheaper per-layer variant that stops each pass at its layer
(``sum_k (k + 1) / n_layers`` of a pass). Each sampled reference pass checks
the sweep's r(k) at that layer (same steering before it, so it must agree
within float tolerance).

    .venv/bin/python benchmarks/sequential_sweep.py --n 1000 --threads 2
"""

import argparse
import json
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="texts per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample-layers", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["add"])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("CONTROLLENS_DATA", "../shared/data"))
        / "sst2"
        / "train_sample.tsv",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/sequential.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from controllens import Gains, load_bridge, load_labelled_tsv, sequential_steering
    from controllens.vectors import mean_activations

    # both approaches run on the same TransformerBridge: the sweep on its
    # decoder layers, the reference passes through its hooks
    model = load_bridge()
    data = load_labelled_tsv(args.data, limit=args.n)
    n_layers = model.cfg.n_layers
    last = n_layers - 1
    extra = {"rotate": {"angle": 20.0}}
    common = dict(batch_size=args.batch_size, progress=False)

    start = time.perf_counter()
    target = mean_activations(model, data.target, **common)
    target_pass = time.perf_counter() - start

    results = {"target_pass": target_pass, "methods": {}}
    print(
        f"SmolLM2, {len(data.target)} + {len(data.source)} SST-2 texts, "
        f"{n_layers} layers, {args.threads} threads; clean target pass "
        f"{target_pass:.1f} s",
        flush=True,
    )
    sampled = sorted(
        {round(i * last / (args.sample_layers - 1)) for i in range(args.sample_layers)}
    )
    for method in args.methods:
        start = time.perf_counter()
        sweep = sequential_steering(
            model,
            data,
            method=method,
            gains=Gains.pid(0.9, 0.01, 0.01),
            alpha=0.2 if method != "ablate" else 1.0,
            **extra.get(method, {}),
            **common,
        )
        sweep_time = time.perf_counter() - start

        passes, gaps = {}, {}
        for layer in sampled:
            row = sweep.layers.index(layer)
            # the sweep's own steering of the layers before this one
            before = None
            if row:
                before = sweep.replace(
                    errors=sweep.errors[:row], layers=sweep.layers[:row]
                )
            start = time.perf_counter()
            with before.apply(model) if before is not None else nullcontext():
                # reading the last layer too makes the pass run the whole model
                source = mean_activations(
                    model, data.source, layers=[layer, last], **common
                )[0]
            passes[layer] = time.perf_counter() - start
            reference_r = target[layer] - source
            gaps[layer] = (reference_r - sweep.errors[row]).abs().max().item()

        mean_pass = sum(passes.values()) / len(passes)
        reference = target_pass + n_layers * mean_pass
        stopping = target_pass + mean_pass * sum(
            (k + 1) / n_layers for k in range(n_layers)
        )
        scale = sweep.errors.abs().max().item()
        results["methods"][method] = {
            "sweep_seconds": sweep_time,
            "reference_pass_seconds": passes,
            "reference_total_seconds": reference,
            "stopping_total_seconds": stopping,
            "speedup_vs_reference": reference / sweep_time,
            "speedup_vs_stopping": stopping / sweep_time,
            "max_abs_diff": max(gaps.values()),
            "largest_entry": scale,
        }
        print(
            f"{method:>10}: sweep {sweep_time:7.1f} s | reference passes "
            f"{mean_pass:6.1f} s each -> {reference:7.1f} s "
            f"({reference / sweep_time:5.1f}x); stopping at each layer "
            f"{stopping:7.1f} s ({stopping / sweep_time:5.1f}x) | max |diff| "
            f"{max(gaps.values()):.1e} (largest entry {scale:.1f})",
            flush=True,
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(vars(args) | results, default=str, indent=2))


if __name__ == "__main__":
    main()
