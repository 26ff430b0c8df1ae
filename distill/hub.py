"""Hugging Face hub ids as the tools take them: a directory, or an id resolved through the Hugging Face
cache (offline with HF_HUB_OFFLINE=1 when the cache holds it), and the one line a gated repository's refusal
ends with."""

from __future__ import annotations

import os

from distill.config import ConfigError


def short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    reason = text[0] if text else type(err).__name__
    return reason[:200]


GATED_HINT = ("it is a gated repository: accept its licence on its Hugging Face page, then log in with "
              "`hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN")
"""What to do when the hub refuses a gated model (Llama): the one line every loader ends with."""


def hub_reason(err: BaseException) -> str:
    """`short_reason`, or `GATED_HINT` when the hub refused a gated repository (transformers wraps
    huggingface_hub's GatedRepoError in an OSError saying "gated repo"; datasets says "gated dataset")."""
    from huggingface_hub.errors import GatedRepoError  # only resolving hub ids

    if isinstance(err, GatedRepoError) or "gated" in str(err).lower():
        return GATED_HINT
    return short_reason(err)


def looks_local(path: str) -> bool:
    """Whether `path` names a directory rather than a hub id (org/name): absolute, ./ ../ ~, or deeper
    than org/name. A missing local path is reported as such, not looked up on the hub."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
"""What `model_directory` fetches of a hub repository: what from_pretrained reads (config, safetensors
weights, tokenizer), not the repository's other formats (Llama-3's original/ consolidated .pth)."""


def model_directory(path: str, flag: str) -> str:
    """A local directory holding the model `path` names: the directory itself, or a hub id's snapshot in
    the Hugging Face cache, fetched as training fetches it (`HF_HUB_OFFLINE=1` reads the cache alone).

    Raises:
        ConfigError: `flag path: ...` in one line (no such directory, not on the hub or not cached, gated).
    """
    if looks_local(path) or os.path.isdir(os.path.expanduser(path)):
        if not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"{flag} {path}: no such directory")
        return os.path.expanduser(path)
    from huggingface_hub import snapshot_download  # only resolving hub ids

    try:
        return snapshot_download(path, allow_patterns=HUB_FILES, ignore_patterns=["original/*"])
    except Exception as err:  # noqa: BLE001 -- not found, offline and not cached, gated, bad id: all one line
        raise ConfigError(f"{flag} {path}: not a directory, and not loadable as a Hugging Face hub id "
                          f"({hub_reason(err)})") from None
