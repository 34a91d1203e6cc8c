"""Data: corpus files (or prepared token shards) -> packed sequences -> a resumable, rank-aware
DataLoader.

>>> from apt.core.config import DataConfig
>>> bundle = build_datasets(DataConfig(max_corpus_bytes=200_000))     # doctest: +SKIP
>>> loader = create_dataloader(bundle.train, batch_size=16, seed=1234)  # doctest: +SKIP

See ``docs/data.md`` for the corpus sources, the split, packing, the sampler and the cache;
fine-tuning examples (``source: {kind: sft}``) are read by :mod:`apt.trainops.data.sft`.
"""

from apt.trainops.data.build import DataBundle, build_datasets, data_tokenizer
from apt.trainops.data.corpus import CorpusFile, python_stdlib_files, read_documents, resolve_files
from apt.trainops.data.loader import create_dataloader, seed_worker
from apt.trainops.data.packing import CorpusStats, PackedDataset, tokenize_documents
from apt.trainops.data.sampler import ResumableSampler
from apt.trainops.data.sft import (
    PackedSFTDataset,
    SFTBundle,
    SFTDataset,
    build_sft_datasets,
    read_examples,
)
from apt.trainops.data.shards.dataset import ShardDataset
from apt.trainops.data.split import split_caps, split_files
from apt.trainops.data.tokenizers import (
    TOKENIZERS,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    token_dtype,
)

__all__ = [
    "TOKENIZERS",
    "ByteTokenizer",
    "CorpusFile",
    "CorpusStats",
    "DataBundle",
    "PackedDataset",
    "PackedSFTDataset",
    "ResumableSampler",
    "SFTBundle",
    "SFTDataset",
    "ShardDataset",
    "Tokenizer",
    "build_datasets",
    "build_sft_datasets",
    "build_tokenizer",
    "create_dataloader",
    "data_tokenizer",
    "python_stdlib_files",
    "read_documents",
    "read_examples",
    "resolve_files",
    "seed_worker",
    "split_caps",
    "split_files",
    "token_dtype",
    "tokenize_documents",
]
