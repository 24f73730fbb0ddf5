"""CLIP zero-shot classification heads from the open_clip text tower, as task_vectors builds them.

For each class every template is filled with the class name and encoded by the text tower; the
embeddings are L2-normalised, averaged over templates and normalised again. The rows, times
``logit_scale.exp()``, are the weight of a :class:`ClassificationHead` with zero bias that
normalises its input, so ``head(encode_image(x))`` equals CLIP's own zero-shot logits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.models.archs import TINY_ARCHS, get_arch
from surgery_edge.models.convert.open_clip import plain_state_dict, read_state_file
from surgery_edge.models.heads import ClassificationHead
from surgery_edge.models.templates import templates_for

Tokenizer = Callable[[list[str]], torch.Tensor]  # prompts -> (N, context_length) token ids
_MAX_LISTED = 5
_SCALE_KEYS = ("logit_scale", "logit_bias")


def _check_model_name(model_name: str) -> None:
    """Raise :class:`ConfigError` unless ``model_name`` is an open_clip ViT CLIP usable offline."""
    get_arch(model_name)  # unknown names and non-ViT image towers, with get_arch's wording
    if model_name in TINY_ARCHS:
        raise ConfigError(
            f"Architecture {model_name!r} is an image-tower-only tiny config with no text tower, "
            "so it cannot build zero-shot heads. Use an open_clip config name such as 'ViT-B-32'."
        )
    import open_clip  # deferred: importing open_clip takes seconds and loads Triton

    text_cfg = open_clip.get_model_config(model_name).get("text_cfg", {})
    hf = text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name")
    if hf:
        raise ConfigError(
            f"Model {model_name!r} uses the Hugging Face text model {hf!r}; surgery-edge builds "
            "zero-shot heads with open_clip's own text transformer (CLIP, OpenCLIP ViT configs)."
        )


def _state_of(path: Path) -> dict[str, torch.Tensor]:
    """The plain CLIP state dict in ``path``: no ``state_dict`` wrapper, no ``module.`` prefix."""
    return plain_state_dict(read_state_file(path, trust_pickle=False), path)


def _check_fits(
    path: Path, model_name: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, Any]
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has ``expected``'s keys and shapes."""
    text_keys = {k for k in expected if not k.startswith("visual.") and k not in _SCALE_KEYS}
    if not text_keys & state.keys():
        raise CheckpointError(
            f"{path} has no CLIP text tower (no 'token_embedding.weight' or 'transformer.*' "
            f"keys; found e.g. {sorted(state)[:_MAX_LISTED]}), so it cannot build zero-shot heads. "
            "task_vectors' zeroshot.pt and finetuned.pt keep only the image encoder: pass the "
            f"open_clip weights file of {model_name!r} (e.g. open_clip_pytorch_model.bin or "
            "a .safetensors of the full CLIP state dict)."
        )
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{len(found)} {what} (e.g. {found[:_MAX_LISTED]})"
        for what, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("tensors of the wrong shape", wrong_shape),
        )
        if found
    ]
    if problems:
        raise CheckpointError(
            f"{path} does not fit open_clip model {model_name!r}: {'; '.join(problems)}. Pass the "
            "model name the weights were made for."
        )


def load_clip(
    model_name: str, weights: str | os.PathLike, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build open_clip's ``model_name`` and load a full CLIP state dict (both towers) into it.

    Args:
        model_name: an open_clip ViT config name (``ViT-B-32``). A plain state dict does not
            record the MLP activation: OpenAI's weights (task_vectors' models) need the
            ``-quickgelu`` variant (``ViT-B-32-quickgelu``).
        weights: ``.safetensors``, or ``.pt``/``.bin`` holding tensors only (read with
            ``torch.load(weights_only=True)``); a ``{"state_dict": ...}`` wrapper and a ``module.``
            prefix are removed.
        device: where the model goes.

    Returns:
        The open_clip CLIP model in fp32 and eval mode.

    Raises:
        ConfigError: ``model_name`` is not an open_clip ViT config with an open_clip text tower.
        CheckpointError: the file is missing, unreadable, has no text tower or does not fit.
    """
    _check_model_name(model_name)
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"CLIP weights file {path} does not exist. Check the path.")
    state = _state_of(path)
    import open_clip  # deferred: importing open_clip takes seconds and loads Triton

    model = open_clip.create_model(model_name, pretrained=None)
    _check_fits(path, model_name, state, model.state_dict())
    model.load_state_dict(state, strict=True)  # fp16 files are upcast into the fp32 parameters
    return model.to(device).eval()


def _fill(templates: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """Every prompt, class-major: ``[t0(c0), t1(c0), ..., t0(c1), ...]``."""
    if not class_names:
        raise ConfigError("No class names given; a zero-shot head needs at least one class.")
    if not templates:
        raise ConfigError("No templates given; a zero-shot head needs at least one template.")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ConfigError(
            f"Templates {bad[:_MAX_LISTED]} have no '{{}}' placeholder for the class name; write "
            "them like 'a photo of a {}.'."
        )
    try:
        return [t.format(name) for name in class_names for t in templates]
    except (IndexError, KeyError, ValueError) as e:
        raise ConfigError(
            f"A template could not be filled in ({type(e).__name__}: {e}); use exactly one '{{}}' "
            "and write literal braces as '{{' and '}}'."
        ) from None


@torch.no_grad()
def zeroshot_head(
    model: nn.Module,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> ClassificationHead:
    """The CLIP zero-shot head for ``class_names``: one row per class, in the order given.

    Args:
        model: an open_clip CLIP (``encode_text``, ``logit_scale``) already on ``device``.
        tokenizer: open_clip's tokenizer for the model (``open_clip.get_tokenizer(name)``).
        class_names: one name per class, in class-index order.
        templates: prompts with ``{}`` where the class name goes.
        device: where the prompts are encoded.
        batch_size: prompts per text-tower call.

    Returns:
        A CPU :class:`ClassificationHead` (weight (C, embed_dim) in fp32, zero bias,
        ``normalize=True``).
    """
    prompts = _fill(templates, class_names)
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model.encode_text(tokenizer(prompts[i : i + batch_size]).to(device)).float()
            for i in range(0, len(prompts), batch_size)
        ]
        scale = model.logit_scale.detach().float().exp()
    finally:
        model.train(was_training)
    emb = F.normalize(torch.cat(chunks), dim=-1)  # (C*T, e)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, e)
    weight = (F.normalize(emb, dim=-1) * scale).cpu()
    return ClassificationHead(weight, torch.zeros(weight.shape[0]), normalize=True)


def build_zeroshot_heads(
    model_name: str,
    weights: str | os.PathLike,
    class_names: Mapping[str, Sequence[str]],
    templates: Mapping[str, Sequence[str]] | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], Any] = print,
) -> dict[str, ClassificationHead]:
    """Zero-shot heads for several tasks from one CLIP checkpoint (loaded once).

    Args:
        model_name: an open_clip ViT config name; see :func:`load_clip`.
        weights: the full CLIP weights (image and text towers).
        class_names: task -> class names in class-index order.
        templates: task -> templates; tasks not listed use :func:`templates_for` (the paper's
            templates for the eight paper tasks, generic ones otherwise).
        device: where the text tower runs.
        log: progress messages.

    Returns:
        task -> CPU :class:`ClassificationHead`, in the order of ``class_names``.
    """
    templates = dict(templates or {})
    unknown = sorted(set(templates) - set(class_names))
    if unknown:
        raise ConfigError(
            f"Templates given for tasks {unknown} that have no class names; tasks: "
            f"{list(class_names)}."
        )
    import open_clip  # deferred: importing open_clip takes seconds and loads Triton

    model = load_clip(model_name, weights, device)
    tokenizer = open_clip.get_tokenizer(model_name)
    heads = {}
    for task, names in class_names.items():
        task_templates = templates.get(task) or templates_for(task)
        log(f"zero-shot head for {task}: {len(names)} classes x {len(task_templates)} templates")
        try:
            heads[task] = zeroshot_head(model, tokenizer, names, task_templates, device)
        except ConfigError as e:
            raise ConfigError(f"Task {task!r}: {e}") from None
    return heads


__all__ = ["build_zeroshot_heads", "load_clip", "zeroshot_head"]
