"""Sequential r(k): one layer-by-layer sweep against one forward pass per layer.

Both methods of :func:`controllens.sequential_steering` run in one process on
the same SST-2 texts, alternating, with a fixed thread count; the report gives
their times, the speed-up as a ratio and the largest difference between the
errors they estimate.

    .venv/bin/python benchmarks/sequential_sweep.py --n 64 --repeats 2
"""

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64, help="texts per side")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
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

    from controllens import Gains, load_hf, load_labelled_tsv, sequential_steering

    model, tokenizer = load_hf()
    data = load_labelled_tsv(args.data, limit=args.n)
    options = dict(
        tokenizer=tokenizer,
        gains=Gains.pid(0.9, 0.01, 0.01),
        alpha=0.2,
        batch_size=args.batch_size,
        progress=False,
    )
    times: dict[str, list[float]] = {"sweep": [], "per_layer": []}
    errors = {}
    for _ in range(args.repeats):
        for method in times:
            start = time.perf_counter()
            errors[method] = sequential_steering(model, data, method=method, **options)
            times[method].append(time.perf_counter() - start)

    sweep, per_layer = (statistics.median(times[m]) for m in ("sweep", "per_layer"))
    gap = (errors["sweep"].errors - errors["per_layer"].errors).abs().max().item()
    scale = errors["per_layer"].errors.abs().max().item()
    n_layers = len(errors["sweep"].layers)
    print(
        f"SmolLM2, {len(data.target)} + {len(data.source)} SST-2 texts, "
        f"{n_layers} steered layers, {args.threads} threads\n"
        f"  one sweep          {sweep:8.1f} s\n"
        f"  one pass per layer {per_layer:8.1f} s\n"
        f"  speed-up           {per_layer / sweep:8.1f} x\n"
        f"  max |difference|   {gap:.2e} (largest entry {scale:.1f})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            vars(args)
            | {"times": times, "speedup": per_layer / sweep, "max_abs_diff": gap},
            default=str,
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
