"""Task-routed representation-surgery correction fused with the LayerNorm that follows it.

For every token row ``z`` of image ``b`` with task ``t = task_ids[b]``::

    z_corr = z - up[t] @ relu(down[t] @ z)        # the surgery adapter of task t
    y      = LayerNorm(z_corr; ln_weight, ln_bias, eps)

In a ViT block the corrected residual stream ``z_corr`` goes on down the residual path and
``y`` feeds the next attention or MLP branch, so the fused kernel reads ``x`` once and writes
both. The *all-tasks* mode is the same kernel over a batch expanded to ``T * B`` images
(:func:`expand_all_tasks`).

Contents, in reading order: the PyTorch references, the Triton kernel, the launcher (input
checks, then the launch) registered as the op ``torch.ops.surgery_edge.surgery_correct_layernorm``,
and the public function :func:`surgery_correct_layernorm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _jit, _launcher, _register_op, _require_launchable
from .reference import routed_correction

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton wheel for this platform: the references still work
    triton = None

OP_NAME = "surgery_edge::surgery_correct_layernorm"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------
def surgery_correct_ref(
    x: torch.Tensor,  # (B, N, d)
    task_ids: torch.Tensor,  # (B,) integer, values in [0, T)
    down: torch.Tensor,  # (T, r, d)
    up: torch.Tensor,  # (T, d, r)
) -> torch.Tensor:  # (B, N, d)
    """Apply each image's surgery adapter: ``x - up[t] @ relu(down[t] @ x)`` row by row.

    Computes in the dtype of the inputs, as the unfused PyTorch path would: pass float32 (or
    float64) tensors for a high-precision reference, half-precision tensors for the same-dtype
    baseline that kernel tolerances are measured against.
    """
    return routed_correction(x, task_ids, down, up)


def surgery_correct_layernorm_ref(
    x: torch.Tensor,  # (B, N, d)
    task_ids: torch.Tensor,  # (B,) integer, values in [0, T)
    down: torch.Tensor,  # (T, r, d)
    up: torch.Tensor,  # (T, d, r)
    ln_weight: torch.Tensor,  # (d,)
    ln_bias: torch.Tensor,  # (d,)
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:  # (x_corr (B, N, d), LayerNorm(x_corr) (B, N, d))
    """Reference for :func:`surgery_correct_layernorm`, in the dtype of ``x``.

    The LayerNorm parameters are cast to ``x.dtype``, so float32 parameters with half-precision
    activations behave like a half-precision ``nn.LayerNorm``.
    """
    x_corr = surgery_correct_ref(x, task_ids, down, up)
    y = F.layer_norm(x_corr, (x.shape[-1],), ln_weight.to(x.dtype), ln_bias.to(x.dtype), eps)
    return x_corr, y


def expand_all_tasks(
    x: torch.Tensor,  # (B, N, d)
    num_tasks: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (x repeated (T*B, N, d), task_ids (T*B,) int64)
    """Expand a batch so that every image is answered for every task (all-tasks mode).

    Rows are task-major: rows ``t*B .. t*B + B - 1`` are the whole batch under task ``t``, so
    outputs reshape to ``(T, B, ...)`` without a transpose.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    batch = x.shape[0]
    task_ids = (
        torch.arange(num_tasks, device=x.device)[:, None].expand(num_tasks, batch).reshape(-1)
    )
    return x.repeat(num_tasks, *([1] * (x.dim() - 1))), task_ids


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
@_jit
def _adapter_correction(
    x,  # (BLOCK_M, BLOCK_D) rows in the input dtype, zero outside the D valid columns
    down_ptr,  # (T, R, D) contiguous
    up_ptr,  # (T, D, R) contiguous
    task,  # int64 scalar, a valid task id
    cols,  # (BLOCK_D,) column indices
    col_ok,  # (BLOCK_D,) cols < D
    D,
    R,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # Returns up[task] @ relu(down[task] @ row) for every row of x: (BLOCK_M, BLOCK_D), fp32.
    # Shared by both kernels of the package.
    corr = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if USE_DOT:
        # Half precision: tensor cores, BLOCK_R ranks at a time (ReLU acts per rank, so rank
        # chunks are independent and the weight tiles stay (BLOCK_D, BLOCK_R) whatever r is).
        # Padded ranks and columns load as zeros and add nothing to either product.
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            down_t = tl.load(  # down[task, ranks, :]^T, (BLOCK_D, BLOCK_R)
                down_ptr + task * R * D + ranks[None, :] * D + cols[:, None],
                mask=col_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
            up_t = tl.load(  # up[task, :, ranks]^T, (BLOCK_R, BLOCK_D)
                up_ptr + task * D * R + cols[None, :] * R + ranks[:, None],
                mask=rank_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            hidden = tl.maximum(tl.dot(x, down_t), 0.0)  # (BLOCK_M, BLOCK_R), fp32
            corr = tl.dot(hidden.to(up_t.dtype), up_t, corr)
    else:
        # float32: exact fp32 FMAs one rank at a time. tl.dot would either round to TF32 or
        # (input_precision="ieee") stage three fp32 tiles in shared memory, ~192 KB at d = 1024.
        xf = x.to(tl.float32)
        for j in range(0, R):
            down_j = tl.load(down_ptr + (task * R + j) * D + cols, mask=col_ok, other=0.0)
            hidden = tl.maximum(tl.sum(xf * down_j.to(tl.float32)[None, :], axis=1), 0.0)
            up_j = tl.load(up_ptr + task * D * R + cols * R + j, mask=col_ok, other=0.0)
            corr += hidden[:, None] * up_j.to(tl.float32)[None, :]
    return corr


@_jit
def _surgery_correct_layernorm_kernel(
    x_ptr,  # (B, N, D), last dim contiguous, rows at stride_xb / stride_xn
    task_ids_ptr,  # (B,)
    down_ptr,  # (T, R, D) contiguous
    up_ptr,  # (T, D, R) contiguous
    ln_w_ptr,  # (D,)
    ln_b_ptr,  # (D,)
    x_corr_ptr,  # (B, N, D) contiguous, output
    y_ptr,  # (B, N, D) contiguous, output
    N,
    D,
    R,
    T,
    stride_xb,
    stride_xn,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # one program = BLOCK_M token rows of one image, hence one task and one weight set
    pid_m = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)

    task = tl.load(task_ids_ptr + image).to(tl.int64)
    # An out-of-range id must not read out of bounds; its rows come out NaN instead (checking on
    # the host would cost a device sync per call).
    task_ok = (task >= 0) & (task < T)
    task = tl.where(task_ok, task, 0)
    poison = tl.where(task_ok, 0.0, float("nan"))

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    tile_ok = row_ok[:, None] & col_ok[None, :]

    x_offs = image * stride_xb + rows[:, None].to(tl.int64) * stride_xn + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=tile_ok, other=0.0)  # (BLOCK_M, BLOCK_D)

    corr = _adapter_correction(
        x, down_ptr, up_ptr, task, cols, col_ok, D, R, BLOCK_M, BLOCK_D, BLOCK_R, USE_DOT
    )
    x_corr = x.to(tl.float32) - corr + poison

    out_offs = (image * N + rows[:, None]).to(tl.int64) * D + cols[None, :]
    tl.store(x_corr_ptr + out_offs, x_corr.to(x_corr_ptr.dtype.element_ty), mask=tile_ok)

    # LayerNorm of the fp32 x_corr (not of its rounded copy); padded columns hold 0 and are
    # masked out of the variance
    mean = tl.sum(x_corr, axis=1) / D
    centred = tl.where(col_ok[None, :], x_corr - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    ln_w = tl.load(ln_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def _check_inputs(
    x: torch.Tensor,
    task_ids: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the first argument whose device, dtype, layout or shape is wrong.

    Looks only at metadata, so it also runs on fake tensors under ``torch.compile``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, d), got shape {tuple(x.shape)}")
    batch, _, width = x.shape
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.stride(2) != 1:
        raise ValueError(
            f"x must be contiguous in its last dim (strides {tuple(x.stride())}); "
            "call x.contiguous()"
        )
    if down.dim() != 3 or down.shape[2] != width:
        raise ValueError(
            f"down must be (T, r, d) with d = {width} (the width of x {tuple(x.shape)}), "
            f"got shape {tuple(down.shape)}"
        )
    num_tasks, rank, _ = down.shape
    if tuple(up.shape) != (num_tasks, width, rank):
        raise ValueError(
            f"up must be (T, d, r) = {(num_tasks, width, rank)} to match down "
            f"{tuple(down.shape)}, got shape {tuple(up.shape)}"
        )
    if tuple(task_ids.shape) != (batch,):
        raise ValueError(
            f"task_ids must be (B,) = ({batch},), one id per image of x {tuple(x.shape)}, "
            f"got shape {tuple(task_ids.shape)}"
        )
    if task_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"task_ids must be int64 or int32, got {task_ids.dtype}")
    for name, param in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tuple(param.shape) != (width,):
            raise ValueError(f"{name} must be ({width},), got shape {tuple(param.shape)}")
        if param.dtype not in (torch.float32, x.dtype):
            raise ValueError(
                f"{name} must be float32 or the dtype of x ({x.dtype}), got {param.dtype}"
            )
    for name, weight in (("down", down), ("up", up)):
        if weight.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {weight.dtype}")
    named = {
        "task_ids": task_ids,
        "down": down,
        "up": up,
        "ln_weight": ln_weight,
        "ln_bias": ln_bias,
    }
    for name, tensor in named.items():
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call {name}.contiguous()")


def _launch_config(width: int, dtype: torch.dtype) -> dict[str, int | bool]:
    """Block sizes and launch options for rows of ``width`` elements in ``dtype``.

    A program holds whole rows (BLOCK_D >= d) so the LayerNorm statistics need no second pass;
    BLOCK_M shrinks as rows widen to bound the tile at ~8K elements, but stays at least 16, the
    smallest ``tl.dot`` operand. Half precision uses tensor cores (~96 KB of shared memory at
    d = 1024); float32 uses exact FMAs (no tile staging).
    """
    block_d = max(16, triton.next_power_of_2(int(width)))
    return {
        "BLOCK_M": max(16, min(64, 8192 // block_d)),
        "BLOCK_D": block_d,
        "BLOCK_R": 16,
        "USE_DOT": dtype != torch.float32,
        "num_warps": 8 if block_d >= 1024 else 4,
    }


def _surgery_correct_layernorm_launch(
    x: torch.Tensor,  # (B, N, d)
    task_ids: torch.Tensor,  # (B,)
    down: torch.Tensor,  # (T, r, d)
    up: torch.Tensor,  # (T, d, r)
    ln_weight: torch.Tensor,  # (d,)
    ln_bias: torch.Tensor,  # (d,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (x_corr (B, N, d), y (B, N, d))
    """Check the inputs and launch the kernel; the body of the registered op."""
    _check_inputs(x, task_ids, down, up, ln_weight, ln_bias)
    batch, tokens, width = x.shape
    num_tasks, rank, _ = down.shape
    x_corr = torch.empty((batch, tokens, width), dtype=x.dtype, device=x.device)
    y = torch.empty_like(x_corr)
    config = _launch_config(width, x.dtype)
    grid = (triton.cdiv(tokens, config["BLOCK_M"]), batch)
    _launcher(_surgery_correct_layernorm_kernel)[grid](
        x, task_ids, down, up, ln_weight, ln_bias, x_corr, y,
        tokens, width, rank, num_tasks, x.stride(0), x.stride(1), eps, **config,
    )  # fmt: skip
    return x_corr, y


def _surgery_correct_layernorm_fake(
    x: torch.Tensor,
    task_ids: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output metadata of the op (same checks as the launcher), for tracing."""
    _check_inputs(x, task_ids, down, up, ln_weight, ln_bias)
    return x.new_empty(x.shape), x.new_empty(x.shape)


_register_op(OP_NAME, _surgery_correct_layernorm_launch, _surgery_correct_layernorm_fake)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def surgery_correct_layernorm(
    x: torch.Tensor,  # (B, N, d) residual stream; the N tokens of image b share task_ids[b]
    task_ids: torch.Tensor,  # (B,) int64, values in [0, T)
    down: torch.Tensor,  # (T, r, d) W_down of every task, stacked
    up: torch.Tensor,  # (T, d, r) W_up of every task, stacked
    ln_weight: torch.Tensor,  # (d,)
    ln_bias: torch.Tensor,  # (d,)
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:  # (x_corr (B, N, d), LayerNorm(x_corr) (B, N, d))
    """Fused task-routed surgery correction and LayerNorm (one Triton launch).

    Args:
        x: residual stream, float32/float16/bfloat16, contiguous in its last dim.
        task_ids: the task of each image. Checked against ``[0, T)`` here when it lives on the
            CPU; on the GPU (no host sync) an image with an invalid id gets NaN outputs.
        down, up: the stacked adapters, same dtype as ``x``, contiguous.
        ln_weight, ln_bias: the LayerNorm after the adapter, float32 or ``x.dtype``.
        eps: the LayerNorm epsilon.

    Returns:
        ``(x_corr, y)`` in ``x.dtype``: the corrected stream and its LayerNorm. Both come from
        one fp32 computation (``y`` is not recomputed from the rounded ``x_corr``).

    Raises:
        ValueError: an argument has the wrong device, dtype, layout or shape, or a CPU
            ``task_ids`` holds an id outside ``[0, T)``.
        RuntimeError: Triton is missing, or ``x`` is on the CPU without ``TRITON_INTERPRET=1``.
    """
    _require_launchable(x)
    if not torch.compiler.is_compiling() and task_ids.device.type == "cpu" and task_ids.numel():
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0 or high >= down.shape[0]:
            raise ValueError(
                f"task_ids must lie in [0, {down.shape[0]}) (T = down.shape[0]), "
                f"got values from {low} to {high}"
            )
    return torch.ops.surgery_edge.surgery_correct_layernorm(
        x, task_ids, down, up, ln_weight, ln_bias, eps
    )
