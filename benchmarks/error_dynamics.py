"""Error dynamics of P, PI, PD and PID on SmolLM2: measured against the loop model.

For SST-2 sentences (positive = target, negative = source) each controller
steers every layer of SmolLM2 with r(k) measured on clean activations; the
remaining error e(k) = mu_target(k) - mu_steered_source(k) is measured on the
source texts and compared with the linearised loop of
:mod:`controllens.dynamics` (block gains from Jacobian-vector products). The
table gives the remaining error along r(k) at the last layer (1 = unsteered,
0 = on target, < 0 = past it), measured, predicted for these fixed edits and
predicted for sequential steering with the same gains; the first overshoot,
measured and predicted; and the spectral radius of the sequential loop.
``--sequential`` adds two sequentially estimated P steerings, one with gains
the stability check calls unstable.

    # default: 80 + 80 texts, alpha 0.05 and 0.1; about 3 min on one core
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/error_dynamics.py
    # about 3 min as well
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/error_dynamics.py --n 60 \
        --alphas 0.1 --gain-texts 16 --sequential --out runs/dynamics/sequential

Writes error_dynamics.json and error_dynamics.png under runs/dynamics/.
"""

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

# controller families: (kp, ki, kd); alpha scales them all
FAMILIES = {
    "P": (1.0, 0.0, 0.0),
    "PI": (1.0, 0.05, 0.0),
    "PD": (1.0, 0.0, 0.5),
    "PID": (1.0, 0.05, 0.5),
}
# sequential P: stable (alpha * kp = 1.5, radius about 0.5) and unstable (2.5)
SEQUENTIAL_ALPHAS = (1.5, 2.5)


def _number(value) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _overshoot(overshoot) -> str:
    if overshoot is None:
        return "none"
    return f"L{overshoot.layer} ({overshoot.peak:+.2f} @L{overshoot.peak_layer})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=80, help="texts per side")
    parser.add_argument(
        "--alphas", default="0.05,0.1", help="comma-separated steering strengths"
    )
    parser.add_argument(
        "--gain-texts", type=int, default=32, help="source texts for block gains"
    )
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("CONTROLLENS_DATA", "../shared/data"))
        / "sst2"
        / "train_sample.tsv",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/dynamics"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from controllens import (
        Gains,
        Steering,
        contrastive_means,
        load_bridge,
        load_labelled_tsv,
        sequential_steering,
    )
    from controllens.dynamics import error_dynamics, plot_error_dynamics

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = load_bridge()
    data = load_labelled_tsv(args.data, limit=args.n)
    alphas = [float(a) for a in args.alphas.split(",")]

    # r(k) on clean activations, reused by error_dynamics
    options = dict(batch_size=args.batch_size, progress=False)
    means = contrastive_means(bridge, data, **options)
    steerings = {}
    for alpha in alphas:
        for family, (kp, ki, kd) in FAMILIES.items():
            steerings[f"{family} a={alpha:g}"] = Steering.from_means(
                means, gains=Gains(kp=kp, ki=ki, kd=kd), alpha=alpha
            )
    if args.sequential:
        for alpha in SEQUENTIAL_ALPHAS:
            steerings[f"seq P a={alpha:g}"] = sequential_steering(
                bridge, data, gains=Gains.p(1.0), alpha=alpha, **options
            )
    prepared = time.perf_counter()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = error_dynamics(
            bridge,
            steerings,
            data,
            batch_size=args.batch_size,
            means=means,
            gain_texts=args.gain_texts,
        )
    stability_warnings = [
        str(w.message) for w in caught if w.category.__name__ == "StabilityWarning"
    ]
    done = time.perf_counter()

    header = (
        f"{'steering':14s} {'steady meas':>11s} {'pred':>7s} {'seq pred':>8s}  "
        f"{'overshoot measured':22s} {'overshoot predicted':22s} {'radius':>6s}"
    )
    lines = [
        f"SmolLM2, {len(data.target)} + {len(data.source)} SST-2 texts, all "
        f"{bridge.cfg.n_layers} layers steered, {args.threads} thread(s); "
        "remaining error along r(k) (1 unsteered, 0 on target)",
        header,
        "-" * len(header),
    ]
    for name, r in results.items():
        sequential = None if r.predicted is None else r.predicted_sequential[-1]
        radius = None if r.stability is None else r.stability.spectral_radius
        lines.append(
            f"{name:14s} {r.steady_state:11.3f} "
            f"{_number(r.predicted_steady_state):>7s} {_number(sequential):>8s}  "
            f"{_overshoot(r.overshoot):22s} "
            f"{_overshoot(r.predicted_overshoot):22s} {_number(radius):>6s}"
        )
    gap = {
        name: float((r.remaining - r.predicted).abs().max())
        for name, r in results.items()
        if r.predicted is not None
    }
    lines.append(
        "largest |measured - predicted| over the layers: "
        + ", ".join(f"{name} {value:.2f}" for name, value in gap.items())
    )
    lines.append(
        f"time: prepare {prepared - start:.0f} s, measure and predict "
        f"{done - prepared:.0f} s"
    )
    lines.extend(f"StabilityWarning: {message}" for message in stability_warnings)
    print("\n".join(lines))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "error_dynamics.json").write_text(
        json.dumps(
            {
                "settings": vars(args),
                "seconds": {"prepare": prepared - start, "measure": done - prepared},
                "stability_warnings": stability_warnings,
                "results": {name: r.summary() for name, r in results.items()},
            },
            default=str,
            indent=2,
        )
    )
    plot_error_dynamics(results, args.out / "error_dynamics.png")


if __name__ == "__main__":
    main()
