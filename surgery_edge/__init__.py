"""surgery-edge: merge fine-tuned ViT experts, repair them with Representation Surgery, ship
one engine. ``__version__`` is the one version source (the wheel's version is read from it)."""

__version__ = "0.2.0"
