"""Text -> JSONL shards (prepare), shards -> samples (JsonlStream), samples -> batches (collators),
all three behind JsonlDataModule for Lightning.

Exports load on first use, so `prepare_train_data.py` starts without importing Lightning.
"""

import importlib

_EXPORTS = {
    "JsonlDataModule": "convmodel.data.datamodule",
    "EpochDataLoader": "convmodel.data.datamodule",
    "JsonlStream": "convmodel.data.jsonl_stream",
    "CausalLmCollator": "convmodel.data.collators",
    "MaskedLmCollator": "convmodel.data.collators",
    "build_collator": "convmodel.data.collators",
    "prepare_train_data": "convmodel.data.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'convmodel.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
