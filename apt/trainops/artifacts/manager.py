"""The run folder: resolved config, provenance, metric log, exported model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from apt.core.config import ArtifactsConfig
from apt.core.files import apply_umask

__all__ = ["ArtifactManager"]


class ArtifactManager:
    """Owns ``<output_dir>/<experiment_name>/``; only the main process writes.

    Files: ``config.yaml`` (the resolved config), ``provenance.json`` (where each value came
    from), ``metrics.jsonl`` (one JSON object per logged step), ``final_model/``.

    Args:
        cfg: the ``artifacts`` section (or pass ``output_dir``/``experiment_name``).
        is_main: False on every rank but 0: nothing is written.
    """

    def __init__(
        self,
        cfg: ArtifactsConfig | None = None,
        *,
        output_dir: str | Path | None = None,
        experiment_name: str | None = None,
        is_main: bool = True,
    ) -> None:
        cfg = cfg or ArtifactsConfig.model_validate({})
        self.cfg = cfg
        self.run_dir = Path(output_dir or cfg.output_dir) / (experiment_name or cfg.experiment_name)
        self.is_main = is_main
        self._metrics_file: Any = None

    def prepare(self) -> Path:
        """Create the run folder (idempotent) and return it."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir

    def archive_existing(self) -> Path | None:
        """Move an existing run folder aside as ``<name>-<YYYYmmdd-HHMMSS>``; return its new
        path (None when there was nothing to move)."""
        if not self.is_main or not self.run_dir.exists():
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.run_dir.with_name(f"{self.run_dir.name}-{stamp}")
        self.run_dir.rename(target)
        return target

    def save_config(self, config: dict[str, Any], provenance: dict[str, str] | None = None) -> None:
        """Write the resolved config (and where its values came from)."""
        if not self.is_main:
            return
        self._write_text("config.yaml", yaml.safe_dump(config, sort_keys=False))
        if provenance is not None:
            self._write_text("provenance.json", json.dumps(provenance, indent=2, sort_keys=True))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append one line to ``metrics.jsonl``."""
        if not self.is_main or not metrics:
            return
        if self._metrics_file is None:
            self.prepare()
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()

    # Seed-compatible name.
    def save_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Alias of :meth:`log_metrics`."""
        self.log_metrics(metrics, step)

    def save_logs(self, lines: list[str], name: str = "train.log") -> None:
        """Write free-form log lines to a file in the run folder."""
        if self.is_main:
            self._write_text(name, "\n".join(lines) + "\n")

    def save_model(
        self,
        model: nn.Module,
        name: str | Path = "final_model",
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Export ``model`` with ``save_pretrained`` (APT models) or as a safetensors file.

        Args:
            model: the (unwrapped) model.
            name: folder inside the run folder, or an absolute/relative path of its own.
            state_dict: weights to write instead of the module's own (gathered from shards).
        """
        target = self.run_dir / name
        if not self.is_main:
            return target
        target.mkdir(parents=True, exist_ok=True)
        save_pretrained = getattr(model, "save_pretrained", None)
        if callable(save_pretrained):
            if state_dict is None:
                save_pretrained(target)
            else:
                save_pretrained(target, state_dict=state_dict)
        else:
            from safetensors.torch import save_file

            state = state_dict if state_dict is not None else model.state_dict()
            tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
            save_file(tensors, str(target / "model.safetensors"))
            apply_umask(target / "model.safetensors")
        return target

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` (for tests and reports)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        """Close the metric log."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def _write_text(self, name: str, text: str) -> None:
        self.prepare()
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.run_dir / name)
