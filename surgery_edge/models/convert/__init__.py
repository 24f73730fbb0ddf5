"""Convert checkpoints made by other tools into this project's safetensors checkpoints.

- :mod:`.sandbox`: the restricted unpickler that reads pickled checkpoints (only with
  ``trust_pickle``) into inert stand-ins, and its allow-list.
- :mod:`.towers`: image-tower checks shared by every source (shapes, heads, MLP activation).
- :mod:`.open_clip`: open_clip state dicts on disk, and the image tower taken from them.
- :mod:`.task_vectors`: the task_vectors / AdaMerging layout (pickled encoders and heads).
- :mod:`.hf`: Hugging Face CLIP vision weights <-> open_clip image-tower weights.
- :mod:`.weights`: open_clip or HF towers into a ``checkpoints/`` folder, with zero-shot heads.

Nothing here imports open_clip until a function needs it.
"""

from surgery_edge.models.convert.hf import load_hf_clip_vision
from surgery_edge.models.convert.open_clip import load_open_clip_image_tower
from surgery_edge.models.convert.sandbox import load_pickle_restricted
from surgery_edge.models.convert.task_vectors import (
    ImportSummary,
    check_out_dir,
    find_task_vectors_layout,
    import_task_vectors,
)
from surgery_edge.models.convert.towers import check_tower, with_activation
from surgery_edge.models.convert.weights import checkpoint_arch, import_weights

__all__ = [
    "ImportSummary",
    "check_out_dir",
    "check_tower",
    "checkpoint_arch",
    "find_task_vectors_layout",
    "import_task_vectors",
    "import_weights",
    "load_hf_clip_vision",
    "load_open_clip_image_tower",
    "load_pickle_restricted",
    "with_activation",
]
