"""The task_vectors / AdaMerging / Surgery checkpoint layout and its importer.

:func:`import_task_vectors` converts one model's files into this project's checkpoints::

    <root>/<model>/zeroshot.pt            pickled src.modeling.ImageEncoder (pretrained)
    <root>/<model>/<Task>/finetuned.pt    pickled src.modeling.ImageEncoder (expert)
    <root>/<model>/head_<Task>.pt         pickled src.modeling.ClassificationHead

These files are whole pickled Python objects, and unpickling can run arbitrary code. They are read
only when the caller passes ``trust_pickle=True``, and then only through the restricted unpickler
of :mod:`~surgery_edge.models.convert.sandbox`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery_edge.errors import CheckpointError, ConfigError
from surgery_edge.io import safe_name, staged_dir
from surgery_edge.models.archs import ArchSpec, get_arch
from surgery_edge.models.checkpoint import save_encoder, save_head
from surgery_edge.models.convert.sandbox import (
    TRUST_PICKLE_HINT,
    load_pickle_restricted,
    module_state,
    original_class,
    stand_in_tensor,
)
from surgery_edge.models.convert.towers import (
    as_float32,
    check_facts,
    check_tower,
    tower_facts,
    tower_from_module,
    with_activation,
)
from surgery_edge.models.heads import ClassificationHead
from surgery_edge.progress import progress_bar


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_task_vectors` wrote (paths are inside ``out_dir``)."""

    out_dir: Path
    arch: ArchSpec
    pretrained: Path
    experts: dict[str, Path]
    heads: dict[str, Path]
    source: Path
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "format": "task_vectors",
            "out_dir": str(self.out_dir),
            "arch": self.arch.to_dict(),
            "pretrained": str(self.pretrained),
            "experts": {t: str(p) for t, p in self.experts.items()},
            "heads": {t: str(p) for t, p in self.heads.items()},
            "notes": list(self.notes),
        }


@dataclass
class TaskVectorsLayout:
    """The files of one model in a task_vectors checkpoint tree."""

    model_dir: Path
    zeroshot: Path
    experts: dict[str, Path]
    heads: dict[str, Path]

    @property
    def files(self) -> list[Path]:
        return [self.zeroshot, *self.experts.values(), *self.heads.values()]


def _head_file(model_dir: Path, task: str) -> Path | None:
    # task_vectors fine-tunes into "<Task>Val/" while heads may be named for "<Task>".
    names = [task, f"{task}Val", task.removesuffix("Val")]
    for name in dict.fromkeys(names):
        if (model_dir / f"head_{name}.pt").is_file():
            return model_dir / f"head_{name}.pt"
    return None


def find_task_vectors_layout(
    root: str | os.PathLike, model_name: str, tasks: Sequence[str] | None = None
) -> TaskVectorsLayout:
    """Locate ``zeroshot.pt``, every ``<Task>/finetuned.pt`` and its ``head_<Task>.pt``."""
    safe_name(model_name, "Model folder name")
    for task in tasks or ():
        safe_name(task, "Task name")
    model_dir = Path(root) / model_name
    expected = (
        f"expected {model_dir}/zeroshot.pt, {model_dir}/<Task>/finetuned.pt and "
        f"{model_dir}/head_<Task>.pt"
    )
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory ({expected}).")
    zeroshot = model_dir / "zeroshot.pt"
    if not zeroshot.is_file():
        raise CheckpointError(f"{zeroshot} does not exist ({expected}).")
    found = sorted(p.parent.name for p in model_dir.glob("*/finetuned.pt"))
    for task in found:
        safe_name(task, f"Task folder name in {model_dir}")
    if tasks is not None:
        missing = [t for t in tasks if t not in found]
        if missing:
            raise CheckpointError(
                f"No fine-tuned checkpoint for tasks {missing} in {model_dir} (found {found})."
            )
        found = list(tasks)
    if not found:
        raise CheckpointError(f"{model_dir} has no <Task>/finetuned.pt ({expected}).")
    heads, no_head = {}, []
    for task in found:
        head = _head_file(model_dir, task)
        if head is None:
            no_head.append(task)
        heads[task] = head
    if no_head:
        raise CheckpointError(
            f"No classification head for tasks {no_head}: expected "
            + ", ".join(str(model_dir / f"head_{t}.pt") for t in no_head)
            + "."
        )
    experts = {t: model_dir / t / "finetuned.pt" for t in found}
    return TaskVectorsLayout(model_dir, zeroshot, experts, heads)


def _read_pickled_tower(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    visual = tower_from_module(load_pickle_restricted(path), path)
    state = as_float32({f"visual.{k}": v for k, v in module_state(visual, path).items()})
    return state, tower_facts(visual)


def _read_pickled_head(path: Path, arch: ArchSpec) -> ClassificationHead:
    obj = load_pickle_restricted(path)
    if original_class(obj) != "src.modeling.ClassificationHead":
        raise CheckpointError(
            f"{path} holds a {original_class(obj)}, not a src.modeling.ClassificationHead."
        )
    weight, bias = stand_in_tensor(obj, "weight"), stand_in_tensor(obj, "bias")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise CheckpointError(f"Head {path} has no 2-d `weight`.")
    if weight.shape[1] != arch.embed_dim:
        raise CheckpointError(
            f"Head {path} expects {weight.shape[1]}-d features, but architecture {arch.name!r} "
            f"produces {arch.embed_dim}-d features. Heads and encoders must come from one model."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(
            f"Head {path} has bias {tuple(bias.shape)}; expected ({weight.shape[0]},)."
        )
    normalize = vars(obj).get("normalize", True)
    if not isinstance(normalize, bool):
        raise CheckpointError(f"Head {path} has normalize={normalize!r}; expected True or False.")
    return ClassificationHead(
        weight.detach().float(),
        None if bias is None else bias.detach().float(),
        normalize=normalize,
    )


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Output {out} exists and is not a directory. Choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"Output directory {out} already exists and is not empty. Choose another --out, or "
            "pass overwrite=True (--overwrite) to replace it."
        )


@dataclass(frozen=True)
class _ClassNames:
    """The class names given per task, and where each task's came from (named in errors)."""

    given: dict[str, Sequence[str]]
    source: dict[str, str]

    def of(self, task: str, head_path: Path, num_classes: int) -> list[str]:
        """``task``'s class names for a head of ``num_classes`` (``class_0 …`` when none were
        given); a count that does not match the head is an error."""
        names = list(self.given.get(task) or [f"class_{i}" for i in range(num_classes)])
        if len(names) != num_classes:
            origin = self.source.get(task)
            raise ConfigError(
                f"{len(names)} class names given for task {task!r}"
                + (f" (from {origin})" if origin else "")
                + f", but {head_path} has {num_classes} classes. The data and the "
                "checkpoints must describe the same classes: check the task's class-name "
                "file or folders."
            )
        return names


def _import_pretrained(
    path: Path, arch: ArchSpec, out: Path, log: Callable[[str], Any]
) -> tuple[ArchSpec, list[str]]:
    """Convert the pretrained tower ``path`` into ``out``, in the MLP activation the file
    records; returns the architecture it turned out to have and a note if that changed it."""
    log(f"reading {path}")
    state, facts = _read_pickled_tower(path)
    check_tower(f"Image tower of {path}", state, arch)  # shapes: any activation
    notes = []
    if "quick_gelu" in facts and facts["quick_gelu"] != arch.quick_gelu:
        adapted = with_activation(arch, facts["quick_gelu"])
        notes.append(
            f"The checkpoints use {'QuickGELU' if facts['quick_gelu'] else 'GELU'}: "
            f"architecture {arch.name!r} was imported as {adapted.name!r}."
        )
        arch = adapted
    check_facts(path, facts, arch)
    source = {"format": "task_vectors", "file": str(path)}
    save_encoder(out, arch, state, task=None, source=source)
    return arch, notes


def _import_expert(
    path: Path, task: str, arch: ArchSpec, out: Path, log: Callable[[str], Any]
) -> None:
    """Convert ``task``'s fine-tuned tower ``path`` into ``out``; it must be of ``arch``."""
    log(f"reading {path}")
    state, facts = _read_pickled_tower(path)
    check_tower(f"Image tower of {path}", state, arch)
    check_facts(path, facts, arch)
    source = {"format": "task_vectors", "file": str(path)}
    save_encoder(out, arch, state, task, source=source)


def _import_head(path: Path, task: str, arch: ArchSpec, names: _ClassNames, out: Path) -> list[str]:
    """Convert ``task``'s pickled head ``path`` into ``out`` with its class names; returns a
    note when none were given."""
    head = _read_pickled_head(path, arch)
    classes = names.of(task, path, head.num_classes)
    notes = []
    if task not in names.given:
        notes.append(f"Task {task!r}: no class names given; using class_0..class_N.")
    save_head(out, arch, task, classes, head)
    return notes


def import_task_vectors(
    root: str | os.PathLike,
    model_name: str,
    out_dir: str | os.PathLike,
    trust_pickle: bool,
    *,
    tasks: Sequence[str] | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
    class_names_source: Mapping[str, str] | None = None,
    overwrite: bool = False,
    arch: ArchSpec | None = None,
    log: Callable[[str], Any] = print,
) -> ImportSummary:
    """Convert task_vectors-layout checkpoints into this project's safetensors checkpoints.

    Writes ``out_dir/pretrained.safetensors``, ``out_dir/experts/<Task>.safetensors``,
    ``out_dir/heads/<Task>.safetensors`` and ``out_dir/import.json`` (the summary). Everything is
    written into a temporary directory beside ``out_dir`` and moved into place at the end, so an
    error leaves nothing half-written.

    Args:
        root: the folder holding ``<model_name>/``.
        model_name: an open_clip ViT config name (``ViT-B-32``) or a tiny config; also the
            sub-folder's name. The MLP activation is read from the checkpoints: OpenAI-based ones
            use QuickGELU, so ``ViT-B-32`` becomes ``ViT-B-32-quickgelu``.
        out_dir: where the checkpoints go (e.g. a run's ``checkpoints/`` folder).
        trust_pickle: the files are pickles that can run code; without this they are refused.
        tasks: import only these task folders (default: every ``<Task>/finetuned.pt``).
        class_names: class names per task; the pickled heads carry none, so by default they are
            ``class_0 … class_{C-1}``.
        class_names_source: where each task's class names came from (a file, a dataset), named
            in the error when their count does not match the head.
        overwrite: replace a non-empty ``out_dir``.
        arch: the architecture, when the folder's name is not one (default:
            ``get_arch(model_name)``).
        log: progress messages.

    Returns:
        An :class:`ImportSummary` of what was written.
    """
    arch = arch or get_arch(model_name)
    layout = find_task_vectors_layout(root, model_name, tasks)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    if not trust_pickle:
        raise CheckpointError(
            f"{layout.zeroshot} and the {len(layout.files) - 1} other checkpoints in "
            f"{layout.model_dir} are whole pickled Python objects (task_vectors layout); loading "
            f"a pickle can run arbitrary code. {TRUST_PICKLE_HINT}"
        )
    names = _ClassNames(dict(class_names or {}), dict(class_names_source or {}))
    unknown = sorted(set(names.given) - set(layout.experts))
    if unknown:
        raise ConfigError(
            f"class_names given for unknown tasks {unknown}; tasks: {list(layout.experts)}."
        )

    with staged_dir(out) as tmp:
        arch, notes = _import_pretrained(layout.zeroshot, arch, tmp / "pretrained.safetensors", log)
        with progress_bar(len(layout.experts), "import experts") as bar:
            for task, path in layout.experts.items():
                _import_expert(path, task, arch, tmp / "experts" / f"{task}.safetensors", log)
                head = tmp / "heads" / f"{task}.safetensors"
                notes += _import_head(layout.heads[task], task, arch, names, head)
                bar.advance(expert=task)
        summary = ImportSummary(
            out_dir=out,
            arch=arch,
            pretrained=out / "pretrained.safetensors",
            experts={t: out / "experts" / f"{t}.safetensors" for t in layout.experts},
            heads={t: out / "heads" / f"{t}.safetensors" for t in layout.experts},
            source=layout.model_dir,
            notes=notes,
        )
        (tmp / "import.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


__all__ = [
    "ImportSummary",
    "TaskVectorsLayout",
    "check_out_dir",
    "find_task_vectors_layout",
    "import_task_vectors",
]
