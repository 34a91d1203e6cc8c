"""Recipes: a :class:`~apt.trainops.engine.trainer.Trainer` with the defaults of one kind of
run. ``Finetuner`` fine-tunes (``finetune()``, ``save_model(dir)``); ``PreTrainer`` pre-trains,
from a prepared shard folder when given one (``data_path=``). Both run the Trainer's own loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from apt.core.config import APTConfig
from apt.trainops.engine.keywords import LENGTH_KEYWORDS, config_with_keywords
from apt.trainops.engine.trainer import Trainer, TrainResult

__all__ = ["Finetuner", "PreTrainer"]


class Finetuner(Trainer):
    """A Trainer with fine-tuning defaults: ``learning_rate=1e-5``, ``num_epochs=3``.

    >>> finetuner = Finetuner(model=APTLargeModel.from_pretrained(path),   # doctest: +SKIP
    ...                       train_dataset=data, learning_rate=1e-5, num_epochs=3)
    >>> finetuner.finetune()                                               # doctest: +SKIP
    >>> finetuner.save_model("my_finetuned_model")                         # doctest: +SKIP
    """

    keyword_defaults: ClassVar[dict[str, Any]] = {
        "learning_rate": 1e-5,
        "num_epochs": 3,
        "experiment_name": "finetune",
    }

    def finetune(self) -> TrainResult:
        """Fine-tune (the same loop as :meth:`Trainer.train`)."""
        return self.train()

    def save_model(self, directory: str | Path) -> Path:
        """Write the fine-tuned model (``save_pretrained`` format for APT models)."""
        return self.export_model(Path(directory).absolute())


class PreTrainer(Trainer):
    """A Trainer with pre-training defaults (``learning_rate=6e-4``); ``pretrain()`` trains.

    >>> PreTrainer(data_path="data/shards", max_steps=1000).pretrain()    # doctest: +SKIP
    >>> PreTrainer.from_config(load_profile("pretrain")).pretrain()       # doctest: +SKIP

    ``data_path`` names a folder of token shards (``python -m apt data prepare``): it sets
    ``data.source: {kind: shards, path: data_path}`` on ``config`` (default: the schema's
    defaults under this trainer's keyword defaults) and drops the keys that describe reading
    text (:data:`~apt.core.config.data.TEXT_SOURCE_KEYS`); the model (``config``'s, or yours)
    trains with the config's task, ``causal_lm`` by default. A config whose source is shards
    already needs no ``data_path``.

    With a shard source the tokenizer is the one the folder's ``index.json`` records (as for
    any Trainer): the model is sized (``vocab_size: auto``) and checked against it, ``val_bpb``
    counts its bytes, and the run folder and the exported model carry it.

    Args:
        model: your model; default: built from ``config.model``.
        data_path: a prepared shard folder; None: the data ``config`` describes.
        config: a validated :class:`APTConfig`.
        **kwargs: what :class:`Trainer` takes (datasets, loaders, callbacks, keywords).

    Raises:
        ConfigError: ``model.vocab_size`` is smaller than the shards' vocabulary, or the
            config with ``data_path`` is invalid.
        DataError: the shard folder, its ``index.json`` or a shard is missing or damaged.
    """

    keyword_defaults: ClassVar[dict[str, Any]] = {
        "learning_rate": 6e-4,
        "experiment_name": "pretrain",
    }

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        data_path: str | Path | None = None,
        config: APTConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if data_path is not None:
            if config is None:
                defaults = dict(self.keyword_defaults)
                if any(kwargs.get(k) is not None for k in LENGTH_KEYWORDS):
                    defaults = {k: v for k, v in defaults.items() if k not in LENGTH_KEYWORDS}
                config = config_with_keywords(None, defaults)  # as Trainer would apply them
            config = self._reading_shards(config, {"kind": "shards", "path": str(data_path)})
        super().__init__(model, config=config, **kwargs)

    @staticmethod
    def _reading_shards(config: APTConfig, source: dict[str, str]) -> APTConfig:
        """``config`` with ``data.source`` set to ``source``; the keys that describe text are
        dropped (the schema refuses them beside a shard source)."""
        from apt.core.config import config_from_dict
        from apt.core.config.data import TEXT_SOURCE_KEYS

        data = config.model_dump(mode="json")
        for key in TEXT_SOURCE_KEYS:
            data["data"].pop(key, None)  # they describe text; the schema's defaults apply
        data["data"]["source"] = source
        return config_from_dict(data, source=f"PreTrainer(data_path={source['path']!r})")

    def pretrain(self) -> TrainResult:
        """Pre-train (the same loop as :meth:`Trainer.train`)."""
        return self.train()
