"""APTModel: a decoder-only causal language model, readable top to bottom.

    tokens -> embed_tokens -> Block x num_layers -> norm -> lm_head (tied to embed_tokens) -> logits
    Block:  x = x + attn(attn_norm(x));  x = x + mlp(mlp_norm(x))      (pre-norm, RMSNorm)

Shape legend:
    B  batch                      T  positions (sequence length)     V  vocab_size
    D  hidden_size                H  query heads                     Hkv  key/value heads
    Dh head size (D / H)          F  MLP width (mlp_hidden_size)     L  num_layers

Optional, switchable modules (present only when their config section is set): MoE feed-forward
layers (``model.moe``), the align KL loss (``model.align``) and the voter (``model.voter``). They
report extra losses through :class:`ModelOutput` only, so a training loop never branches on them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
import torch.nn.functional as F
from torch import nn

from apt.core.config.model import AlignConfig, ModelConfig
from apt.core.config.schedules import SCHEDULABLE, resolve_attribute
from apt.core.errors import ConfigError
from apt.model.architectures.output import ModelOutput
from apt.model.layers.align import AlignLoss, kl_divergence
from apt.model.layers.attention import CausalSelfAttention, KVCache
from apt.model.layers.documents import DocumentLayout, document_layout, resolve_kernel
from apt.model.layers.mlp import SwiGLU
from apt.model.layers.moe import MoEAux, MoEFeedForward, upcycle_
from apt.model.layers.norm import RMSNorm
from apt.model.layers.rope import RotaryEmbedding
from apt.model.layers.switch import ModuleGroup
from apt.model.layers.voter import Voter
from apt.model.tokenizers import Tokenizer

__all__ = ["APTModel", "Block", "build_model"]

#: Layer attributes whose names differ from the schedule's (``router.temperature`` is the MoE
#: layer's ``router_temperature``); the names themselves are declared in ``SCHEDULABLE``.
_LAYER_ATTRIBUTE = {("router", "temperature"): "router_temperature"}

_M = TypeVar("_M", bound="APTModel")

#: Residual-branch output projections: initialised with std / sqrt(2 * num_layers) (GPT-2).
_RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


class Block(nn.Module):
    """Pre-norm transformer block: attention then a (dense or MoE) SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig, use_moe: bool) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.attn_norm = RMSNorm(D, cfg.norm_eps)
        self.attn = CausalSelfAttention(D, cfg.num_heads, cfg.kv_heads, cfg.dropout)
        self.mlp_norm = RMSNorm(D, cfg.norm_eps)
        self.mlp: SwiGLU | MoEFeedForward
        if use_moe and cfg.moe is not None:
            self.mlp = MoEFeedForward(cfg.moe, D, cfg.mlp_hidden_size)
        else:
            self.mlp = SwiGLU(D, cfg.mlp_hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (T, Dh/2)
        sin: torch.Tensor,  # (T, Dh/2)
        cache: KVCache | None = None,
        start: int = 0,
        documents: DocumentLayout | None = None,
    ) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, start, documents))
        h = self.mlp_norm(x)  # (B, T, D)
        aux = None
        if isinstance(self.mlp, MoEFeedForward):
            out, aux = self.mlp(h)
        else:
            out = self.mlp(h)
        return x + self.dropout(out), aux


class APTModel(nn.Module):
    """Decoder-only causal LM: RoPE, RMSNorm, grouped-query attention, SwiGLU, tied head.

    Args:
        config: the ``model:`` section. Weights are drawn from the global torch RNG, so
            ``torch.manual_seed(s)`` before construction makes them reproducible.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size == "auto":
            raise ConfigError(
                "model.vocab_size: auto is set from the tokenizer when a run starts (Trainer, "
                "python -m apt train); to build a model on its own give the number of ids"
            )
        self.config = config
        D, V = config.hidden_size, config.vocab_size
        moe_every = config.moe.every_n_layers if config.moe is not None else 0
        self.embed_tokens = nn.Embedding(V, D)
        self.rope = RotaryEmbedding(
            D // config.num_heads, config.max_seq_len, config.rope_theta, config.rope_scaling
        )
        self.blocks = nn.ModuleList(
            Block(config, use_moe=moe_every > 0 and i % moe_every == moe_every - 1)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(D, config.norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._init_weights()
        #: Turns text into ids for ``generate(text)`` and travels with ``save_pretrained``.
        self.tokenizer: Tokenizer | None = None
        # Built after the weights: the reference covers exactly the LM's parameters.
        self.align = AlignLoss(config.align, self.named_parameters()) if config.align else None
        self.voter = Voter(config.voter) if config.voter else None
        if self.align is not None and self.align.needs_reference:
            self._take_reference()

    def _init_weights(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # norms keep their ones
                nn.init.normal_(p, 0.0, residual_std if name.endswith(_RESIDUAL_OUTPUTS) else std)

    # ------------------------------------------------------------------ forward

    def _trunk(
        self,
        input_ids: torch.Tensor,
        caches: list[KVCache] | None = None,
        start: int = 0,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """(B, T) token ids at positions ``start..`` -> final-normed hidden states (B, T, D).

        ``document_ids`` (B, T): which document of a packed sequence each token belongs to
        (non-decreasing along T). Attention then stays inside each document and positions
        restart at each document's first token, so a packed sequence computes what its
        documents would alone."""
        T = input_ids.shape[1]
        documents = None
        if document_ids is None:
            self._check_length(start + T)
            cos, sin = self.rope(start, T)  # (T, Dh/2) each
        else:
            kernel = resolve_kernel(
                self.config.document_attention, document_ids.device, self.config.dropout
            )
            documents = document_layout(document_ids, kernel)
            # A row may be longer than max_seq_len (padding-free batches): its documents may
            # not. varlen knows their lengths on the host; the others would sync to look.
            for row in documents.bounds:
                self._check_length(max(stop - begin for begin, stop in row))
            cos = self.rope.cos[documents.positions].unsqueeze(1)  # (B, 1, T, Dh/2)
            sin = self.rope.sin[documents.positions].unsqueeze(1)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        moe_aux: list[MoEAux] = []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x, aux = block(x, cos, sin, cache, start, documents)
            if aux is not None:
                moe_aux.append(aux)
        return self.norm(x), moe_aux

    def _check_length(self, positions: int) -> None:
        if positions > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {positions} positions exceeds model.max_seq_len "
                f"({self.config.max_seq_len}); shorten it or raise max_seq_len"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        return_logits: bool = True,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Next-token logits, and losses when ``targets`` are given.

        Args:
            input_ids: (B, T) token ids.
            targets: (B, T) token ids already aligned with the logits (the model does not
                shift them); -100 marks positions to ignore.
            return_logits: False (with ``targets``): the output's ``logits`` is None. A
                training step needs only the loss; under ``torch.compile`` the (B, T, V)
                logits then never leave the compiled graph, which saves writing them out
                (1.6 GiB in bf16 at B=16, T=1024, V=50304) and keeping them alive.
            document_ids: (B, T) document of each token of a packed sequence (non-decreasing
                along T): attention stays inside documents and positions restart at each
                (``data.document_mask``). None: one causal sequence.

        Returns:
            A :class:`ModelOutput`; ``loss`` is what to backpropagate.
        """
        if self.align is not None and self.align.needs_reference:
            # Only after a direct model.align.enable(); kept out of any compiled graph.
            torch.compiler.disable(self._take_reference)()
        h, moe_aux = self._trunk(input_ids, document_ids=document_ids)  # (B, T, D)
        logits = self.lm_head(h)  # (B, T, V)
        aux_losses: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        if moe_aux:
            # Means over the MoE layers: a weight means the same at any depth.
            aux_losses["moe_balance"] = torch.stack([a.balance_loss for a in moe_aux]).mean()
            aux_losses["moe_z"] = torch.stack([a.z_loss for a in moe_aux]).mean()
            stats["moe_overflow_fraction"] = torch.stack(
                [a.overflow_fraction for a in moe_aux]
            ).mean()
        if self.voter is not None and self.voter.enabled and not self.training:
            stats["voter_fired"] = self.voter.fires(logits.detach()).float().mean()

        loss = lm_loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
            if self.align is not None and self.align.enabled:
                aux_losses["align_kl"] = self._align_loss(input_ids, logits, targets, document_ids)
            loss = lm_loss + sum(aux_losses.values())
        kept = logits if return_logits or targets is None else None
        return ModelOutput(kept, loss, lm_loss, aux_losses, stats)

    def _align_loss(
        self,
        input_ids: torch.Tensor,  # (B, T)
        logits: torch.Tensor,  # (B, T, V)
        targets: torch.Tensor,  # (B, T)
        document_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        assert self.align is not None
        ref_logits = self.reference_logits(input_ids, document_ids=document_ids)  # (B, T, V)
        # Over the trained positions only: prompt tokens (-100 in sft) are not the model's to
        # keep near anything.
        kl = kl_divergence(logits, ref_logits, mask=targets != -100)
        return self.align.loss_weight * kl

    @torch.no_grad()
    def reference_logits(
        self, input_ids: torch.Tensor, *, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The align reference's next-token logits (B, T, V), without gradient: this model's
        forward with the reference tensors in place of the parameters they copy (the others,
        frozen, as they are), in the current train/eval mode.

        Raises:
            ValueError: the model has no align loss (``model.align`` or :meth:`attach_align`).
        """
        if self.align is None:
            raise ValueError(
                "reference_logits: this model has no align reference; configure model.align "
                "or finetune.align"
            )
        # The reference forward gets no targets, so it computes no align loss of its own.
        ref = torch.func.functional_call(
            self, self.align.reference(), (input_ids,), {"document_ids": document_ids}
        )
        assert ref.logits is not None
        return ref.logits

    # ------------------------------------------------------------------ generation

    @overload
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = ...,
        top_k: int | None = ...,
        generator: torch.Generator | None = ...,
    ) -> torch.Tensor: ...

    @overload
    def generate(
        self,
        prompt_ids: str,
        max_new_tokens: int,
        temperature: float = ...,
        top_k: int | None = ...,
        generator: torch.Generator | None = ...,
    ) -> str: ...

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor | str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | str:
        """Continue ``prompt_ids`` by ``max_new_tokens`` tokens, with a KV cache.

        Runs in eval mode (the previous mode is restored). Past ``max_seq_len`` positions the
        context is the last ``max_seq_len`` tokens, recomputed each step without the cache.

        Args:
            prompt_ids: (B, T0) or (T0,) token ids, T0 >= 1; or a text, encoded with
                ``self.tokenizer`` (set by ``from_pretrained`` when the folder holds one, and by
                the Trainer for the tokenizer of its data).
            max_new_tokens: tokens to append.
            temperature: 0 picks the argmax (greedy); > 0 samples from softmax(logits / t).
            top_k: sample only among the k likeliest tokens.
            generator: random source of the samples (on the model's device).

        Returns:
            (B, T0 + max_new_tokens), or (T0 + max_new_tokens,) for a 1-d prompt; for a text,
            the text followed by its continuation, up to the first end-of-text token.
        """
        if isinstance(prompt_ids, str):
            return self._generate_text(prompt_ids, max_new_tokens, temperature, top_k, generator)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if prompt_ids.dim() not in (1, 2) or prompt_ids.shape[-1] == 0:
            raise ValueError(
                f"prompt_ids must be (B, T0) or (T0,) with T0 >= 1, got {tuple(prompt_ids.shape)}"
            )
        idx = prompt_ids.view(1, -1) if prompt_ids.dim() == 1 else prompt_ids  # (B, T0)
        L = self.config.max_seq_len
        was_training = self.training
        self.eval()
        try:
            caches = [KVCache(min(L, idx.shape[1] + max_new_tokens)) for _ in self.blocks]
            logits = self._last_logits(idx[:, -L:], caches, 0)  # (B, V)
            pos = min(idx.shape[1], L)
            for step in range(max_new_tokens):
                nxt = self._pick(logits, temperature, top_k, generator)  # (B,)
                idx = torch.cat((idx, nxt[:, None]), dim=1)
                if step == max_new_tokens - 1:
                    break
                if pos < L:
                    logits = self._last_logits(nxt[:, None], caches, pos)
                    pos += 1
                else:  # window full: slide it and recompute
                    logits = self._last_logits(idx[:, -L:], None, 0)
        finally:
            self.train(was_training)
        return idx.view(-1) if prompt_ids.dim() == 1 else idx

    def _generate_text(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> str:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError(
                "generate() got a text but this model has no tokenizer: pass token ids, or "
                "set model.tokenizer (a model saved by a Trainer run, or loaded with "
                "from_pretrained from a folder holding apt_tokenizer.json, has one)"
            )
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError("generate() got an empty prompt; give at least one character")
        device = self.embed_tokens.weight.device
        prompt_ids = torch.tensor(ids, dtype=torch.long, device=device)
        out = self.generate(prompt_ids, max_new_tokens, temperature, top_k, generator)
        new = out[len(ids) :].tolist()
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        return prompt + tokenizer.decode(new)

    def _last_logits(
        self, ids: torch.Tensor, caches: list[KVCache] | None, start: int
    ) -> torch.Tensor:  # (B, T) -> (B, V) float32 logits of the last position
        h, _ = self._trunk(ids, caches, start)
        return self.lm_head(h[:, -1]).float()

    def _pick(
        self,
        logits: torch.Tensor,  # (B, V)
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:  # (B,)
        if temperature == 0:
            scaled, tokens = logits, logits.argmax(-1)
        else:
            scaled = logits / temperature
            if top_k is not None:
                kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            probs = F.softmax(scaled, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if self.voter is not None and self.voter.enabled:
            tokens, _ = self.voter.decide(logits, tokens, scaled, generator)
        return tokens

    @torch.no_grad()
    def predict_tokens(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluator's token choice: argmax, or the voter's majority where it fires.

        Args:
            logits: (..., V).
            generator: random source of the voter's samples.

        Returns:
            tokens (...) long and fired (...) bool (all False while the voter is off).
        """
        tokens = logits.argmax(-1)
        if self.voter is None or not self.voter.enabled:
            return tokens, torch.zeros_like(tokens, dtype=torch.bool)
        return self.voter.decide(logits, tokens, generator=generator)

    # ------------------------------------------------------------------ schedulable modules

    def moe_layers(self) -> dict[str, MoEFeedForward]:
        """Qualified name -> MoE feed-forward layer, in depth order."""
        return {
            f"blocks.{i}.mlp": block.mlp
            for i, block in enumerate(self.blocks)
            if isinstance(block.mlp, MoEFeedForward)
        }

    def controllable_modules(self) -> dict[str, ModuleGroup]:
        """The switchable modules by name (``moe``, ``router``, ``align``, ``voter``; only
        those configured), each with ``enable()``, ``disable()``, ``enabled`` and its
        schedulable attributes. ``moe`` and ``router`` share one switch (the MoE layers)."""

        def group(module: str, layers: list[Any], **kwargs: Any) -> ModuleGroup:
            names = {a: _LAYER_ATTRIBUTE.get((module, a), a) for a in SCHEDULABLE[module]}
            return ModuleGroup(layers, names, **kwargs)

        groups: dict[str, ModuleGroup] = {}
        if self.config.moe is not None:
            layers = list(self.moe_layers().values())
            groups["moe"] = group("moe", layers, enable=self._enable_moe)
            groups["router"] = group("router", layers, enable=self._enable_moe)
        if self.align is not None:
            groups["align"] = group("align", [self.align], enable=self._enable_align)
        if self.voter is not None:
            groups["voter"] = group("voter", [self.voter])
        return groups

    def schedulable_attributes(self) -> list[str]:
        """Dotted ``module.attribute`` names a schedule may set (the config's declaration)."""
        return self.config.schedulable_attributes()

    def set_scheduled(self, name: str, value: float) -> None:
        """Set a schedulable attribute, e.g. ``set_scheduled("router.temperature", 0.5)``."""
        module, attr = self._split_scheduled(name)
        setattr(self.controllable_modules()[module], attr, value)

    def get_scheduled(self, name: str) -> float:
        """Current value of a schedulable attribute."""
        module, attr = self._split_scheduled(name)
        return float(getattr(self.controllable_modules()[module], attr))

    def _split_scheduled(self, name: str) -> tuple[str, str]:
        try:
            target = resolve_attribute(name, self.schedulable_attributes())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        module, attr = target.split(".")
        return module, attr

    def _enable_moe(self) -> None:
        layers = self.moe_layers()
        fresh = [name for name, layer in layers.items() if not bool(layer.experts_ready)]
        for layer in layers.values():
            layer.enable()
        # An align reference taken before the upcycling must be upcycled the same way, or the
        # KL would compare against randomly initialised experts.
        if self.align is not None and bool(self.align.has_reference):
            reference = self.align.reference()
            for name in fresh:
                upcycle_(reference, prefix=f"{name}.")

    def _enable_align(self) -> None:
        assert self.align is not None
        self.align.enable()
        if self.align.needs_reference:
            self._take_reference()

    def _take_reference(self) -> None:
        assert self.align is not None
        self.align.take_reference(self.named_parameters())

    def attach_align(self, cfg: AlignConfig) -> AlignLoss:
        """Switch the align loss on against the model as it is now, on a model built without
        ``model.align`` (``finetune.align``), and return it. Call it after freezing.

        The reference copies the parameters that train (``requires_grad``) and those of MoE
        layers (upcycled with it when MoE switches on); a frozen parameter never changes, so
        the reference forward uses it as it is: with LoRA the copy is the adapters (``B`` = 0,
        so the reference is the base model), not the frozen base. ``self.config`` keeps
        ``align: None``, so :meth:`save_pretrained` writes the plain model; checkpoints
        (``state_dict()``) hold the reference, and loading one restores it.

        Raises:
            ValueError: the model has an align loss already (``model.align``).
        """
        if self.align is not None:
            raise ValueError("attach_align: the model has an align loss already (model.align)")
        moe = tuple(f"{name}." for name in self.moe_layers())
        copied = [
            (name, p)
            for name, p in self.named_parameters()
            if p.requires_grad or name.startswith(moe)
        ]
        self.align = AlignLoss(cfg.model_copy(update={"enabled": True}), copied)
        self.align.to(self.embed_tokens.weight.device)
        self._take_reference()
        return self.align

    # ------------------------------------------------------------------ utilities

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once (the align reference is not counted).

        Args:
            non_embedding: leave out the token embedding (and an untied output head).
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    @property
    def has_conditional_parameters(self) -> bool:
        """True when some parameters get no gradient in some states (MoE configured: the dense
        MLP while on, router and experts while off). DDP then needs find_unused_parameters."""
        return self.config.moe is not None

    def save_pretrained(
        self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``; return it.

        The folder holds what ``self.config`` describes: an align reference added by
        :meth:`attach_align` (fine-tuning's) stays out.

        Args:
            directory: the folder (created if missing).
            state_dict: weights to write instead of this module's own (e.g. the full state
                gathered from an FSDP-sharded copy of this model).
        """
        from apt.model.architectures.pretrained import save_pretrained

        if self.align is not None and self.config.align is None:
            state = self.state_dict() if state_dict is None else state_dict
            state_dict = {k: v for k, v in state.items() if not k.startswith("align.")}
        return save_pretrained(self, directory, state_dict)

    @classmethod
    def from_pretrained(
        cls: type[_M], directory: str | Path, device: torch.device | str | None = None
    ) -> _M:
        """Load a model written by :meth:`save_pretrained`, bit for bit.

        Raises:
            CheckpointError: a file is missing, corrupt or does not match the config.
        """
        from apt.model.architectures.pretrained import load_pretrained

        return load_pretrained(cls, directory, device=device)

    def extra_repr(self) -> str:
        return f"params={self.num_parameters():,}"


def build_model(cfg: ModelConfig) -> APTModel:
    """Build the model a ``model:`` config section describes.

    Raises:
        TypeError: when handed something other than a :class:`ModelConfig` (pass ``cfg.model``,
            not the whole run config).
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(
            f"build_model takes the model section (ModelConfig), got {type(cfg).__name__}; "
            "pass cfg.model"
        )
    return APTModel(cfg)
