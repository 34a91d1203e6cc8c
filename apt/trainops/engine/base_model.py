"""The model a run starts from, and the tokenizer that goes with it.

``finetune.base_model: NAME|DIR`` loads a saved model (a folder, or a name in the local model
store) as the run's starting point: its config becomes the run's ``model:`` section, so the
run folder's ``config.yaml`` describes the network that trains, and its tokenizer reads the
data unless ``data.tokenizer`` says otherwise. A model passed in (``Trainer(model=...)``) brings
its tokenizer the same way. Token ids the model was not trained on would be silent nonsense, so
a data tokenizer other than the model's is refused.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from apt.core.config import APTConfig, ModelConfig
from apt.core.config.data import DataConfig, ShardSource
from apt.core.config.plugins import TokenizerSpec
from apt.core.errors import ConfigError
from apt.model.tokenizers import ByteTokenizer, JSONTokenizer, Tokenizer
from apt.trainops.data.tokenizers import tokenizer_fingerprint

__all__ = ["check_model_tokenizer", "start_from_base", "with_given_model", "with_model_tokenizer"]

log = logging.getLogger("apt")

_KEY = "finetune.base_model"
#: ``model:`` keys that do not describe the network (the preset is expanded into the others).
_NOT_THE_NETWORK = ("preset",)


def start_from_base(cfg: APTConfig) -> tuple[APTConfig, nn.Module]:
    """Load ``cfg.finetune.base_model`` and return ``cfg`` re-sectioned around it, and it.

    The returned config's ``model:`` is the base model's own; its ``data.tokenizer`` is the
    model's tokenizer when the config leaves it at the default (:func:`with_model_tokenizer`).

    Raises:
        ConfigError: the config's ``model:`` sets keys the base model has otherwise (each
            named with both values).
        ModelStoreError / CheckpointError: no such model, or its files are damaged.
    """
    from apt.model import APTModel

    name = cfg.finetune.base_model
    assert name is not None
    model = APTModel.from_pretrained(name)
    base: ModelConfig = model.config
    _refuse_other_network(cfg.model, base, name)
    log.info("%s: starting from %s (%s parameters)", _KEY, name, f"{model.num_parameters():,}")
    cfg = _rows_that_fit(cfg.model_copy(update={"model": base}), f"{_KEY} {name}")
    return with_model_tokenizer(cfg, model), model


def _rows_that_fit(cfg: APTConfig, what: str) -> APTConfig:
    """``cfg`` with rows no longer than the model's positions: ``data.seq_len`` left at the
    schema's default shrinks to ``model.max_seq_len``; one set longer is refused.

    Raises:
        ConfigError: ``data.seq_len`` set above the model's ``max_seq_len``.
    """
    longest, seq_len = cfg.model.max_seq_len, cfg.data.seq_len
    if seq_len <= longest:
        return cfg
    if seq_len != DataConfig.model_fields["seq_len"].default:
        raise ConfigError(
            f"data.seq_len: {seq_len} is longer than the {longest} positions of {what} (its "
            f"model.max_seq_len). To fix: --set data.seq_len={longest} (or less)."
        )
    log.info(
        "data.seq_len: %d, the model's max_seq_len (the default %d is longer)", longest, seq_len
    )
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": longest})})


def with_given_model(cfg: APTConfig, model: nn.Module) -> APTConfig:
    """``cfg`` around a model passed in: an APT model's own config becomes the ``model:``
    section (what the run folder records and what sizes the vocabulary checks), and its
    tokenizer reads the data (:func:`with_model_tokenizer`).

    Raises:
        ConfigError: the config's ``model:`` sets keys the model has otherwise.
    """
    own = getattr(model, "config", None)
    if isinstance(own, ModelConfig) and own != cfg.model:
        _refuse_other_network(cfg.model, own, "the model passed in", key="model=")
        cfg = _rows_that_fit(cfg.model_copy(update={"model": own}), "the model passed in")
    return with_model_tokenizer(cfg, model)


def _refuse_other_network(
    given: ModelConfig, base: ModelConfig, name: str, *, key: str = _KEY
) -> None:
    """A ``model:`` section that says something else than the base model is a mistake: the
    weights fix the network. Keys left at the schema's defaults say nothing."""
    default = ModelConfig().model_dump()
    mine, theirs = given.model_dump(), base.model_dump()
    clashes = [
        f"model.{key}: {mine[key]!r} (the base model has {theirs[key]!r})"
        for key in mine
        if key not in _NOT_THE_NETWORK and mine[key] != default[key] and mine[key] != theirs[key]
    ]
    if clashes:
        raise ConfigError(
            f"{key}: {name} fixes the network, but the config's model: section says otherwise:"
            "\n  " + "\n  ".join(clashes) + "\nTo fix: remove the model: section (or these keys) "
            "from the profile and --set options; the base model's config is used."
        )


def with_model_tokenizer(cfg: APTConfig, model: nn.Module) -> APTConfig:
    """``cfg`` with ``data.tokenizer`` set to ``model``'s tokenizer, when the model has one that
    is not the default byte tokenizer and the config leaves ``data.tokenizer`` at its default
    (a shard folder's recorded tokenizer is checked instead: :func:`check_model_tokenizer`)."""
    tokenizer = getattr(model, "tokenizer", None)
    if not isinstance(tokenizer, JSONTokenizer) or isinstance(cfg.data.source, ShardSource):
        return cfg
    if cfg.data.tokenizer != TokenizerSpec():
        return cfg  # the user's choice; check_model_tokenizer compares them
    spec: dict[str, Any] = {
        "kind": tokenizer.name,
        "path": str(tokenizer.path),
        "eos_token": tokenizer.eos_token,
    }
    log.info("data.tokenizer: the model's own (%s, %s)", tokenizer.name, tokenizer.path)
    data = cfg.data.model_copy(update={"tokenizer": TokenizerSpec.model_validate(spec)})
    return cfg.model_copy(update={"data": data})


def check_model_tokenizer(model: nn.Module, data_tokenizer: Tokenizer) -> None:
    """Refuse data encoded with another tokenizer than the one ``model`` was trained with.

    Raises:
        ConfigError: both tokenizers named, with the fix.
    """
    own = getattr(model, "tokenizer", None)
    if own is None or tokenizer_fingerprint(own) == tokenizer_fingerprint(data_tokenizer):
        return
    raise ConfigError(
        f"data.tokenizer: the data is read with the {_describe(data_tokenizer)} tokenizer, but "
        f"the model was trained with the {_describe(own)} one: its token ids would mean other "
        "text. To fix: leave data.tokenizer unset (the model's own is used), point it at the "
        "model's tokenizer, or prepare the data with it."
    )


def _describe(tokenizer: Tokenizer) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    where = getattr(tokenizer, "path", None)
    return f"{tokenizer.name} ({tokenizer.vocab_size} ids{', ' + str(where) if where else ''})"
