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

Forced overflows (also test-only, off unless set): DAPT_TEST_FP16_INF_GRAD=STEPS[@RANK] makes
`DeepSpeedEngine.backward` multiply the loss by inf during the listed optimizer steps, numbered as in
metrics.jsonl (1-based: the step that `engine.global_steps` + 1 is about to complete), on rank RANK
only (default: every rank). STEPS is a comma-separated list of `N`, `N-M` or `N-` (N and everything
after), e.g. `5-7@1` or `4-`. The gradients then hold inf/nan, DeepSpeed's overflow check (all-reduced
over the ranks) skips the step on every rank and lowers the loss scale, exactly as for a real overflow.
The step number comes from the engine, so it is also right after a resume from a checkpoint.
"""
from __future__ import annotations

import os
import runpy
import sys

_ACCELERATOR = "deepspeed.accelerator.cpu_accelerator"
_ENGINE = "deepspeed.runtime.engine"


def _patch_accelerator(module) -> None:
    cls = getattr(module, "CPU_Accelerator", None)
    if cls is None or getattr(cls, "_dapt_test_fp16_patched", False):
        return

    def is_fp16_supported(self):
        return True

    cls.is_fp16_supported = is_fp16_supported
    cls._dapt_test_fp16_patched = True


def _parse_inf_steps(spec: str) -> tuple[list[tuple[int, float]], int | None]:
    """`5-7,10@1` -> ([(5, 7), (10, 10)], 1); `4-` -> ([(4, inf)], None)."""
    steps, _, rank = spec.partition("@")
    ranges = []
    for item in filter(None, (s.strip() for s in steps.split(","))):
        lo, dash, hi = item.partition("-")
        ranges.append((int(lo), float("inf") if dash and not hi else float(hi or lo)))
    if not ranges:
        raise ValueError(f"DAPT_TEST_FP16_INF_GRAD={spec!r}: no steps")
    return ranges, (int(rank) if rank.strip() else None)


def _patch_engine(module) -> None:
    cls = getattr(module, "DeepSpeedEngine", None)
    if cls is None or getattr(cls, "_dapt_test_inf_grad_patched", False):
        return
    real_backward = cls.backward

    def backward(self, loss, *args, **kwargs):
        # read at each call, not at import: ranks forked from a process that imported DeepSpeed before
        # their environment was set (tests/ranks.py) see their own value
        spec = os.environ.get("DAPT_TEST_FP16_INF_GRAD", "")
        if spec:
            ranges, only_rank = _parse_inf_steps(spec)
            step = int(self.global_steps) + 1  # the optimizer step this backward contributes to
            if any(lo <= step <= hi for lo, hi in ranges) and (only_rank is None or self.global_rank == only_rank):
                loss = loss * float("inf")
        return real_backward(self, loss, *args, **kwargs)

    cls.backward = backward
    cls._dapt_test_inf_grad_patched = True


_PATCHES = {_ACCELERATOR: _patch_accelerator, _ENGINE: _patch_engine}
# the finder and the chaining, shared with tests/workers/jobhooks/sitecustomize.py (loaded by path: no package)
_HOOKS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "site_hooks.py"))
_FINDER = _HOOKS["PatchAfterImport"](_PATCHES)

if os.environ.get("DAPT_TEST_FP16_PATCH", "1") != "0":
    if os.environ.get("DAPT_TEST_FP16_INF_GRAD"):
        try:
            _parse_inf_steps(os.environ["DAPT_TEST_FP16_INF_GRAD"])
        except ValueError as exc:  # a test's mistake: stop here, not with a run that silently never overflows
            print(f"tests/fp16/sitecustomize.py: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    else:
        del _PATCHES[_ENGINE]
    for _name, _patch in list(_PATCHES.items()):
        if _name in sys.modules:  # imported some other way (e.g. `import sitecustomize` late)
            _patch(sys.modules[_name])
            del _PATCHES[_name]
    if _PATCHES:
        sys.meta_path.insert(0, _FINDER)

try:
    _HOOKS["chain_next_sitecustomize"](__file__)
except Exception as exc:  # noqa: BLE001 - never break interpreter start-up
    print(f"tests/fp16/sitecustomize.py: the shadowed sitecustomize failed: {exc!r}", file=sys.stderr)
