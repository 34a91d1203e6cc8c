"""``python -m apt`` / ``apt-train``: train, inspect profiles, validate configs.

Exit codes: 0 success, 2 configuration or usage error (a message, no traceback), 1 any other
failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import yaml

from apt.core.config import APTConfig, list_profiles, load_profile, resolve_profile
from apt.core.errors import APTError, ConfigError, DistributedError

__all__ = ["main"]

log = logging.getLogger("apt")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apt", description="APT: config-driven training of transformer LMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train from a profile")
    train.add_argument("--profile", "-p", required=True, help="profile name or YAML path")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    train.add_argument("--task", help="training task (same as --set training.task=NAME)")
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though resume-critical config keys changed",
    )
    train.add_argument(
        "--new-run",
        action="store_true",
        help="move an existing run folder aside and start a new run",
    )

    profiles = sub.add_parser("profiles", help="list or show profiles")
    psub = profiles.add_subparsers(dest="action", required=True, metavar="ACTION")
    psub.add_parser("list", help="list the profiles found")
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

    sub.add_parser("tasks", help="list the training tasks")

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
    return parser


class _ProgressFriendlyHandler(logging.Handler):
    """Writes log lines through tqdm so they do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging() -> None:
    # Only rank 0 speaks, unless something is wrong.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    handler = _ProgressFriendlyHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _check_callbacks(cfg: APTConfig) -> None:
    from apt.trainops.engine.callbacks import build_callbacks

    build_callbacks(cfg.callbacks, sink=None, schedules=cfg.schedules)


def _end_with_launcher() -> None:
    """Under torchrun, die with the launcher: torchrun starts workers in sessions of their own,
    so a SIGKILL of the launcher would otherwise leave them training into the run folder, racing
    the next run of the same command."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("could not tie this worker to its launcher (errno %d)", ctypes.get_errno())
    elif os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


def _cmd_train(args: argparse.Namespace) -> int:
    _end_with_launcher()
    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"training.task={args.task}")
    cfg = load_profile(args.profile, overrides=overrides)
    from apt.trainops.distributed import teardown_distributed
    from apt.trainops.engine import Trainer

    trainer = Trainer.from_config(
        cfg, allow_config_change=args.allow_config_change, new_run=args.new_run
    )
    log.info("run folder: %s", trainer.run_dir)
    result = trainer.train()
    if trainer.env.is_main and result.exit_signal is None:
        _report(trainer, result)
    # Tear the process group down while every rank is alive and idle: left to interpreter exit,
    # gloo's threads can be destroyed mid-flight ("terminate called without an active
    # exception", exit -6) even though training succeeded.
    teardown_distributed()
    if result.exit_signal is not None:
        print(
            f"stopped by signal {result.exit_signal} at step {result.global_step}; the run is "
            f"saved in {result.run_dir}. Run the same command to resume.",
            file=sys.stderr,
        )
        return 128 + int(result.exit_signal)
    return 0


def _report(trainer: Any, result: Any) -> None:
    metrics = result.metrics
    print(f"run folder: {result.run_dir}")
    if "val_loss_initial" in metrics and "val_loss_final" in metrics:
        first, last = metrics["val_loss_initial"], metrics["val_loss_final"]
        change = (first - last) / first
        print(f"validation loss: {first:.4f} -> {last:.4f} ({change:.1%} lower)")
    prompt = trainer.config.artifacts.sample_prompt
    model = trainer.strategy.unwrap(trainer.model)
    if prompt and hasattr(model, "generate"):
        if trainer.strategy.sharded:
            print("sample: skipped (the model is sharded; load final_model to generate)")
        else:
            print("sample:\n" + _sample(trainer, model, prompt))


def _sample(trainer: Any, model: Any, prompt: str) -> str:
    import torch

    from apt.trainops.data import build_tokenizer

    tokenizer = build_tokenizer(trainer.config.data.tokenizer)
    ids = torch.tensor([list(tokenizer.encode(prompt))], device=trainer.device)
    gen = torch.Generator(device=trainer.device).manual_seed(trainer.config.training.seed)
    out = model.generate(ids, max_new_tokens=160, temperature=0.8, top_k=40, generator=gen)
    return str(tokenizer.decode(out[0].tolist()))


def _provenance_lines(cfg: APTConfig) -> list[str]:
    lines: list[str] = []

    def walk(node: Any, prefix: str, indent: int) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else key
            pad = "  " * indent
            if isinstance(value, dict) and value:
                lines.append(f"{pad}{key}:")
                walk(value, dotted, indent + 1)
            else:
                text = yaml.safe_dump({key: value}, default_flow_style=True, width=200).strip()
                lines.append(f"{pad}{text[1:-1]:<48} # {cfg.origin_of(dotted)}")

    walk(cfg.to_dict(), "", 0)
    return lines


def _cmd_profiles(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name in list_profiles():
            print(name)
        return 0
    if not args.resolved:
        print(resolve_profile(args.profile).read_text(encoding="utf-8"), end="")
        return 0
    cfg = load_profile(args.profile, overrides=args.overrides)
    print(f"# {args.profile}: resolved from {cfg.source}")
    print("\n".join(_provenance_lines(cfg)))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.action == "schema":
        schema = APTConfig.model_json_schema()
        schema["properties"]["extends"] = {
            "type": "string",
            "description": "Parent profile whose values this file overrides.",
        }
        print(json.dumps(schema, indent=2))
        return 0
    cfg = load_profile(args.file, overrides=args.overrides)
    _check_callbacks(cfg)
    print(f"OK: {cfg.source} is a valid APT config (fingerprint {cfg.fingerprint()[:12]})")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from apt.trainops.engine import TASKS

    for name in TASKS.names():
        print(name)
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    if not args.train_args or args.train_args[0] != "train":
        raise ConfigError(
            "launch runs a train command: launch --nproc-per-node 2 train --profile P"
        )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from apt.trainops.distributed.env import STATIC_RENDEZVOUS_ENV

    argv = [
        f"--nproc-per-node={args.nproc_per_node}",
        f"--nnodes={args.nnodes}",
        f"--node-rank={args.node_rank}",
        f"--master-addr={args.master_addr}",
        f"--master-port={args.master_port}",
        f"--max-restarts={args.max_restarts}",
        "--module",
        "apt",
        *args.train_args,
    ]
    os.environ[STATIC_RENDEZVOUS_ENV] = "1"  # torchrun passes it on to every worker
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as exc:
        failures = "; ".join(
            f"rank {rank}: exit code {failure.exitcode}" for rank, failure in exc.failures.items()
        )
        print(
            f"error: training processes failed ({failures}); see their messages above",
            file=sys.stderr,
        )
        return 1
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "profiles": _cmd_profiles,
    "config": _cmd_config,
    "tasks": _cmd_tasks,
    "launch": _cmd_launch,
}


def _exit_now(code: int) -> NoReturn:
    """End the process at once with ``code``, after flushing what it printed and logged.

    A process group whose peer died or hangs cannot be torn down cleanly: its destructors, run
    at interpreter exit, can block on the lost peer or abort the process (exit -6 instead of
    the code the error promised). The run's files are closed already; nothing else needs to run.
    """
    for handler in logging.getLogger().handlers + logging.getLogger("apt").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return exc.exit_code
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _exit_now(exc.exit_code)
    except APTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
