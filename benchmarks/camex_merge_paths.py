"""Time and peak memory of the merged-output paths of a CAMEx layer.

Compares, for one merged linear map of SmolLM2's MLP shape (gate projection,
d_mlp 1536 x d_model 576, 4 experts plus a base):

- ``reference``: the per-sample materialisation of the CAMEx research code,
  one merged ``[d_out, d_in]`` matrix per routing row (base included), then a
  batched matrix product;
- ``weights`` and ``outputs``: the two paths of ``controllens.camex``
  (see ``controllens.camex.layers``), and ``auto``, the one chosen from shapes.

Time is forward + backward, median over interleaved repeats in one process;
peak memory is the growth of the peak resident set (VmHWM, reset after
setup) of a fresh subprocess running one forward + backward (Linux only). Usage::

    python benchmarks/camex_merge_paths.py --repeats 5 --json out.json
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from controllens.camex.layers import MergedExperts, MoEConfig

VARIANTS = ("reference", "weights", "outputs", "auto")
CASES = {
    # name: (batch, pos, tokens per routing group)
    "per-sequence b8 x 256": (8, 256, 256),
    "segments of 64, b8 x 256": (8, 256, 64),
    "per-token b2 x 32": (2, 32, 1),
}


def build(case: str, n_experts: int = 4, d_out: int = 1536, d_in: int = 576):
    batch, pos, length = CASES[case]
    torch.manual_seed(0)
    config = MoEConfig(n_experts=n_experts, method="task_vector")
    layer = MergedExperts(config, d_model=d_in, d_mlp=d_out)
    projection = layer.projections["gate"]
    x = torch.randn(batch, pos // length, length, d_in, requires_grad=True)
    coeffs = torch.randn(batch, pos // length, n_experts).softmax(-1)
    return projection, x, coeffs


def reference(projection, x, coeffs):
    # the research code: concatenate base and experts, merge per row, bmm
    base, deltas, scale = projection.terms()
    stacked = torch.cat([base[None], base + deltas])
    weights = torch.cat([1 - coeffs.sum(-1, keepdim=True) * scale, coeffs * scale], -1)
    merged = torch.einsum("bge,eoi->bgoi", weights, stacked)
    return torch.einsum("bgli,bgoi->bglo", x, merged)


def run_once(variant: str, projection, x, coeffs) -> None:
    if variant == "reference":
        y = reference(projection, x, coeffs)
    else:
        y = projection(x, coeffs, variant)
    y.sum().backward()


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(variant: str, case: str) -> None:
    # a fresh process per variant; writing 5 to clear_refs resets the peak
    # resident set (VmHWM) to the current one, so imports and setup drop out
    projection, x, coeffs = build(case)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status_mb("VmRSS")
    run_once(variant, projection, x, coeffs)
    print(json.dumps({"peak_mb": status_mb("VmHWM") - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        memory_worker(*args.worker)
        return

    results = {}
    for case in CASES:
        projection, x, coeffs = build(case)
        times = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm-up
            run_once(v, projection, x, coeffs)
        for _ in range(args.repeats):
            for v in VARIANTS:  # interleaved
                start = time.perf_counter()
                run_once(v, projection, x, coeffs)
                times[v].append(time.perf_counter() - start)
        memory = {}
        for v in VARIANTS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--worker",
                    v,
                    case,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[v] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
        median = {v: statistics.median(t) for v, t in times.items()}
        results[case] = {
            v: {
                "time_ms": 1000 * median[v],
                "peak_mb": memory[v],
                "time_vs_reference": median[v] / median["reference"],
                "memory_vs_reference": memory[v] / max(memory["reference"], 1e-9),
            }
            for v in VARIANTS
        }

    print("| case | path | time (ms) | x reference | peak MB | x reference |")
    print("|---|---|---|---|---|---|")
    for case, rows in results.items():
        for v, r in rows.items():
            print(
                f"| {case} | {v} | {r['time_ms']:.1f} | {r['time_vs_reference']:.2f} "
                f"| {r['peak_mb']:.0f} | {r['memory_vs_reference']:.2f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
