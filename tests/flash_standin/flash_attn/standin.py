"""The stand-in's own parts: the record of calls, and the patch that lets transformers dispatch
`flash_attention_2` to this package on a CPU.

transformers refuses flash-attn 2 without CUDA in two places, and only there: `is_flash_attn_2_available`
(which needs a CUDA device besides the package) and the devices its flash-attn 2 entry lists
(`FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["supported_devices"]`, checked when a model on the CPU asks for
flash). `patch_transformers` answers yes to the first and adds the CPU to the second. Nothing else of
transformers is touched: mask building, the packed-sequence detection, `cu_seqlens` from `position_ids`, the
dtype handling and the varlen call are its own code.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

CALLS: list[dict] = []
"""One entry per call of an entry point: {"entry", "dtype", "causal", "window", "heads", "autocast_cache"
(whether autocast's weight-cast cache was on around the call), and "cu_seqlens" and "documents" (varlen) or
"rows" and "seq_q" (flash_attn_func)}."""

RECORD_DIR = os.environ.get("FLASH_STANDIN_RECORD_DIR")


def record(entry: str, q, causal: bool, window_size, **fields) -> None:
    import torch

    call = {"entry": entry, "dtype": str(q.dtype).removeprefix("torch."), "causal": bool(causal),
            "window": [int(w) for w in window_size], "heads": int(q.shape[-2]),
            "autocast_cache": torch.is_autocast_cache_enabled(), **fields}
    if "cu_seqlens" in call:
        call["documents"] = len(call["cu_seqlens"]) - 1
    CALLS.append(call)


def reset() -> None:
    CALLS.clear()


def _write_record() -> None:
    if not RECORD_DIR or not CALLS:
        return
    os.makedirs(RECORD_DIR, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    path = os.path.join(RECORD_DIR, f"calls-rank{rank}-pid{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(CALLS, f)


atexit.register(_write_record)


def read_records(directory: str) -> dict[str, list[dict]]:
    """{file name: its calls} of every process that wrote to `directory`."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("calls-") and name.endswith(".json"):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                out[name] = json.load(f)
    return out


def _yes(*args, **kwargs) -> bool:
    del args, kwargs
    return True


def _cpu() -> bool:
    return True


def patch_transformers() -> None:
    """Make transformers dispatch `flash_attention_2` to this package on a CPU (idempotent)."""
    import transformers.modeling_flash_attention_utils as fa_utils
    import transformers.utils as utils
    import transformers.utils.import_utils as import_utils

    entry = fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]
    if getattr(fa_utils, "_flash_standin", False):
        return
    for module in (fa_utils, utils, import_utils):
        module.is_flash_attn_2_available = _yes
    entry["general_availability_check"] = _yes
    entry["supported_devices"] = (*entry["supported_devices"], (_cpu, "cpu"))
    fa_utils._flash_standin = True
    # Version checks read the package metadata through caches that may predate this directory on the path.
    for name in ("is_flash_attn_greater_or_equal", "is_flash_attn_greater_or_equal_2_10"):
        cached = getattr(import_utils, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    flash = sys.modules.get("transformers.integrations.flash_attention")
    if flash is not None:  # imported before the patch: its module-level flag was computed without it
        flash._use_top_left_mask = fa_utils.flash_attn_supports_top_left_mask()
