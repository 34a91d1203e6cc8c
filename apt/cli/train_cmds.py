"""``train``, ``finetune`` and ``launch``: run training in this process, or in N processes
through torchrun."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from apt.cli.inspect_cmds import check_device
from apt.core.config import load_profile
from apt.core.cpus import default_cpu_threads
from apt.core.errors import ConfigError

__all__ = ["cmd_finetune", "cmd_launch", "cmd_train"]

log = logging.getLogger("apt")


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


def cmd_train(args: argparse.Namespace) -> int:
    _end_with_launcher()
    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"training.task={args.task}")
    from apt.trainops.engine import Trainer

    return _run(Trainer, load_profile(args.profile, overrides=overrides), args)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``finetune --profile finetune --model NAME|DIR --data FILE.jsonl``: ``train`` with
    ``finetune.base_model`` and the sft source's files set from the flags (``--set`` keys
    after them win)."""
    _end_with_launcher()
    flags = []
    if args.model:
        flags.append(f"finetune.base_model={args.model}")
    if args.data:
        flags.append(f"data.source.path={args.data}")
    if args.val_data:
        flags.append(f"data.source.val_path={args.val_data}")
    cfg = load_profile(args.profile, overrides=[*flags, *args.overrides])
    if cfg.finetune.base_model is None:
        raise ConfigError(
            f"finetune --profile {args.profile}: which model? Give --model NAME|DIR (a folder "
            "from python -m apt export, or a name that python -m apt models list shows), or set "
            "finetune.base_model in the profile. To train a new model use python -m apt train."
        )
    from apt.trainops.engine import Finetuner

    return _run(Finetuner, cfg, args)


def _run(trainer_cls: Any, cfg: Any, args: argparse.Namespace) -> int:
    check_device(cfg)
    from apt.trainops.distributed import exit_process, teardown_distributed

    trainer = trainer_cls.from_config(
        cfg, allow_config_change=args.allow_config_change, new_run=args.new_run
    )
    log.info("run folder: %s", trainer.run_dir)
    result = trainer.train()
    if trainer.env.is_main and result.exit_signal is None:
        _report(trainer, result)
    code = _finish_message(result)
    if trainer.env.world_size > 1 or trainer.env.backend is not None:
        # Every rank is alive and idle: tear the group down, then end before finalization,
        # where gloo's threads can abort a process that trained successfully.
        teardown_distributed()
        exit_process(code)
    return code


def _finish_message(result: Any) -> int:
    """Say how an interrupted run ended; the exit code of the run."""
    if result.exit_signal is None:
        return 0
    if result.global_step == 0:
        print(
            f"stopped by signal {result.exit_signal} before the first step; nothing was trained "
            "and nothing saved.",
            file=sys.stderr,
        )
    else:
        print(
            f"stopped by signal {result.exit_signal} at step {result.global_step}; the run is "
            f"saved in {result.run_dir}. Run the same command to resume.",
            file=sys.stderr,
        )
    return 128 + int(result.exit_signal)


def _report(trainer: Any, result: Any) -> None:
    metrics = result.metrics
    print(f"run folder: {result.run_dir}")
    if result.export_error:
        print("final model: NOT exported (the warning above says why)")
    if "val_loss_initial" in metrics and "val_loss_final" in metrics:
        first, last = metrics["val_loss_initial"], metrics["val_loss_final"]
        change = (first - last) / first
        print(f"validation loss: {first:.4f} -> {last:.4f} ({change:.1%} lower)")
    prompt = trainer.config.artifacts.sample_prompt
    model = trainer.strategy.unwrap(trainer.model)
    if not prompt or not hasattr(model, "generate") or result.steps_run == 0:
        return  # nothing trained in this call: its sample was printed when it was
    if trainer.strategy.sharded:
        print("sample: skipped (the model is sharded; load final_model to generate)")
    else:
        print("sample:\n" + _sample(trainer, model, prompt))


def _sample(trainer: Any, model: Any, prompt: str) -> str:
    import torch

    tokenizer = trainer.tokenizer
    ids = torch.tensor([_prompt_ids(trainer.config.data, tokenizer, prompt)], device=trainer.device)
    gen = torch.Generator(device=trainer.device).manual_seed(trainer.config.training.seed)
    out = model.generate(ids, max_new_tokens=160, temperature=0.8, top_k=40, generator=gen)
    return str(tokenizer.decode(out[0].tolist()))


def _prompt_ids(data: Any, tokenizer: Any, prompt: str) -> list[int]:
    """The sample's prompt: as it is, or for a fine-tuning run, a user turn in the run's chat
    template followed by the assistant's header (what the model learnt to answer)."""
    from apt.core.config.data import SFTSource

    if not isinstance(data.source, SFTSource):
        return list(tokenizer.encode(prompt))
    from apt.trainops.data.sft import Message, build_template, encode_prompt

    template = build_template(data.source.template, tokenizer)
    return encode_prompt([Message("user", prompt)], template, tokenizer).tolist()


def cmd_launch(args: argparse.Namespace) -> int:
    if not args.train_args or args.train_args[0] not in ("train", "finetune"):
        raise ConfigError(
            "launch runs a train or finetune command: launch --nproc-per-node 2 train --profile P"
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
    # The workers' share of this machine's CPUs (each Trainer sets its own from
    # training.cpu_threads); set here, torchrun also skips its banner about the variable.
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(default_cpu_threads(processes=args.nproc_per_node))
    )
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
        # Workers that all failed for the same reason a code names (2: config, 3: diverged)
        # pass it on; anything else is a failure (1).
        codes = {failure.exitcode for failure in exc.failures.values()}
        return codes.pop() if len(codes) == 1 and codes <= {2, 3} else 1
    return 0
