"""Cost of PID steering on every layer of SmolLM2, next to the unsteered model.

Variants run interleaved in one process (round-robin, so background load hits
all of them alike) with a fixed thread count; the table reports median times
and each steered variant's ratio to the unsteered run of the same back end.

    .venv/bin/python benchmarks/steering_overhead.py --repeats 5 --threads 2
"""

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def _timer(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from controllens import Gains, Steering, load_bridge, load_hf, load_nnsight

    bridge, nnsight = load_bridge(), load_nnsight()
    hf, _ = load_hf()
    n_layers, d_model = bridge.cfg.n_layers, bridge.cfg.d_model
    generator = torch.Generator().manual_seed(0)
    steering = Steering(
        errors=torch.randn(n_layers, d_model, generator=generator),
        layers=tuple(range(n_layers)),
        gains=Gains.pid(0.9, 0.01, 0.01),
        alpha=0.1,
    )
    tokens = torch.randint(100, 20000, (args.batch, args.seq), generator=generator)
    hooks = steering.hooks(bridge)
    edits = steering.control()

    def bare_hooks_forward() -> None:
        # the floor: a plain PyTorch forward hook per layer adding its vector
        def make(edit: torch.Tensor) -> Callable:
            return lambda module, args, output: output + edit

        handles = [
            layer.register_forward_hook(make(edit))
            for layer, edit in zip(hf.model.layers, edits, strict=True)
        ]
        try:
            hf(tokens)
        finally:
            for handle in handles:
                handle.remove()

    def nn_forward(steer: bool) -> None:
        with nnsight.trace(tokens):
            if steer:
                steering.intervene(nnsight)
            nnsight.lm_head.output.save()

    def nn_generate(steer: bool) -> None:
        with nnsight.generate(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        ) as tracer:
            with tracer.invoke(tokens):
                if steer:
                    steering.intervene(nnsight, tracer)
            with tracer.invoke():
                tracer.result.save()

    def tl_generate(steer: bool) -> None:
        kwargs = dict(
            max_new_tokens=args.new_tokens,
            do_sample=False,
            verbose=False,
            stop_at_eos=False,
        )
        if steer:
            with steering.apply(bridge):
                bridge.generate(tokens, **kwargs)
        else:
            bridge.generate(tokens, **kwargs)

    def hf_generate(steer: bool) -> None:
        kwargs = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        )
        if not steer:
            hf.generate(tokens, **kwargs)
            return
        handles = [
            layer.register_forward_hook(lambda m, a, o, e=edit: o + e)
            for layer, edit in zip(hf.model.layers, edits, strict=True)
        ]
        try:
            hf.generate(tokens, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    variants: dict[str, Callable[[], object]] = {
        "forward/hf": lambda: hf(tokens),
        "forward/hf+bare-hook": bare_hooks_forward,
        "forward/tl": lambda: bridge(tokens),
        "forward/tl+pid": lambda: bridge.run_with_hooks(tokens, fwd_hooks=hooks),
        "forward/nnsight": lambda: nn_forward(False),
        "forward/nnsight+pid": lambda: nn_forward(True),
        "generate/hf": lambda: hf_generate(False),
        "generate/hf+bare-hook": lambda: hf_generate(True),
        "generate/tl": lambda: tl_generate(False),
        "generate/tl+pid": lambda: tl_generate(True),
        "generate/nnsight": lambda: nn_generate(False),
        "generate/nnsight+pid": lambda: nn_generate(True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(_timer(fn))

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"SmolLM2, batch {args.batch} x {args.seq} tokens, {args.new_tokens} new "
        f"tokens, PID on all {n_layers} layers, {args.threads} threads, "
        f"{args.repeats} interleaved repeats\n"
    )
    print(f"{'variant':<24} {'median s':>9} {'ratio to unsteered':>19}")
    rows = {}
    for name, median in medians.items():
        base = name.split("+")[0]
        ratio = median / medians[base]
        rows[name] = {"median_s": median, "ratio": ratio, "times": times[name]}
        print(f"{name:<24} {median:>9.3f} {ratio:>19.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(vars(args) | {"results": rows}, default=str, indent=2)
    )


if __name__ == "__main__":
    main()
