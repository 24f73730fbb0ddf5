"""Triton Inference Server model configurations, written as protobuf text (``config.pbtxt``).

Both model repositories this project writes go through here: the one the official tritonserver
container loads (ONNX Runtime and TensorRT backends, :mod:`surgery_edge.export.triton`) and the
one ``surgery-edge serve`` runs through PyTriton (Python-backend models over the runtime,
:mod:`surgery_edge.runtime.serving`).

A configuration is a plain dict in protobuf's JSON mapping of ``model_config.proto``
(``inference.ModelConfig``): a dict is a message, a list a repeated field, :class:`Map` a map
field, :class:`Enum` an enum value (``TYPE_FP32``, ``KIND_GPU``); ``None`` leaves a field out.
:func:`to_pbtxt` hands it to protobuf (``json_format.ParseDict`` into the schema tritonclient
ships, ``tritonclient.grpc.model_config_pb2``, then ``text_format``), so a field or value the
schema does not know fails here. Where tritonclient is not installed (``triton-repo`` on a
machine without the serve extra) the same dict is written by :func:`_by_hand`; the tests parse
both texts with the schema and compare them.

Both repositories batch the same way, so the batching settings are one type here
(:class:`Batching`: one validator, one ``dynamic_batching`` builder), and an engine's inputs
and outputs become config entries through :func:`tensor_config` from the engine format's
:func:`~surgery_edge.engine_format.io_specs`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from surgery_edge.engine_format import TensorSpec
from surgery_edge.errors import ExportError

# Triton model names become folder names and URL path segments.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
META_PARAMETER = "surgery_edge"  # the model parameter that holds the engine metadata (JSON)
# numpy's element type names (the engine format's) -> Triton's data types
TRITON_TYPES = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "bool": "TYPE_BOOL", "float16": "TYPE_FP16",
                "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16"}  # fmt: skip


class Enum(str):
    """An enum value, written without quotes."""


class Map(dict):
    """A protobuf map field (``map<string, ...>``): its keys are data, not field names."""


def check_model_name(name: str, what: str = "model name") -> str:
    """``name`` if Triton can serve a model under it (letters, digits, ``_ . -``)."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ExportError(
            f"{what} {name!r} cannot name a Triton model: use letters, digits, '_', '.' and "
            "'-' (starting with a letter or digit), at most 128 characters."
        )
    return name


def check_integer(flag: str, value: Any, least: int, most: int | None = None) -> int:
    """``value`` if it is an integer from ``least`` to ``most``; ExportError naming ``flag``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
    if not ok or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f"of at least {least}"
        raise ExportError(f"{flag} must be an integer {bound}, got {value!r}.")
    return value


@dataclass(frozen=True)
class Batching:
    """How Triton batches a model's requests (the same for the repository the official server
    loads and for ``surgery-edge serve``).

    Args:
        max_batch: ``max_batch_size``: the most rows Triton puts in one model call.
        preferred_batches: batch sizes the dynamic batcher aims for (default: none, i.e. as
            large as the queue allows).
        max_queue_delay_us: how long a request may wait for others to join its batch (0,
            Triton's default: a batch holds what queued while the model was busy).
    """

    max_batch: int = 32
    preferred_batches: tuple[int, ...] = ()
    max_queue_delay_us: int = 0

    def check(self) -> Batching:
        """``self`` if every value is usable; ExportError naming the first flag that is not."""
        check_integer("--max-batch", self.max_batch, 1)
        check_integer("--max-queue-delay-us", self.max_queue_delay_us, 0)
        for b in self.preferred_batches:
            check_integer("--preferred-batch", b, 1, self.max_batch)
        return self

    def config(self) -> dict[str, Any]:
        """The config's ``max_batch_size`` and ``dynamic_batching`` fields."""
        return {
            "max_batch_size": self.max_batch,
            "dynamic_batching": {
                "preferred_batch_size": list(self.preferred_batches) or None,
                "max_queue_delay_microseconds": self.max_queue_delay_us,
            },
        }


def tensor_config(spec: TensorSpec, reshape: bool = True) -> dict[str, Any]:
    """An input or output entry of a config for ``spec`` (its shape's batch dimension first).

    Triton's dims leave the batch out; a per-row scalar (``task_ids`` (B,)) is sent as [1] per
    request and, with ``reshape``, handed to the model as the graph's () per row.
    """
    entry: dict[str, Any] = {"name": spec.name, "data_type": Enum(TRITON_TYPES[spec.dtype])}
    entry["dims"] = list(spec.shape[1:]) or [1]
    if reshape and not spec.shape[1:]:
        entry["reshape"] = {"shape": []}
    return entry


def parameters(values: Mapping[str, Any]) -> Map:
    """Model ``parameters`` (a ``map<string, ModelParameter>``): strings stay, anything else
    is stored as JSON."""
    return Map(
        (k, {"string_value": v if isinstance(v, str) else json.dumps(v)}) for k, v in values.items()
    )


def string_map(values: Mapping[str, Any]) -> Map:
    """A ``map<string, string>`` field (e.g. an execution accelerator's parameters)."""
    return Map((k, str(v)) for k, v in values.items())


def model_config_pb2():
    """tritonclient's ``model_config_pb2`` (Triton's schema), or ``None`` where it is not
    installed (it comes with ``pip install 'surgery-edge[serve]'``)."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb2  # deferred: optional, [serve]
    except ImportError:
        return None
    return pb2


def to_pbtxt(config: Mapping[str, Any]) -> str:
    """``config`` (an ``inference.ModelConfig`` as a dict) in protobuf text format."""
    pb2 = model_config_pb2()
    if pb2 is None:
        return _by_hand(config)
    from google.protobuf import json_format, text_format  # deferred: with tritonclient

    try:
        message = json_format.ParseDict(_present(config), pb2.ModelConfig())
    except json_format.ParseError as e:  # a writer here made a field the schema lacks
        raise ExportError(f"Model {config.get('name')!r}: not a Triton model config: {e}") from e
    return text_format.MessageToString(message)


def _present(value: Any) -> Any:
    """``value`` without the ``None`` fields (left out), maps and enums as plain JSON."""
    if isinstance(value, Mapping):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_present(v) for v in value]
    return value


# --- without tritonclient ------------------------------------------------------------------


def _by_hand(message: Mapping[str, Any]) -> str:
    """``message`` in protobuf text format, one field per line, two-space indents."""
    return "\n".join(_fields(message, 0)) + "\n"


def _fields(message: Mapping[str, Any], depth: int) -> list[str]:
    pad, lines = "  " * depth, []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, Map):  # one entry block per key
            for k, v in value.items():
                entry = {"key": k, "value": v}
                lines += [f"{pad}{key} {{", *_fields(entry, depth + 1), f"{pad}}}"]
        elif isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", *_fields(value, depth + 1), f"{pad}}}"]
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
            for item in value:  # a repeated message: one block per element
                lines += [f"{pad}{key} {{", *_fields(item, depth + 1), f"{pad}}}"]
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} in a Triton config")


def _quote(text: str) -> str:
    """A protobuf text-format string literal: C escapes, non-ASCII as octal UTF-8 bytes."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'
