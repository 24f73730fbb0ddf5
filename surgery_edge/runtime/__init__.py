"""Serving exported engines: ``load(path) -> Predictor``.

::

    from surgery_edge import runtime

    predictor = runtime.load("runs/demo/engines/surgeryv2-routed.onnx")  # or .pt2 / .engine
    for result in predictor.predict(["cat.png", "sign.jpg"], task="signs"):
        print(result.source, result["signs"].label, result["signs"].score)

The engine's metadata says how to preprocess (open_clip's eval transform: size, interpolation,
mean, std) and names the tasks and classes, so the Predictor needs nothing from the training
code: serving an ONNX engine imports numpy, pillow and onnxruntime, never torch.
"""

from surgery_edge.runtime.predictor import ImageResult, Predictor, TaskPrediction, load
from surgery_edge.runtime.preprocess import normalise, preprocess, resize_crop, to_rgb_array

__all__ = [
    "ImageResult",
    "Predictor",
    "TaskPrediction",
    "load",
    "normalise",
    "preprocess",
    "resize_crop",
    "to_rgb_array",
]
