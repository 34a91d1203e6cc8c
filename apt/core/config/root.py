"""``APTConfig``: the whole run, as one validated, frozen object."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from apt.core.config.base import Section
from apt.core.config.callbacks import CallbackSpec
from apt.core.config.data import TOKENIZER_VOCAB, DataConfig, SFTSource, vocab_mismatch
from apt.core.config.finetune import FinetuneConfig
from apt.core.config.model import PRESETS, ModelConfig
from apt.core.config.monitoring import MonitoringConfig
from apt.core.config.resume import FREE
from apt.core.config.runtime import ArtifactsConfig, EvalConfig
from apt.core.config.schedules import SchedulesConfig, schedule_errors
from apt.core.config.training import TrainingConfig

__all__ = ["APTConfig"]


class APTConfig(Section):
    """A complete run description, loaded from a YAML profile by :func:`load_profile`.

    Components never receive this root object: each is built from the narrowest section it
    needs (``cfg.model``, ``cfg.training.checkpoints``, ...).
    """

    model: ModelConfig = Field(default_factory=ModelConfig, description="The network.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and tokenizer.")
    training: TrainingConfig = Field(
        # validated from {} so that its own default rule (one epoch) applies
        default_factory=lambda: TrainingConfig.model_validate({}),
        description="Optimisation, distribution and checkpoints.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Validation.")
    monitoring: MonitoringConfig = Field(
        default_factory=MonitoringConfig, description="Progress and metric logs."
    )
    artifacts: ArtifactsConfig = Field(
        default_factory=ArtifactsConfig, description="Run folder and exported model."
    )
    schedules: SchedulesConfig = Field(
        default_factory=SchedulesConfig, description="Curriculum: module switches and annealing."
    )
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="Which parameters train: frozen ones by name, or LoRA adapters.",
    )
    callbacks: list[CallbackSpec] = Field(
        default_factory=list,
        description="Extra callbacks by name or import path.",
        json_schema_extra=FREE,
    )

    _provenance: dict[str, str] = PrivateAttr(default_factory=dict)
    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _checkpoints_rank_by_eval_monitor(cls, data: Any) -> Any:
        """``eval.monitor``/``eval.mode`` are the run's one notion of "best": checkpoint
        retention follows them unless ``training.checkpoints.best_metric``/``best_mode`` are
        set themselves."""
        evaluation = data.get("eval") if isinstance(data, dict) else None
        if not isinstance(evaluation, dict) or not {"monitor", "mode"} & set(evaluation):
            return data
        training = data.get("training") or {}
        checkpoints = training.get("checkpoints") or {} if isinstance(training, dict) else None
        if not isinstance(checkpoints, dict):
            return data
        follow = {"best_metric": "monitor", "best_mode": "mode"}
        filled = {
            key: evaluation[source]
            for key, source in follow.items()
            if key not in checkpoints and source in evaluation
        }
        if not filled:
            return data
        return {**data, "training": {**training, "checkpoints": {**checkpoints, **filled}}}

    @model_validator(mode="after")
    def _schedules_name_real_things(self) -> APTConfig:
        errors = schedule_errors(
            dict(self.schedules.root),
            modules=self.model.controllable_modules(),
            attributes=self.model.schedulable_attributes(),
        )
        if errors:
            raise ValueError(errors[0])
        return self

    @model_validator(mode="after")
    def _data_fits_the_model(self) -> APTConfig:
        if self.finetune.base_model is not None:
            return self  # model: is the base model's, read at run start and checked there
        kind, vocab = self.data.tokenizer.kind, self.model.vocab_size
        known = TOKENIZER_VOCAB.get(kind)
        problem = known and vocab != "auto" and vocab_mismatch(vocab, kind, known)
        if problem:
            raise ValueError(problem)
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len: {self.data.seq_len} is longer than model.max_seq_len "
                f"({self.model.max_seq_len}), the longest sequence the model has positions "
                "for. To fix: lower data.seq_len or raise model.max_seq_len."
            )
        return self

    @model_validator(mode="after")
    def _padding_free_rows_split_evenly(self) -> APTConfig:
        source = self.data.source
        padding_free = isinstance(source, SFTSource) and source.padding_free
        if padding_free and self.training.distributed.sequence_sharded:
            raise ValueError(
                "data.source.padding_free: rows as long as each batch's examples together "
                "cannot be split evenly along the sequence by sequence parallelism. To fix: set "
                "data.source.padding_free: false (packed rows of data.seq_len), or use strategy "
                "tensor"
            )
        return self

    @model_validator(mode="after")
    def _lora_without_float8(self) -> APTConfig:
        if self.finetune.lora is not None and self.training.float8 != "off":
            raise ValueError(
                f"finetune.lora: LoRA adapters cannot train with training.float8 "
                f"({self.training.float8}): FP8 conversion replaces the adapted linear layers "
                "and drops their adapters. To fix: set training.float8=off, or remove "
                "finetune.lora."
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> APTConfig:
        """Load a profile file (its ``extends:`` parents included) and apply ``overrides``.

        APT 1.x fields in the files (``plugins:``, ``attention_name``/``ffn_name``/
        ``router_name``, ...) are mapped onto the 2.0 sections or refused with what replaces
        them (:mod:`apt.core.config.legacy`, docs/migration.md); ``load_profile`` reads 2.0
        profiles only."""
        from apt.core.config.loader import load_legacy_file

        return load_legacy_file(Path(path), overrides=overrides)

    @property
    def source(self) -> str | None:
        """The profile file this config was loaded from, if any."""
        return self._source

    @property
    def provenance(self) -> dict[str, str]:
        """Where each explicitly set dotted key came from (``file:line`` or ``--set``)."""
        return dict(self._provenance)

    def origin_of(self, dotted_key: str) -> str:
        """Where ``dotted_key``'s value came from: ``file:line``, ``--set ...``, ``preset
        <name>`` (a value of ``model.preset``), or ``default`` when nothing set it."""
        if dotted_key in self._provenance:
            return self._provenance[dotted_key]
        parts = dotted_key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self._provenance:
                return self._provenance[prefix]
        preset = self.model.preset
        if preset and len(parts) == 2 and parts[0] == "model" and parts[1] in PRESETS[preset]:
            return f"preset {preset}"
        return "default"

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-compatible data."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the resolved config; equal configs give equal fingerprints."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
