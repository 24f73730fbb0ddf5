"""A running server's statistics, as ``surgery-edge serve-stats`` shows them: per model, the
requests answered and failed, the engine calls (batches), and the mean time a request queued
and computed, read from Triton's restricted statistics API with the server's access token
(``surgery-edge serve`` names the 0600 file that holds it).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from surgery_edge.errors import ExportError

TOKEN_HEADER = "triton-access-token"


def read_token(path: str | os.PathLike) -> str:
    """The access token in ``path`` (the file ``surgery-edge serve`` wrote)."""
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ExportError(
            f"Cannot read the access token file {path} ({e.strerror}): give the file "
            "`surgery-edge serve` named when it started (it exists while the server runs)."
        ) from None
    if not token:
        raise ExportError(f"The access token file {path} is empty: give the one serve named.")
    return token


def fetch_stats(url: str, token: str, model: str | None = None, timeout_s: float = 10) -> dict:
    """Triton's statistics (``/v2/models[/<model>]/stats``) from the server at ``url``
    (``host:port`` or ``http://host:port``)."""
    base = url if "://" in url else f"http://{url}"
    where = f"{base.rstrip('/')}/v2/models{f'/{model}' if model else ''}/stats"
    request = urllib.request.Request(where, headers={TOKEN_HEADER: token})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        hint = (
            "the token is not this server's: give the token file its serve named"
            if e.code in (401, 403) or "restricted" in detail
            else "check the model name"
        )
        raise ExportError(f"{where} answered {e.code} ({detail.strip()}): {hint}.") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ExportError(
            f"No statistics from {where} ({reason}): is `surgery-edge serve` running there? "
            "Give its HTTP address (host:port)."
        ) from None


def _mean_ms(stat: dict[str, Any]) -> float | None:
    count = int(stat.get("count", 0))
    return int(stat.get("ns", 0)) / count / 1e6 if count else None


def summarise(stats: dict) -> list[dict[str, Any]]:
    """Per model and version: requests answered and failed, engine calls, mean rows per call,
    mean queue and compute (inference) time per request in ms."""
    rows = []
    for m in stats.get("model_stats", []):
        infer = m.get("inference_stats", {})
        success = int(infer.get("success", {}).get("count", 0))
        calls = int(m.get("execution_count", 0))
        rows.append(
            {
                "model": m["name"],
                "version": m.get("version", ""),
                "requests": success,
                "failed": int(infer.get("fail", {}).get("count", 0)),
                "engine_calls": calls,
                "rows_per_call": int(m.get("inference_count", 0)) / calls if calls else None,
                "queue_ms": _mean_ms(infer.get("queue", {})),
                "compute_ms": _mean_ms(infer.get("compute_infer", {})),
            }
        )
    return rows


def stats_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The rows of :func:`summarise` as an aligned text table."""

    def cell(x: Any, spec: str = "") -> str:
        return "-" if x is None else format(x, spec)

    header = ["model", "requests", "failed", "engine calls", "rows/call", "queue ms", "compute ms"]
    table = [header] + [
        [
            r["model"],
            cell(r["requests"]),
            cell(r["failed"]),
            cell(r["engine_calls"]),
            cell(r["rows_per_call"], ".2f"),
            cell(r["queue_ms"], ".3f"),
            cell(r["compute_ms"], ".3f"),
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
