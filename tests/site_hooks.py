"""TEST-ONLY helpers shared by the sitecustomize files the tests put first on a child's PYTHONPATH
(tests/fp16/, tests/workers/jobhooks/), which load it by file path: neither has the other on sys.path.
Imports nothing heavy: it runs at interpreter start-up."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType


class PatchAfterImport:
    """A sys.meta_path finder that wraps the real loaders of the modules in `patches` (name -> patch
    function): the module is loaded as usual, then patched, whenever and however it is first imported."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.patches = patches

    def find_spec(self, fullname, path=None, target=None):
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            patch(module)

        # Wrap on the instance, keep everything else of the original loader.
        try:
            loader.exec_module = exec_module
        except AttributeError:  # a loader with __slots__: give up quietly, the module still loads
            return spec
        return spec


def chain_next_sitecustomize(this_file: str) -> None:
    """Run the sitecustomize that `this_file` shadows: the next one on sys.path after its own directory
    (entries before it are not searched: two test hook directories chained this way run once each)."""
    here = os.path.dirname(os.path.abspath(this_file))
    entries = [os.path.abspath(p or os.curdir) for p in sys.path]
    start = entries.index(here) + 1 if here in entries else 0
    rest = [p for p, e in zip(sys.path[start:], entries[start:]) if e != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.origin is None or os.path.abspath(spec.origin) == os.path.abspath(this_file):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
