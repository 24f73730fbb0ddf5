"""Writing results: the JSON record every benchmark stores, Markdown tables, and the engine
benchmark's report (headline and same-runtime ratios beside their ceilings, the measured cost
of eight experts, warnings, every row, and ``--merge`` with earlier results)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from surgery_edge.bench.choices import CONFIGS, PATHS
from surgery_edge.bench.env import LOAD_WARNING, environment, provenance
from surgery_edge.bench.flops import FLOPS_FORMULA, backbone_flops, one_expert_bytes, task_classes
from surgery_edge.bench.plots import engine_results, write_plots
from surgery_edge.bench.ratios import BEST_VS_BEST, derive_ratios
from surgery_edge.bench.roofline import DeviceRates
from surgery_edge.bench.timing import SPREAD_WARNING
from surgery_edge.bench.workloads import (
    CONFIG_LABELS,
    CONFIG_MODES,
    DTYPES,
    RANDOM_WEIGHTS_NOTE,
    EngineBenchConfig,
    EngineResult,
    plan_paths,
)
from surgery_edge.errors import ConfigError, SurgeryEdgeError
from surgery_edge.io import write_json_atomic, write_text_atomic
from surgery_edge.models import get_arch
from surgery_edge.surgery.methods import SURGERY_METHODS

_C = TypeVar("_C")  # a config dataclass


def command_line(argv: Sequence[str] | None, prog: str) -> str:
    """The command to record: ``python <script> <args>`` when run as a script (``argv`` None),
    else ``prog`` followed by ``argv``."""
    if argv is None:
        return shlex.join(["python", *sys.argv])
    return " ".join([prog, shlex.join(argv)]) if argv else prog


def config_from_args(cls: type[_C], args: argparse.Namespace, **given: Any) -> _C:
    """The config dataclass ``cls`` made of the parsed options of its fields' names
    (``--max-batch``: ``max_batch``); ``given`` sets fields otherwise (a list made a tuple)."""
    return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls)}, **given})


@contextlib.contextmanager
def user_errors_exit_2() -> Iterator[None]:
    """A user error (:class:`~surgery_edge.errors.SurgeryEdgeError`) raised inside ends the
    command: its one paragraph on stderr, exit code 2, no traceback."""
    try:
        yield
    except SurgeryEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Write one benchmark's JSON record (atomically, creating the folder); returns ``path``.

    The record gets its :func:`~surgery_edge.bench.env.provenance` (commit, command, machine,
    load, date) under ``provenance`` first, in place, so what a benchmark returns is what it
    wrote."""
    if "provenance" not in record:
        record["provenance"] = provenance(record.get("command"))
    return write_json_atomic(path, record)


def provenance_line(made: dict[str, Any]) -> str:
    """The Markdown line that says where a record comes from."""
    commit = made.get("commit") or "no git checkout"
    dirty = " (uncommitted changes in the tree)" if made.get("dirty") else ""
    machine = made.get("machine", {})
    return (
        f"Made at commit {commit}{dirty} on {made.get('date')}: `{made.get('command')}`, on "
        f"{machine.get('cpu')} ({machine.get('cores')} cores); load average before "
        f"{made.get('load_before')}, after {made.get('load_after')}."
    )


def write_record_set(
    folder: Path,
    stem: str,
    record: dict[str, Any],
    markdown: str | Sequence[str],
    plot: Callable[[dict[str, Any], Path], Any] | None = None,
) -> Path:
    """A benchmark's ``<stem>.json``, ``<stem>.md`` (a string, or its lines; the record's
    provenance is added as its last line) and, given ``plot``, ``<stem>.png`` in ``folder``,
    each written atomically; returns the JSON's path."""
    folder = Path(folder)
    text = markdown if isinstance(markdown, str) else "\n".join(markdown) + "\n"
    record["provenance"] = provenance(record.get("command"))  # in place, as write_record
    text = text.rstrip("\n") + "\n\n" + provenance_line(record["provenance"]) + "\n"
    path = write_record(folder / f"{stem}.json", record)
    write_text_atomic(folder / f"{stem}.md", text)
    if plot is not None:
        plot(record, folder / f"{stem}.png")
    return path


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
    backend = (
        ""
        if config.compile_backend == "inductor"
        else f", compile backend {config.compile_backend}"
    )
    if config.device.startswith("cuda"):
        return f"{device_name}, {dtype}, torch.utils.benchmark (CUDA synchronised){backend}"
    return f"CPU timings: {device_name}, {dtype}, wall clock (not representative of a GPU){backend}"


def _mib(n: float | None) -> str:
    return fmt(None if n is None else n / 2**20, ",.2f")


def _engine_name(config: str) -> str:
    m = SURGERY_METHODS.get(config)
    return f"{'V2' if m.every_block else 'V1'} ({config})" if m else config


def warnings(results: Sequence[EngineResult], derived: dict[str, Any], cpus: int) -> list[str]:
    """What a reader must know before trusting the numbers."""
    ok = [r for r in results if r.status == "ok"]
    out = []
    loaded = sorted(
        {
            (r.mode, r.batch, r.load_avg_1m)
            for r in ok
            if r.load_avg_1m is not None
            and r.load_avg_1m - r.threads * r.workers > LOAD_WARNING * cpus
        }
    )
    if loaded:
        loads = ", ".join(f"{m} B={b}: {load:.2f}" for m, b, load in loaded)
        out.append(
            f"The machine was loaded during {len(loaded)} group(s) (1-minute load on {cpus} "
            f"CPUs beyond the benchmark's own threads: {loads}): re-run on a quiet machine."
        )
    spread = [r for r in ok if r.spread is not None and r.spread > SPREAD_WARNING]
    if spread:
        out.append(
            f"{len(spread)} of {len(ok)} rows have an interquartile range above "
            f"{100 * SPREAD_WARNING:.0f}% of their median (marked ⚠ in the table)."
        )
    above = derived["above_ceiling"]
    if above:
        unexplained = [r for r in above if not r["explained"]]
        out.append(
            f"{len(above)} ratio(s) exceed their ceiling; {len(above) - len(unexplained)} are "
            "explained by the measured eight-expert penalty (below), "
            f"{len(unexplained)} are not: do not cite those."
        )
    skipped = [r for r in results if r.status == "skipped"]
    if skipped:
        out.append(f"{len(skipped)} rows were skipped: {skipped[0].reason}.")
    return out


def _flag(row: dict[str, Any]) -> str:
    if not row["above_ceiling"]:
        return ""
    if row["explained"]:
        p = row["penalty"]
        return (
            f"⚠ above ceiling: the baseline ran {p['value']:.2f}x slower than its "
            f"{p['experts_run']} experts one at a time alone; against those "
            f"{row['speedup_vs_8x_one_expert']:.2f}x"
        )
    if row["penalty"] is not None:
        return "⚠ above ceiling, even against the experts one at a time: do not cite"
    return "⚠ above ceiling, cause not measured: do not cite"


RATIO_HEADER = ["engine", "mode", "B", "engine path", "baseline / path", "speedup", "ceiling"]
RATIO_HEADER += ["roofline ceiling", "flag"]
LATENCY_HEADER = [*RATIO_HEADER[:5], "latency ratio", "floor", "roofline floor", "flag"]


def _ratio_rows(rows: Sequence[dict[str, Any]], latency: bool = False) -> list[list[str]]:
    """Speedups beside their ceilings, or (``latency``) latency ratios beside their floors."""
    out = []
    for x in rows:
        roof = x["roofline_ceiling"]
        if latency:
            value, bound = f"{x['latency_ratio']:.3f}x", f"{1 / x['ceiling']:.3f}x"
            roof_text = fmt(None if roof is None else 1 / roof, ".3f")
        else:
            value, bound = f"{x['speedup']:.2f}x", f"{x['ceiling']:.2f}x"
            roof_text = fmt(roof, ".2f")
        roof_text += "x" if roof else ""
        out.append(
            [
                _engine_name(x["engine"]),
                x["mode"],
                str(x["batch"]),
                x["engine_path"],
                f"{x['baseline']} / {x['baseline_path']}",
                value,
                f"{bound} ({x['ceiling_basis']})",
                roof_text,
                _flag(x),
            ]
        )
    return out


def markdown_report(
    results: Sequence[EngineResult],
    derived: dict[str, Any],
    label: str,
    arch: str,
    env: dict[str, Any] | None = None,
    commands: Sequence[str] = (),
    complete: bool = True,
) -> str:
    """The engine benchmark's report for one architecture."""
    env = env or {}
    ok = [r for r in results if r.status == "ok"]
    lines = [f"# Engine benchmark: {arch}", "", f"{label}. *{RANDOM_WEIGHTS_NOTE}.*", ""]
    if commands:
        lines += ["Command (re-run it on a quiet machine to check these figures):", ""]
        lines += [f"    {c}" for c in commands] + [""]
    state = "complete" if complete else "partial: still running, or interrupted"
    threads = sorted({r.threads for r in ok}) or ["—"]
    workers = sorted({r.workers for r in ok if r.workers > 1})
    rates = derived.get("device_rates")
    caches = ", ".join(f"{k} {_mib(v)} MiB" for k, v in derived.get("caches", {}).items())
    loads = [r.load_avg_1m for r in ok if r.load_avg_1m is not None]
    low, high = (min(loads), max(loads)) if loads else (None, None)
    facts = [
        f"Run: {state}; {len(ok)} rows measured of {len(results)} planned.",
        f"Load average (1/5/15 min) when written: {env.get('cpu_load_avg')} on "
        f"{env.get('cpu_count')} CPUs; 1-minute load per group: {fmt(low, '.2f')} to "
        f"{fmt(high, '.2f')}.",
        f"Threads: torch intra-op {', '.join(map(str, threads))}; ONNX Runtime intra-op the "
        "same (1 per session for concurrent experts); concurrent experts: "
        + (f"{', '.join(map(str, workers))} at once" if workers else "—")
        + " (CPU: a thread each with one intra-op thread; GPU: a CUDA stream each).",
        f"Caches: {caches or '—'}.",
    ]
    if rates:
        facts.append(
            f"Device rates (measured: {rates['how']}): matmul "
            f"{rates['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s, copy "
            f"{rates['copy_bytes_per_s'] / 1e9:,.1f} GB/s."
        )
    facts.append(
        "Timing: each (mode, batch) group's contestants in interleaved rounds (ABCABC...) of "
        "torch.utils.benchmark blocks; median over rounds, interquartile range beside it."
    )
    lines += [f"- {f}" for f in facts] + [""]
    warned = warnings(results, derived, env.get("cpu_count") or 1)
    if warned:
        lines += ["**Warnings:**", ""] + [f"- {w}" for w in warned] + [""]
    lines += [
        "Configurations: " + "; ".join(f"`{k}` = {v}" for k, v in CONFIG_LABELS.items()) + ".",
        "",
    ]
    lines += _ratio_sections(derived)
    lines += _measurement_table(results)
    return "\n".join(lines) + "\n"


def _ratio_sections(derived: dict[str, Any]) -> list[str]:
    header = RATIO_HEADER
    vs = derived["vs_experts"]
    best = [x for modes in vs.values() for rows in modes.values() for x in rows]
    best = [x for x in best if x["kind"] == BEST_VS_BEST]
    lines = [
        "## Headline: best engine path against the best eight-expert baseline",
        "",
        "Speedup in task-answers per second (the same answers per call on both sides). The "
        "ceiling is the most the work allows, max(FLOPs ratio, bytes ratio); the roofline "
        "ceiling uses the measured device rates. A ratio above its ceiling points at the "
        "baseline, not the engine.",
        "",
    ]
    lines += table(header, _ratio_rows(best)) if best else ["(nothing measured)"]
    batch1 = [x for x in best if x["batch"] == 1 and x["engine"] in SURGERY_METHODS]
    v2 = [x for x in batch1 if SURGERY_METHODS[x["engine"]].every_block]
    if v2:
        lines += ["", "Batch-1 latency of the V2 engine against the best baseline:", ""]
        lines += table(LATENCY_HEADER, _ratio_rows(v2, latency=True))
    same = [x for modes in vs.values() for rows in modes.values() for x in rows]
    same = [x for x in same if x["kind"] != BEST_VS_BEST]
    lines += [
        "",
        "## Same-runtime ratios: each engine path against the fastest baseline on that runtime",
        "",
        "`fused` (Triton) is compared with eager PyTorch, `fused+cuda-graph` with CUDA graphs.",
        "",
    ]
    lines += table(header, _ratio_rows(same)) if same else ["(nothing measured)"]
    lines += _penalty_section(derived)
    over = derived["routed_overhead_over_merged"]
    rows = [
        [
            _engine_name(engine),
            str(x["batch"]),
            f"{x['engine_path']} vs {x['merged_path']}",
            x["kind"],
            f"{100 * x['overhead']:+.1f}%",
            f"{100 * x['flops_floor']:+.1f}%",
            "⚠ below its floor: do not cite" if x.get("below_floor") else "",
        ]
        for engine, xs in over["rows"].items()
        for x in xs
    ]
    if rows:
        lines += ["", "## Routed latency over the bare merged backbone", ""]
        if over["note"]:
            lines += [f"({over['note']})", ""]
        lines += table(["engine", "B", "paths", "kind", "overhead", "FLOPs floor", "flag"], rows)
    peak = derived["merged_peak_fraction"]
    if peak:
        lines += ["", "## Merged backbone against the dense peak", ""]
        lines += table(
            ["B", "path", "TFLOP/s", "% of peak"],
            [
                [
                    str(p["batch"]),
                    p["path"],
                    f"{p['tflops']:.1f}",
                    f"{100 * p['peak_fraction']:.1f}",
                ]
                for p in peak
            ],
        )
    weights = derived["weight_ratio_vs_one_expert"]
    lines += ["", "## Weights held", ""]
    lines += table(
        ["configuration", "MiB", "vs one expert"],
        [[k, _mib(derived["weight_bytes"][k]), f"{v:.3f}x"] for k, v in weights.items()],
    )
    return lines + [""]


def _penalty_section(derived: dict[str, Any]) -> list[str]:
    rows = derived["eight_expert_penalty"]
    if not rows:
        return []
    w = derived["weight_bytes"]
    caches = derived.get("caches", {})
    one, eight = w.get("one_expert"), w.get("experts")
    fits = []
    for level, size in caches.items():
        if level.startswith("L1"):
            continue
        holds = [name for name, b in (("one expert", one), ("eight", eight)) if b and b <= size]
        fits.append(f"{level} ({_mib(size)} MiB) holds {' and '.join(holds) or 'neither'}")
    lines = [
        "",
        "## What eight sets of weights cost (measured)",
        "",
        "Each baseline against its experts run one at a time, each alone (the `one-expert` row "
        "on the same path, at the batch each expert gets): a penalty above 1 is time beyond "
        f"the work. One expert's weights are {_mib(one)} MiB, eight experts' {_mib(eight)} "
        "MiB; " + ("; ".join(fits) or "cache sizes unknown") + ".",
        "",
    ]
    header = ["baseline", "mode", "path", "B", "baseline ms", "experts x one expert ms"]
    lines += table(
        [*header, "penalty"],
        [
            [
                r["config"],
                r["mode"],
                r["path"],
                str(r["batch"]),
                f"{r['median_ms']:.3f}",
                f"{r['experts_run']} x {r['one_expert_ms']:.3f} (B={r['one_expert_batch']})",
                f"{r['value']:.2f}x",
            ]
            for r in rows
        ],
    )
    return lines


def _measurement_table(results: Sequence[EngineResult]) -> list[str]:
    ok = [r for r in results if r.status == "ok"]
    gpu = any(r.peak_fraction is not None for r in ok)
    header = ["config", "mode", "path", "B", "median ms", "IQR ms", "task-answers/s"]
    header += ["GFLOP/call", "TFLOP/s", *(["% peak"] if gpu else []), "weights MiB"]
    header += ["peak mem MiB", "threads x workers", "load", "max err vs eager"]
    rows = []
    for r in ok:
        mark = " ⚠" if r.spread is not None and r.spread > SPREAD_WARNING else ""
        row = [r.config, r.mode, r.path, str(r.batch), fmt(r.median_ms, ".3f") + mark]
        row += [f"{r.q1_ms:.3f}–{r.q3_ms:.3f}", fmt(r.answers_per_s, ",.0f")]
        row += [fmt(r.flops_per_call / 1e9, ".3f"), fmt(r.tflops, ".3f")]
        if gpu:
            row.append(fmt(None if r.peak_fraction is None else 100 * r.peak_fraction, ".1f"))
        mem = _mib(r.peak_mem_bytes)
        if r.peak_mem_bytes is not None:
            mem += f" ({r.peak_mem_kind})"
        row += [_mib(r.weight_bytes), mem, f"{r.threads} x {r.workers}"]
        row += [fmt(r.load_avg_1m, ".2f"), fmt(r.max_abs_err_vs_eager, ".1e")]
        rows.append(row)
    lines = [
        "## Every measurement",
        "",
        "Latency is per call of the whole batch; all-tasks answers every task for every image "
        "(B x T answers), routed answers one task per image. Peak memory: each configuration "
        "in a process of its own (peak RSS on the CPU, torch.cuda.max_memory_allocated on the "
        "GPU), while running.",
        "",
        *table(header, rows),
    ]
    skipped = sorted(
        {(r.config, r.mode, r.path, r.status, r.reason) for r in results if r.status != "ok"}
    )
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {c} / {m} / {p}: {s}: {why}" for c, m, p, s, why in skipped]
    return lines


@dataclass
class Previous:
    """The rows and runs of an earlier ``engine-<arch>.json`` (for ``--merge``), read once
    before the run so that the incremental writes do not merge with themselves."""

    rows: dict[str, list[EngineResult]] = field(default_factory=dict)  # per architecture
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def read(cls, out: Path, config: EngineBenchConfig) -> Previous:
        prev = cls()
        device_name = environment(config.device)["device_name"]
        for arch_name in config.archs:
            path = out / f"engine-{get_arch(arch_name).name}.json"
            if path.exists():
                rows, runs = read_previous(path, device_name, config.resolved_dtype())
                prev.rows[arch_name], prev.runs[arch_name] = rows, runs
        return prev


def read_previous(
    path: Path, device_name: str, dtype: str
) -> tuple[list[EngineResult], list[dict[str, Any]]]:
    """An earlier file's rows and runs; ConfigError if it is from another device or dtype."""
    old = json.loads(path.read_text())
    old_dtype = old["results"][0]["dtype"] if old.get("results") else dtype
    if old.get("device_name") != device_name or old_dtype != dtype:
        raise ConfigError(
            f"{path} holds results from {old.get('device_name')!r} ({old_dtype}), not "
            f"{device_name!r} ({dtype}): use another --out, or run without --merge to replace it."
        )
    rows = engine_results(old)
    runs = old.get("runs") or [{"command": old.get("command"), "config": old.get("config")}]
    return rows, runs


def merge_rows(earlier: Sequence[EngineResult], rows: Sequence[EngineResult]) -> list[EngineResult]:
    """This run's rows plus the earlier rows for what it did not measure, in table order."""
    measured = {(r.config, r.mode, r.path, r.batch) for r in rows}
    kept = [r for r in earlier if (r.config, r.mode, r.path, r.batch) not in measured]
    paths = plan_paths(PATHS)
    order = {(c, m): i for i, (c, m) in enumerate((c, m) for c in CONFIGS for m in CONFIG_MODES[c])}
    return sorted(
        [*kept, *rows],
        key=lambda r: (r.batch, r.mode, order.get((r.config, r.mode), 99), paths.index(r.path)),
    )


def write_outputs(
    config: EngineBenchConfig,
    results: Sequence[EngineResult],
    out: Path,
    command: str,
    previous: Previous | None = None,
    plots: bool = True,
    complete: bool = True,
    quiet: bool = False,
    rates: DeviceRates | None = None,
) -> list[Path]:
    """JSON and Markdown (and plots) per architecture under ``out``; returns the files written.

    With ``previous`` (``--merge``), the earlier file's rows this run did not measure are kept
    (so that a sweep can be split over several commands), and its commands are listed with
    this one. ``complete=False`` marks an incremental write of a run still going.
    """
    previous = previous or Previous()
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
        runs = [*previous.runs.get(arch_name, []), {"command": command, "config": asdict(config)}]
        rows = merge_rows(previous.rows.get(arch_name, []), rows)
        classes = task_classes(arch, config.num_tasks)
        one_expert = one_expert_bytes(arch, DTYPES[dtype_name], classes[0])
        derived = derive_ratios(rows, one_expert, config.overhead_batch, rates, env["caches"])
        record = {
            "benchmark": "engine",
            "note": RANDOM_WEIGHTS_NOTE,
            "label": label,
            "complete": complete,
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
            "warnings": warnings(rows, derived, env.get("cpu_count") or 1),
        }
        record["provenance"] = provenance(command)
        write_record(json_path, record)
        md = markdown_report(
            rows, derived, label, arch.name, env, [run["command"] for run in runs], complete
        )
        write_text_atomic(
            md_path, md.rstrip("\n") + "\n\n" + provenance_line(record["provenance"]) + "\n"
        )
        if not quiet:
            print(md)
        written += [json_path, md_path]
        if plots:
            written += write_plots(rows, derived, out, arch.name, label)
    return written
