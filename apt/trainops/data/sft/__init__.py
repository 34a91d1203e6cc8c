"""Supervised fine-tuning data: ``data.source: {kind: sft, path: FILE.jsonl}``.

Prompt/completion or chat examples (:mod:`.examples`) -> a chat template (:mod:`.templates`,
:mod:`.jinja`) -> token ids whose labels cover the completion only -> packed or one-a-row
datasets (:mod:`.dataset`), built by :func:`build_sft_datasets` for ``training.task: sft``.
"""

from apt.trainops.data.sft.build import (
    SFTBundle,
    SFTStats,
    build_sft_datasets,
    build_sft_from_examples,
    encode_example,
    split_examples,
)
from apt.trainops.data.sft.dataset import (
    EncodedExamples,
    PackedSFTDataset,
    SFTDataset,
    join_collate,
    pack_rows,
)
from apt.trainops.data.sft.examples import ROLES, Example, Message, parse_example, read_examples
from apt.trainops.data.sft.templates import (
    TEMPLATES,
    BuiltinTemplate,
    ChatTemplate,
    Piece,
    PlainTemplate,
    build_template,
    encode_pieces,
    encode_prompt,
)

__all__ = [
    "ROLES",
    "TEMPLATES",
    "BuiltinTemplate",
    "ChatTemplate",
    "EncodedExamples",
    "Example",
    "Message",
    "PackedSFTDataset",
    "Piece",
    "PlainTemplate",
    "SFTBundle",
    "SFTDataset",
    "SFTStats",
    "build_sft_datasets",
    "build_sft_from_examples",
    "build_template",
    "encode_example",
    "encode_pieces",
    "encode_prompt",
    "join_collate",
    "pack_rows",
    "parse_example",
    "read_examples",
    "split_examples",
]
