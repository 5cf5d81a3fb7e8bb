"""Cost of steering every layer of SmolLM2: controllens, steering-vectors, a bare hook.

One process, one thread count, one HF model loaded three times (a plain HF
model, a TransformerBridge and an nnsight model, which must not share an
object). Variants:

- ``hf``: unsteered; a bare torch forward hook per layer adding its vector (the
  floor); the peer library steering-vectors (``SteeringVector.apply``) adding
  the same vectors;
- ``tl`` (TransformerBridge hooks) and ``nnsight``: unsteered; controllens P;
  controllens PID.

Each is timed on a forward pass (batch 8 x 32 tokens) and on 32-token greedy
generation. Every round runs every variant once, in a freshly shuffled
(seeded) order, so background load and drift hit all alike; a variant's ratio
is the median over rounds of its time divided by the unsteered time of its back
end in the same round. "vs bare hook" is the median over rounds of that ratio
divided by the bare hook's ratio in the same round: steering overhead relative
to the floor, whatever the back end's own speed (the goal for controllens is
<= 1.03).

Before timing, the script checks that the bare hook, steering-vectors and
controllens P and PID in both back ends produce the same logits.

    .venv/bin/python benchmarks/steering_overhead.py --threads 1 --repeats 7

steering-vectors declares transformers<5, so it is installed without its
dependencies (``make bench`` does it); without it, its variants are skipped.
"""

import argparse
import gc
import json
import random
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

#: back end -> its unsteered variant and its steered ones
VARIANTS = {
    "hf": (None, "bare-hook", "steering-vectors"),
    "tl": (None, "P", "PID"),
    "nnsight": (None, "P", "PID"),
}


class _BareHooks:
    """The floor: a plain PyTorch forward hook per layer adding its vector."""

    def __init__(self, model: torch.nn.Module, edits: torch.Tensor) -> None:
        self.layers, self.edits = model.model.layers, edits

    def __enter__(self) -> None:
        self.handles = [
            layer.register_forward_hook(lambda m, a, out, e=edit: out + e)
            for layer, edit in zip(self.layers, self.edits, strict=True)
        ]

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def peer_installed() -> bool:
    try:
        import steering_vectors  # noqa: F401
    except ImportError:
        return False
    return True


class Bench:
    """The three wrappers of SmolLM2, the inputs and the steerings."""

    def __init__(self, args: argparse.Namespace) -> None:
        from controllens import Gains, Steering, load_bridge, load_hf, load_nnsight

        # one HF object per back end: booting a bridge rewires the modules
        self.bridge, self.nnsight = load_bridge(), load_nnsight()
        self.hf, _ = load_hf()
        self.new_tokens = args.new_tokens
        n_layers, d_model = self.bridge.cfg.n_layers, self.bridge.cfg.d_model
        generator = torch.Generator().manual_seed(args.seed)
        errors = torch.randn(n_layers, d_model, generator=generator)
        controllers = {"P": Gains.p(1.0), "PID": Gains.pid(0.9, 0.01, 0.01)}
        self.steerings = {
            name: Steering(
                errors=errors, layers=tuple(range(n_layers)), gains=gains, alpha=0.1
            )
            for name, gains in controllers.items()
        }
        self.pid_edits = self.steerings["PID"].control()
        self.tokens = torch.randint(
            100, 20000, (args.batch, args.seq), generator=generator
        )

    def hf_context(
        self, variant: str | None, edits: torch.Tensor | None = None
    ) -> AbstractContextManager:
        """The HF model's steering; the PID vectors unless ``edits`` are given
        (P costs the same: one vector per layer)."""
        if edits is None:
            edits = self.pid_edits
        if variant is None:
            return nullcontext()
        if variant == "bare-hook":
            return _BareHooks(self.hf, edits)
        from steering_vectors import SteeringVector

        vector = SteeringVector(
            layer_activations={layer: edit for layer, edit in enumerate(edits)},
            layer_type="decoder_block",
        )
        return vector.apply(self.hf)

    def tl_context(self, variant: str | None) -> AbstractContextManager:
        if variant is None:
            return nullcontext()
        return self.steerings[variant].apply(self.bridge)

    def forward(self, backend: str, variant: str | None) -> torch.Tensor:
        if backend == "nnsight":
            with self.nnsight.trace(self.tokens):
                if variant is not None:
                    self.steerings[variant].intervene(self.nnsight)
                logits = self.nnsight.lm_head.output.save()
            return logits
        if backend == "tl":
            with self.tl_context(variant):
                return self.bridge(self.tokens)
        with self.hf_context(variant):
            return self.hf(self.tokens).logits

    def generate(self, backend: str, variant: str | None) -> None:
        steps = self.new_tokens
        if backend == "nnsight":
            with self.nnsight.generate(
                max_new_tokens=steps, min_new_tokens=steps, do_sample=False
            ) as tracer:
                with tracer.invoke(self.tokens):
                    if variant is not None:
                        self.steerings[variant].intervene(self.nnsight, tracer)
                with tracer.invoke():
                    tracer.result.save()
        elif backend == "tl":
            with self.tl_context(variant):
                self.bridge.generate(
                    self.tokens,
                    max_new_tokens=steps,
                    do_sample=False,
                    verbose=False,
                    stop_at_eos=False,
                )
        else:
            with self.hf_context(variant):
                self.hf.generate(
                    self.tokens,
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    do_sample=False,
                )


def check_logits(bench: Bench, peer: bool) -> None:
    """Assert that every implementation of the same edit gives the same logits.

    The bridge runs eager attention where HF runs SDPA, so its logits differ
    from HF's by float noise (about 1e-4 on SmolLM2, steered or not); the
    tolerance is far below the effect of the steering itself.
    """
    unsteered = bench.forward("hf", None)
    tolerance = 1e-4 * unsteered.abs().max().item()
    for name, steering in bench.steerings.items():
        edits = steering.control()
        with bench.hf_context("bare-hook", edits):
            floor = bench.hf(bench.tokens).logits
        effect = (floor - unsteered).abs().max().item()
        assert effect > 100 * tolerance, f"{name}: steering too weak to check"
        results = {
            f"controllens {name} (TransformerBridge)": bench.forward("tl", name),
            f"controllens {name} (nnsight)": bench.forward("nnsight", name),
        }
        if peer:
            with bench.hf_context("steering-vectors", edits):
                results[f"steering-vectors ({name} vectors)"] = bench.hf(
                    bench.tokens
                ).logits
        for label, logits in results.items():
            difference = (logits - floor).abs().max().item()
            assert difference <= tolerance, (
                f"{label} differs from the bare hook by {difference:.3g} "
                f"(tolerance {tolerance:.3g}, steering effect {effect:.3g})"
            )
            print(
                f"same logits: {label} vs bare hook, max |diff| {difference:.2g} "
                f"(the steering moves them by {effect:.3g})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    bench = Bench(args)
    peer = peer_installed()
    if not peer:
        print("steering-vectors is not installed (make bench): its rows are skipped")
    variants: dict[str, Callable[[], object]] = {}
    for task in ("forward", "generate"):
        run = getattr(bench, task)
        for backend, names in VARIANTS.items():
            for variant in names:
                if variant == "steering-vectors" and not peer:
                    continue
                key = f"{task}/{backend}" + (f"+{variant}" if variant else "")
                variants[key] = lambda r=run, b=backend, v=variant: r(b, v)

    with torch.inference_mode():
        check_logits(bench, peer)
        for fn in variants.values():  # warm-up
            fn()
        times = measure(variants, args.repeats, args.seed)
    report(times, args, n_layers=bench.bridge.cfg.n_layers)


def measure(
    variants: dict[str, Callable[[], object]], repeats: int, seed: int
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one round after another, each round in
    a new (seeded) random order."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(seed)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for name in order:
            gc.collect()
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


def report(
    times: dict[str, list[float]], args: argparse.Namespace, n_layers: int
) -> None:
    """Print the table and write the JSON."""
    ratios = {
        name: [t / b for t, b in zip(values, times[name.split("+")[0]], strict=True)]
        for name, values in times.items()
    }
    rows: dict[str, dict] = {}
    for name, values in times.items():
        rows[name] = {
            "median_s": statistics.median(values),
            "ratio": statistics.median(ratios[name]),
            "ratio_quartiles": _quartiles(ratios[name]),
            "times": values,
        }
        floor = ratios.get(name.split("/")[0] + "/hf+bare-hook")
        if floor is not None and "+" in name:
            # paired by round, like the ratios themselves
            versus = [r / f for r, f in zip(ratios[name], floor, strict=True)]
            rows[name]["vs_bare_hook"] = statistics.median(versus)

    print(
        f"\nSmolLM2, batch {args.batch} x {args.seq} tokens, {args.new_tokens} new "
        f"greedy tokens, steering on all {n_layers} layers, {args.threads} "
        f"thread(s), {args.repeats} interleaved rounds\n"
    )
    print(
        f"{'variant':<30} {'median s':>9} {'ratio':>7} {'ratio IQR':>15} "
        f"{'vs bare hook':>13}"
    )
    for name, row in rows.items():
        low, high = row["ratio_quartiles"]
        versus = f"{row['vs_bare_hook']:.3f}" if "vs_bare_hook" in row else ""
        print(
            f"{name:<30} {row['median_s']:>9.3f} {row['ratio']:>7.3f} "
            f"{low:>7.3f}-{high:<7.3f} {versus:>13}"
        )
    print(
        "\nratio: median over rounds of time / unsteered time of the same back end "
        "in the same round; vs bare hook: median over rounds of ratio / the bare "
        "hook's ratio in that round"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    versions = {
        package: _version(package)
        for package in ("torch", "transformers", "nnsight", "steering-vectors")
    }
    meta = vars(args) | {"versions": versions}
    args.out.write_text(json.dumps(meta | {"results": rows}, default=str, indent=2))


if __name__ == "__main__":
    main()
