"""megalora.data: messages JSONL and hub datasets -> tokens, assistant-only labels, packed DP micro-batches.

Public entry points:
    build_dataset / build_datasets   DataSection + tokenizer -> TokenizedDataset (cached, validated)
    make_batches                     TokenizedDataset -> endless micro-batch iterator with state_dict()
    summarize                        counts and one sample with its trained tokens marked
    build_tiny_tokenizer, write_demo_chats   local test/demo assets
Batch format and the label convention (labels NOT shifted): see `megalora.data.pack`.
This package never imports megatron-core.
"""
from megalora.data.dataset import TokenizedDataset, build_dataset, build_datasets
from megalora.data.demo_data import write_demo_chats
from megalora.data.encode import IGNORE_INDEX, TEMPLATE_MODES, EncodeSettings, encode_conversation
from megalora.data.errors import REASONS, DataError
from megalora.data.hub_datasets import HubDatasetError
from megalora.data.pack import best_fit_decreasing, collate
from megalora.data.sampler import BatchLoader, DataLoaderState, EpochSampler, make_batches
from megalora.data.summary import render_sample, summarize
from megalora.data.tiny_tokenizer import build_tiny_tokenizer

__all__ = [
    "BatchLoader", "DataError", "DataLoaderState", "EncodeSettings", "EpochSampler", "HubDatasetError", "IGNORE_INDEX",
    "REASONS", "TEMPLATE_MODES", "TokenizedDataset", "best_fit_decreasing", "build_dataset", "build_datasets",
    "build_tiny_tokenizer", "collate", "encode_conversation", "make_batches", "render_sample", "summarize",
    "write_demo_chats",
]
