"""Dataset loader for the local ``posttrain_sums`` lm-eval task (no network).

lm-eval hands ``dataset_path``/``dataset_kwargs`` straight to ``datasets.load_dataset``,
so a relative ``data_files`` path would resolve against the current directory, not the
task file. ``custom_dataset: !function posttrain_sums.load`` is imported relative to
the YAML instead, so this loader finds ``sums.jsonl`` next to itself from any directory.
"""

from __future__ import annotations

from pathlib import Path

import datasets

DATA = Path(__file__).with_name("sums.jsonl")


def load(**_metadata) -> datasets.DatasetDict:
    # The "json" builder reads the local file; lm-eval passes its metadata as kwargs.
    return datasets.load_dataset("json", data_files={"test": str(DATA)})
