"""``python -m apt`` / ``apt-train``: train, inspect profiles, validate configs.

Exit codes: 0 success, 2 configuration or usage error, or a run folder that cannot be used (held
by another run, a file, not writable) (a message, no traceback), 1 any other failure, 128 + the
signal when stopped by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from apt.cli.console import guard_console
from apt.cli.data_cmd import add_data_parser, cmd_data
from apt.cli.eval_cmd import add_eval_parser, cmd_eval
from apt.cli.export_cmd import add_export_parser, cmd_export
from apt.cli.inspect_cmds import cmd_config, cmd_profiles, cmd_tasks
from apt.cli.models_cmd import add_models_parser, cmd_models
from apt.cli.train_cmds import cmd_finetune, cmd_launch, cmd_train
from apt.core.errors import APTError, ConfigError, DistributedError
from apt.core.logs import install_console_logging
from apt.core.version import __version__
from apt.trainops.engine.signals import StopNow

__all__ = ["main"]

log = logging.getLogger("apt")


def _prog() -> str:
    """How the user called us: ``apt-train`` (the console script) or ``python -m apt``."""
    return "apt-train" if Path(sys.argv[0]).name == "apt-train" else "python -m apt"


def _add_run_options(command: argparse.ArgumentParser) -> None:
    """The options every training command takes."""
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    command.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though resume-critical config keys changed",
    )
    command.add_argument(
        "--new-run",
        action="store_true",
        help="move an existing run folder aside and start a new run",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(), description="APT: config-driven training of transformer LMs."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train from a profile")
    train.add_argument("--profile", "-p", required=True, help="profile name or YAML path")
    train.add_argument("--task", help="training task (same as --set training.task=NAME)")
    _add_run_options(train)

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune a saved model on prompt/completion or chat examples "
        "(finetune --profile finetune --model NAME|DIR --data FILE.jsonl)",
    )
    finetune.add_argument(
        "--profile", "-p", default="finetune", help="profile name or YAML path (finetune)"
    )
    finetune.add_argument(
        "--model",
        help="the model to start from: a folder (python -m apt export) or a store name "
        "(python -m apt models list); sets finetune.base_model",
    )
    finetune.add_argument("--data", help="training examples (.jsonl); sets data.source.path")
    finetune.add_argument(
        "--val-data", help="validation examples (.jsonl); sets data.source.val_path"
    )
    _add_run_options(finetune)

    profiles = sub.add_parser("profiles", help="list or show profiles")
    psub = profiles.add_subparsers(dest="action", required=True, metavar="ACTION")
    psub.add_parser("list", help="list the profiles found, and where each was found")
    show = psub.add_parser("show", help="print a profile")
    show.add_argument("profile")
    show.add_argument(
        "--resolved",
        action="store_true",
        help="print the validated config with where each value came from",
    )
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    config = sub.add_parser("config", help="validate configs, print the JSON schema")
    csub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    validate = csub.add_parser("validate", help="validate a profile file")
    validate.add_argument("file")
    validate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    csub.add_parser("schema", help="print the JSON Schema of the config (for editors)")

    sub.add_parser("tasks", help="list the training tasks, each with what it does")

    launch = sub.add_parser(
        "launch",
        help="start N processes per node with torchrun, e.g. launch --nproc-per-node 2 "
        "train --profile ddp",
    )
    launch.add_argument("--nproc-per-node", type=int, default=1, help="processes on this node")
    launch.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's rank")
    launch.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    launch.add_argument("--master-port", type=int, default=29500, help="free port on node 0")
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart the whole group this many times after a failure "
        "(each restart resumes from the newest checkpoint)",
    )
    launch.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        metavar="COMMAND",
        help="the apt command every process runs (train --profile ...)",
    )
    add_eval_parser(sub)
    add_data_parser(sub)
    add_export_parser(sub)
    add_models_parser(sub)
    return parser


_COMMANDS = {
    "train": cmd_train,
    "finetune": cmd_finetune,
    "profiles": cmd_profiles,
    "config": cmd_config,
    "tasks": cmd_tasks,
    "launch": cmd_launch,
    "eval": cmd_eval,
    "data": cmd_data,
    "export": cmd_export,
    "models": cmd_models,
}


def _exit_code(code: int) -> int:
    """``code``; a process of a distributed run ends with it at once instead.

    Its ranks stop together on an error every rank raises (a run folder another run holds, a
    failed save or export), and gloo's threads can abort a process in the interpreter's
    finalization; the run's files are closed by then.
    """
    if "torch.distributed" in sys.modules:
        from apt.trainops.distributed import exit_process, in_process_group

        if in_process_group():
            exit_process(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    guard_console()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    install_console_logging(main=os.environ.get("RANK", "0") == "0", always=True)
    logging.basicConfig(level=logging.WARNING)  # other libraries: warnings and errors only
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return _exit_code(exc.exit_code)
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        # The process group whose peer died cannot be torn down: its destructors can block on
        # the lost peer or abort the process; end now, with the code the error promises.
        from apt.trainops.distributed import exit_process

        exit_process(exc.exit_code)
    except APTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _exit_code(exc.exit_code)
    except StopNow as exc:
        print(
            f"{signal.Signals(exc.signum).name} again: stopped at once, without saving. The "
            "newest checkpoint of the run is intact: run the same command to resume from it.",
            file=sys.stderr,
        )
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
