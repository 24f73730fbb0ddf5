"""Surgery V1 at the final site, for every task at once: adapter, L2 normalisation, linear head.

Surgery V1 corrects only the backbone's output feature, so in all-tasks mode the backbone runs
once and only this step fans out over tasks. For every task ``t`` and image ``b``::

    z      = feat[b] - up[t] @ relu(down[t] @ feat[b])
    zn     = z / max(||z||_2, 1e-12)                  # like F.normalize
    logits = head_w[t] @ zn + head_b[t]

One launch covers all ``(t, b)`` pairs: a program takes a block of images under one task, so it
loads that task's adapter and head once.

Contents, in reading order: the PyTorch reference, the Triton kernel, the launcher (input
checks, then the launch) registered as the op ``torch.ops.surgery_edge.final_site_all_tasks``,
and the public function :func:`final_site_all_tasks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _jit, _launcher, _register_op, _require_launchable
from .reference import all_tasks_correction
from .surgery_correction import _adapter_correction

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton wheel for this platform: the reference still works
    triton = None

OP_NAME = "surgery_edge::final_site_all_tasks"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NORM_EPS = 1e-12  # the eps of F.normalize


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------
def final_site_all_tasks_ref(
    feat: torch.Tensor,  # (B, e)
    down: torch.Tensor,  # (T, r, e)
    up: torch.Tensor,  # (T, e, r)
    head_w: torch.Tensor,  # (T, C_max, e)
    head_b: torch.Tensor,  # (T, C_max)
) -> tuple[torch.Tensor, torch.Tensor]:  # (normalised features (T, B, e), logits (T, B, C_max))
    """Reference for :func:`final_site_all_tasks`, in the dtype of ``feat``.

    Pass float32 (or float64) tensors for a high-precision reference, half-precision tensors
    for the same-dtype baseline; ``head_b`` is cast to ``feat.dtype``.
    """
    z = all_tasks_correction(feat, down, up)  # (T, B, e)
    zn = F.normalize(z, dim=-1, eps=_NORM_EPS)
    logits = torch.baddbmm(
        head_b.to(feat.dtype).unsqueeze(1), zn, head_w.transpose(1, 2)
    )  # (T, B, C_max)
    return zn, logits


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
@_jit
def _final_site_all_tasks_kernel(
    feat_ptr,  # (B, E) contiguous
    down_ptr,  # (T, R, E) contiguous
    up_ptr,  # (T, E, R) contiguous
    head_w_ptr,  # (T, C, E) contiguous
    head_b_ptr,  # (T, C) contiguous
    zn_ptr,  # (T, B, E) contiguous, output
    logits_ptr,  # (T, B, C) contiguous, output
    B,
    E,
    R,
    C,
    norm_eps,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # one program = BLOCK_B images under one task
    pid_b = tl.program_id(0)
    task = tl.program_id(1).to(tl.int64)

    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < B
    col_ok = cols < E
    tile_ok = row_ok[:, None] & col_ok[None, :]

    feat = tl.load(
        feat_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=tile_ok, other=0.0
    )  # (BLOCK_B, BLOCK_E)

    corr = _adapter_correction(
        feat, down_ptr, up_ptr, task, cols, col_ok, E, R, BLOCK_B, BLOCK_E, BLOCK_R, USE_DOT
    )
    z = feat.to(tl.float32) - corr

    norm = tl.sqrt(tl.sum(z * z, axis=1))
    zn = z / tl.maximum(norm, norm_eps)[:, None]
    out_rows = (task * B + rows).to(tl.int64)
    tl.store(
        zn_ptr + out_rows[:, None] * E + cols[None, :], zn.to(zn_ptr.dtype.element_ty), tile_ok
    )

    # Heads, BLOCK_C classes at a time; padded classes keep their -inf bias. "ieee" keeps
    # float32 off TF32; half precision uses tensor cores either way.
    zn_op = zn.to(feat.dtype)
    for c0 in range(0, C, BLOCK_C):
        classes = c0 + tl.arange(0, BLOCK_C)
        class_ok = classes < C
        head_t = tl.load(  # head_w[task, classes, :]^T, (BLOCK_E, BLOCK_C)
            head_w_ptr + task * C * E + classes[None, :] * E + cols[:, None],
            mask=col_ok[:, None] & class_ok[None, :],
            other=0.0,
        )
        bias = tl.load(head_b_ptr + task * C + classes, mask=class_ok, other=0.0)
        logits = tl.dot(zn_op, head_t, input_precision="ieee") + bias.to(tl.float32)[None, :]
        tl.store(
            logits_ptr + out_rows[:, None] * C + classes[None, :],
            logits.to(logits_ptr.dtype.element_ty),
            mask=row_ok[:, None] & class_ok[None, :],
        )


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _check_inputs(
    feat: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    head_w: torch.Tensor,
    head_b: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the first argument whose device, dtype, layout or shape is wrong.

    Looks only at metadata, so it also runs on fake tensors under ``torch.compile``.
    """
    if feat.dim() != 2:
        raise ValueError(f"feat must be (B, e), got shape {tuple(feat.shape)}")
    width = feat.shape[1]
    if feat.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"feat must be float32, float16 or bfloat16, got {feat.dtype}")
    if down.dim() != 3 or down.shape[2] != width:
        raise ValueError(
            f"down must be (T, r, e) with e = {width} (the width of feat {tuple(feat.shape)}), "
            f"got shape {tuple(down.shape)}"
        )
    num_tasks, rank, _ = down.shape
    if tuple(up.shape) != (num_tasks, width, rank):
        raise ValueError(
            f"up must be (T, e, r) = {(num_tasks, width, rank)} to match down "
            f"{tuple(down.shape)}, got shape {tuple(up.shape)}"
        )
    if head_w.dim() != 3 or head_w.shape[0] != num_tasks or head_w.shape[2] != width:
        raise ValueError(
            f"head_w must be (T, C_max, e) with T = {num_tasks} and e = {width}, "
            f"got shape {tuple(head_w.shape)}"
        )
    num_classes = head_w.shape[1]
    if tuple(head_b.shape) != (num_tasks, num_classes):
        raise ValueError(
            f"head_b must be (T, C_max) = {(num_tasks, num_classes)} to match head_w "
            f"{tuple(head_w.shape)}, got shape {tuple(head_b.shape)}"
        )
    for name, weight in (("down", down), ("up", up), ("head_w", head_w)):
        if weight.dtype != feat.dtype:
            raise ValueError(
                f"{name} must have the dtype of feat ({feat.dtype}), got {weight.dtype}"
            )
    if head_b.dtype not in (torch.float32, feat.dtype):
        raise ValueError(
            f"head_b must be float32 or the dtype of feat ({feat.dtype}), got {head_b.dtype}"
        )
    named = {"feat": feat, "down": down, "up": up, "head_w": head_w, "head_b": head_b}
    for name, tensor in named.items():
        if tensor.device != feat.device:
            raise ValueError(f"{name} is on {tensor.device} but feat is on {feat.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call {name}.contiguous()")


def _launch_config(width: int, dtype: torch.dtype) -> dict[str, int | bool]:
    """Block sizes and launch options for features of ``width`` elements in ``dtype``.

    A program holds whole features (BLOCK_E >= e) so the norm needs no second pass; BLOCK_B
    shrinks as features widen to bound the tile at ~8K elements, but stays at least 16, the
    smallest ``tl.dot`` operand. The fp32 head product stages fp32 tiles in shared memory, so
    float32 takes narrower class blocks and no pipelining (~128 KB at e = 1024, as against
    ~320 KB otherwise; half precision needs ~96 KB).
    """
    block_e = max(16, triton.next_power_of_2(int(width)))
    fp32 = dtype == torch.float32
    return {
        "BLOCK_B": max(16, min(64, 8192 // block_e)),
        "BLOCK_E": block_e,
        "BLOCK_R": 16,
        "BLOCK_C": 16 if fp32 else 32,
        "USE_DOT": not fp32,
        "num_warps": 8 if block_e >= 1024 else 4,
        "num_stages": 1 if fp32 else 3,
    }


def _final_site_all_tasks_launch(
    feat: torch.Tensor,  # (B, e)
    down: torch.Tensor,  # (T, r, e)
    up: torch.Tensor,  # (T, e, r)
    head_w: torch.Tensor,  # (T, C_max, e)
    head_b: torch.Tensor,  # (T, C_max)
) -> tuple[torch.Tensor, torch.Tensor]:  # (zn (T, B, e), logits (T, B, C_max))
    """Check the inputs and launch the kernel; the body of the registered op."""
    _check_inputs(feat, down, up, head_w, head_b)
    batch, width = feat.shape
    num_tasks, rank, _ = down.shape
    num_classes = head_w.shape[1]
    zn = torch.empty((num_tasks, batch, width), dtype=feat.dtype, device=feat.device)
    logits = torch.empty((num_tasks, batch, num_classes), dtype=feat.dtype, device=feat.device)
    config = _launch_config(width, feat.dtype)
    grid = (triton.cdiv(batch, config["BLOCK_B"]), num_tasks)
    _launcher(_final_site_all_tasks_kernel)[grid](
        feat, down, up, head_w, head_b, zn, logits,
        batch, width, rank, num_classes, _NORM_EPS, **config,
    )  # fmt: skip
    return zn, logits


def _final_site_all_tasks_fake(
    feat: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    head_w: torch.Tensor,
    head_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output metadata of the op (same checks as the launcher), for tracing."""
    _check_inputs(feat, down, up, head_w, head_b)
    (batch, width), num_tasks, num_classes = feat.shape, down.shape[0], head_w.shape[1]
    return feat.new_empty((num_tasks, batch, width)), feat.new_empty(
        (num_tasks, batch, num_classes)
    )


_register_op(OP_NAME, _final_site_all_tasks_launch, _final_site_all_tasks_fake)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def final_site_all_tasks(
    feat: torch.Tensor,  # (B, e) one backbone feature per image (after ln_post and projection)
    down: torch.Tensor,  # (T, r, e) final-site W_down of every task, stacked
    up: torch.Tensor,  # (T, e, r) final-site W_up of every task, stacked
    head_w: torch.Tensor,  # (T, C_max, e) every task's head, zero-padded to C_max rows
    head_b: torch.Tensor,  # (T, C_max) head bias; padded classes hold -inf
) -> tuple[torch.Tensor, torch.Tensor]:  # (normalised features (T, B, e), logits (T, B, C_max))
    """Fused Surgery-V1 final site for every task at once (one Triton launch).

    Args:
        feat: the backbone features, float32/float16/bfloat16, contiguous.
        down, up: the final-site adapters, same dtype as ``feat``, contiguous.
        head_w: the stacked linear heads, same dtype as ``feat``; rows past a task's class
            count are zero.
        head_b: the stacked biases, float32 or ``feat.dtype``; positions past a task's class
            count hold ``-inf`` so that they never win an argmax or a softmax.

    Returns:
        ``(zn, logits)`` in ``feat.dtype``: the corrected, L2-normalised features and the logits
        of every task for every image.

    Raises:
        ValueError: an argument has the wrong device, dtype, layout or shape.
        RuntimeError: Triton is missing, or ``feat`` is on the CPU without ``TRITON_INTERPRET=1``.
    """
    _require_launchable(feat)
    return torch.ops.surgery_edge.final_site_all_tasks(feat, down, up, head_w, head_b)
