"""Run configuration: a frozen pydantic model, loadable from YAML, with the demo's defaults.

Without ``data`` and ``checkpoints`` a run is the built-in demo: the suite is generated and the
experts are trained. With both, it is a recipe over the user's own files: the experts and heads
are imported (task_vectors, open_clip or Hugging Face layouts) and the tasks are read from disk
(image folders or torchvision datasets). ``configs/paper_vit_b32.yaml`` is an example.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from surgery_edge import merging
from surgery_edge.data.suite import TASK_NAMES
from surgery_edge.engine_format import DEVICE_PATTERN
from surgery_edge.errors import ConfigError
from surgery_edge.io import MAX_YAML_BYTES, load_yaml, not_a_file, safe_name
from surgery_edge.surgery.methods import (
    SCHEDULES,
    SURGERY,
    SURGERY_METHODS,
    SURGERY_V2,
    get_surgery,
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Count = Annotated[int, Field(ge=1, le=10**8)]
Rate = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]


def _safe_names(names, what: str):
    try:
        for name in names:
            safe_name(name, what)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return names


class SuiteSettings(_Frozen):
    seed: Seed = 0
    n_train: int = Field(2000, ge=10, le=10**6)
    n_adapt: int = Field(1000, ge=10, le=10**6)
    n_test: int = Field(500, ge=10, le=10**6)
    tasks: list[str] | None = None

    @field_validator("tasks")
    @classmethod
    def _builtin(cls, tasks):
        if tasks is not None:
            if not tasks or len(set(tasks)) != len(tasks):
                raise ValueError("list each built-in task at most once, and at least one")
            unknown = [t for t in tasks if t not in TASK_NAMES]
            if unknown:
                raise ValueError(f"unknown tasks {unknown}; the built-in suite has {TASK_NAMES}")
        return tasks


class ExpertSettings(_Frozen):
    pretrain_n_per_source: Count = 1000
    pretrain_epochs: Count = 3
    pretrain_lr: Rate = 1e-3
    finetune_epochs: Count = 10
    finetune_lr: Rate = 1e-3
    finetune_batch_size: Count = 64


# The demo's settings where they differ from the methods' own (the reference code's) defaults:
# a 15-minute CPU budget takes 100 AdaMerging steps and 500 SurgeryV2 steps; V1's rank and
# steps, and the learning rate (DEMO_SURGERY_LR), are what benchmarks/sweep_surgery.py chose on
# held-out adaptation images (benchmarks/results/cpu/surgery-sweep-tiny-vit-32.md): rank 80 is
# SurgeryV2's parameter count at this width. A config's ``params`` are merged onto these, method
# by method and parameter by parameter; the paper recipes set the authors' values.
DEMO_MERGE_PARAMS = {"adamerging_taskwise": {"steps": 100}, "adamerging_layerwise": {"steps": 100}}
DEMO_SURGERY_PARAMS = {SURGERY: {"rank": 80, "steps": 2000}, SURGERY_V2: {"steps": 500}}
DEMO_SURGERY_LR = 3e-3

# Flat settings of earlier releases -> (method, parameter) entries of ``params``.
LEGACY_MERGE_KEYS = {
    "task_arithmetic_lam": (("task_arithmetic", "lam"),),
    "ties_k": (("ties_merging", "k"),),
    "ties_lam": (("ties_merging", "lam"),),
    **{
        f"adamerging_{p}": (("adamerging_taskwise", p), ("adamerging_layerwise", p))
        for p in ("steps", "batch_size", "lr")
    },
}
LEGACY_SURGERY_KEYS = {
    "rank": tuple((m, "rank") for m in SURGERY_METHODS),
    "rank_v2": ((SURGERY_V2, "rank"),),
    "steps_v1": ((SURGERY, "steps"),),
    "steps_v2": ((SURGERY_V2, "steps"),),
}


def _with_params(data: Any, legacy: dict, defaults: dict) -> Any:
    """Move legacy flat keys into ``params`` and merge ``params`` onto ``defaults``."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    given = data.get("params") or {}
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise ValueError("params must map a method name to its {parameter: value} settings")
    params = copy.deepcopy(defaults)
    for method, values in given.items():
        params.setdefault(method, {}).update(values)
    for key, targets in legacy.items():
        if key not in data or data[key] is None:
            data.pop(key, None)
            continue
        value = data.pop(key)
        for method, name in targets:
            if name in given.get(method, {}):
                raise ValueError(
                    f"{key} and params.{method}.{name} both set {name}; keep only params"
                )
            params.setdefault(method, {})[name] = value
    data["params"] = params
    return data


class MergeSettings(_Frozen):
    """Which merges to make, and each method's parameters (see ``surgery-edge merge --help``)."""

    methods: list[str] = [
        "weight_averaging",
        "task_arithmetic",
        "ties_merging",
        "adamerging_taskwise",
        "adamerging_layerwise",
    ]
    params: dict[str, dict[str, float | int]] = Field(
        default_factory=lambda: copy.deepcopy(DEMO_MERGE_PARAMS),
        description="method -> {parameter: value}, merged onto the demo's defaults.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        return _with_params(data, LEGACY_MERGE_KEYS, DEMO_MERGE_PARAMS)

    @model_validator(mode="after")
    def _known(self):
        try:
            for name in [*self.methods, *self.params]:
                merging.get(name)
            for name, values in self.params.items():
                merging.get(name).resolve(values)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def params_for(self, method: str) -> dict[str, float | int]:
        """Every parameter of ``method``: the registry's defaults, then these settings."""
        return merging.get(method).resolve(self.params.get(method, {}))


class SurgeryMethodSettings(_Frozen):
    rank: int = Field(ge=1, le=1 << 14)
    steps: int = Field(ge=1, le=10**9)
    lr: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="this method's lr (default: surgery.lr)"
    )


class SurgerySettings(_Frozen):
    """Which surgery methods to train, with what; ``params`` per method (rank, steps)."""

    methods: list[str] = list(SURGERY_METHODS)
    params: dict[str, SurgeryMethodSettings] = Field(default_factory=dict)
    batch_size: int = Field(16, ge=1, le=1 << 16)
    lr: float = Field(DEMO_SURGERY_LR, gt=0, allow_inf_nan=False)
    schedule: Literal[tuple(SCHEDULES)] = Field(  # type: ignore[valid-type]
        "joint",
        description="joint: one step per batch of every task; reference: the authors' per-task "
        "loop with torch 1.10's zero_grad (see surgery_edge.surgery.trainer).",
    )
    transductive: bool = False

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        data = _with_params(data, LEGACY_SURGERY_KEYS, DEMO_SURGERY_PARAMS)
        if isinstance(data, dict):
            try:
                for name in data["params"]:
                    get_surgery(name)
            except ConfigError as e:
                raise ValueError(str(e)) from None
            params = data["params"]
            for name, method in SURGERY_METHODS.items():  # the registry's defaults
                values = params.setdefault(name, {})
                if isinstance(values, dict):
                    values.setdefault("rank", method.rank)
                    values.setdefault("steps", method.steps)
            data["params"] = {m: params[m] for m in SURGERY_METHODS}  # registry order
        return data

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        try:
            for name in methods:
                get_surgery(name)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return methods


def _expand(path: Path | None) -> Path | None:
    """``~`` and ``$VARS`` expanded; an unset variable is an error, not a literal folder name."""
    if path is None:
        return None
    expanded = os.path.expandvars(os.path.expanduser(str(path)))
    if "$" in expanded:
        raise ValueError(
            f"{path} names an environment variable that is not set: set it, or override the "
            "path (surgery-edge run --data-root / --checkpoint-root / --set KEY=VALUE)"
        )
    return Path(expanded)


class DataTask(_Frozen):
    """One task's data on disk (see :class:`surgery_edge.data.disk.DiskTask`)."""

    source: Literal["folder", "torchvision"] = "folder"
    path: Path | None = None  # relative paths resolve against DataSettings.root
    dataset: str | None = None  # torchvision class name (source: torchvision)
    class_names: Path | None = None  # JSON list or {folder: name}
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # Splits given as text lists of image names instead of folders (RESISC45's resisc45-*.txt).
    split_lists: dict[Literal["train", "test"], Path] = {}

    _expand_paths = field_validator("path", "class_names")(_expand)

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "torchvision" and not self.dataset:
            raise ValueError("source: torchvision needs `dataset` (e.g. MNIST, SVHN, GTSRB)")
        return self


class DataSettings(_Frozen):
    """The tasks, in order, and where their images are."""

    root: Path | None = None
    tasks: dict[str, DataTask]
    n_adapt: int = Field(400, ge=1, le=10**7, description="Adaptation images sampled from train/.")

    _expand_root = field_validator("root")(_expand)

    @field_validator("tasks")
    @classmethod
    def _not_empty(cls, tasks):
        if not tasks:
            raise ValueError("at least one task is needed")
        return _safe_names(tasks, "Task name")

    def task_path(self, name: str) -> Path:
        """The folder (or torchvision root) of task ``name``: ``path`` under ``root``."""
        task = self.tasks[name]
        path = task.path if task.path is not None else Path(name)
        return path if path.is_absolute() or self.root is None else self.root / path

    def class_names_path(self, name: str) -> Path | None:
        p = self.tasks[name].class_names
        return p if p is None or p.is_absolute() or self.root is None else self.root / p


class CheckpointSettings(_Frozen):
    """Where the pretrained model, the experts and their heads come from.

    - ``task_vectors``: ``<root>/<model>/zeroshot.pt``, ``<root>/<model>/<Task>/finetuned.pt``,
      ``<root>/<model>/head_<Task>.pt`` (pickles; needs ``trust_pickle``);
    - ``open_clip``: ``pretrained`` and one ``experts`` file per task (open_clip state dicts);
    - ``hf``: the same with Hugging Face ``CLIPVisionModel`` weights (file or folder).

    Heads come from the task_vectors files (``heads: checkpoint``) or are built from the class
    names with the CLIP text tower of ``clip_weights`` (``heads: zeroshot``, the only choice for
    the open_clip and hf layouts, whose experts carry no heads).
    """

    format: Literal["task_vectors", "open_clip", "hf"] = "task_vectors"
    root: Path | None = None
    model: str | None = None  # task_vectors sub-folder (default: the run's arch)
    trust_pickle: bool = False
    pretrained: Path | None = None
    experts: dict[str, Path] = {}
    heads: Literal["checkpoint", "zeroshot"] = "checkpoint"
    clip_weights: Path | None = None  # open_clip CLIP weights with the text tower

    _expand_paths = field_validator("root", "pretrained", "clip_weights")(_expand)

    @field_validator("experts")
    @classmethod
    def _expand_experts(cls, experts):
        return {k: _expand(v) for k, v in _safe_names(experts, "Task name").items()}

    def resolve(self, path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() or self.root is None else self.root / path

    @model_validator(mode="after")
    def _consistent(self):
        if self.format == "task_vectors":
            if self.root is None:
                raise ValueError("format: task_vectors needs `root` (the folder holding <model>/)")
        else:
            if self.pretrained is None or not self.experts:
                raise ValueError(f"format: {self.format} needs `pretrained` and `experts`")
            if self.heads != "zeroshot":
                raise ValueError(
                    f"format: {self.format} files carry no classification heads: set "
                    "`heads: zeroshot` and `clip_weights`"
                )
        if self.heads == "zeroshot" and self.clip_weights is None:
            raise ValueError(
                "heads: zeroshot needs `clip_weights` (open_clip weights with the text tower)"
            )
        return self


class RunConfig(_Frozen):
    """Everything ``surgery-edge demo`` / ``run`` needs; every field has the demo's default."""

    name: str | None = None
    arch: str = "tiny-vit-32"
    seed: Seed = 0
    device: str = Field(
        "auto", pattern=f"^({DEVICE_PATTERN})$", description="auto | cpu | cuda | cuda:N"
    )
    suite: SuiteSettings = SuiteSettings()
    experts: ExpertSettings = ExpertSettings()
    data: DataSettings | None = None
    checkpoints: CheckpointSettings | None = None
    merge: MergeSettings = MergeSettings()
    surgery: SurgerySettings = SurgerySettings()
    export: bool = True
    reference: str | None = Field(
        None, description="Published table to print beside the results, e.g. paper_vit_b32."
    )

    @model_validator(mode="after")
    def _data_and_checkpoints(self):
        if (self.data is None) != (self.checkpoints is None):
            raise ValueError(
                "`data` and `checkpoints` go together: imported experts need the tasks' data, "
                "and data from disk needs imported experts (the built-in suite trains its own)"
            )
        if self.data is not None and self.checkpoints.format != "task_vectors":
            missing = sorted(set(self.data.tasks) - set(self.checkpoints.experts))
            if missing:
                raise ValueError(f"checkpoints.experts has no file for tasks {missing}")
        return self

    @property
    def builtin(self) -> bool:
        """True for the built-in suite with trained experts (the demo)."""
        return self.data is None


def shipped_configs() -> dict[str, Path]:
    """The recipes that ship with the package (``configs/*.yaml``), by name."""
    from importlib.resources import files  # deferred: only name lookups need it

    folder = files("surgery_edge.configs")
    return {
        Path(f.name).stem: Path(str(f))
        for f in folder.iterdir()
        if f.name.endswith((".yaml", ".yml"))
    }


def find_config(name_or_path: str | Path) -> Path:
    """A config file's path: ``name_or_path`` itself when it exists, else the shipped recipe of
    that name (``paper_vit_b32`` or ``paper_vit_b32.yaml``).

    Raises:
        ConfigError: neither exists; the message lists the shipped names.
    """
    path = Path(name_or_path)
    problem = not_a_file(path)
    if problem is None:
        return path
    if problem != "does not exist":  # a folder, a FIFO, /dev/null: never opened
        raise ConfigError(f"Config {path} {problem}; give a YAML file or a shipped recipe's name.")
    shipped = shipped_configs()
    if len(path.parts) == 1 and path.stem in shipped and path.suffix in ("", ".yaml", ".yml"):
        return shipped[path.stem]
    raise ConfigError(
        f"Config {name_or_path} is neither a file nor a shipped recipe; the shipped ones are: "
        f"{', '.join(sorted(shipped))} (`surgery-edge run NAME`), or give a YAML file's path."
    )


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML run config; ``overrides`` maps dotted keys (``data.root``) to values.

    ``~`` and ``$VARS`` in paths are expanded. The file is read only when it is a regular file
    of at most :data:`~surgery_edge.io.MAX_YAML_BYTES`, and YAML aliases are refused
    (:func:`~surgery_edge.io.load_yaml`), all before pydantic sees the settings.
    """
    path = Path(path)
    problem = not_a_file(path)
    if problem is not None:  # checked before opening: reading a FIFO would block
        raise ConfigError(f"Config file {path} {problem}.")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(
                f"Config file {path} holds {path.stat().st_size:,} bytes; a run config is a few "
                f"kB, and files above {MAX_YAML_BYTES:,} bytes are refused."
            )
        data = load_yaml(path.read_text(), f"Config file {path}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of settings.")
        for dotted, value in (overrides or {}).items():
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"Cannot set {dotted} in {path}: {key} is not a mapping.")
            node[leaf] = value
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"Config file {path} is invalid: {config_errors(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {path} is invalid:\n{e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Config file {path} is unreadable ({e}).") from None


def config_errors(e: ValidationError) -> str:
    """pydantic's errors as one sentence per setting, without its URLs, e.g.
    ``surgery.lr must be greater than 0 (got -1).``"""
    sentences = []
    for error in e.errors(include_url=False):
        where = ".".join(str(x) for x in error["loc"]) or "The config"
        got = repr(error.get("input"))
        got = f" (got {got if len(got) <= 60 else got[:57] + '...'})"
        message = error["msg"].removeprefix("Value error, ").rstrip(".")
        if error["type"] == "extra_forbidden":
            sentence = f"{where} is not a setting (check its spelling)"
        elif error["type"] == "missing":
            sentence = f"{where} is required"
        elif message.startswith("Input should be"):
            sentence = f"{where} {message.replace('Input should be', 'must be', 1)}{got}"
        else:  # a validator's own sentence
            sentence = f"{where}: {message}"
        sentences.append(sentence + ".")
    return " ".join(sentences)


# Settings that shape no artefact: where the run executes, what it prints, which methods of the
# lists it makes (adding one replaces nothing).
_NOT_SHAPING = {"device", "export", "reference", "name"}


def shaping_settings(config: RunConfig) -> dict[str, Any]:
    """The settings that shape a run's artefacts, as JSON (for comparing two configs)."""
    data = config.model_dump(mode="json", exclude=_NOT_SHAPING)
    data["merge"].pop("methods", None)
    data["surgery"].pop("methods", None)
    return data


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["suite.seed: 0 -> 1", ...]``: the dotted keys whose values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
