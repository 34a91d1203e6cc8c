"""APT 1.x profile fields, mapped onto the 2.0 config or refused with what replaces them.

=======================================  ==================================================
1.x field                                APT 2.0
=======================================  ==================================================
``schedules:`` (a mapping)               ``schedules:``, the same entries (checked against
                                         the model's modules when the config validates)
``plugins: [moe, routing, align, voter]``  the ``model.moe`` / ``model.align`` /
                                         ``model.voter`` sections (``routing``: the MoE
                                         router, part of ``model.moe``). A listed plugin
                                         starts on (``enabled: true``) unless a schedule
                                         switches it on later or its section says otherwise.
``attention_name``, ``ffn_name``,        removed: APT 2.0 has one implementation of each.
``router_name``, ``align_name``,         The value that names it (``default``; ``topk`` /
``retrieval_name`` (top level or under   ``topk_default`` for the router; ``none`` for
``model:``)                              retrieval) is dropped, any other is refused.
=======================================  ==================================================

Every other key is left to the 2.0 schema, which names the key and its nearest valid names.

``APTConfig.from_yaml`` translates every file it reads (the profile and each ``extends:``
parent) before merging; ``load_profile`` and the CLI read 2.0 profiles only, so a 1.x field
there is an unknown key with its nearest valid names. The legacy ``apt_model.config.from_yaml``
is ``APTConfig.from_yaml``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from apt.core.errors import ConfigError

__all__ = ["LEGACY_FIELDS", "PLUGINS", "PROVIDERS", "translate_legacy"]

#: 1.x plugin name -> the 2.0 ``model`` section that builds it.
PLUGINS: dict[str, str] = {
    "moe": "moe",
    "routing": "moe",
    "router": "moe",
    "align": "align",
    "voter": "voter",
}

#: 1.x provider field -> (values that name the one 2.0 implementation, what replaces the field).
PROVIDERS: dict[str, tuple[tuple[str, ...], str]] = {
    "attention_name": (
        ("default",),
        "APT 2.0 has one attention, causal self-attention with RoPE and grouped-query heads "
        "(model.num_heads, model.num_kv_heads, model.rope_theta)",
    ),
    "ffn_name": (
        ("default",),
        "APT 2.0 has one feed-forward, the SwiGLU MLP (model.intermediate_size); "
        "mixture-of-experts layers are the model.moe section",
    ),
    "router_name": (
        ("default", "topk", "topk_default"),
        "the MoE router is token-choice top-k (model.moe.top_k, model.moe.router_temperature)",
    ),
    "align_name": (
        ("default",),
        "the align loss is a KL divergence towards a frozen copy of the model "
        "(model.align.loss_weight)",
    ),
    "retrieval_name": (("none",), "APT 2.0 has no retrieval provider"),
}

#: Top-level keys a 1.x profile may hold besides the 2.0 sections.
LEGACY_FIELDS: tuple[str, ...] = ("plugins", *PROVIDERS)

_PLUGIN_HELP = (
    "model modules are switched on by their sections (model.moe, model.align, model.voter; 1.x "
    f"plugin names {', '.join(PLUGINS)}); other behaviour is a callback (callbacks: a "
    "registered name or 'package.module:Class')"
)


def _switched_by_schedule(schedules: Any, section: str) -> bool:
    names = ("moe", "router") if section == "moe" else (section,)
    keys = {f"enable_{n}_at_{by}" for n in names for by in ("epoch", "step")}
    return isinstance(schedules, Mapping) and bool(keys & set(schedules))


def _drop_providers(container: dict[str, Any], prefix: str, problems: list[str]) -> None:
    for key, (accepted, replacement) in PROVIDERS.items():
        if key not in container:
            continue
        value = container.pop(key)
        if value not in accepted:
            problems.append(
                f"{prefix}{key}: {value!r} has no APT 2.0 equivalent: {replacement}. "
                f"Remove {prefix}{key}."
            )


def _add_plugins(data: dict[str, Any], model: dict[str, Any], problems: list[str]) -> None:
    plugins = data.pop("plugins")
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        problems.append(
            f"plugins: must be a list of plugin names, got {plugins!r}; {_PLUGIN_HELP}."
        )
        return
    for name in plugins:
        section = PLUGINS.get(name)
        if section is None:
            problems.append(f"plugins: {name!r} has no APT 2.0 equivalent; {_PLUGIN_HELP}.")
            continue
        block = model.get(section)
        block = {} if block is None else block
        if (
            isinstance(block, dict)
            and not {"enabled", "use_moe"} & set(block)
            and not _switched_by_schedule(data.get("schedules"), section)
        ):
            block = {**block, "enabled": True}
        model[section] = block


def translate_legacy(data: Mapping[str, Any], *, where: str = "<dict>") -> dict[str, Any]:
    """A 2.0 profile mapping from one that may hold the 1.x fields (module docstring).

    Args:
        data: the mapping a profile file holds (not modified).
        where: the file, for messages.

    Returns:
        A new mapping without 1.x fields (equal to ``data`` when it had none).

    Raises:
        ConfigError: one line per 1.x field or value without a 2.0 equivalent, saying what
            replaces it.
    """
    out = copy.deepcopy(dict(data))
    problems: list[str] = []
    given = out.get("model")
    model = {} if given is None else given  # a copy: edited in place
    _drop_providers(out, "", problems)
    if isinstance(model, dict):
        _drop_providers(model, "model.", problems)
        if "plugins" in out:
            _add_plugins(out, model, problems)
    if problems:
        raise ConfigError(
            f"{where}: APT 1.x fields without an APT 2.0 equivalent (docs/migration.md):\n  - "
            + "\n  - ".join(problems)
        )
    if given is None and model:
        out["model"] = model
    return out
