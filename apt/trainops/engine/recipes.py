"""Recipes: a :class:`~apt.trainops.engine.trainer.Trainer` with the defaults of one kind of
run. ``Finetuner`` fine-tunes (``finetune()``, ``save_model(dir)``); ``PreTrainer`` pre-trains,
from a prepared shard folder when given one (``data_path=``). Both run the Trainer's own loop."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn
from torch.utils.data import Dataset

from apt.core.config import APTConfig
from apt.core.config.data import SFTSource
from apt.core.errors import ConfigError
from apt.trainops.engine.keywords import LENGTH_KEYWORDS, config_with_keywords
from apt.trainops.engine.trainer import Trainer, TrainResult

__all__ = ["Finetuner", "PreTrainer"]

log = logging.getLogger("apt")


class _Recipe(Trainer):
    """What the recipes share: a config made from their keyword defaults before ``Trainer``
    sees it, so that a recipe can set its data source on it."""

    @classmethod
    def _default_config(cls, keywords: dict[str, Any]) -> APTConfig:
        """The config :class:`Trainer` would make from ``keyword_defaults`` (a run length the
        caller gives replaces the default one); the caller's keywords go on top later."""
        defaults = dict(cls.keyword_defaults)
        if any(keywords.get(k) is not None for k in LENGTH_KEYWORDS):
            defaults = {k: v for k, v in defaults.items() if k not in LENGTH_KEYWORDS}
        return config_with_keywords(None, defaults)


class Finetuner(_Recipe):
    """A Trainer with fine-tuning defaults: the ``sft`` task, ``learning_rate=1e-5``,
    ``num_epochs=3``.

    >>> finetuner = Finetuner(model=APTLargeModel.from_pretrained(path),   # doctest: +SKIP
    ...                       train_dataset="train.jsonl", learning_rate=1e-5, num_epochs=3)
    >>> finetuner.finetune()                                               # doctest: +SKIP
    >>> finetuner.save_model("my_finetuned_model")                         # doctest: +SKIP
    >>> Finetuner.from_config(load_profile("finetune")).finetune()         # doctest: +SKIP

    ``train_dataset`` (and ``eval_dataset``) may be:

    * a ``.jsonl`` path: it becomes ``data.source: {kind: sft, path: ..., val_path: ...}`` of the
      config, so the run folder's config names it and a rerun resumes from it;
    * a list of example records (``{"prompt", "completion"}`` or ``{"messages": [...]}``):
      rendered and packed as the file would be, with the tokenizer of the model (else of
      ``data.tokenizer``) and the options of ``data.source`` when it is an sft source; without
      ``eval_dataset``, ``data.source.val_fraction`` of them is held out;
    * any ``torch`` Dataset, used as it is (as :class:`Trainer` does).

    The model is yours, ``finetune.base_model`` (a saved folder or a store name), or built from
    ``model:``. With ``config`` given its values stand, the task included.

    Raises:
        ConfigError: a bad keyword or config, or a tokenizer other than the model's.
        DataError: a missing or malformed examples file or record (file and line, or
            ``train_dataset[i]``, named).
    """

    keyword_defaults: ClassVar[dict[str, Any]] = {
        "learning_rate": 1e-5,
        "num_epochs": 3,
        "task": "sft",
        "experiment_name": "finetune",
    }

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        config: APTConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if eval_dataset is not None and train_dataset is None:
            raise ConfigError(
                "Finetuner(eval_dataset=...) without train_dataset: give the training examples "
                "too (or set both in data.source)."
            )
        if _is_path(train_dataset):
            config = _with_source(
                config or self._default_config(kwargs),
                _sft_source(config, train_dataset, eval_dataset),
                origin=f"Finetuner(train_dataset={str(train_dataset)!r})",
            )
            train_dataset = eval_dataset = None
        elif isinstance(train_dataset, list | tuple):
            config = config or self._default_config(kwargs)
            train_dataset, eval_dataset = _records_datasets(
                config, model, train_dataset, eval_dataset
            )
        super().__init__(
            model, train_dataset=train_dataset, eval_dataset=eval_dataset, config=config, **kwargs
        )

    def finetune(self) -> TrainResult:
        """Fine-tune (the same loop as :meth:`Trainer.train`)."""
        return self.train()

    def save_model(self, directory: str | Path) -> Path:
        """Write the fine-tuned model (``save_pretrained`` format for APT models; LoRA adapters
        merged, or alone, as ``finetune.lora.merge`` says)."""
        return self.export_model(Path(directory).absolute())


def _is_path(value: Any) -> bool:
    return isinstance(value, str | Path)


def _sft_source(config: APTConfig | None, train: Any, val: Any) -> dict[str, Any]:
    """``data.source`` reading the examples files ``train`` / ``val``, keeping the options of
    ``config``'s own sft source."""
    if val is not None and not _is_path(val):
        raise ConfigError(
            "Finetuner(train_dataset=PATH, eval_dataset=...): with a file of training examples "
            f"give the validation examples as a file too (got a {type(val).__name__})."
        )
    source = config.data.source if config is not None else None
    options: dict[str, Any] = (
        source.model_dump() if isinstance(source, SFTSource) else {"kind": "sft"}
    )
    options.update(path=str(train), val_path=None if val is None else str(val))
    return options


def _records_datasets(
    config: APTConfig, model: nn.Module | None, train: Sequence[Any], val: Any
) -> tuple[Dataset[Any], Dataset[Any]]:
    """The sft datasets of in-memory example records, cut as the run will cut its rows (the
    model's positions and tokenizer, when it brings them)."""
    from apt.trainops.data.sft import build_sft_from_examples, parse_example, split_examples
    from apt.trainops.data.tokenizers import build_tokenizer
    from apt.trainops.engine.base_model import with_given_model

    if model is not None:
        config = with_given_model(config, model)
    data = config.data
    source = data.source if isinstance(data.source, SFTSource) else None
    source = (source or SFTSource(path="train_dataset")).model_copy(
        update={"path": "train_dataset"}
    )
    train_examples = [
        parse_example(r, fmt=source.format, where=f"train_dataset[{i}]")
        for i, r in enumerate(train)
    ]
    if val is None:
        train_examples, val_examples = split_examples(
            train_examples, source.val_fraction, seed=config.training.seed, key="train_dataset"
        )
    elif isinstance(val, list | tuple):
        val_examples = [
            parse_example(r, fmt=source.format, where=f"eval_dataset[{i}]")
            for i, r in enumerate(val)
        ]
    else:
        raise ConfigError(
            "Finetuner(train_dataset=[records], eval_dataset=...): give the validation examples "
            f"as records too (got a {type(val).__name__})."
        )
    tokenizer = getattr(model, "tokenizer", None) or build_tokenizer(data.tokenizer)
    bundle = build_sft_from_examples(
        train_examples, val_examples, source, tokenizer=tokenizer, seq_len=data.seq_len
    )
    log.info("%s", bundle.description)
    return bundle.train, bundle.val


class PreTrainer(_Recipe):
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
            config = _with_source(
                config or self._default_config(kwargs),
                {"kind": "shards", "path": str(data_path)},
                origin=f"PreTrainer(data_path={str(data_path)!r})",
            )
        super().__init__(model, config=config, **kwargs)

    def pretrain(self) -> TrainResult:
        """Pre-train (the same loop as :meth:`Trainer.train`)."""
        return self.train()


def _with_source(config: APTConfig, source: dict[str, Any], *, origin: str) -> APTConfig:
    """``config`` with ``data.source`` set to ``source``; the keys that describe text corpora
    are dropped (the schema refuses them beside a shard or sft source)."""
    from apt.core.config import config_from_dict
    from apt.core.config.data import TEXT_SOURCE_KEYS

    data = config.model_dump(mode="json")
    for key in TEXT_SOURCE_KEYS:
        data["data"].pop(key, None)  # they describe text; the schema's defaults apply
    data["data"]["source"] = source
    return config_from_dict(data, source=origin)
