"""Prompt templates and class names of the paper tasks, for CLIP zero-shot heads.

The templates are those published with CLIP (``data/prompts.md``) and used by the task_vectors /
AdaMerging / Representation Surgery code, keyed by task_vectors' task names: the eight paper
tasks, and the twelve that the 14- and 20-task suites (TALL14 / TALL20: Wang et al., "Localizing
Task Information for Improved Model Merging and Compression", ICML 2024, arXiv:2405.07813, and
FusionBench's ``clip-vit-*_TALL20`` model pools) add, as that paper's code holds them. ``{}``
marks where the class name goes. :data:`PAPER_CLASS_NAMES` holds the readable class names for
the tasks whose dataset folders (or torchvision classes) do not carry them, in class-index order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

TEMPLATES: dict[str, tuple[str, ...]] = {
    "SUN397": (
        "a photo of a {}.",
        "a photo of the {}.",
    ),
    "Cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "RESISC45": (
        "satellite imagery of {}.",
        "aerial imagery of {}.",
        "satellite photo of {}.",
        "aerial photo of {}.",
        "satellite view of {}.",
        "aerial view of {}.",
        "satellite imagery of a {}.",
        "aerial imagery of a {}.",
        "satellite photo of a {}.",
        "aerial photo of a {}.",
        "satellite view of a {}.",
        "aerial view of a {}.",
        "satellite imagery of the {}.",
        "aerial imagery of the {}.",
        "satellite photo of the {}.",
        "aerial photo of the {}.",
        "satellite view of the {}.",
        "aerial view of the {}.",
    ),
    "EuroSAT": (
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ),
    "SVHN": ('a photo of the number: "{}".',),
    "GTSRB": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ),
    "MNIST": ('a photo of the number: "{}".',),
    "DTD": (
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ),
}

_CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

#: The tasks TALL14 adds to the eight (CIFAR100 ... FER2013) and the six more of TALL20.
TEMPLATES.update(
    {
        "CIFAR100": _CIFAR_TEMPLATES,
        "STL10": ("a photo of a {}.", "a photo of the {}."),
        "Flowers102": ("a photo of a {}, a type of flower.",),
        "OxfordIIITPet": ("a photo of a {}, a type of pet.",),
        "PCAM": ("this is a photo of {}",),
        "FER2013": (
            "a photo of a {} looking face.",
            "a photo of a face showing the emotion: {}.",
            "a photo of a face looking {}.",
            "a face that looks {}.",
            "they look {}.",
            "look at how {} they are.",
        ),
        "EMNIST": ('a photo of the digit character: "{}".',),
        "CIFAR10": _CIFAR_TEMPLATES,
        "Food101": ("a photo of {}, a type of food.",),
        "FashionMNIST": ("a photo of a {}.", "a photo of the {}."),
        "RenderedSST2": ("a {} review of a movie.",),
        "KMNIST": ("a photo of the character {}.",),
    }
)

#: The TALL14 / TALL20 suites in their papers' order (the eight paper tasks first).
PAPER_TASKS: tuple[str, ...] = (
    "SUN397",
    "Cars",
    "RESISC45",
    "EuroSAT",
    "SVHN",
    "GTSRB",
    "MNIST",
    "DTD",
)
TALL14_TASKS: tuple[str, ...] = PAPER_TASKS + (
    "Flowers102",
    "PCAM",
    "FER2013",
    "OxfordIIITPet",
    "STL10",
    "CIFAR100",
)
TALL20_TASKS: tuple[str, ...] = TALL14_TASKS + (
    "CIFAR10",
    "Food101",
    "FashionMNIST",
    "EMNIST",
    "KMNIST",
    "RenderedSST2",
)

#: Templates for a task that :data:`TEMPLATES` does not know.
GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a bad photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
)

_DIGITS = tuple(str(i) for i in range(10))

PAPER_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "MNIST": _DIGITS,
    "SVHN": _DIGITS,
    # Folder order AnnualCrop, Forest, HerbaceousVegetation, Highway, Industrial, Pasture,
    # PermanentCrop, Residential, River, SeaLake, renamed as CLIP's prompts.md names them.
    "EuroSAT": (
        "annual crop land",
        "forest",
        "brushland or shrubland",
        "highway or road",
        "industrial buildings or commercial buildings",
        "pasture land",
        "permanent crop land",
        "residential buildings or homes or apartments",
        "river",
        "lake or sea",
    ),
    # Class ids 0..42 (folders 00000..00042); CLIP's spelling, typos included, so the prompts
    # match the published zero-shot heads.
    "GTSRB": (
        "red and white circle 20 kph speed limit",
        "red and white circle 30 kph speed limit",
        "red and white circle 50 kph speed limit",
        "red and white circle 60 kph speed limit",
        "red and white circle 70 kph speed limit",
        "red and white circle 80 kph speed limit",
        "end / de-restriction of 80 kph speed limit",
        "red and white circle 100 kph speed limit",
        "red and white circle 120 kph speed limit",
        "red and white circle red car and black car no passing",
        "red and white circle red truck and black car no passing",
        "red and white triangle road intersection warning",
        "white and yellow diamond priority road",
        "red and white upside down triangle yield right-of-way",
        "stop",
        "empty red and white circle",
        "red and white circle no truck entry",
        "red circle with white horizonal stripe no entry",
        "red and white triangle with exclamation mark warning",
        "red and white triangle with black left curve approaching warning",
        "red and white triangle with black right curve approaching warning",
        "red and white triangle with black double curve approaching warning",
        "red and white triangle rough / bumpy road warning",
        "red and white triangle car skidding / slipping warning",
        "red and white triangle with merging / narrow lanes warning",
        "red and white triangle with person digging / construction / road work warning",
        "red and white triangle with traffic light approaching warning",
        "red and white triangle with person walking warning",
        "red and white triangle with child and person walking warning",
        "red and white triangle with bicyle warning",
        "red and white triangle with snowflake / ice warning",
        "red and white triangle with deer warning",
        "white circle with gray strike bar no speed limit",
        "blue circle with white right turn arrow mandatory",
        "blue circle with white left turn arrow mandatory",
        "blue circle with white forward arrow mandatory",
        "blue circle with white forward or right turn arrow mandatory",
        "blue circle with white forward or left turn arrow mandatory",
        "blue circle with white keep right arrow mandatory",
        "blue circle with white keep left arrow mandatory",
        "blue circle with white arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended",
    ),
    # PCAM's label 0 / 1 (torchvision and the TALL-masks code carry no names).
    "PCAM": ("lymph node", "lymph node containing metastatic tumor tissue"),
    # FER2013's emotion ids 0..6 (angry, disgust, fear, happy, sad, surprise, neutral), worded
    # for the prompts as CLIP's prompts.md words them.
    "FER2013": ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"),
    # The NWPU-RESISC45 folders in alphabetical order, underscores read as spaces.
    "RESISC45": (
        "airplane",
        "airport",
        "baseball diamond",
        "basketball court",
        "beach",
        "bridge",
        "chaparral",
        "church",
        "circular farmland",
        "cloud",
        "commercial area",
        "dense residential",
        "desert",
        "forest",
        "freeway",
        "golf course",
        "ground track field",
        "harbor",
        "industrial area",
        "intersection",
        "island",
        "lake",
        "meadow",
        "medium residential",
        "mobile home park",
        "mountain",
        "overpass",
        "palace",
        "parking lot",
        "railway",
        "railway station",
        "rectangular farmland",
        "river",
        "roundabout",
        "runway",
        "sea ice",
        "ship",
        "snowberg",
        "sparse residential",
        "stadium",
        "storage tank",
        "tennis court",
        "terrace",
        "thermal power station",
        "wetland",
    ),
}

_V = TypeVar("_V")


def _lookup(task: str, table: Mapping[str, _V]) -> _V | None:
    """``table[task]``, case-insensitive; task_vectors' ``<Task>Val`` maps to ``<Task>``."""
    by_lower = {k.lower(): v for k, v in table.items()}
    name = task.lower()
    if name in by_lower:
        return by_lower[name]
    if name.endswith("val"):
        return by_lower.get(name.removesuffix("val"))
    return None


def templates_for(task: str) -> tuple[str, ...]:
    """The paper's prompt templates for ``task`` (``"mnist"``, ``"EuroSATVal"``), else generic."""
    found = _lookup(task, TEMPLATES)
    return GENERIC_TEMPLATES if found is None else found


def paper_class_names(task: str) -> tuple[str, ...] | None:
    """Readable class names for ``task`` in class-index order, or None if none are stored."""
    return _lookup(task, PAPER_CLASS_NAMES)


__all__ = [
    "GENERIC_TEMPLATES",
    "PAPER_CLASS_NAMES",
    "PAPER_TASKS",
    "TALL14_TASKS",
    "TALL20_TASKS",
    "TEMPLATES",
    "paper_class_names",
    "templates_for",
]
