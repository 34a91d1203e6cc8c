"""APTLargeModel: :class:`APTModel` built from keyword sizes (the APT 1.x way)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import ValidationError

from apt.core.config.model import ModelConfig
from apt.core.errors import ConfigError
from apt.model.architectures.apt_model import APTModel

if TYPE_CHECKING:
    from apt.model.store import ModelStore

__all__ = ["APTLargeModel"]

#: Head size used when ``hidden_size`` is given without ``num_heads`` or a preset.
_DEFAULT_HEAD_DIM = 64

_L = TypeVar("_L", bound="APTLargeModel")


class APTLargeModel(APTModel):
    """An :class:`APTModel` whose sizes are keyword arguments.

    >>> model = APTLargeModel(hidden_size=256, num_layers=2, vocab_size=512)   # doctest: +SKIP
    >>> model = APTLargeModel(preset="small", vocab_size=50304)                 # doctest: +SKIP
    >>> model = APTLargeModel.from_pretrained("apt-base")   # a stored name     # doctest: +SKIP

    Args:
        config: a full :class:`ModelConfig` (also accepted as ``config=``); keyword sizes given
            beside it override its values.
        **sizes: any :class:`ModelConfig` key (``vocab_size``, ``hidden_size``, ``num_layers``,
            ``num_heads``, ``num_kv_heads``, ``max_seq_len``, ``preset``, ``moe``, ...). With
            ``hidden_size`` but neither ``num_heads`` nor ``preset``, heads are 64 wide.

    Raises:
        ConfigError: an unknown key or an invalid combination of sizes.
    """

    def __init__(self, config: ModelConfig | None = None, /, **sizes: Any) -> None:
        if config is None:
            config = sizes.pop("config", None)
        super().__init__(self._config_from(config, sizes))

    @staticmethod
    def _config_from(config: ModelConfig | None, sizes: dict[str, Any]) -> ModelConfig:
        if config is not None and not sizes:
            return config
        if config is None and "hidden_size" in sizes and not {"num_heads", "preset"} & set(sizes):
            sizes["num_heads"] = max(1, sizes["hidden_size"] // _DEFAULT_HEAD_DIM)
        data = {**config.model_dump(), **sizes} if config is not None else sizes
        try:
            return ModelConfig.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"APTLargeModel sizes are invalid: {problems}") from None

    @classmethod
    def from_pretrained(
        cls: type[_L],
        directory: str | Path,
        device: torch.device | str | None = None,
        *,
        store: ModelStore | str | Path | None = None,
    ) -> _L:
        """Load a model written by ``save_pretrained``: from a folder, or by its name in the
        local model store (:mod:`apt.model.store`).

        Args:
            directory: a model folder; else the name of a model in ``store`` (an existing
                folder wins over a name).
            device: where to put the model (default: the CPU).
            store: the store, or its folder (default: ``$APT_HOME``, else
                ``~/.cache/apt/models``).

        Raises:
            ModelStoreError: a name the store does not hold (the message lists those it does).
            CheckpointError: a file is missing, corrupt or does not match the config.
        """
        from apt.model.architectures.pretrained import load_pretrained

        return load_pretrained(cls, directory, device=device, store=store)
