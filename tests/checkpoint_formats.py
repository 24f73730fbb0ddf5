"""Writers of checkpoints in other tools' real formats, shared by the importer and recipe tests.

- :func:`micro_clip`: a tiny open_clip ``CLIP`` whose image tower is ``micro-vit-16``;
- :func:`fake_task_vectors_module` / :func:`task_vectors_classes`: ``src.modeling`` as in the
  task_vectors repository, installed in ``sys.modules`` only while its objects are pickled, so
  the files hold exactly what that repository's ``torch.save`` writes;
- :func:`write_task_vectors_tree`: ``<root>/<model>/zeroshot.pt``, ``<Task>/finetuned.pt`` and
  ``head_<Task>.pt`` with experts that are the pretrained model plus a small task vector.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn


def micro_clip(quick_gelu: bool, seed: int):
    """A tiny open_clip CLIP whose image tower is ``micro-vit-16``, with random weights."""
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(
        embed_dim=24,
        vision_cfg=dict(
            image_size=16, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0
        ),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
        quick_gelu=quick_gelu,
    )
    with torch.no_grad():  # random everything (LayerNorms too) so any mis-mapping shows
        for p in clip.parameters():
            p.normal_(0.0, 0.3)
    return clip.eval()


def fake_task_vectors_module() -> types.ModuleType:
    """``src.modeling`` as in the task_vectors repository (the parts its pickles reference)."""
    from open_clip.transform import image_transform

    class ImageEncoder(nn.Module):
        def __init__(self, model, keep_lang=False):
            super().__init__()
            self.model = model
            self.train_preprocess = image_transform(16, is_train=True)
            self.val_preprocess = image_transform(16, is_train=False)
            self.cache_dir = "/cache"
            if not keep_lang and hasattr(self.model, "transformer"):
                delattr(self.model, "transformer")

        def forward(self, images):
            return self.model.encode_image(images)

    class ClassificationHead(nn.Linear):
        def __init__(self, normalize, weights, biases=None):
            output_size, input_size = weights.shape
            super().__init__(input_size, output_size)
            self.normalize = normalize
            self.weight = nn.Parameter(weights.clone())
            self.bias = nn.Parameter(biases.clone())

        def forward(self, inputs):
            if self.normalize:
                inputs = inputs / inputs.norm(dim=-1, keepdim=True)
            return super().forward(inputs)

    module = types.ModuleType("src.modeling")
    for cls in (ImageEncoder, ClassificationHead):
        cls.__module__, cls.__qualname__ = "src.modeling", cls.__name__
        setattr(module, cls.__name__, cls)
    return module


@contextlib.contextmanager
def task_vectors_classes() -> Iterator[types.ModuleType]:
    """Install ``src.modeling`` while the block runs (so ``torch.save`` pickles it by name)."""
    saved = {name: sys.modules.get(name) for name in ("src", "src.modeling")}
    modeling = fake_task_vectors_module()
    sys.modules["src"] = types.ModuleType("src")
    sys.modules["src"].modeling = modeling
    sys.modules["src.modeling"] = modeling
    try:
        yield modeling
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_task_vectors_tree(
    root: Path,
    model_name: str,
    classes: Mapping[str, int],
    quick_gelu: bool = True,
    delta: float = 0.02,
    seed: int = 0,
    make_clip=None,
) -> Path:
    """A task_vectors tree (by default of the micro CLIP): experts are pretrained + ``delta`` noise.

    Args:
        classes: task -> number of classes of its head.
        make_clip: ``make_clip(seed)`` -> an open_clip CLIP (default: :func:`micro_clip`).

    Returns:
        ``root / model_name``.
    """
    model_dir = root / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    make_clip = make_clip or (lambda s: micro_clip(quick_gelu, s))
    pretrained = make_clip(seed)
    embed_dim = pretrained.visual.output_dim
    with task_vectors_classes() as modeling:
        torch.save(modeling.ImageEncoder(pretrained), model_dir / "zeroshot.pt")
        for i, (task, n) in enumerate(classes.items()):
            expert = make_clip(seed)
            gen = torch.Generator().manual_seed(seed + 100 + i)
            with torch.no_grad():
                for p in expert.visual.parameters():
                    p.add_(delta * torch.randn(p.shape, generator=gen))
            (model_dir / task).mkdir(exist_ok=True)
            torch.save(modeling.ImageEncoder(expert), model_dir / task / "finetuned.pt")
            weight = torch.randn(n, embed_dim, generator=gen)
            head = modeling.ClassificationHead(True, weight, torch.zeros(n))
            torch.save(head, model_dir / f"head_{task}.pt")
    return model_dir
