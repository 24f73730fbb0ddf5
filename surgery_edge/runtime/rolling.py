"""A server that rolls to a new engine version while it serves (``surgery-edge serve REPO
--watch``).

A :class:`VersionedServer` polls a model folder (:mod:`surgery_edge.runtime.versions`) and
rolls to each new version while it serves, through Triton's explicit model control (the
repository API of the server PyTriton starts):

1. the new engine is opened here first (its digest verified, its backend and device usable),
   so a bad version never reaches the server: it is reported and the old one keeps serving;
2. the engine model's new version folder and config are written, and a model for each task
   the new version adds is loaded. Until the engine rolls, such a task model's requests get an
   error that names the task and says that the version serving it is loading (HTTP requests
   for it get 503 with that message while its model loads, from the front);
3. the engine model is loaded again: Triton loads the new version (the config's version
   policy serves the newest one), switches requests to it once it is ready, and unloads the
   old one after the requests it holds are answered, so no request fails;
4. the task models of dropped tasks are unloaded (their requests get an error naming the task
   until then), those of tasks whose classes changed are loaded again.

Task models ask the engine for their task by name (a request parameter), never by an index
that another version could give to another task. A client that sends ``task_ids`` to the
engine model itself addresses the version that answers (every KServe response names its
``model_version``); an id the old version lacks gets an error saying a new version is loading.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from surgery_edge.engine_format import EngineMetadata
from surgery_edge.errors import ExportError
from surgery_edge.runtime.backends import open_backend
from surgery_edge.runtime.http_front import model_limits
from surgery_edge.runtime.serve_options import ServeOptions
from surgery_edge.runtime.serving import Server
from surgery_edge.runtime.serving_repository import (
    _engine_config,
    _task_config,
    _write_model,
    check_task_models,
)
from surgery_edge.runtime.triton_config import to_pbtxt
from surgery_edge.runtime.triton_models import loading_message
from surgery_edge.runtime.versions import EngineVersion, published, served_model

POLL_S = 2.0  # how often --watch looks for a new version


class VersionedServer(Server):
    """A :class:`Server` of one model folder's newest version that, while it serves, rolls to
    each newer version published there (see the module's text).

    Args:
        model_folder: a model folder written by the repository writer, or a repository
            holding one (:func:`~surgery_edge.runtime.versions.served_model`).
        options: as for :class:`Server`; ``options.name`` is the engine model's name.
        watch: poll the folder for new versions (else serve the newest one, as it is).
        poll_s: how often to look.
        log: where a roll says what it did (default: standard error).
    """

    def __init__(
        self,
        model_folder: str | os.PathLike,
        options: ServeOptions | None = None,
        watch: bool = False,
        poll_s: float = POLL_S,
        log: Callable[[str], None] | None = None,
    ):
        self.folder = served_model(model_folder)  # raises, naming what is missing
        versions = published(self.folder)
        self.version = versions[-1].version
        options = options or ServeOptions()
        super().__init__({options.name: versions[-1].engine}, options)
        self.watch, self.poll_s = watch, poll_s
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._skipped: set[int] = set()  # versions that failed to load: not tried again
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self._rolling = threading.Lock()

    @property
    def _repository(self) -> Path:
        return self._work / "repository"

    def start(self) -> VersionedServer:
        """Start the server (the engine model at this version's number), then the watcher."""
        if self._triton is not None:
            return self
        self.engine_version = self.version
        super().start()
        if self.watch:
            self._stop_watching.clear()
            self._watcher = threading.Thread(target=self._poll, name="versions", daemon=True)
            self._watcher.start()
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop watching (a roll under way finishes or fails first), then stop the server."""
        self._stop_watching.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=self.options.startup_timeout_s)
        super().stop(grace_s)

    def describe(self) -> list[str]:
        """:meth:`Server.describe`, with the version served and whether new ones are watched."""
        watching = f"; watching {self.folder} for new versions" if self.watch else ""
        return [*super().describe(), f"engine version {self.version}{watching}"]

    # rolling ------------------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stop_watching.wait(self.poll_s):
            newest = published(self.folder)
            if not newest or newest[-1].version <= self.version:
                continue
            if newest[-1].version in self._skipped:
                continue
            try:
                self.roll(newest[-1])
            except Exception as e:  # reported; the version serving now goes on
                self._skipped.add(newest[-1].version)
                why = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {e}"
                self._log(f"engine version {newest[-1].version} not served: {why}")

    def roll(self, new: EngineVersion) -> None:
        """Serve ``new`` instead of the version served now, without failing a request.

        Raises ExportError (the old version keeps serving) when the new engine cannot be
        opened, names a task that cannot be a model, or fails to load in the server."""
        with self._rolling:
            name, opts = self.options.name, self.options
            backend = open_backend(new.engine, device=opts.device)  # verified before the server
            meta = backend.meta
            del backend
            repo, old, old_version = self._repository, self.metadata[name], self.version
            if opts.task_models:
                check_task_models(meta, {name: meta}, new.engine)
            started = time.monotonic()
            added = [t for t in meta.tasks if t not in old.tasks] if opts.task_models else []
            dropped = [t for t in old.tasks if t not in meta.tasks] if opts.task_models else []
            changed = [
                t
                for t in meta.tasks
                if opts.task_models
                and t in old.tasks
                and meta.class_names[meta.tasks.index(t)] != old.class_names[old.tasks.index(t)]
            ]
            front = self._front
            if front is not None:
                front.loading = {
                    t: loading_message(t, new.version, old_version, old.tasks) for t in added
                }
            try:
                config = _engine_config(name, new.engine.resolve(), meta, opts)
                _write_model(repo / name, "EngineModel", config, version=new.version)
                for task in added:
                    config = _task_config(task, name, meta, opts, engine_version=new.version)
                    _write_model(repo / task, "TaskModel", config)
                self._control_all(added, "load")
                if front is not None:
                    front.limits = model_limits(repo)
                self._control(name, "load")  # Triton retires the old version once it is idle
            except ExportError:
                self._undo(name, new.version, old, added)
                raise
            finally:
                if front is not None:
                    front.loading = {}
            self.metadata[name], self.engines[name], self.version = meta, new.engine, new.version
            for task in changed:
                config = _task_config(task, name, meta, opts, engine_version=new.version)
                shutil.rmtree(repo / task)
                _write_model(repo / task, "TaskModel", config)
            self._control_all(changed, "load")
            self._control_all(dropped, "unload")
            for task in dropped:
                shutil.rmtree(repo / task, ignore_errors=True)
            shutil.rmtree(repo / name / str(old_version), ignore_errors=True)
            if front is not None:
                front.limits = model_limits(repo)
            self.models = sorted(p.name for p in repo.iterdir())
            took = time.monotonic() - started
            self._log(
                f"engine version {new.version} serving ({', '.join(meta.tasks)}), version "
                f"{old_version} retired, in {took:.1f} s"
                + (f"; tasks added: {', '.join(added)}" if added else "")
                + (f"; tasks dropped: {', '.join(dropped)}" if dropped else "")
            )

    def _undo(self, name: str, version: int, old: EngineMetadata, added: list[str]) -> None:
        """After a failed roll: the old version's engine config back, the new version's
        folder and the added tasks' models gone (unloaded where they were loaded)."""
        repo, opts = self._repository, self.options
        config = _engine_config(name, self.engines[name].resolve(), old, opts)
        (repo / name / "config.pbtxt").write_text(to_pbtxt(config), encoding="utf-8")
        shutil.rmtree(repo / name / str(version), ignore_errors=True)
        for task in added:
            try:
                self._control(task, "unload")
            except ExportError:
                pass  # it never loaded
            shutil.rmtree(repo / task, ignore_errors=True)

    def _control_all(self, models: list[str], action: str) -> None:
        """:meth:`_control` of several models at once (Triton loads them side by side)."""
        with concurrent.futures.ThreadPoolExecutor(max(1, len(models))) as pool:
            for done in [pool.submit(self._control, m, action) for m in models]:
                done.result()

    def _control(self, model: str, action: str) -> None:
        """Triton's model control: ``load`` (reads the model's folder again: a new version or
        config replaces the one serving once it is ready) or ``unload``; blocks until done."""
        url = f"http://{self._upstream}/v2/repository/models/{model}/{action}"
        request = urllib.request.Request(url, data=b"{}", method="POST")
        request.add_header("triton-access-token", self.access_token or "")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.options.startup_timeout_s):
                return
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except json.JSONDecodeError:
                pass
            raise ExportError(f"Triton could not {action} model {model!r}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ExportError(f"Triton could not {action} model {model!r}: {e}") from None
