"""Command line: ``controllens demo`` and ``controllens steer``."""

import argparse
import logging
import sys
from pathlib import Path

from controllens.steering import METHODS

__all__ = ["main"]


def _layers(text: str) -> tuple[int, ...]:
    """Parse ``"3,5,-1"`` or ``"2-20"`` into layer indices."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                cut = part.index("-", 1)
                first, last = int(part[:cut]), int(part[cut + 1 :])
                if last < first:
                    raise argparse.ArgumentTypeError(
                        f"layer range {part!r} runs backwards; write it low-high"
                    )
                layers += range(first, last + 1)
            else:
                layers.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layer indices like 0-29 or 4,8,-1, got {text!r}"
        ) from None
    return tuple(layers)


def _positions(text: str) -> str | int:
    """Parse ``--positions``: a name or a start position."""
    if text in ("all", "prompt", "generated"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected all, prompt, generated or an integer, got {text!r}"
        ) from None


def _demo(args: argparse.Namespace) -> int:
    from controllens.demo import DemoConfig, run_demo

    config = DemoConfig(
        model=args.model,
        data_dir=args.data_dir or DemoConfig().data_dir,
        out_dir=args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if not (config.data_dir / "sst2" / "dev.tsv").is_file():
        print(
            f"error: SST-2 data not found under {config.data_dir}/sst2. Point "
            "--data-dir (or CONTROLLENS_DATA) at the folder holding sst2/.",
            file=sys.stderr,
        )
        return 2
    results = run_demo(config, say=lambda line: print(line, flush=True))
    _print_table(results)
    print(
        f"\nwrote {config.out_dir / 'results.json'} and {config.out_dir / 'layers.png'}"
    )
    return 0


def _print_table(results: dict) -> None:
    test = results["test"]
    chosen = results["chosen"]
    accuracy = results["scorer"]["sst2_dev_accuracy"]
    print(
        f"\nSentiment steering of {results['model']} on {len(results['prompts'])} "
        f"held-out negative SST-2 dev prompts (scorer: {results['scorer']['name']}, "
        f"its SST-2 dev accuracy {accuracy:.3f})\n"
    )
    print(f"{'method':<10} {'settings':<34} {'positive':>9} {'perplexity':>11}")
    for name, row in test.items():
        settings = "-"
        if name in chosen:
            g = chosen[name]["gains"]
            settings = (
                f"alpha={chosen[name]['alpha']} kp={g['kp']} ki={g['ki']} kd={g['kd']}"
            )
        print(
            f"{name:<10} {settings:<34} {row['positive_rate']:>9.2f} "
            f"{row['perplexity']:>11.2f}"
        )
    print("\nSample continuations:")
    for i in range(min(3, len(results["prompts"]))):
        print(f"\n  prompt: {results['prompts'][i]!r}")
        for name, row in test.items():
            print(f"    {name:<10} {row['texts'][i][:100]!r}")


def _steer(args: argparse.Namespace) -> int:
    from controllens.controllers import Gains
    from controllens.data import from_texts, load_caa, load_labelled_tsv
    from controllens.evaluate import generate
    from controllens.models import load_bridge
    from controllens.steering import Steering
    from controllens.vectors import ContrastiveMeans, contrastive_means

    model = load_bridge(args.model)
    if args.load_path:
        means = ContrastiveMeans.load(args.load_path, model=model)
    else:
        if args.tsv:
            data = load_labelled_tsv(args.tsv, limit=args.limit)
        elif args.caa:
            data = load_caa(args.caa)
        elif args.target and args.source:
            read = lambda path: [  # noqa: E731
                line.strip()
                for line in Path(path).read_text().splitlines()
                if line.strip()
            ]
            data = from_texts(read(args.target), read(args.source))
        else:
            print(
                "error: give contrastive data with --tsv, --caa, --target and "
                "--source, or saved means with --load.",
                file=sys.stderr,
            )
            return 2
        moments = args.method in ("pca", "transport", "rotate")
        means = contrastive_means(
            model, data, aggregation=args.aggregation, moments=moments
        )
    if args.save_path:
        print(f"saved means to {means.save(args.save_path)}")

    steering = Steering.from_means(
        means,
        layers=args.layers,
        gains=Gains(
            kp=args.kp, ki=args.ki, kd=args.kd, integral_bound=args.integral_bound
        ),
        alpha=args.alpha,
        positions=args.positions,
        method=args.method,
        **({"angle": args.angle} if args.method == "rotate" else {}),
    )
    prompts = args.prompt or ["I think this movie is"]
    kwargs = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, progress=False)
    plain = generate(model, prompts, None, **kwargs)
    steered = generate(model, prompts, steering, **kwargs)
    print(
        f"{steering.gains.name} {args.method} steering, alpha={steering.alpha}, "
        f"layers {steering.layers[0]}..{steering.layers[-1]}"
    )
    for prompt, a, b in zip(prompts, plain.texts, steered.texts, strict=True):
        print(f"\nprompt:    {prompt!r}\nunsteered: {a!r}\nsteered:   {b!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``controllens`` command."""
    parser = argparse.ArgumentParser(
        prog="controllens",
        description="PID activation steering for TransformerLens and nnsight.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="SST-2 sentiment steering of the embedded SmolLM2, P vs PID"
    )
    demo.add_argument("--model", help="local HF model folder (default: embedded)")
    demo.add_argument("--data-dir", type=Path, help="folder holding sst2/")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--n-train", type=int, default=200, help="texts per side")
    demo.add_argument("--n-val", type=int, default=24, help="tuning prompts")
    demo.add_argument("--n-test", type=int, default=60, help="held-out prompts")
    demo.add_argument("--max-new-tokens", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    steer = commands.add_parser("steer", help="steer your own model with your data")
    steer.add_argument("--model", help="local HF model folder (default: embedded)")
    steer.add_argument("--tsv", help="labelled TSV (sentence, label); label 1 = target")
    steer.add_argument("--caa", help="CAA-style A/B JSON")
    steer.add_argument("--target", help="file of target texts, one per line")
    steer.add_argument("--source", help="file of source texts, one per line")
    steer.add_argument("--limit", type=int, help="texts per side from --tsv")
    # dest names avoid "save": nnsight gives every object a .save() once it
    # has traced, and argparse then skips the default of an attribute it sees
    steer.add_argument(
        "--load", dest="load_path", help="saved means (.safetensors) instead of data"
    )
    steer.add_argument("--save", dest="save_path", help="save the measured means here")
    steer.add_argument("--aggregation", choices=("mean", "last"), default="mean")
    steer.add_argument(
        "--layers",
        type=_layers,
        help='e.g. "0-29" or "4,8,12"; negative with "=": --layers=-1 (default: all)',
    )
    steer.add_argument(
        "--method",
        choices=METHODS,
        default="add",
        help="steering method (operator); pca, transport and rotate measure moments",
    )
    steer.add_argument(
        "--angle",
        type=float,
        default=1.0,
        help="degrees per steered layer, for --method rotate",
    )
    steer.add_argument("--kp", type=float, default=1.0)
    steer.add_argument("--ki", type=float, default=0.0)
    steer.add_argument("--kd", type=float, default=0.0)
    steer.add_argument("--integral-bound", type=float)
    steer.add_argument("--alpha", type=float, default=0.2)
    steer.add_argument(
        "--positions",
        type=_positions,
        default="all",
        help="all, prompt, generated, or a start position",
    )
    steer.add_argument("--prompt", action="append", help="prompt (repeatable)")
    steer.add_argument("--max-new-tokens", type=int, default=24)
    steer.add_argument("--seed", type=int, default=0)
    steer.set_defaults(run=_steer)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``controllens`` command.

    Args:
        argv: The arguments after the command name (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on bad input (reported in one line).

    Examples:
        ``--help`` prints the usage and exits, as argparse does:

        >>> import contextlib, io
        >>> text = io.StringIO()
        >>> with contextlib.redirect_stdout(text):
        ...     try:
        ...         main(["steer", "--help"])
        ...     except SystemExit as stop:
        ...         code = stop.code
        >>> code, text.getvalue().startswith("usage: controllens steer")
        (0, True)
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as error:
        # bad input: one line saying what is wrong, not a traceback
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
