"""SmolLM2 upcycled to merged experts and fine-tuned on tinyshakespeare.

Variants, each trained for the same steps and tokens on the MLPs of the same
decoder layers (every other weight frozen):

- ``dense``: the dense MLPs;
- ``sparse-top2``: a classic MoE (output mixture), noisy top-2 routing per token;
- ``smear``: flat weight averaging of all expert slots (SMEAR);
- ``ties``: base + task vectors with Ties sign election;
- ``camex``: base + task vectors through Kronecker-factored curvature;
- ``ep-camex``: CAMEx whose base is the previous layer's merged expert.

Every MoE layer has the same number of expert slots: SMEAR and the sparse MoE
route over all of them, the task-vector methods keep one slot as the base and
route over the rest. Merged methods route causal segments (Lory). Each
(variant, seed) runs in its own process, so peak memory (max resident set) is
its own. Defaults fit about 20 minutes on 2 CPU cores; raise ``--steps``,
``--batch-size`` and ``--seq-len`` for runs that mean more. Usage::

    python benchmarks/camex_finetune.py --json out.json --markdown out.md
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from controllens.camex import (
    MoEConfig,
    TrainConfig,
    UpcycleConfig,
    load_text,
    perplexity,
    train,
    upcycle,
)
from controllens.models import default_model_path, load_hf

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
VARIANTS = ("dense", "sparse-top2", "smear", "ties", "camex", "ep-camex")


def moe_config(variant: str, args: argparse.Namespace) -> MoEConfig | None:
    slots = args.experts
    merged = {"granularity": "segment", "segment_length": args.segment_length}
    return {
        "dense": None,
        "sparse-top2": MoEConfig(
            n_experts=slots, method="mixture", router="noisy_top_k", top_k=2
        ),
        "smear": MoEConfig(n_experts=slots, method="smear", **merged),
        "ties": MoEConfig(n_experts=slots - 1, method="ties", **merged),
        "camex": MoEConfig(
            n_experts=slots - 1, method="camex", curvature_rank=args.rank, **merged
        ),
        "ep-camex": MoEConfig(
            n_experts=slots - 1, method="ep_camex", curvature_rank=args.rank, **merged
        ),
    }[variant]


def worker(variant: str, seed: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    model, tokenizer = load_hf()
    train_ids, val_ids = load_text(args.text, tokenizer, val_fraction=0.1)
    config = moe_config(variant, args)
    if config is not None:
        upcycle(
            model,
            UpcycleConfig(
                layers=tuple(args.layers), moe=config, noise_std=args.noise, seed=seed
            ),
        )
    settings = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        lr=args.lr,
        aux_loss_weight=0.01,
        train_layers=tuple(args.layers),
        eval_batches=args.eval_batches,
        seed=seed,
        progress=False,
    )
    result = train(model, train_ids, val_ids, settings)
    times = result.step_times[1:] or result.step_times
    return {
        "variant": variant,
        "seed": seed,
        "val_perplexity": result.val_perplexity[-1][1],
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "step_time_s": statistics.median(times),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(
            p.numel() for p in model.parameters() if p.requires_grad
        ),
        "tokens": result.tokens_seen,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def baseline(args: argparse.Namespace) -> float:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_hf()
    _, val_ids = load_text(args.text, tokenizer, val_fraction=0.1)
    return perplexity(
        model,
        val_ids,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_batches=args.eval_batches,
    )


def table(runs: list[dict], base_ppl: float) -> str:
    lines = [
        f"Validation perplexity before fine-tuning: {base_ppl:.2f}",
        "",
        "| variant | val ppl (mean +- sd) | step time (s) | params (M) "
        "| trained (M) | peak RSS (MB) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        rows = [r for r in runs if r["variant"] == variant]
        if not rows:
            continue
        ppl = [r["val_perplexity"] for r in rows]
        sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        lines.append(
            f"| {variant} | {statistics.mean(ppl):.3f} +- {sd:.3f} "
            f"| {statistics.mean(r['step_time_s'] for r in rows):.2f} "
            f"| {rows[0]['params'] / 1e6:.2f} "
            f"| {rows[0]['trainable_params'] / 1e6:.2f} "
            f"| {max(r['peak_rss_mb'] for r in rows):.0f} | {len(rows)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="+", default=[26, 27, 28, 29])
    parser.add_argument("--experts", type=int, default=4, help="expert slots")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--segment-length", type=int, default=32)
    parser.add_argument("--rank", type=int, default=1, help="CAMEx Kronecker terms")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--noise", type=float, default=0.01, help="upcycling noise")
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        variant, seed = args.worker
        out = (
            baseline(args)
            if variant == "baseline"
            else worker(variant, int(seed), args)
        )
        print(json.dumps(out))
        return
    if not args.text.is_file():
        sys.exit(f"tinyshakespeare not found at {args.text.resolve()}")
    default_model_path()  # convert the embedded model once, before the workers

    def spawn(variant: str, seed: int):
        forwarded = [a for a in sys.argv[1:]]
        command = [sys.executable, __file__, *forwarded, "--worker", variant, str(seed)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{variant} seed {seed} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    start = time.perf_counter()
    base_ppl = spawn("baseline", 0)
    runs = []
    for seed in range(args.seeds):  # seeds outside, variants inside: interleaved
        for variant in args.variants:
            runs.append(spawn(variant, seed))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    markdown = table(runs, base_ppl)
    markdown += (
        f"\n\n{args.steps} steps x {args.grad_accum} x {args.batch_size} x "
        f"{args.seq_len} tokens, layers {args.layers}, {args.experts} expert slots, "
        f"{args.threads} threads, {time.perf_counter() - start:.0f} s in all."
    )
    print(markdown)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "baseline_perplexity": base_ppl,
                    "runs": runs,
                },
                indent=2,
            )
        )
    if args.markdown:
        args.markdown.write_text(markdown + "\n")


if __name__ == "__main__":
    main()
