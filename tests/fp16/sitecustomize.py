"""TEST-ONLY: let DeepSpeed's CPU accelerator accept FP16 configs in child processes.

On CPUs without oneDNN fp16 (e.g. AVX2-only AMD EPYC), DeepSpeed 0.19.x's
`CPU_Accelerator.is_fp16_supported()` returns None, so `deepspeed.initialize` refuses fp16
("Type fp16 is not supported on your device.") and dapt refuses fp16 configs. The FP16 code path
itself (loss scaling, overflow skips, ZeRO-2/3 fp16 optimizers) runs fine on CPU, so the tests run it
by putting this directory first on PYTHONPATH of the processes they start:

    env["PYTHONPATH"] = f"{ROOT / 'tests' / 'fp16'}{os.pathsep}{ROOT}"

Python imports `sitecustomize` at start-up (site.py) from the first sys.path entry that has one.
Nothing heavy is imported eagerly (no torch, no deepspeed, which take ~3 s to import; this file adds
~3 ms to `python -c pass`): a meta-path hook waits for `deepspeed.accelerator.cpu_accelerator` to be imported and
then replaces `CPU_Accelerator.is_fp16_supported` on the class (so instances made before or after
see it). Set DAPT_TEST_FP16_PATCH=0 to switch it off. Any other `sitecustomize` later on sys.path
(which this file shadows) is still run. Product code is not changed.
"""
from __future__ import annotations

import os
import sys

_TARGET = "deepspeed.accelerator.cpu_accelerator"


def _patch(module) -> None:
    cls = getattr(module, "CPU_Accelerator", None)
    if cls is None or getattr(cls, "_dapt_test_fp16_patched", False):
        return

    def is_fp16_supported(self):  # noqa: ARG001
        return True

    cls.is_fp16_supported = is_fp16_supported
    cls._dapt_test_fp16_patched = True


class _PatchAfterImport:
    """A sys.meta_path finder that only wraps the real loader of one module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
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
            _patch(module)

        # Wrap on the instance, keep everything else of the original loader.
        try:
            loader.exec_module = exec_module
        except AttributeError:  # a loader with __slots__: give up quietly, the module still loads
            return spec
        return spec


def _chain_next_sitecustomize() -> None:
    """Run the sitecustomize this file shadows, if any (none in dapt's venv today)."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.origin is None or os.path.abspath(spec.origin) == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_FINDER = _PatchAfterImport()

if os.environ.get("DAPT_TEST_FP16_PATCH", "1") != "0":
    if _TARGET in sys.modules:  # imported some other way (e.g. `import sitecustomize` late)
        _patch(sys.modules[_TARGET])
    else:
        sys.meta_path.insert(0, _FINDER)

try:
    _chain_next_sitecustomize()
except Exception as exc:  # never break interpreter start-up
    print(f"tests/fp16/sitecustomize.py: the shadowed sitecustomize failed: {exc!r}", file=sys.stderr)
