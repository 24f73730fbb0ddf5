"""The merging stage: every configured merge method on the run's experts (reusing up-to-date
merges), checked before any work."""

from __future__ import annotations

from pathlib import Path

from surgery_edge import merging
from surgery_edge.data.transforms import to_model_input
from surgery_edge.distributed import check_rows
from surgery_edge.errors import ConfigError
from surgery_edge.io import check_output, fingerprint
from surgery_edge.merging import AdaMergingContext
from surgery_edge.models import load_encoder, save_encoder
from surgery_edge.progress import MetricsLog, progress_bar
from surgery_edge.run.provenance import check_replace, recorded, up_to_date
from surgery_edge.run.state import Run, adaptation_split, is_kind, metrics_file, suite_images


def check_merges(
    run: Run, methods: list[str] | None = None, overrides: dict | None = None, processes: int = 1
) -> tuple[dict, dict[str, dict]]:
    """What merging checks before any work (and before ``--nproc`` starts its processes): the
    methods and their parameters, every output, a learning method's batch against the number
    of processes, and merges already there made with other parameters (ConfigError, unless
    ``run.overwrite``). Returns ``({method: spec}, {method: parameters})``."""
    methods = methods or run.config.merge.methods
    specs = {name: merging.get(name) for name in methods}  # unknown names fail before any work
    declared = {p.name for spec in specs.values() for p in spec.params}
    unknown = sorted(set(overrides or {}) - declared)
    if unknown:
        raise ConfigError(
            f"No chosen merge method takes {unknown}: "
            + " ".join(spec.describe() for spec in specs.values())
        )
    plans = {}
    for name, spec in specs.items():
        params = run.config.merge.params_for(name)
        given = {k: v for k, v in (overrides or {}).items() if k in params}
        plans[name] = spec.resolve({**params, **given})  # values checked before any work
        if spec.needs_data and "batch_size" in plans[name]:
            check_rows(plans[name]["batch_size"], processes, f"Merge method {name!r}: batch_size")
    for name in specs:  # every output checked before any merge is computed
        path = check_output(run.layout.merged(name), "merged model", is_kind("encoder"))
        old = (recorded(path) or {}).get("provenance") if path.exists() else None
        new = {"method": name, "params": plans[name]}
        if isinstance(old, dict) and not run.overwrite and {k: old.get(k) for k in new} != new:
            what = f"merged model {name!r}"
            check_replace(path, what, new, False, run.log, old={k: old.get(k) for k in new})
    return specs, plans


def run_merges(
    run: Run, methods: list[str] | None = None, overrides: dict | None = None
) -> dict[str, Path]:
    """Merge the experts with every configured method (reusing up-to-date merges).

    Args:
        methods: merge only these (default: the config's list).
        overrides: parameter overrides, e.g. ``{"lam": 0.5}``, for every method that declares
            them; a name no chosen method declares is an error.
    """
    specs, plans = check_merges(run, methods, overrides)
    todo = _merges_to_make(run, specs, plans)
    if not todo:
        return run.merged
    pre = load_encoder(run.experts.pretrained, run.arch)
    experts = {t: load_encoder(p, run.arch).state_dict for t, p in run.experts.experts.items()}
    for name, (path, provenance, fp) in todo.items():
        spec, params = specs[name], plans[name]
        if not (spec.needs_data or run.writer):  # one rank computes a merge that learns nothing
            run.merged[name] = path
            continue
        with run.stage(f"merge:{name}"):
            result = _merge(run, name, spec, params, pre, experts)
            if run.writer:
                save_encoder(
                    path,
                    run.arch,
                    result.state_dict,
                    task=None,
                    recipe=result.recipe,
                    provenance=provenance,
                    fingerprint=fp,
                )
                run.record(path)
        run.merged[name] = path
        stale = run.layout.trained_adapters([name])
        for (_, method), adapters in stale.items():
            run.log(
                f"note: {adapters} was trained on the previous {name} merge and no longer fits "
                f"it; re-train it (surgery-edge train --run {run.out} --merge {name} --surgery "
                f"{method} --overwrite)."
            )
    if run.world is not None:
        run.world.barrier("saving the merged models")
    return run.merged


def _merges_to_make(
    run: Run, specs: dict, plans: dict[str, dict]
) -> dict[str, tuple[Path, dict, str]]:
    """``{method: (path, provenance, fingerprint)}`` of the merges that are missing or out of
    date (reused ones go into ``run.merged``); replacing one made otherwise needs overwrite."""
    experts_fp = run.experts.fingerprint(run.hashes)
    todo = {}
    for name, spec in specs.items():
        path = run.layout.merged(name)
        params = plans[name]
        provenance: dict = {"experts": experts_fp, "method": name, "params": params}
        if spec.needs_data:
            split = adaptation_split(run)
            provenance["data"] = {
                "seed": run.config.seed,
                "split": split,
                "images": run.split_digest(split),
            }
        fp = fingerprint(provenance)
        if up_to_date(path, fp) and run.layout.checksums.reusable(
            path, run.hashes, run.overwrite, run.log
        ):
            run.log(f"reusing merge {name}")
            run.merged[name] = path
            continue
        if path.exists() and not up_to_date(path, fp):
            check_replace(path, f"merged model {name!r}", provenance, run.overwrite, run.log)
        todo[name] = (path, provenance, fp)
    return todo


def _merge(run: Run, name: str, spec, params: dict, pre, experts: dict):
    """One merge method's result; a method that learns (AdaMerging) does so on the unlabelled
    split, with a progress bar and a metrics log."""
    if not spec.needs_data:
        return spec(pre.state_dict, experts, **params)
    context = AdaMergingContext(
        encoder=pre.build(run.device),
        heads={t: h.to(run.device) for t, h in zip(run.tasks, run.heads())},
        # uint8 arrays (memory-mapped for data from disk), converted per batch
        images={t: suite_images(run.suite, t, adaptation_split(run)) for t in run.tasks},
        transform=lambda x: to_model_input(x, run.arch, run.device),
        seed=run.config.seed,
        device=run.device,
        world=run.world,
    )
    with (
        progress_bar(params["steps"], name, show=run.writer) as bar,
        MetricsLog(metrics_file(run, f"merge-{name}"), method=name, params=params) as m,
    ):
        context.progress = lambda step, loss: bar.advance(entropy=loss)
        context.metrics = m
        return spec(pre.state_dict, experts, context=context, **params)
