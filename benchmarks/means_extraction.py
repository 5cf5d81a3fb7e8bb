"""Cost of contrastive-means extraction against plain forward passes.

On the embedded SmolLM2 and the SST-2 training sample, this times
``contrastive_means`` (every layer, resid_post, token means) against plain
Hugging Face forward passes over the same token batches, chunk by chunk and
interleaved (the order alternates per chunk), with the torch thread count
fixed. Two baselines: the full causal LM (logits) and the base model alone
(no LM head), which is what extraction has to run at least.

Memory: in a fresh subprocess per data size, the peak resident set size
(VmHWM of /proc/self/status) above the loaded model, for plain forwards and
for extraction over the same texts; extraction keeps float64 running sums, so
its peak should not grow with the number of texts.

    .venv/bin/python benchmarks/means_extraction.py            # 2,000 texts
    .venv/bin/python benchmarks/means_extraction.py --n 400    # quicker
"""

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "sst2" / "train_sample.tsv"


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # writing 5 resets this process's VmHWM to its current RSS (Linux >= 4.0)
    Path("/proc/self/clear_refs").write_text("5")


def _texts(n: int) -> tuple[list[str], list[str]]:
    from controllens.data import load_labelled_tsv

    data = load_labelled_tsv(TRAIN, limit=(n + 1) // 2)
    return list(data.target[: (n + 1) // 2]), list(data.source[: n // 2])


def _batches(texts: list[str], tokenizer, batch_size: int) -> list[dict]:
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        )
        out.append(dict(enc))
    return out


def _plain(module, batches: list[dict]) -> None:
    with torch.inference_mode():
        for batch in batches:
            module(**batch, use_cache=False)


def _timing(args: argparse.Namespace) -> dict:
    from controllens.models import load_hf
    from controllens.vectors import contrastive_means

    model, tokenizer = load_hf()
    target, source = _texts(args.n)
    rows = {"extract": 0.0, "forward_lm": 0.0, "forward_base": 0.0}
    ratios = []
    n_tokens = 0

    # warm-up, so that no variant pays first-call costs (weights paging in)
    _plain(model, _batches(target[:16], tokenizer, args.batch_size))
    contrastive_means(
        model, target=target[:4], source=source[:4], tokenizer=tokenizer,
        progress=False,
    )  # fmt: skip

    # one chunk = one target batch and one source batch; the variants take
    # turns chunk by chunk, in alternating order, so that the drifting load
    # of a shared machine hits all of them alike
    step = args.batch_size
    for i, start in enumerate(range(0, len(target), step)):
        t, s = target[start : start + step], source[start : start + step]
        if not t or not s:
            break
        batches = _batches(t, tokenizer, step) + _batches(s, tokenizer, step)
        n_tokens += sum(int(b["attention_mask"].sum()) for b in batches)

        def extract(t=t, s=s) -> None:
            contrastive_means(
                model, target=t, source=s, tokenizer=tokenizer, batch_size=step,
                progress=False,
            )  # fmt: skip

        variants = [
            ("extract", extract),
            ("forward_lm", lambda b=batches: _plain(model, b)),
            ("forward_base", lambda b=batches: _plain(model.model, b)),
        ]
        if i % 2:
            variants.reverse()
        chunk = {}
        for name, run in variants:
            t0 = time.perf_counter()
            run()
            chunk[name] = time.perf_counter() - t0
            rows[name] += chunk[name]
        ratios.append(chunk["extract"] / chunk["forward_base"])
        if i % 10 == 0:
            logging.info("chunk %d: %s", i, {k: round(v, 1) for k, v in rows.items()})

    return {
        "n_texts": 2 * min(len(target), len(source)),
        "n_tokens": n_tokens,
        "seconds": rows,
        "ratio_vs_forward_lm": rows["extract"] / rows["forward_lm"],
        "ratio_vs_forward_base": rows["extract"] / rows["forward_base"],
        "median_chunk_ratio_vs_forward_base": statistics.median(ratios),
    }


def _memory_child(n: int, batch_size: int, variant: str) -> dict:
    from controllens.models import load_hf
    from controllens.vectors import contrastive_means

    model, tokenizer = load_hf()
    target, source = _texts(n)
    # the weights are memory-mapped: page them in before taking the baseline
    _plain(model.model, _batches(target[:batch_size], tokenizer, batch_size))
    model_rss = _status_mb("VmRSS")
    _reset_peak()
    if variant == "plain":
        # token batches one at a time, as extraction makes them
        for texts in (target, source):
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                _plain(model.model, _batches(batch, tokenizer, batch_size))
    else:
        contrastive_means(
            model, target=target, source=source, tokenizer=tokenizer,
            batch_size=batch_size, progress=False,
        )  # fmt: skip
    return {
        "model_rss_mb": model_rss,
        "peak_above_model_mb": _status_mb("VmHWM") - model_rss,
    }


def _memory(args: argparse.Namespace) -> list[dict]:
    out = []
    for n in args.memory_sizes:
        row = {"n_texts": n}
        for variant in ("plain", "extract"):
            cmd = [
                sys.executable, __file__, "--memory-child", str(n), variant,
                "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            ]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            child = json.loads(result.stdout.strip().splitlines()[-1])
            row["model_rss_mb"] = child["model_rss_mb"]
            row[f"{variant}_peak_above_model_mb"] = child["peak_above_model_mb"]
            logging.info("memory %s", row)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="texts for timing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[500, 2000])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "means_extraction.json"
    )
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("controllens").setLevel(logging.WARNING)
    if not TRAIN.is_file():
        sys.exit(f"SST-2 sample not found at {TRAIN} (expected ../shared/data)")

    if args.memory_child:
        n, variant = args.memory_child
        print(json.dumps(_memory_child(int(n), args.batch_size, variant)))
        return

    timing = _timing(args)
    memory = _memory(args)
    result = {
        "model": "SmolLM2-135M-Instruct",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "timing": timing,
        "memory": memory,
    }

    s = timing["seconds"]
    print(f"\ncontrastive means, {timing['n_texts']} SST-2 texts, "
          f"{timing['n_tokens']} tokens, batch {args.batch_size}, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'variant':<28}{'seconds':>10}{'extract / it':>14}")
    for name, label in [
        ("extract", "contrastive_means"),
        ("forward_lm", "plain forward (causal LM)"),
        ("forward_base", "plain forward (base model)"),
    ]:
        print(f"{label:<28}{s[name]:>10.1f}{s['extract'] / s[name]:>14.3f}")
    median = timing["median_chunk_ratio_vs_forward_base"]
    print(f"median per-chunk ratio vs base model: {median:.3f}")
    print(f"\n{'texts':>6}{'model RSS':>12}{'plain peak+':>14}{'extract peak+':>15}")
    for m in memory:
        print(
            f"{m['n_texts']:>6}{m['model_rss_mb']:>10.0f}MB"
            f"{m['plain_peak_above_model_mb']:>12.1f}MB"
            f"{m['extract_peak_above_model_mb']:>13.1f}MB"
        )

    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
