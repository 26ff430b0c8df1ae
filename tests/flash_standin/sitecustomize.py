"""Run by every Python process that starts with tests/flash_standin on PYTHONPATH (the `site` module imports
`sitecustomize` at start-up): once transformers loads its flash-attention utilities, patch its availability
checks so that `flash_attention_2` dispatches to the stand-in package beside this file
(`flash_attn.standin.patch_transformers`). Nothing is imported before transformers itself is, so a process
that never uses it pays nothing."""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "transformers.modeling_flash_attention_utils"


class _PatchAfterLoad(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            sys.modules[fullname] = module  # patch_transformers imports it by name
            from flash_attn import standin

            standin.patch_transformers()

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchAfterLoad())
