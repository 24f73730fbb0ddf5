"""Tests of the Triton kernels against their PyTorch references.

CPU tests run the kernels through the Triton interpreter (``TRITON_INTERPRET=1``, as ``make test``
sets it) and are skipped without it. Tolerances:

* float32: ``|kernel - ref64| <= 1e-5 + 1e-5 * |ref64|`` against a float64 reference.
* float16/bfloat16: the kernel's max error against the float64 reference may be at most twice
  PyTorch's own same-dtype error plus a small dtype atol (flash-attention's rule).

GPU tests (marker ``gpu``) need compiled kernels: they are skipped without CUDA and under the
interpreter; run them with ``python -m pytest -m gpu tests/test_kernels.py``. The interpreter
cannot run ``tl.dot`` on bfloat16 (triton-lang/triton#11584), so bfloat16 is tested on GPU only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from surgery_edge import kernels

ON_CPU = pytest.mark.skipif(
    not kernels.can_launch("cpu"),
    reason="CPU kernel tests need Triton and TRITON_INTERPRET=1",
)
ON_GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.triton_interpreter_enabled(),
    reason="GPU tests need a CUDA device and compiled kernels (TRITON_INTERPRET unset)",
)
HALF_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _adapters(num_tasks: int, rank: int, width: int, gen: torch.Generator) -> tuple:
    """Stacked (down, up) whose correction is O(1) and whose ReLU is about half active."""
    down = torch.randn(num_tasks, rank, width, generator=gen) / width**0.5
    up = torch.randn(num_tasks, width, rank, generator=gen) * (0.5 / rank**0.5)
    return down, up


def correction_inputs(batch, tokens, width, rank, num_tasks, seed=0, device="cpu"):
    """(x, task_ids, down, up, ln_weight, ln_bias) in float32, task ids covering all tasks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=gen)
    task_ids = torch.arange(batch) % num_tasks
    down, up = _adapters(num_tasks, rank, width, gen)
    ln_weight = 1.0 + 0.1 * torch.randn(width, generator=gen)
    ln_bias = 0.1 * torch.randn(width, generator=gen)
    return tuple(t.to(device) for t in (x, task_ids, down, up, ln_weight, ln_bias))


def final_site_inputs(batch, width, rank, num_tasks, classes, seed=0, device="cpu"):
    """(feat, down, up, head_w, head_b) in float32; task t has classes[t] real classes."""
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(batch, width, generator=gen)
    down, up = _adapters(num_tasks, rank, width, gen)
    c_max = max(classes)
    head_w = torch.randn(num_tasks, c_max, width, generator=gen) / width**0.5
    head_b = 0.1 * torch.randn(num_tasks, c_max, generator=gen)
    for task, count in enumerate(classes):  # zero-padded rows, -inf bias (the documented layout)
        head_w[task, count:] = 0.0
        head_b[task, count:] = float("-inf")
    return tuple(t.to(device) for t in (feat, down, up, head_w, head_b))


def _cast(tensors, dtype):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def assert_close_fp32(actual: torch.Tensor, expected64: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected64, atol=1e-5, rtol=1e-5)


def assert_within_torch_error(actual, same_dtype, expected64) -> None:
    """kernel error <= 2 x PyTorch same-dtype error + atol(dtype), against float64."""
    finite = torch.isfinite(expected64)
    assert torch.equal(finite, torch.isfinite(actual)), "non-finite entries differ"
    kernel_err = (actual.double() - expected64)[finite].abs().max().item()
    torch_err = (same_dtype.double() - expected64)[finite].abs().max().item()
    assert kernel_err <= 2 * torch_err + HALF_ATOL[actual.dtype], (kernel_err, torch_err)


# ---------------------------------------------------------------------------------------------
# surgery_correct_layernorm: correctness (interpreter)
# ---------------------------------------------------------------------------------------------
# (B, N, d, r, T): N in {50, 257}; d in {128, 768, 1024} plus a width that is not a multiple of
# 16; r in {4, 16} plus 8 and 32 (two rank chunks); B = 1 and batches that are not powers of two
CORRECTION_CASES = [
    (1, 50, 768, 16, 8),
    (3, 257, 1024, 4, 4),
    (5, 50, 128, 4, 3),
    (2, 257, 768, 16, 2),
    (3, 7, 100, 8, 2),
    (2, 20, 128, 32, 3),
]


@ON_CPU
@pytest.mark.parametrize("case", CORRECTION_CASES, ids=lambda c: "B{}-N{}-d{}-r{}-T{}".format(*c))
def test_surgery_correct_layernorm_routed_fp32(case):
    inputs = correction_inputs(*case)
    x_corr, y = kernels.surgery_correct_layernorm(*inputs)
    ref_corr, ref_y = kernels.surgery_correct_layernorm_ref(*_cast(inputs, torch.float64))
    assert_close_fp32(x_corr, ref_corr)
    assert_close_fp32(y, ref_y)
    # the correction must matter, or the test would pass for x_corr = x
    assert (ref_corr - inputs[0].double()).abs().max() > 0.5


@ON_CPU
@pytest.mark.parametrize("case", [(1, 50, 1024, 16, 3), (3, 257, 128, 4, 2)], ids=str)
def test_surgery_correct_layernorm_all_tasks_fp32(case):
    batch, _, _, _, num_tasks = case
    x, _, down, up, ln_weight, ln_bias = correction_inputs(*case)
    x_all, task_ids = kernels.expand_all_tasks(x, num_tasks)
    assert x_all.shape == (num_tasks * batch, *x.shape[1:])
    assert task_ids.tolist() == [t for t in range(num_tasks) for _ in range(batch)]

    x_corr, y = kernels.surgery_correct_layernorm(x_all, task_ids, down, up, ln_weight, ln_bias)
    for task in range(num_tasks):  # rows t*B .. t*B+B-1 are the batch under task t
        ids = torch.full((batch,), task)
        ref = kernels.surgery_correct_layernorm_ref(
            *_cast((x, ids, down, up, ln_weight, ln_bias), torch.float64)
        )
        rows = slice(task * batch, (task + 1) * batch)
        assert_close_fp32(x_corr[rows], ref[0])
        assert_close_fp32(y[rows], ref[1])


@ON_CPU
@pytest.mark.parametrize("ln_dtype", [torch.float32, torch.float16])
def test_surgery_correct_layernorm_fp16(ln_dtype):
    x, task_ids, down, up, ln_weight, ln_bias = correction_inputs(3, 50, 128, 16, 2)
    x, down, up = _cast((x, down, up), torch.float16)
    ln_weight, ln_bias = ln_weight.to(ln_dtype), ln_bias.to(ln_dtype)
    args = (x, task_ids, down, up, ln_weight, ln_bias)

    out = kernels.surgery_correct_layernorm(*args)
    same_dtype = kernels.surgery_correct_layernorm_ref(*args)
    expected = kernels.surgery_correct_layernorm_ref(*_cast(args, torch.float64))
    for actual, baseline, reference in zip(out, same_dtype, expected, strict=True):
        assert actual.dtype == torch.float16
        assert_within_torch_error(actual, baseline, reference)


@ON_CPU
def test_surgery_correct_layernorm_strided_tokens():
    """x may be strided over images and tokens (here every other token) if rows are contiguous."""
    x, task_ids, down, up, ln_weight, ln_bias = correction_inputs(2, 40, 128, 4, 2)
    x_view = x[:, ::2]
    assert not x_view.is_contiguous()
    out = kernels.surgery_correct_layernorm(x_view, task_ids, down, up, ln_weight, ln_bias)
    expected = kernels.surgery_correct_layernorm_ref(
        *_cast((x_view, task_ids, down, up, ln_weight, ln_bias), torch.float64)
    )
    for actual, reference in zip(out, expected, strict=True):
        assert actual.is_contiguous()
        assert_close_fp32(actual, reference)


# ---------------------------------------------------------------------------------------------
# surgery_correct_layernorm: input validation
# ---------------------------------------------------------------------------------------------
def _replace(inputs: tuple, index: int, value) -> tuple:
    return inputs[:index] + (value,) + inputs[index + 1 :]


def _bad_correction_cases() -> list:
    """One ``pytest.param(inputs, message fragment, id=...)`` per kind of bad argument."""
    good = correction_inputs(2, 5, 32, 4, 3)
    x, task_ids, down, up, ln_weight, ln_bias = good
    return [
        pytest.param(_replace(good, 0, x.double()), "x must be float32", id="x-float64"),
        pytest.param(_replace(good, 0, x[0]), "x must be (B, N, d)", id="x-2d"),
        pytest.param(_replace(good, 2, down.half()), "down must have the dtype", id="down-dtype"),
        pytest.param(_replace(good, 2, down[..., :16]), "down must be (T, r, d)", id="down-width"),
        pytest.param(_replace(good, 3, up[:, :, :2]), "up must be (T, d, r)", id="up-shape"),
        pytest.param(_replace(good, 4, ln_weight[:8]), "ln_weight must be (32,)", id="ln-shape"),
        pytest.param(
            _replace(good, 5, ln_bias.double()),
            "ln_bias must be float32 or the dtype of x",
            id="ln-dtype",
        ),
        pytest.param(_replace(good, 1, task_ids[:1]), "task_ids must be (B,)", id="ids-shape"),
        pytest.param(_replace(good, 1, task_ids.float()), "int64 or int32", id="ids-dtype"),
        pytest.param(_replace(good, 1, torch.tensor([0, 3])), "lie in [0, 3)", id="ids-high"),
        pytest.param(_replace(good, 1, torch.tensor([-1, 0])), "lie in [0, 3)", id="ids-negative"),
        pytest.param(
            _replace(good, 0, x.transpose(1, 2).contiguous().transpose(1, 2)),
            "contiguous in its last dim",
            id="x-last-dim-strided",
        ),
        pytest.param(
            _replace(good, 3, up.transpose(1, 2).contiguous().transpose(1, 2)),
            "up must be contiguous",
            id="up-not-contiguous",
        ),
    ]


@ON_CPU
@pytest.mark.parametrize("inputs, message", _bad_correction_cases())
def test_surgery_correct_layernorm_rejects(inputs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.surgery_correct_layernorm(*inputs)


@ON_CPU
def test_shape_errors_name_the_shapes():
    x, task_ids, down, up, ln_weight, ln_bias = correction_inputs(2, 5, 32, 4, 3)
    with pytest.raises(ValueError) as info:
        kernels.surgery_correct_layernorm(x, task_ids, down[..., :16], up, ln_weight, ln_bias)
    assert "(3, 4, 16)" in str(info.value) and "d = 32" in str(info.value)


def test_expand_all_tasks_rejects_zero_tasks():
    with pytest.raises(ValueError, match="num_tasks"):
        kernels.expand_all_tasks(torch.zeros(2, 3, 4), 0)


# ---------------------------------------------------------------------------------------------
# final_site_all_tasks
# ---------------------------------------------------------------------------------------------
# (B, e, r, T, classes per task): e in {128, 768, 1024} and 100 (masked); several class chunks;
# two image blocks for B = 70
FINAL_SITE_CASES = [
    (1, 768, 16, 8, (10, 37, 2, 100, 10, 5, 3, 8)),
    (5, 128, 4, 3, (10, 7, 3)),
    (3, 1024, 4, 2, (100, 47)),
    (70, 100, 8, 2, (5, 4)),
]


@ON_CPU
@pytest.mark.parametrize("case", FINAL_SITE_CASES, ids=lambda c: "B{}-e{}-r{}-T{}".format(*c))
def test_final_site_all_tasks_fp32(case):
    inputs = final_site_inputs(*case)
    zn, logits = kernels.final_site_all_tasks(*inputs)
    ref_zn, ref_logits = kernels.final_site_all_tasks_ref(*_cast(inputs, torch.float64))
    assert_close_fp32(zn, ref_zn)
    assert_close_fp32(logits, ref_logits)  # also checks -inf at the same (padded) positions
    batch, classes = case[0], case[4]
    for task, count in enumerate(classes):
        assert torch.isneginf(logits[task, :, count:]).all()
        assert torch.isfinite(logits[task, :, :count]).all()
    assert zn.shape == (len(classes), batch, case[1])


@ON_CPU
def test_final_site_all_tasks_fp16():
    inputs = _cast(final_site_inputs(5, 128, 16, 3, (10, 33, 4)), torch.float16)
    out = kernels.final_site_all_tasks(*inputs)
    same_dtype = kernels.final_site_all_tasks_ref(*inputs)
    expected = kernels.final_site_all_tasks_ref(*_cast(inputs, torch.float64))
    for actual, baseline, reference in zip(out, same_dtype, expected, strict=True):
        assert actual.dtype == torch.float16
        assert_within_torch_error(actual, baseline, reference)


@ON_CPU
def test_final_site_all_tasks_rejects():
    feat, down, up, head_w, head_b = final_site_inputs(2, 32, 4, 3, (5, 5, 5))
    with pytest.raises(ValueError, match="feat must be float32"):
        kernels.final_site_all_tasks(feat.double(), down, up, head_w, head_b)
    with pytest.raises(ValueError, match="down must be"):
        kernels.final_site_all_tasks(feat, down[..., :16], up, head_w, head_b)
    with pytest.raises(ValueError, match="head_w must be"):
        kernels.final_site_all_tasks(feat, down, up, head_w[:2], head_b)
    with pytest.raises(ValueError, match="head_b must be"):
        kernels.final_site_all_tasks(feat, down, up, head_w, head_b[:, :4])
    with pytest.raises(ValueError, match="head_w must have the dtype"):
        kernels.final_site_all_tasks(feat, down, up, head_w.half(), head_b)
    with pytest.raises(ValueError, match="head_w must be contiguous"):
        kernels.final_site_all_tasks(
            feat, down, up, head_w.transpose(1, 2).contiguous().transpose(1, 2), head_b
        )


# ---------------------------------------------------------------------------------------------
# registered ops
# ---------------------------------------------------------------------------------------------
@ON_CPU
def test_ops_pass_opcheck():
    """Schema, fake tensors and AOT dispatch with dynamic shapes (torch.library.opcheck)."""
    correction = correction_inputs(2, 5, 32, 4, 3)
    torch.library.opcheck(
        torch.ops.surgery_edge.surgery_correct_layernorm.default, (*correction, 1e-5)
    )
    final_site = final_site_inputs(3, 32, 4, 2, (5, 3))
    torch.library.opcheck(torch.ops.surgery_edge.final_site_all_tasks.default, final_site)


@ON_CPU
def test_fake_impls_give_output_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    correction = _cast(correction_inputs(3, 7, 32, 4, 2), torch.float16)
    final_site = _cast(final_site_inputs(3, 32, 4, 2, (5, 3)), torch.bfloat16)
    with mode:
        fake_correction = [mode.from_tensor(t) for t in correction]
        x_corr, y = torch.ops.surgery_edge.surgery_correct_layernorm(*fake_correction, 1e-5)
        fake_final = [mode.from_tensor(t) for t in final_site]
        zn, logits = torch.ops.surgery_edge.final_site_all_tasks(*fake_final)
    for out in (x_corr, y):
        assert (out.shape, out.dtype, out.is_contiguous()) == ((3, 7, 32), torch.float16, True)
    assert (zn.shape, zn.dtype) == ((2, 3, 32), torch.bfloat16)
    assert (logits.shape, logits.dtype) == ((2, 3, 5), torch.bfloat16)


@ON_CPU
def test_compiles_without_graph_breaks():
    """fullgraph=True: each public function traces to its op, with no graph break."""
    correction = correction_inputs(2, 5, 32, 4, 3)
    compiled = torch.compile(kernels.surgery_correct_layernorm, fullgraph=True, backend="aot_eager")
    eager = kernels.surgery_correct_layernorm(*correction)
    for actual, expected in zip(compiled(*correction), eager, strict=True):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    final_site = final_site_inputs(3, 32, 4, 2, (5, 3))
    compiled = torch.compile(kernels.final_site_all_tasks, fullgraph=True, backend="aot_eager")
    eager = kernels.final_site_all_tasks(*final_site)
    for actual, expected in zip(compiled(*final_site), eager, strict=True):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# imports and devices
# ---------------------------------------------------------------------------------------------
def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def test_import_is_lean():
    """Importing the package imports neither Triton nor the kernel modules."""
    result = _run_python(
        """
        import sys
        import surgery_edge.kernels
        assert "triton" not in sys.modules, "surgery_edge.kernels imported triton"
        assert "surgery_edge.kernels.surgery_correction" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr


def test_lazy_accessors_resolve():
    assert kernels.surgery_correct_ref.__module__ == "surgery_edge.kernels.surgery_correction"
    assert kernels.final_site_all_tasks_ref.__module__ == "surgery_edge.kernels.final_site"
    assert set(kernels.__all__) <= set(dir(kernels))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kernels.nope  # noqa: B018


@pytest.mark.skipif(not kernels.has_triton(), reason="needs Triton")
def test_cpu_tensors_without_interpreter_give_a_clear_error():
    result = _run_python(
        """
        import torch
        from surgery_edge.kernels import surgery_correction as sc
        x = torch.zeros(1, 2, 16)
        try:
            sc.surgery_correct_layernorm(
                x, torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, 16), torch.zeros(1, 16, 4),
                torch.ones(16), torch.zeros(16),
            )
        except RuntimeError as error:
            print(error)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "CUDA" in result.stdout


_SM90_COMPILE = """
import json
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from surgery_edge.kernels import final_site, surgery_correction

dtype = getattr(torch, "{dtype}")
name = {{torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}}[dtype]
cases = [
    (surgery_correction._surgery_correct_layernorm_kernel, surgery_correction._launch_config,
     {{"task_ids_ptr": "*i64", "ln_w_ptr": "*fp32", "ln_b_ptr": "*fp32", "eps": "fp32"}}),
    (final_site._final_site_all_tasks_kernel, final_site._launch_config,
     {{"head_b_ptr": "*fp32", "norm_eps": "fp32"}}),
]
report = {{}}
for kernel, launch_config, types in cases:
    config = launch_config({width}, dtype)
    constexprs = {{k: v for k, v in config.items() if not k.startswith("num_")}}
    signature = {{
        arg: types.get(arg, "constexpr" if arg in constexprs else f"*{{name}}"
                       if arg.endswith("_ptr") else "i32")
        for arg in kernel.arg_names
    }}
    options = {{k: v for k, v in config.items() if k.startswith("num_")}}
    binary = compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                     options=options)
    report[kernel.__name__] = [binary.metadata.shared, binary.asm["ptx"].count("st.local")]
print(json.dumps(report))
"""


@pytest.mark.skipif(not kernels.has_triton(), reason="needs Triton")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_kernels_compile_for_sm90(dtype):
    """Without a GPU: the compiled (not interpreted) kernels build for sm_90 at d = 1024, fit
    in a Hopper SM's shared memory (227 KB on the H100 and H200; also under an A100's 163 KB)
    and spill no registers."""
    result = _run_python(_SM90_COMPILE.format(dtype=dtype, width=1024))
    assert result.returncode == 0, result.stderr[-3000:]
    for kernel, (shared, spills) in json.loads(result.stdout.splitlines()[-1]).items():
        assert shared <= 163 * 1024, (kernel, shared)
        assert spills == 0, (kernel, spills)


# ---------------------------------------------------------------------------------------------
# GPU (compiled kernels)
# ---------------------------------------------------------------------------------------------
GPU_CORRECTION_CASES = [
    (1, 50, 768, 16, 8),
    (32, 50, 768, 16, 8),
    (5, 257, 1024, 4, 8),
    (64, 257, 1024, 16, 8),
    (3, 197, 384, 32, 3),
]


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CORRECTION_CASES, ids=str)
@pytest.mark.parametrize("ln_dtype", ["fp32", "same"])
def test_gpu_surgery_correct_layernorm_half(case, dtype, ln_dtype):
    x, task_ids, down, up, ln_weight, ln_bias = correction_inputs(*case, device="cuda")
    x, down, up = _cast((x, down, up), dtype)
    if ln_dtype == "same":
        ln_weight, ln_bias = ln_weight.to(dtype), ln_bias.to(dtype)
    args = (x, task_ids, down, up, ln_weight, ln_bias)
    out = kernels.surgery_correct_layernorm(*args)
    same_dtype = kernels.surgery_correct_layernorm_ref(*args)
    expected = kernels.surgery_correct_layernorm_ref(*_cast(args, torch.float64))
    for actual, baseline, reference in zip(out, same_dtype, expected, strict=True):
        assert actual.dtype == dtype
        assert_within_torch_error(actual, baseline, reference)


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("case", GPU_CORRECTION_CASES[:3], ids=str)
def test_gpu_surgery_correct_layernorm_fp32(case):
    inputs = correction_inputs(*case, device="cuda")
    out = kernels.surgery_correct_layernorm(*inputs)
    expected = kernels.surgery_correct_layernorm_ref(*_cast(inputs, torch.float64))
    for actual, reference in zip(out, expected, strict=True):
        assert_close_fp32(actual, reference)


@pytest.mark.gpu
@ON_GPU
def test_gpu_final_site_all_tasks_fp32():
    inputs = final_site_inputs(37, 768, 16, 8, (10, 37, 2, 100, 1000, 5, 3, 8), device="cuda")
    out = kernels.final_site_all_tasks(*inputs)
    expected = kernels.final_site_all_tasks_ref(*_cast(inputs, torch.float64))
    for actual, reference in zip(out, expected, strict=True):
        assert_close_fp32(actual, reference)


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 37, 128])
def test_gpu_final_site_all_tasks_half(batch, dtype):
    classes = (10, 37, 2, 100, 1000, 5, 3, 8)
    inputs = _cast(final_site_inputs(batch, 768, 16, 8, classes, device="cuda"), dtype)
    out = kernels.final_site_all_tasks(*inputs)
    same_dtype = kernels.final_site_all_tasks_ref(*inputs)
    expected = kernels.final_site_all_tasks_ref(*_cast(inputs, torch.float64))
    for actual, baseline, reference in zip(out, same_dtype, expected, strict=True):
        assert_within_torch_error(actual, baseline, reference)


@pytest.mark.gpu
@ON_GPU
def test_gpu_invalid_task_id_poisons_only_its_image():
    x, _, down, up, ln_weight, ln_bias = correction_inputs(3, 50, 768, 16, 4, device="cuda")
    task_ids = torch.tensor([1, 4, 0], device="cuda")  # 4 is out of range
    x_corr, y = kernels.surgery_correct_layernorm(x, task_ids, down, up, ln_weight, ln_bias)
    assert torch.isnan(x_corr[1]).all() and torch.isnan(y[1]).all()
    assert torch.isfinite(x_corr[[0, 2]]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.gpu
@ON_GPU
def test_gpu_torch_compile_inlines_the_kernels():
    correction = _cast(correction_inputs(8, 50, 768, 16, 8, device="cuda"), torch.float16)
    compiled = torch.compile(kernels.surgery_correct_layernorm, fullgraph=True)
    eager = kernels.surgery_correct_layernorm(*correction)
    for actual, expected in zip(compiled(*correction), eager, strict=True):
        torch.testing.assert_close(actual, expected)
    final_site = _cast(final_site_inputs(8, 768, 16, 8, (10,) * 8, device="cuda"), torch.float16)
    compiled = torch.compile(kernels.final_site_all_tasks, fullgraph=True)
    eager = kernels.final_site_all_tasks(*final_site)
    for actual, expected in zip(compiled(*final_site), eager, strict=True):
        torch.testing.assert_close(actual, expected)


@pytest.mark.gpu
@ON_GPU
def test_gpu_fake_impls_give_output_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    correction = _cast(correction_inputs(3, 7, 32, 4, 2, device="cuda"), torch.float16)
    with mode:
        fake = [mode.from_tensor(t) for t in correction]
        x_corr, y = torch.ops.surgery_edge.surgery_correct_layernorm(*fake, 1e-5)
    assert (x_corr.shape, x_corr.dtype, x_corr.device.type) == ((3, 7, 32), torch.float16, "cuda")
    assert (y.shape, y.dtype) == ((3, 7, 32), torch.float16)
