"""Does an exported engine compute what the PyTorch model computes? (timm's ``check_forward``)"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from surgery_edge.data.transforms import to_model_input
from surgery_edge.engine_format import Precision
from surgery_edge.errors import ExportError
from surgery_edge.runtime import Predictor, load
from surgery_edge.surgery.model import MultiTaskModel


@dataclass(frozen=True)
class Parity:
    """Engine vs PyTorch on the same preprocessed images.

    ``max_abs_diff`` is over finite logits (``inf`` if the ``-inf`` padding differs);
    ``argmax_agreement`` is the percentage of (image, task) answers with the same class.
    """

    rows: int
    max_abs_diff: float
    argmax_agreement: float
    max_abs_logit: float  # the largest |logit| of the reference, for relative tolerances

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def _reference(model: MultiTaskModel, x: torch.Tensor, task_ids, batch_size: int):
    device = model.head_weight.device
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        if task_ids is None:
            outs.append([t.float().cpu().numpy() for t in model.forward_all_tasks(xb)])
        else:
            outs.append([model(xb, task_ids[i : i + batch_size].to(device)).float().cpu().numpy()])
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def check_forward(
    model: MultiTaskModel,
    engine,
    images: np.ndarray | torch.Tensor,
    task_ids: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> Parity:
    """Compare an engine's logits with ``model``'s on the same images.

    Args:
        model: the PyTorch model the engine was exported from.
        engine: a :class:`~surgery_edge.runtime.Predictor` or the path of an engine file.
        images: (N, H, W, 3) uint8 (preprocessed here as in evaluation) or (N, 3, S, S) float32
            model input.
        task_ids: (N,) task ids: compare routed answers. ``None``: compare every task's answer
            for every image.
        batch_size: images per engine call (exercises the engine's dynamic batch).
        device: where an engine given by path runs (``cpu``, ``cuda`` or ``auto``).
    """
    predictor = engine if isinstance(engine, Predictor) else load(os.fspath(engine), device)
    model.eval()
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = to_model_input(x, model.encoder.arch)
    x = x.float().cpu()
    ids = None if task_ids is None else torch.as_tensor(task_ids, dtype=torch.long).cpu()
    ref = _reference(model, x, ids, batch_size)
    got = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].numpy()
        if ids is None:
            got.append(predictor.all_task_logits(xb))
        else:
            got.append([predictor.routed_logits(xb, ids[i : i + batch_size].numpy())])
    got = [np.concatenate([g[k] for g in got]) for k in range(len(ref))]
    max_diff, agree, total, max_logit = 0.0, 0, 0, 0.0
    for r, g in zip(ref, got):
        finite = np.isfinite(r)
        if r.shape != g.shape or not np.array_equal(finite, np.isfinite(g)):
            max_diff = float("inf")
        else:
            max_diff = max(max_diff, float(np.abs(r[finite] - g[finite]).max(initial=0.0)))
        max_logit = max(max_logit, float(np.abs(r[finite]).max(initial=0.0)))
        agree += int((r.argmax(-1) == g.argmax(-1)).sum()) if r.shape == g.shape else 0
        total += len(r)
    return Parity(
        rows=total,
        max_abs_diff=max_diff,
        argmax_agreement=100.0 * agree / max(total, 1),
        max_abs_logit=max_logit,
    )


def smoke_check(model: MultiTaskModel, predictor, precision: Precision) -> Parity:
    """Compare a freshly exported engine with ``model`` on a few random images.

    The tolerance is relative to the logits' scale: 1e-3 for fp32, 5e-2 for fp16 (which is
    checked for gross errors only here; argmax agreement is measured on real images).
    Raises ExportError when the engine is off.
    """
    gen = torch.Generator().manual_seed(1)
    s = model.encoder.arch.image_size
    n = max(3, model.num_tasks)
    images = torch.randn(n, 3, s, s, generator=gen)
    parity = check_forward(model, predictor, images, torch.arange(n) % model.num_tasks)
    tolerance = (5e-2 if precision is Precision.FP16 else 1e-3) * (1.0 + parity.max_abs_logit)
    if not parity.max_abs_diff <= tolerance:
        raise ExportError(
            f"The exported engine {predictor.path.name} disagrees with PyTorch: max abs logit "
            f"difference {parity.max_abs_diff:.3g} > {tolerance:.3g}. Please report this with "
            "the model's architecture."
        )
    return parity
