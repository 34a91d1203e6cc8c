"""Test-only callbacks that the Trainer tests plug into real CLI runs through ``callbacks:``.

``--set 'callbacks=[{name: trainer_hooks:FaultHook}]'`` (with this folder on ``PYTHONPATH``)
installs them in every rank. They touch nothing in ``apt/``:

* :class:`FaultHook` does nothing unless ``APT_TEST_FAULT`` says so, so the very same command can
  be run once with a fault and once without (a crash, then the rerun that resumes)::

      APT_TEST_FAULT=die:1@3      rank 1 calls os._exit(1) after optimizer step 3 (a crash)
      APT_TEST_FAULT=hang:1@3     rank 1 sleeps for an hour after step 3 (a hung peer)
      APT_TEST_FAULT=pause:0@12   rank 0 sleeps after step 12, once its marker file is written,
                                  so that the test kills the job at a known step
      APT_TEST_FAULT=nan:0@3      rank 0 fills its weights with NaN after step 3 (a divergence
                                  that starts on one rank)

  ``APT_TEST_FAULT_MARKER`` names the file written (with the step) just before sleeping or dying.
  A fault fires in torchrun's first attempt only: after an elastic restart
  (``TORCHELASTIC_RESTART_COUNT`` > 0) the same command runs clean.
* :class:`LoadedWeights` writes, right after a resume, the weights the model holds (gathered
  from every rank, by parameter name) to ``path`` as safetensors: what was *loaded*, to compare
  bit for bit with what the checkpoint holds.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from apt.trainops.engine import Callback
from apt.trainops.engine.state import Control, RunState

__all__ = ["FaultHook", "LoadedWeights", "parse_fault"]

FAULT_ENV = "APT_TEST_FAULT"
MARKER_ENV = "APT_TEST_FAULT_MARKER"
ACTIONS = ("die", "hang", "pause", "nan")


def parse_fault(spec: str) -> tuple[str, int, int] | None:
    """``"die:1@3"`` -> ``("die", 1, 3)``; an empty spec -> None.

    Raises:
        ValueError: a spec that does not look like ``<action>:<rank>@<step>``.
    """
    if not spec:
        return None
    action, _, rest = spec.partition(":")
    rank, _, step = rest.partition("@")
    if action not in ACTIONS or not rank.isdigit() or not step.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <die|hang|pause|nan>:<rank>@<step>")
    return action, int(rank), int(step)


class FaultHook(Callback):
    """Crash, hang or pause one rank after a given optimizer step (armed by ``APT_TEST_FAULT``)."""

    def __init__(self) -> None:
        self.fault = parse_fault(os.environ.get(FAULT_ENV, ""))
        self.marker = os.environ.get(MARKER_ENV)

    def on_step_end(self, state: RunState, control: Control) -> None:
        if self.fault is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        action, rank, step = self.fault
        if state.rank != rank or state.global_step != step:
            return
        print(f"FAULT-HOOK rank {rank}: {action} after step {step}", file=sys.stderr, flush=True)
        if self.marker:
            Path(self.marker).write_text(f"{action} {step}\n")
        if action == "nan":
            with torch.no_grad():
                for param in state.model.parameters():
                    param.fill_(float("nan"))
            return
        if action == "die":
            os._exit(1)  # no cleanup, no goodbye to the peers: a crash
        time.sleep(3600)  # hang / pause: only a timeout or the test's kill ends this


class LoadedWeights(Callback):
    """After a checkpoint was loaded, write the model's full weights to ``path`` (rank 0).

    Args:
        path: the safetensors file to write; with ``{rank}`` in it, every rank writes what it
            holds (a pipeline rank: its stages' weights).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_checkpoint_load(self, state: RunState, control: Control) -> None:
        model = state.model
        per_rank = "{rank}" in self.path
        if dist.is_initialized() and not per_rank:  # DDP or FSDP: gather (collective)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(model, options=options)
        else:
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if state.rank != 0 and not per_rank:
            return
        tensors = {k: v.clone().contiguous() for k, v in weights.items() if torch.is_tensor(v)}
        save_file(tensors, self.path.format(rank=state.rank) if per_rank else self.path)
