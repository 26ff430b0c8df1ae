"""Directories that appear whole: a checkpoint, an export, a built dataset."""

from __future__ import annotations

import os
import shutil


def replace_dir(tmp: str, final: str) -> None:
    """Put the complete directory `tmp` in place of `final` by renames: an existing `final` is moved aside to
    `<final>.old` first and deleted last, so a kill at any moment leaves the old directory (as `final` or
    `.old`) or the new one, never a partial one."""
    old = f"{final}.old"
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (one line for the user)."""


def file_sizes(directory: str) -> dict[str, int]:
    """{path relative to `directory`: bytes} of every file under it, sorted by path."""
    sizes = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            sizes[os.path.relpath(path, directory)] = os.path.getsize(path)
    return dict(sorted(sizes.items()))
