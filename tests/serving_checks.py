"""What the serving tests share: free loopback ports, engine inputs, waiting for a server."""

from __future__ import annotations

import socket

import numpy as np


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports that nothing listens on now."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def images(n: int, seed: int = 0, size: int = 16) -> np.ndarray:
    """``n`` preprocessed-looking images (n, 3, size, size) float32."""
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def engine_inputs(module, x: np.ndarray, ids=None) -> list:
    """The engine model's inputs for tritonclient ``module`` (http or grpc)."""
    first = module.InferInput("images", list(x.shape), "FP32")
    first.set_data_from_numpy(x)
    if ids is None:
        return [first]
    second = module.InferInput("task_ids", [len(ids), 1], "INT64")
    second.set_data_from_numpy(np.asarray(ids, np.int64).reshape(-1, 1))
    return [first, second]


def image_input(module, *encoded: bytes) -> list:
    """A task model's input: encoded images, one per row."""
    tensor = module.InferInput("image", [len(encoded), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[e] for e in encoded], dtype=object))
    return [tensor]
