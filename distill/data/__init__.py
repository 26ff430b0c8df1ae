"""The data builder: raw corpora → tokenized, packed, memory-mapped streams (long, short, s2l) + held-out.

    from distill.data import PackedStream, DataError
    stream = PackedStream("data/built/demo/long", tokenizer=tokenizer)
    batch = stream.batch([0, 1])  # input_ids, position_ids, labels (B, T), num_docs (B,)
"""

from distill.data.build import build
from distill.data.dataset import (
    IGNORE_INDEX,
    DataError,
    PackedStream,
    tokenizer_fingerprint,
    tokenizer_identity,
)
from distill.data.spec import (
    DataSpec,
    DataStreamConfig,
    HoldoutConfig,
    SourceConfig,
    UpsampleConfig,
    load_spec,
)

__all__ = ["IGNORE_INDEX", "DataError", "DataSpec", "DataStreamConfig", "HoldoutConfig", "PackedStream",
    "SourceConfig", "UpsampleConfig", "build", "load_spec", "tokenizer_fingerprint", "tokenizer_identity"]
