"""The ``mixjax`` command: ``run`` the pipeline, ``report`` an artifact, ``eval`` it on data,
``compress`` a run's float model one shot.

Examples::

    mixjax run                                    # embedded digits, defaults, ./mixjax-run
    mixjax run --model resnet20 --output out      # ResNet-20 (BatchNorm) on the digits
    mixjax run --task lm --dataset text:input.txt # GPT-tiny on a character corpus
    mixjax run --config run.toml --train-steps 500 --output out
    mixjax run --output out --resume              # continue from the latest checkpoints
    mixjax run --output out --overwrite           # start the run in out again
    mixjax report out/model.mjx                   # per-leaf size table
    mixjax eval out/model.mjx --data digits --split test
    mixjax compress out --method gptq --bits 4 --group-size 32 --output out-gptq
    mixjax compress out --method sparsegpt --sparsity 2:4 --bits 8 --output out-24

Settings come from the defaults (:mod:`mixjax.app.config`), then ``--config FILE.toml``, then the
options given; ``mixjax run --help`` lists every option with its default. A bad option or value,
a missing file, an unknown dataset or an invalid TOML file ends with one line
``mixjax: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from mixjax import models
from mixjax.app import config as config_lib

__all__ = ["PROG", "UsageError", "build_parser", "main"]

PROG = "mixjax"
_CHOICES = {
    "data.task": models.TASKS,
    "train.compensation": config_lib.COMPENSATIONS,
    "train.model": tuple(sorted(models.MODELS)),
}
_TYPES = {"int": int, "float": float, "str": str}
# mixjax.app.compress.QUANTIZERS and PRUNERS (named here so a bad command line fails before JAX
# is imported; a test keeps them equal).
_QUANTIZERS = ("gptq", "awq", "rtn")
_PRUNERS = ("sparsegpt", "wanda", "magnitude")
_SAMPLES = 128  # mixjax.app.compress.DEFAULT_SAMPLES


class UsageError(Exception):
    """A bad command line (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE.toml", help="TOML file of settings (default: none)"
    )
    groups = {}
    for key, field in config_lib.options():
        section = key.split(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"[{section}] settings")
        default = field.default
        if key in config_lib.LM_DEFAULTS and key != "data.task":
            default = f"{default}; --task lm: {config_lib.LM_DEFAULTS[key]}"
        for model, recipe in config_lib.MODEL_DEFAULTS.items():
            if key in recipe:
                default = f"{default}; --model {model}: {recipe[key]}"
        groups[section].add_argument(
            field.metadata["flag"],
            dest=key.replace(".", "__"),
            type=_TYPES[config_lib.base_type(field.type)],
            choices=_CHOICES.get(key),
            default=None,
            metavar=None if key in _CHOICES else config_lib.base_type(field.type).upper(),
            help=f"{field.metadata['help']} (default: {default}; TOML: {key})",
        )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its latest intact checkpoints (the same settings)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of an earlier run in --output (files mixjax did not write are "
        "kept); without --resume or --overwrite, --output must be empty or absent",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="stop after this many steps of all stages (checkpointed), to --resume later "
        "(default: run to the end)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars or log lines (default: off)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``mixjax`` argument parser with its ``run``, ``report``, ``eval`` and ``compress``
    subcommands."""
    parser = _Parser(
        prog=PROG,
        description="mixjax: train, compress, export and evaluate image classifiers and "
        "character-level language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `mixjax COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="train, prune, cluster, QAT, export and evaluate (the whole pipeline)",
        description="Train an image classifier with augmentation and delayed-gradient updates, "
        "prune it gradually, cluster and quantize it with QAT, export the artifact, evaluate "
        "float vs compressed vs integer inference and write report.json and plots to --output. "
        "With --task lm: train a language model on --dataset text:FILE, prune it 2:4, quantize "
        "its weights to int8 and to int4 in groups of 32, export the int4 artifact and report "
        "the validation loss and perplexity of each.",
    )
    _add_run_options(run)
    report = commands.add_parser("report", help="print an artifact's per-leaf size table")
    report.add_argument("path", metavar="PATH", help="artifact file (e.g. mixjax-run/model.mjx)")
    report.add_argument(
        "--json", action="store_true", help="print the rows as JSON (default: markdown)"
    )
    evaluate = commands.add_parser("eval", help="evaluate an artifact on a dataset split")
    evaluate.add_argument("path", metavar="PATH", help="artifact file written by `mixjax run`")
    evaluate.add_argument(
        "--data",
        default="digits",
        help="dataset: 'digits', a prepared TFDS name, 'idx:DIR' or 'npz:FILE' (default: digits)",
    )
    evaluate.add_argument("--split", default="test", help="split to evaluate (default: test)")
    _add_compress(commands)
    return parser


def _add_compress(commands: Any) -> None:
    methods = ", ".join((*_QUANTIZERS, *_PRUNERS))
    compress = commands.add_parser(
        "compress",
        help="compress a run's float model one shot from calibration data (no training)",
        description="Compress the float model of a finished `mixjax run` (its output directory, "
        "or a float checkpoint RUN/checkpoints/float/STEP) layer by layer from calibration data, "
        "without training: GPTQ or round-to-nearest quantization, SparseGPT (with --bits: joint "
        "sparsity and quantization), Wanda or magnitude pruning (with --bits: then "
        "round-to-nearest). Writes report.json (the keys of `mixjax run`'s), the artifact "
        "model.mjx and the plots to --output.",
    )
    compress.add_argument(
        "source", metavar="RUN_DIR", help="`mixjax run` output directory or float checkpoint"
    )
    compress.add_argument(
        "--method",
        required=True,
        metavar="METHOD",
        help=f"one of {methods}",
    )
    compress.add_argument(
        "--bits",
        type=int,
        metavar="B",
        help="weight bits, 2..8: needed by gptq, awq and rtn; optional for the pruning methods",
    )
    compress.add_argument(
        "--sparsity",
        metavar="S|N:M",
        help="pruning methods: the fraction pruned per output feature, in [0, 1), or N:M "
        "(keep N of every M inputs, e.g. 2:4)",
    )
    compress.add_argument(
        "--group-size",
        type=int,
        metavar="G",
        help="with --bits: one scale per G input rows of each layer (must divide every layer's "
        "inputs; default: one per output feature)",
    )
    compress.add_argument(
        "--skip",
        metavar="REGEX",
        help="leave float the layers whose parameter path matches REGEX (e.g. 'Conv_0' for a "
        "first conv whose inputs N:M does not divide)",
    )
    compress.add_argument(
        "--dataset",
        help="calibration and evaluation dataset (default: the run's; 'text:FILE' for a "
        "language model)",
    )
    compress.add_argument(
        "--calibration-samples",
        type=int,
        default=_SAMPLES,
        metavar="N",
        help=f"training images (or text windows) to calibrate on (default: {_SAMPLES})",
    )
    compress.add_argument(
        "--output", metavar="DIR", help="output directory (default: RUN_DIR-METHOD beside the run)"
    )
    compress.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of an earlier `mixjax compress` in --output",
    )
    compress.add_argument(
        "--quiet", action="store_true", help="no progress bars or log lines (default: off)"
    )


def _config(args: argparse.Namespace) -> config_lib.Config:
    changes = {
        key: getattr(args, key.replace(".", "__"))
        for key, _ in config_lib.options()
        if getattr(args, key.replace(".", "__")) is not None
    }
    return config_lib.validate(config_lib.load(args.config or None, changes))


def _summary(report: dict) -> str:
    lm = report["task"] == "lm"
    columns = ["val loss", "perplexity"] if lm else ["test accuracy"]
    lines = [
        f"| model | {' | '.join(columns)} | bytes | x dense |",
        "|---|" + "---:|" * (len(columns) + 2),
    ]
    dense = report["bytes_dense"]
    for s in report["stages"]:
        cells = (
            [f"{s['val_loss']:.4f}", f"{s['perplexity']:.2f}"]
            if lm
            else [f"{100 * s['accuracy']:.2f}%"]
        )
        lines.append(
            f"| {s['stage']} | {' | '.join(cells)} | {s['bytes']} | {dense / s['bytes']:.1f}x |"
        )
    rate = report["train_steps_per_second"]
    size = (
        f"{report['bytes_compressed']} bytes, {report['compression_ratio']:.1f}x smaller than "
        "float32"
    )
    speed = f"{'-' if rate is None else f'{rate:.0f}'} train steps/s"
    if "oneshot" in report:  # mixjax compress: no training; the one-shot pass's time instead
        speed = f"one-shot {report['timings_s']['oneshot']:.1f} s"
    total = f"{report['timings_s']['total']:.0f} s in all"
    if lm:
        return "\n".join(
            [
                *lines,
                "",
                f"val loss float {report['val_loss_float']:.4f}, compressed "
                f"{report['val_loss_compressed']:.4f} (perplexity {report['perplexity_float']:.2f} "
                f"-> {report['perplexity_compressed']:.2f}); {size}",
                f"{speed}; {total}",
            ]
        )
    return "\n".join(
        [
            *lines,
            "",
            f"accuracy float {100 * report['accuracy_float']:.2f}%, compressed "
            f"{100 * report['accuracy_compressed']:.2f}%, integer "
            f"{100 * report['accuracy_integer']:.2f}%; {size}",
            f"integer inference {report['inference_speedup_integer']:.2f}x the float forward; "
            f"{speed}; {total}",
        ]
    )


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"argument --stop-after: must be >= 1, got {args.stop_after}")
    from mixjax.app import pipeline  # JAX is imported only once the command line is valid

    try:
        report = pipeline.run(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            quiet=args.quiet,
            progress=not args.quiet,
            stop_after=args.stop_after,
        )
    except pipeline.Stopped as stop:
        print(f"{PROG}: {stop}", file=sys.stderr)
        return 0
    print(_summary(report))
    out = cfg.run.output
    print(f"\nwrote {out}/{pipeline.REPORT}, {out}/{pipeline.ARTIFACT}, plots {report['plots']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mixjax import _markdown, export
    from mixjax.export.report import row_dict

    artifact = export.load(args.path)
    table = export.table(artifact)
    if args.json:
        print(json.dumps([row_dict(r) for r in table.rows], indent=1))
        return 0
    meta = artifact.metadata
    if "model" in meta:  # metadata is the file's: escaped (no ANSI codes, no newlines)
        keys = ("model", "num_classes", "input_shape")
        model, classes, shape = (_markdown.cell(meta.get(key, "?")) for key in keys)
        print(f"model {model}, {classes} classes, input {shape}")
    print(table.markdown)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mixjax import data, export
    from mixjax.app import evaluate

    artifact = export.load(args.path)
    if artifact.metadata.get("task") == "lm":
        raise ValueError(
            f"{args.path!r} holds a language model; `mixjax eval` evaluates image classifiers "
            "(the validation loss and perplexity of a --task lm run are in its report.json)"
        )
    try:  # metadata and leaves checked against the model before any data is read
        fns = evaluate.forwards(artifact)
    except ValueError as err:
        raise ValueError(f"{args.path!r}: {err}") from None
    dataset = data.load(args.data, args.split)
    scores = evaluate.evaluate(artifact, dataset, fns=fns)
    print(f"{args.data} {args.split}: {len(dataset.labels)} images")
    for name, value in scores.items():
        print(f"{name}: {100 * value:.2f}%")
    return 0


def _sparsity(text: str | None) -> float | tuple[int, int] | None:
    if text is None:
        return None
    rule = f"must be a fraction in [0, 1) or N:M with 1 <= N <= M, got {text!r}"
    try:
        if ":" in text:
            n, m = (int(part) for part in text.split(":"))
            if not 1 <= n <= m:
                raise ValueError
            return n, m
        value = float(text)
    except ValueError:
        raise UsageError(f"argument --sparsity: {rule}") from None
    if not 0 <= value < 1:  # False for NaN too
        raise UsageError(f"argument --sparsity: {rule}")
    return value


def _compress_options(args: argparse.Namespace) -> dict[str, Any]:
    """The command line of ``mixjax compress``, checked (before JAX is imported)."""
    method = args.method
    if method not in (*_QUANTIZERS, *_PRUNERS):
        raise UsageError(
            f"argument --method: invalid choice {method!r} (choose from "
            f"{', '.join((*_QUANTIZERS, *_PRUNERS))})"
        )
    sparsity = _sparsity(args.sparsity)
    if args.bits is not None and not 2 <= args.bits <= 8:
        raise UsageError(f"argument --bits: must be in 2..8, got {args.bits}")
    if method in _QUANTIZERS and args.bits is None:
        raise UsageError(f"--method {method} needs --bits (2..8)")
    if method in _QUANTIZERS and sparsity is not None:
        raise UsageError(
            f"--sparsity applies to the pruning methods ({', '.join(_PRUNERS)}); --method "
            f"{method} only quantizes"
        )
    if method in _PRUNERS and sparsity is None:
        raise UsageError(
            f"--method {method} needs --sparsity (a fraction in [0, 1), or N:M such as 2:4)"
        )
    if args.group_size is not None and args.bits is None:
        raise UsageError("--group-size needs --bits (it sets the quantization groups)")
    if args.group_size is not None and args.group_size < 1:
        raise UsageError(f"argument --group-size: must be >= 1, got {args.group_size}")
    if args.calibration_samples < 1:
        raise UsageError(
            f"argument --calibration-samples: must be >= 1, got {args.calibration_samples}"
        )
    if args.skip is not None:
        try:
            re.compile(args.skip)
        except re.error as err:
            raise UsageError(f"argument --skip: not a regular expression ({err})") from None
    return dict(
        method=method,
        bits=args.bits,
        sparsity=sparsity,
        group_size=args.group_size,
        skip=args.skip,
        dataset=args.dataset,
        samples=args.calibration_samples,
        output=args.output,
        overwrite=args.overwrite,
        quiet=args.quiet,
        progress=not args.quiet,
    )


def _compress(args: argparse.Namespace) -> int:
    options = _compress_options(args)
    from mixjax.app import compress

    report = compress.run(args.source, **options)
    print(report["oneshot_layers_markdown"])
    print()
    print(_summary(report))
    out = report["config"]["run"]["output"]
    print(f"\nwrote {out}/{compress.ARTIFACT}, {out}/{compress.REPORT}, plots {report['plots']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``mixjax`` command; returns the exit status (0, 2 for errors, 130 on Ctrl-C)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        commands = {"run": _run, "report": _report, "eval": _eval, "compress": _compress}
        return commands[args.command](args)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except (UsageError, ValueError, TypeError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = (
            "" if args is None or args.command != "run" else "; continue with `mixjax run --resume`"
        )
        print(f"{PROG}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
