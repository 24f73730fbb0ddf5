"""Serving exported engines: ``load(path) -> Predictor``.

::

    from surgery_edge import runtime

    predictor = runtime.load("runs/demo/engines/model.onnx")  # or .pt2, or a TensorRT .engine
    for result in predictor.predict(["cat.png", "sign.jpg"], task="signs"):
        print(result.source, result["signs"].label, result["signs"].score)

The engine's metadata says how to preprocess (size, mean, std) and names the tasks and classes,
so the Predictor needs nothing from the training code.
"""

from surgery_edge.runtime.predictor import ImageResult, Predictor, TaskPrediction, load
from surgery_edge.runtime.preprocess import load_image, normalise, to_rgb_array

__all__ = [
    "ImageResult",
    "Predictor",
    "TaskPrediction",
    "load",
    "load_image",
    "normalise",
    "to_rgb_array",
]
