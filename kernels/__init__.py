"""Triton kernels for the surgery adapters, installed as ``surgery_edge.kernels``.

Importing this package is cheap: it imports neither Triton nor the kernel modules. The public
functions below are resolved on first attribute access (PEP 562), which imports the module that
defines them (and Triton with it, when Triton is installed)::

    from surgery_edge import kernels

    if kernels.can_launch(x.device):
        x_corr, y = kernels.surgery_correct_layernorm(x, task_ids, down, up, ln.weight, ln.bias)

Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1`` set before the kernel modules are imported), which is how the tests run
on machines without a GPU. The ``*_ref`` functions are plain PyTorch and need no Triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

# public name -> module (relative to this package) that defines it
_LAZY = {
    "surgery_correct_ref": "surgery_correction",
    "surgery_correct_layernorm_ref": "surgery_correction",
    "surgery_correct_layernorm": "surgery_correction",
    "expand_all_tasks": "surgery_correction",
    "final_site_all_tasks_ref": "final_site",
    "final_site_all_tasks": "final_site",
}

__all__ = ["can_launch", "has_triton", "triton_interpreter_enabled", *_LAZY]


# looked up once, without importing Triton: the public functions check it inside code that
# torch.compile traces, and torch 2.11's dynamo refuses to trace importlib's find_spec
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def has_triton() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return _HAS_TRITON


def triton_interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to interpret kernels on the CPU.

    Triton reads the variable when a kernel is defined, so it must be set before the kernel
    modules are imported; the values Triton accepts as true are ``1``, ``true`` and ``on``.
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on"}


def can_launch(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors that live on ``device``.

    True for CUDA devices when Triton is installed, and for CPU when the Triton interpreter is on.
    """
    kind = torch.device(device).type
    if not has_triton():
        return False
    return kind == "cuda" or (kind == "cpu" and triton_interpreter_enabled())


def _jit(fn: Callable) -> Callable:
    """``triton.jit(fn)`` when Triton is installed; without it the kernel can never be launched."""
    if not has_triton():
        return fn
    import triton  # deferred: importing this package must not import Triton

    return triton.jit(fn)


def _launcher(kernel: Any) -> Any:
    """What the registered op launches ``kernel`` through: ``torch.library.wrap_triton`` (so
    that ``torch.compile`` traces into it) for compiled kernels; the kernel itself under the
    interpreter, where the op is an opaque ``custom_op`` (:func:`_register_op`) and torch 2.11's
    ``wrap_triton`` refuses the ``InterpretedFunction`` that Triton 3.6's ``triton.jit`` makes
    there (the GPU machines' versions)."""
    if triton_interpreter_enabled():
        _squeeze_interpreter_index()
        return kernel
    from torch.library import wrap_triton  # deferred: only a launch needs it

    return wrap_triton(kernel)


def _squeeze_interpreter_index() -> None:
    """Let Triton 3.6's interpreter take NumPy 2.5 (the GPU machines' pair, for a CPU dry run).

    The interpreter holds a scalar kernel argument as a one-element array and turns it into a
    loop bound (``range(0, R)``) with ``int(array)``, which NumPy 2.5 refuses ("only
    0-dimensional arrays can be converted"); Triton 3.8 squeezes the array first. This does the
    same, once, by wrapping the interpreter's patch of ``tl.tensor``; harmless where Triton
    already squeezes.
    """
    from triton.runtime import interpreter  # deferred: only under the interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes_index", False):
        return

    def squeezing(tensor: Any, scope: Any) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    squeezing.squeezes_index = True
    interpreter._patch_lang_tensor = squeezing


def _require_launchable(x: torch.Tensor) -> None:
    """Raise ``RuntimeError`` saying what to do when the kernels cannot run on ``x``'s device."""
    if not has_triton():
        raise RuntimeError(
            "Triton is not installed, so the fused kernels are unavailable; use the *_ref "
            "functions of surgery_edge.kernels (the reference path) instead"
        )
    if not can_launch(x.device):
        raise RuntimeError(
            f"the input is on {x.device}: the Triton kernels need CUDA tensors, or CPU tensors "
            "with TRITON_INTERPRET=1 set before the surgery_edge.kernels modules are imported"
        )


def _register_op(name: str, launch: Callable, fake: Callable) -> None:
    """Register ``launch`` (input checks + kernel launch) as the operator ``name``.

    With compiled kernels it becomes a ``triton_op``: ``torch.compile`` and AOTInductor trace
    through it to the Triton kernel itself, and ``launch`` doubles as its fake implementation.
    The interpreter runs kernels eagerly and cannot take fake tensors, so under
    ``TRITON_INTERPRET=1`` the op is an opaque ``custom_op`` with the explicit ``fake``.
    """
    if not has_triton():
        return
    if triton_interpreter_enabled():
        torch.library.custom_op(name, launch, mutates_args=()).register_fake(fake)
    else:
        torch.library.triton_op(name, launch, mutates_args=())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
