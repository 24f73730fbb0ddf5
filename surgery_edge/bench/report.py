"""Writing results: the JSON record every benchmark stores, Markdown tables, and the engine
benchmark's report (its table, the derived ratios, and ``--merge`` with earlier results)."""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from surgery_edge.bench.env import environment
from surgery_edge.bench.flops import FLOPS_FORMULA, backbone_flops, one_expert_bytes, task_classes
from surgery_edge.bench.plots import write_plots
from surgery_edge.bench.ratios import derive_ratios
from surgery_edge.bench.workloads import (
    CONFIG_LABELS,
    CONFIG_MODES,
    CONFIGS,
    DTYPES,
    PATHS,
    RANDOM_WEIGHTS_NOTE,
    EngineBenchConfig,
    EngineResult,
    plan_paths,
)
from surgery_edge.errors import ConfigError
from surgery_edge.io import write_json_atomic, write_text_atomic
from surgery_edge.models import get_arch


def command_line(argv: Sequence[str] | None, prog: str) -> str:
    """The command to record: ``python <script> <args>`` when run as a script (``argv`` None),
    else ``prog`` followed by ``argv``."""
    if argv is None:
        return shlex.join(["python", *sys.argv])
    return " ".join([prog, shlex.join(argv)]) if argv else prog


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Write one benchmark's JSON record (atomically, creating the folder); returns ``path``."""
    return write_json_atomic(path, record)


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted with ``spec``, or a dash when it is missing."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def engine_label(config: EngineBenchConfig, device_name: str) -> str:
    """What the engine timings are: the device, the dtype and the clock."""
    dtype = config.resolved_dtype()
    if config.device.startswith("cuda"):
        return f"{device_name}, {dtype}, CUDA events"
    return f"CPU timings: {device_name}, {dtype}, wall clock (not representative of a GPU)"


def markdown_report(
    results: Sequence[EngineResult], derived: dict[str, Any], label: str, arch: str
) -> str:
    """The table of measured rows, the unmeasured paths with reasons, and the derived ratios."""
    ok = [r for r in results if r.status == "ok"]
    gpu = any(r.peak_mem_bytes is not None for r in ok)
    header = ["config", "mode", "path", "B", "median ms", "p90 ms", "task-answers/s"]
    header += ["GFLOP/call", "TFLOP/s", *(["% peak", "peak MiB"] if gpu else [])]
    header += ["weights MiB", "max err vs eager"]
    rows = []
    for r in ok:
        row = [r.config, r.mode, r.path, str(r.batch), fmt(r.median_ms, ".3f")]
        row += [fmt(r.p90_ms, ".3f"), fmt(r.answers_per_s, ",.0f")]
        row += [fmt(r.flops_per_call / 1e9, ".3f"), fmt(r.tflops, ".3f")]
        if gpu:
            pct = None if r.peak_fraction is None else 100 * r.peak_fraction
            mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
            row += [fmt(pct, ".1f"), fmt(mem, ",.0f")]
        row += [fmt(r.weight_bytes / 2**20, ".2f"), fmt(r.max_abs_err_vs_eager, ".1e")]
        rows.append(row)
    lines = [
        f"## {arch}: {label}",
        "",
        f"*{RANDOM_WEIGHTS_NOTE}.* Latency is per call of the whole batch; all-tasks answers "
        "every task for every image (B x T answers), routed answers one task per image.",
        "",
        "Configurations: " + "; ".join(f"`{k}` = {v}" for k, v in CONFIG_LABELS.items()) + ".",
        "",
        *table(header, rows),
    ]
    skipped = sorted(
        {(r.config, r.mode, r.path, r.status, r.reason) for r in results if r.status != "ok"}
    )
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {c} / {m} / {p}: {s}: {why}" for c, m, p, s, why in skipped]
    lines += ["", "Derived (ratios > 1 in throughput, < 1 in latency favour the engine):", ""]
    ratios = derived["weight_ratio_vs_one_expert"]
    lines.append(
        "- weight memory vs one expert: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())
    )

    def show(title: str, rows: list[dict[str, Any]], spec: str = ".2f", suffix: str = "x") -> None:
        if rows:
            text = "; ".join(
                f"B={x['batch']} {x['path']} vs {x['baseline_path']}: "
                f"{format(x['value'], spec)}{suffix}"
                for x in rows
            )
            lines.append(f"- {title}: {text}")

    show("V1 all-tasks throughput / 8 experts", derived["v1_all_tasks_throughput_over_experts"])
    show("V2 all-tasks throughput / 8 experts", derived["v2_all_tasks_throughput_over_experts"])
    for mode, rows in derived["v2_batch1_latency_over_experts"].items():
        show(f"V2 {mode} batch-1 latency / 8 experts", rows)
    over = derived["v2_routed_overhead_over_merged"]
    rows = [{**x, "value": 100 * x["value"]} for x in over["ratios"]]
    title = "V2 routed latency overhead over the merged backbone"
    show(title + (f" ({over['note']})" if over["note"] else ""), rows, "+.1f", "%")
    return "\n".join(lines) + "\n"


def write_outputs(
    config: EngineBenchConfig,
    results: Sequence[EngineResult],
    out: Path,
    command: str,
    plots: bool = True,
    merge: bool = False,
) -> list[Path]:
    """JSON, Markdown and plots per architecture under ``out``; returns the files written.

    With ``merge``, an earlier ``engine-<arch>.json`` from the same device and dtype keeps the
    rows this run did not measure (so that a sweep can be split over several commands), and
    its commands are listed with this one.
    """
    env = environment(config.device)
    dtype_name = config.resolved_dtype()
    label = engine_label(config, env["device_name"])
    written = []
    for arch_name in config.archs:
        arch = get_arch(arch_name)
        rows = [r for r in results if r.arch == arch.name]
        if not rows:
            continue
        stem = out / f"engine-{arch.name}"
        json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
        runs = [{"command": command, "config": asdict(config)}]
        if merge and json_path.exists():
            rows, earlier = merge_previous(json_path, rows, env["device_name"], dtype_name)
            runs = earlier + runs
        classes = task_classes(arch, config.num_tasks)
        one_expert = one_expert_bytes(arch, DTYPES[dtype_name], classes[0])
        derived = derive_ratios(rows, one_expert, config.overhead_batch)
        record = {
            "benchmark": "engine",
            "note": RANDOM_WEIGHTS_NOTE,
            "label": label,
            **env,
            "command": command,
            "config": asdict(config),
            "runs": runs,
            "arch": arch.to_dict(),
            "task_classes": classes,
            "flops_formula": FLOPS_FORMULA,
            "backbone_gflops_per_image": backbone_flops(arch) / 1e9,
            "results": [asdict(r) for r in rows],
            "derived": derived,
        }
        write_record(json_path, record)
        md = markdown_report(rows, derived, label, arch.name)
        commands = "\n".join(f"    {run['command']}" for run in runs)
        write_text_atomic(md_path, f"Commands:\n\n{commands}\n\n{md}")
        print(md)
        written += [json_path, md_path]
        if plots:
            written += write_plots(rows, derived, out, arch.name, label)
    return written


def merge_previous(
    path: Path, rows: Sequence[EngineResult], device_name: str, dtype: str
) -> tuple[list[EngineResult], list[dict[str, Any]]]:
    """This run's rows plus the earlier file's rows for what it did not measure, in table
    order, and the earlier file's runs."""
    old = json.loads(path.read_text())
    old_dtype = old["results"][0]["dtype"] if old.get("results") else dtype
    if old.get("device_name") != device_name or old_dtype != dtype:
        raise ConfigError(
            f"{path} holds results from {old.get('device_name')!r} ({old_dtype}), not "
            f"{device_name!r} ({dtype}): use another --out, or run without --merge to replace it."
        )
    measured = {(r.config, r.mode, r.path, r.batch) for r in rows}
    kept = [
        EngineResult(**r)
        for r in old["results"]
        if (r["config"], r["mode"], r["path"], r["batch"]) not in measured
    ]
    paths = plan_paths(PATHS)
    order = {(c, m): i for i, (c, m) in enumerate((c, m) for c in CONFIGS for m in CONFIG_MODES[c])}
    merged = sorted(
        [*kept, *rows], key=lambda r: (order[r.config, r.mode], paths.index(r.path), r.batch)
    )
    runs = old.get("runs") or [{"command": old.get("command"), "config": old.get("config")}]
    return merged, runs
