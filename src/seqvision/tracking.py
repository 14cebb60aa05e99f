"""MLflow tracking: the only module that imports ``mlflow`` (lazily, inside functions).

One comparison is one *parent* run; every ``train@{task}-{model}`` stage is a *child* run under it. All
calls go through an explicit :class:`mlflow.MlflowClient` with explicit run ids, never the fluent
``mlflow.start_run`` stack: the fluent stack is per thread, so ``nested=True`` inside a worker thread does
not find its parent. Children carry the ``mlflow.parentRunId`` tag, which is exactly what
``mlflow.start_run(parent_run_id=...)`` sets.

Where runs go: ``MLFLOW_TRACKING_URI`` when set, else an *absolute* ``sqlite:///{repo_root}/mlflow.db``
(a relative URI would point into the temporary copy under ``dvc exp run --temp``; a plain ``./mlruns``
file store is refused by MLflow 3). Artifacts of a sqlite store go beside the database in ``mlartifacts/``
(MLflow's own default is ``./mlruns`` under the *current* directory, which has the same problem).

Failing fast: :func:`check_tracking` tells in a second or two whether the store answers (call it before any
work), and every client this module makes bounds MLflow's HTTP retries (:data:`HTTP_LIMITS`), so a server that
dies during a run costs seconds, not MLflow's default four minutes of back-off. Either way the error is one
:class:`TrackingUnavailableError` line naming the URI and the fix.

Process-level hand-over:

- ``SEQVISION_PARENT_RUN_ID``: :func:`start_parent` reuses this run instead of creating one;
- ``MLFLOW_RUN_ID``: :func:`start_child` logs into this existing run (a DDP launcher creates the run once
  and passes it to every rank) and leaves ending it to whoever created it, except on failure.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import urlparse

import yaml

from seqvision.io import file_digest, write_text

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

PARENT_RUN_ENV = "SEQVISION_PARENT_RUN_ID"
RUN_ID_ENV = "MLFLOW_RUN_ID"
PARENT_TAG = "mlflow.parentRunId"  # == mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID

log = logging.getLogger(__name__)

# MLflow's HTTP client during a run (read by mlflow.utils.rest_utils.http_request at every request; a value
# the user exported wins). MLflow 3's defaults, 7 retries with backoff factor 2 and a 120 s timeout, spend
# ~4 minutes on a dead server per call. With these, a refused connection fails in ~3 s (attempts after 0 s
# and 2 s of back-off, plus up to 0.5 s of jitter) and a server that accepts but never answers in at most
# 3 x 8 s + 2.5 s < 30 s, while one dropped connection or slow answer is still retried.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # an int for MLflow; urllib3 sleeps factor * 2**(n-1), n >= 2
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",  # seconds, for connecting and again for each read
}
_SEARCH_ENDPOINT = "/api/2.0/mlflow/experiments/search"  # POST {"max_results": 1}: the cheapest call that
# needs the tracking store behind the server (a /health page answers even when the store is broken)

# MLflow's log_batch limits per request (REST API docs): 1000 metrics, 100 params, 100 tags.
_MAX_PARAMS_PER_BATCH = 100
_MAX_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000


def tracking_uri(repo_root: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the absolute ``sqlite:///{root}/mlflow.db`` where root is ``$DVC_ROOT``
    when DVC runs the stage, else ``repo_root``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    # DVC passes the main repository's root as $DVC_ROOT to every stage, also inside the temporary copy that
    # `dvc exp run --queue/--temp` works in (and deletes afterwards): runs must land in the real repository.
    root = os.environ.get("DVC_ROOT") or repo_root
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Absolute artifact root for a new experiment: ``mlartifacts/`` beside a sqlite database.

    ``None`` for other stores (a tracking server decides where its artifacts go).
    """
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db_path = Path(uri[len("sqlite:///") :])
    if not db_path.is_absolute():
        raise ValueError(f"tracking URI {uri!r} is relative; use sqlite:////absolute/path/mlflow.db")
    return (db_path.parent / "mlartifacts").as_uri()


class TrackingUnavailableError(ConnectionError):
    """The MLflow tracking store cannot be reached or used. One line naming the URI and the fix."""


def _bound_http() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def _client(uri: str) -> MlflowClient:
    _bound_http()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _fix(uri: str) -> str:
    """What a user does about a store that fails, for the end of an error line."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI") == uri
    if urlparse(uri).scheme in ("http", "https"):
        port = urlparse(uri).port or ""
        start = f"start the server (`mlflow server --host 127.0.0.1 --port {port}`)" if port else "start the server"
        return f"{start}, or unset MLFLOW_TRACKING_URI to log to the local sqlite store (mlflow.db)"
    unset = ", or unset MLFLOW_TRACKING_URI to use the default store (mlflow.db in the repository)"
    return "fix the path or its permissions" + (unset if from_env else ", or set MLFLOW_TRACKING_URI to a server")


def _transport_failure(err: BaseException) -> str | None:
    """The innermost OS-level error (refused, timed out, unknown host, TLS) behind an MLflow exception, as
    text; ``None`` when the store answered (a bad request, a missing run): those are not ours to rephrase."""
    reason = None
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):  # requests' and urllib3's transport errors are OSErrors too
            reason = str(current).strip() or type(current).__name__
        current = current.__cause__ or current.__context__
    return reason


@contextlib.contextmanager
def _reaching(uri: str) -> Iterator[None]:
    """Turn MLflow's "could not reach the store" exception into one :class:`TrackingUnavailableError` line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        reason = _transport_failure(err)
        if reason is None:
            raise
        raise TrackingUnavailableError(f"MLflow tracking store {uri} does not answer ({reason}); {_fix(uri)}") from err


def check_tracking(uri: str, *, timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailableError` (one line: the URI, what failed, how to fix it) unless the
    tracking store at ``uri`` can be used; returns within about ``timeout_s`` (twice that at worst).

    - ``http(s)://``: one ``experiments/search`` request (with the user's MLflow credentials), no retries,
      ``timeout_s`` to connect and again to answer. Any answer other than 200 is an error too (401/403: the
      credentials; 404: not an MLflow server).
    - ``sqlite:///``: the folder exists and is writable (sqlite writes its journal beside the database), and
      an existing database opens read-write and reads its schema (a truncated or foreign file fails here).
    - anything else (databricks, postgresql, ...): not checked.
    """
    _bound_http()
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri, timeout_s)


def _check_server(uri: str, timeout_s: float) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    def fail(problem: str) -> TrackingUnavailableError:
        return TrackingUnavailableError(f"MLflow tracking server {uri} {problem}; {_fix(uri)}")

    try:
        response = http_request(
            get_default_host_creds(uri), _SEARCH_ENDPOINT, "POST", json={"max_results": 1},
            max_retries=0, backoff_factor=0, retry_codes=(), timeout=timeout_s,
        )
    except Exception as err:  # MLflow wraps every transport error in a generic MlflowException
        raise fail(f"does not answer ({_transport_failure(err) or err})") from err
    if response.status_code in (401, 403):
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} refuses the request (HTTP {response.status_code}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it"
        )
    if response.status_code != 200:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} answers HTTP {response.status_code} to {_SEARCH_ENDPOINT}; check that "
            "MLFLOW_TRACKING_URI names an MLflow tracking server (scheme, host, port, path)"
        )


def _check_sqlite(uri: str, timeout_s: float) -> None:
    db_path = Path(uri[len("sqlite:///") :])

    def fail(problem: str) -> TrackingUnavailableError:
        return TrackingUnavailableError(f"MLflow tracking store {uri}: {problem}; {_fix(uri)}")

    if not db_path.is_absolute():
        raise TrackingUnavailableError(
            f"MLflow tracking store {uri}: relative database path (it would move with the working directory); "
            "use sqlite:////absolute/path/mlflow.db"
        )
    folder = db_path.parent
    if not folder.is_dir():
        raise fail(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise fail(f"folder {folder} is not writable")
    if not db_path.exists():
        return  # MLflow creates the database and its schema on first use
    if not db_path.is_file() or not os.access(db_path, os.R_OK | os.W_OK):
        raise fail(f"{db_path} is not a readable and writable file")
    try:
        connection = sqlite3.connect(f"{db_path.as_uri()}?mode=rw", uri=True, timeout=timeout_s)
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            connection.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):  # another process is writing to it: it is a working database
            return
        raise fail(f"{db_path} cannot be opened as a database ({err})") from err
    except sqlite3.Error as err:
        raise fail(f"{db_path} cannot be opened as a database ({err})") from err


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def start_parent(
    experiment: str,
    run_name: str,
    *,
    repo_root: str | Path,
    tags: Mapping[str, Any] | None = None,
    run_id_file: str | Path | None = None,
) -> str:
    """The parent run id for one comparison, creating the run only when there is none to reuse.

    Reuses, in order: ``$SEQVISION_PARENT_RUN_ID`` (must exist), then the id stored in ``run_id_file``
    if that run still exists and is RUNNING. Otherwise creates a run in ``experiment`` (created if
    missing) and, when ``run_id_file`` is given, writes the new id there atomically.
    """
    uri = tracking_uri(repo_root)
    client = _client(uri)
    with _reaching(uri):
        env_id = os.environ.get(PARENT_RUN_ENV)
        if env_id:
            client.get_run(env_id)  # raises MlflowException naming the id when it does not exist
            return env_id
        if run_id_file is not None and Path(run_id_file).is_file():
            stored = Path(run_id_file).read_text().strip()
            if stored and _is_running(client, stored):
                return stored
        run = client.create_run(
            _experiment_id(client, experiment, uri), run_name=run_name, tags=_stringify(tags or {})
        )
    if run_id_file is not None:
        write_text(run_id_file, run.info.run_id + "\n")
    return run.info.run_id


def _is_running(client: MlflowClient, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.status == "RUNNING"
    except MlflowException as err:
        if _transport_failure(err) is not None:  # the store is down, not the run gone
            raise
        return False


def end_run(run_id: str, *, repo_root: str | Path, status: str = "FINISHED") -> None:
    """Mark a run (typically the parent) terminated with ``status`` (FINISHED, FAILED or KILLED)."""
    uri = tracking_uri(repo_root)
    with _reaching(uri):
        _client(uri).set_terminated(run_id, status)


def log_to_run(
    run_id: str,
    *,
    repo_root: str | Path,
    metrics: Mapping[str, Any] | None = None,
    artifacts: tuple[str | Path, ...] | list[str | Path] = (),
    artifact_path: str | None = None,
) -> None:
    """Log numeric ``metrics`` (step 0, one request) and files/folders onto an existing run, whatever its
    status (e.g. the comparison report and each child's test metrics on the parent after training)."""
    tracker = Tracker(_client(tracking_uri(repo_root)), run_id, owns_run=False)
    if metrics:
        tracker.log_epoch(metrics, step=0)
    for path in artifacts:
        tracker.log_artifact(path, artifact_path)


def start_child(
    *,
    parent_run_id: str,
    run_name: str,
    repo_root: str | Path,
    tags: Mapping[str, Any] | None = None,
) -> Tracker:
    """A :class:`Tracker` on a new child run of ``parent_run_id`` (same experiment).

    With ``$MLFLOW_RUN_ID`` set, logs into that run instead (created by a launcher, which also ends it).
    Use the tracker as a context manager so that an exception marks the run FAILED.
    """
    uri = tracking_uri(repo_root)
    client = _client(uri)
    external = os.environ.get(RUN_ID_ENV)
    with _reaching(uri):
        if external:
            client.get_run(external)
            tracker = Tracker(client, external, owns_run=False)
        else:
            parent = client.get_run(parent_run_id)
            run = client.create_run(
                parent.info.experiment_id,
                run_name=run_name,
                tags={PARENT_TAG: parent_run_id, **_stringify(tags or {})},
            )
            tracker = Tracker(client, run.info.run_id, owns_run=True)
    if external and tags:
        tracker.set_tags(tags)
    return tracker


def _lost_insert_race(err: BaseException) -> bool:
    """Whether MLflow failed on a unique key that another writer filled first: its SQL store's IntegrityError
    (wrapped in an MlflowException), or a server's answer naming one (sqlite or PostgreSQL backend)."""
    text = str(err)
    return (type(err.__cause__).__name__ == "IntegrityError" or "UNIQUE constraint failed" in text
            or "duplicate key value violates unique constraint" in text)


def _stringify(values: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in values.items()}


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class TrackerLike(Protocol):
    """What the training loop needs from a tracker (:class:`Tracker` or :class:`NullTracker`)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_epoch(self, metrics: Mapping[str, Any], *, step: int) -> None: ...
    def log_steps(self, rows: Iterable[tuple[int, Mapping[str, Any]]]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class Tracker:
    """Logs one run. Per-epoch metrics go in a single ``log_batch`` request, so tracking costs one
    round trip per epoch however many metrics there are.

    As a context manager: a clean exit ends the run FINISHED, an exception FAILED (KILLED for
    Ctrl-C) and re-raises. A run it did not create (``$MLFLOW_RUN_ID``) is only ever marked FAILED or
    KILLED here; its creator reports success.
    """

    def __init__(self, client: MlflowClient, run_id: str, *, owns_run: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.owns_run = owns_run
        self.status: str | None = None  # set once finished
        self._uri = str(client.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat ``{"train.lr": 0.001, ...}``; values are stored as strings (MLflow params are strings)."""
        from mlflow.entities import Param

        entries = [Param(str(k), str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
        with _reaching(self._uri):
            for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(str(k), str(v)) for k, v in tags.items()]
        with _reaching(self._uri):
            for chunk in _chunks(entries, _MAX_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=chunk)

    def log_epoch(self, metrics: Mapping[str, Any], *, step: int) -> None:
        """Numeric entries of ``metrics`` at ``step`` (the epoch), in one ``log_batch`` call."""
        self.log_steps([(step, metrics)])

    def log_steps(self, rows: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
        """:meth:`log_epoch` for many ``(step, metrics)`` rows at once, e.g. a finished training's whole history:
        one ``log_batch`` call per 1,000 values instead of one per row (each call is a store transaction)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [
            Metric(str(k), float(v), timestamp, step)
            for step, metrics in rows
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        with _reaching(self._uri):
            for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or every file of a folder) into the run's artifacts."""
        path = Path(path)
        with _reaching(self._uri):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_datasets(self, folders: Mapping[str, str | Path], *, repo_root: str | Path) -> dict[str, DvcHash]:
        """Record the artifact folders the run reads (``{"features": "artifacts/features", ...}``) as MLflow dataset
        inputs, in one request: each folder three times, ``{name}/train``, ``{name}/val`` and ``{name}/test`` with the
        contexts training, validation and test (MLflow keeps one input per name and digest, so one name per split),
        each with the folder's DVC hash as digest (:func:`dvc_hash`). Returns those hashes by name."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        hashes = {name: dvc_hash(folder, repo_root=repo_root) for name, folder in folders.items()}
        inputs = [
            DatasetInput(
                Dataset(name=f"{name}/{split}", digest=hashes[name].value, source_type="local",
                        source=json.dumps({"uri": str(Path(folder).resolve())})),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("seqvision.split", split),
                      InputTag("seqvision.digest_source", hashes[name].source)],
            )
            for name, folder in folders.items()
            for split, context in SPLIT_CONTEXTS
        ]
        with _reaching(self._uri):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
            except Exception as err:
                if not _lost_insert_race(err):
                    raise
                # Parallel trainings of one comparison read the same folders: MLflow looked a dataset up, another
                # run inserted it, then this insert hit the unique key. It exists now, so a second try links it.
                self.client.log_inputs(self.run_id, datasets=inputs)
        return hashes

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status``; later calls are ignored (the first verdict stands)."""
        if self.status is not None:
            return
        self.status = status
        if self.owns_run or status != "FINISHED":
            with _reaching(self._uri):
                self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            self.finish("FINISHED")
            return False
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        if issubclass(exc_type, TrackingUnavailableError):  # another request would only wait for it again
            self.status = status
            log.warning("MLflow run %s stays RUNNING: its tracking store stopped answering", self.run_id)
            return False
        try:
            self.finish(status)
        except TrackingUnavailableError as err:
            # The store died as well: keep the original error, which says more, rather than replace it.
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, err)
        return False  # never swallow the exception


class NullTracker:
    """Tracking switched off: every call does nothing."""

    run_id: str | None = None
    status: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_epoch(self, metrics: Mapping[str, Any], *, step: int) -> None:
        pass

    def log_steps(self, rows: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False


# --------------------------------------------------------------------------------------------------------
# Tags: where a run came from and what it ran on.


def params_hash(params: Mapping[str, Any]) -> str:
    """Short SHA-256 of the canonical JSON of ``params`` (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def data_md5(dvc_file: str | Path) -> str:
    """The md5 DVC recorded for the outputs of a ``.dvc`` file (``outs[*].md5``, joined by '+')."""
    meta = yaml.safe_load(Path(dvc_file).read_text()) or {}
    hashes = [str(out.get("md5", "")) for out in meta.get("outs", [])]
    if not any(hashes):
        raise ValueError(f"{dvc_file}: no outs[].md5 entry; was `dvc add` run?")
    return "+".join(hashes)


# --------------------------------------------------------------------------------------------------------
# Dataset lineage: the artifact folders a run reads, identified by their DVC hash.

SPLIT_CONTEXTS = (("train", "training"), ("val", "validation"), ("test", "test"))  # split -> MLflow's context
DVC_LOCK = "dvc.lock"


class DvcHash(NamedTuple):
    """The md5 DVC 3 records for an output: ``"<md5>.dir"`` for a folder, ``"<md5>"`` for a file."""

    value: str
    source: str  # "dvc.lock": read from the lock file; "computed": computed here, as DVC computes it


def dvc_hash(path: str | Path, *, repo_root: str | Path) -> DvcHash:
    """The DVC hash of a stage output (a file or a folder).

    From ``{repo_root}/dvc.lock`` when a stage there lists ``path`` among its ``outs`` and the output on disk still
    looks like what was recorded (same size and, for a folder, file count; no file modified after dvc.lock was
    written). Otherwise computed here exactly as DVC 3 does (:func:`compute_dvc_md5`), which reads every file once:
    an output rewritten outside ``dvc repro`` then still gets the hash ``dvc commit`` would record.
    """
    path = Path(path)
    recorded = _locked_out(path, Path(repo_root))
    if recorded is not None:
        lock_time = (Path(repo_root) / DVC_LOCK).stat().st_mtime
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.is_file() else []
        size = sum(p.stat().st_size for p in files)
        fresh = all(p.stat().st_mtime <= lock_time for p in files)
        count_ok = not path.is_dir() or recorded.get("nfiles") == len(files)
        if files and fresh and count_ok and recorded.get("size") == size:
            return DvcHash(str(recorded["md5"]), DVC_LOCK)
    return DvcHash(compute_dvc_md5(path), "computed")


def _locked_out(path: Path, repo_root: Path) -> dict[str, Any] | None:
    """The ``outs`` entry of dvc.lock for ``path`` (md5, size, nfiles), or None."""
    lock = repo_root / DVC_LOCK
    if not lock.is_file():
        return None
    try:
        relative = path.resolve().relative_to(repo_root.resolve()).as_posix()
    except ValueError:  # outside the repository: not a DVC output
        return None
    return _lock_outs(str(lock), lock.stat().st_mtime).get(relative)


@functools.lru_cache(maxsize=4)
def _lock_outs(lock: str, mtime: float) -> dict[str, dict[str, Any]]:
    """Every md5 ``outs`` entry of a dvc.lock by path, parsed once per version of the file (``mtime``): a training
    asks for each folder it reads, and the lock of the whole demo is ~0.5 s of pure-Python YAML."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    stages = (yaml.load(Path(lock).read_text(encoding="utf-8"), Loader=loader) or {}).get("stages") or {}  # noqa: S506
    return {out["path"]: out for stage in stages.values() for out in stage.get("outs") or []
            if out.get("path") and out.get("hash", "md5") == "md5" and out.get("md5")}


def compute_dvc_md5(path: str | Path) -> str:
    """DVC 3's md5 of a file (of its bytes), or of a folder: the md5 of the JSON list of ``{"md5", "relpath"}`` of
    every file under it, sorted by relpath (``dvc_data.hashfile.tree.Tree.digest``), then ``.dir``."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, "md5")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    entries = sorted(({"md5": file_digest(p, "md5"), "relpath": p.relative_to(path).as_posix()}
                      for p in path.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def git_commit(repo_root: str | Path) -> tuple[str, bool]:
    """``(commit sha, dirty)`` of the checkout at ``repo_root``; ``("unknown", False)`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo_root), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return sha, bool(dirty)


def lineage_tags(
    *,
    repo_root: str | Path,
    data_dvc: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Tags that tie a run to its code (git), data (``data.dvc`` md5) and parameters (hash)."""
    sha, dirty = git_commit(repo_root)
    tags = {
        "mlflow.source.git.commit": sha,  # shown by the MLflow UI
        "seqvision.git_commit": sha,
        "seqvision.git_dirty": str(dirty).lower(),
    }
    if data_dvc is not None:
        tags["seqvision.data_md5"] = data_md5(data_dvc)
    if params is not None:
        tags["seqvision.params_hash"] = params_hash(params)
    return tags


def runtime_tags(device: Any) -> dict[str, str]:
    """Tags for what a run executed on: device (with the GPU name), torch and CUDA versions."""
    import torch

    device = torch.device(device)
    name = str(device)
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    return {
        "seqvision.device": name,
        "seqvision.torch_version": torch.__version__,
        "seqvision.cuda_version": str(torch.version.cuda),
    }


# --------------------------------------------------------------------------------------------------------
# Run policy: one comparison is one parent run; every training is a child run under it.

PARENT_EXPERIMENT = "seqvision"
PARENT_RUN_NAME = "comparison"
RUN_ID_FILE = Path(".seqvision") / "parent_run_id"  # relative to the repository root; not a DVC output
DATA_DVC = "data.dvc"


def end_abandoned(parent_run_id: str, run_name: str, *, repo_root: str | Path) -> list[str]:
    """Mark KILLED every child run ``run_name`` of ``parent_run_id`` still RUNNING, and return their ids.

    Called as a training opens its run: the same training never runs twice at once (DVC locks the repository;
    the comparison starts each training once), so a RUNNING namesake is the run of a process that was killed
    (SIGKILL, power loss) before it could mark anything. Its curves stay; the tag says what ended it."""
    if os.environ.get(RUN_ID_ENV):
        return []  # a launcher owns the run and its siblings
    uri = tracking_uri(repo_root)
    client = _client(uri)
    with _reaching(uri):
        experiment = client.get_run(parent_run_id).info.experiment_id
        stale = client.search_runs(
            [experiment],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.run_name = '{run_name}' "
                          "and attributes.status = 'RUNNING'",
        )
        for run in stale:
            client.set_tag(run.info.run_id, "seqvision.ended_by", "the next run of the same training found it "
                                                                  "RUNNING: its process had died")
            client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in stale]


def open_training_run(
    task: str, family: str, *, repo_root: str | Path, params: Mapping[str, Any] | None = None
) -> tuple[Tracker, str]:
    """(child tracker, parent run id) of one training: the comparison's parent run (``$SEQVISION_PARENT_RUN_ID``,
    else the RUNNING run named in ``{repo_root}/.seqvision/parent_run_id``, else a new run ``comparison`` in
    experiment ``seqvision``, recorded there) and a child run ``{task}-{family}`` under it, tagged with its lineage
    (git commit, ``data.dvc`` md5 when the file exists, a hash of ``params``). With ``$MLFLOW_RUN_ID`` set the
    tracker logs into that run instead (a DDP launcher created it)."""
    root = Path(repo_root)
    data_dvc = root / DATA_DVC
    lineage = lineage_tags(repo_root=root, data_dvc=data_dvc if data_dvc.is_file() else None, params=params)
    parent = start_parent(
        PARENT_EXPERIMENT, PARENT_RUN_NAME, repo_root=root, run_id_file=root / RUN_ID_FILE,
        tags={k: v for k, v in lineage.items() if k != "seqvision.params_hash"},
    )
    tags = {**lineage, "seqvision.task": task, "seqvision.family": family, "seqvision.stage": "train"}
    end_abandoned(parent, f"{task}-{family}", repo_root=root)
    child = start_child(parent_run_id=parent, run_name=f"{task}-{family}", repo_root=root, tags=tags)
    return child, parent


def publish_comparison(
    parent_run_id: str,
    *,
    repo_root: str | Path,
    metrics: Mapping[str, float],
    child_metrics: Mapping[str, Mapping[str, float]],
    files: tuple[str | Path, ...] | list[str | Path] = (),
    folders: Mapping[str, str | Path] | None = None,
    child_artifacts: Mapping[str, Mapping[str, Sequence[str | Path]]] | None = None,
    end_parent: bool = True,
) -> None:
    """The report stage's publishing: ``metrics`` and ``files`` (artifact folder ``report/``; ``folders`` maps an
    artifact path to a local folder) on the parent run, each child's test metrics on that child, and
    ``child_artifacts`` (``{child run id: {artifact path: files}}``) on each child; then end the parent FINISHED."""
    log_to_run(parent_run_id, repo_root=repo_root, metrics=metrics, artifacts=list(files), artifact_path="report")
    for artifact_path, folder in (folders or {}).items():
        if Path(folder).is_dir():
            log_to_run(parent_run_id, repo_root=repo_root, artifacts=[folder], artifact_path=artifact_path)
    for child, values in child_metrics.items():
        log_to_run(child, repo_root=repo_root, metrics=values)
    for child, by_path in (child_artifacts or {}).items():
        for artifact_path, paths in by_path.items():
            log_to_run(child, repo_root=repo_root, artifacts=list(paths), artifact_path=artifact_path)
    if end_parent:
        end_run(parent_run_id, repo_root=repo_root, status="FINISHED")


# --------------------------------------------------------------------------------------------------------
# The study (docs/study.md): one parent run "study" per rendering of the measured table, one child run per cell.

STUDY_EXPERIMENT = "seqvision-study"
STUDY_RUN_NAME = "study"


class StudyCell(NamedTuple):
    """One cell of the study's table as a child run: ``name`` ("compute/RNNs") is its run name; ``artifacts`` are
    logged under ``study/``."""

    name: str
    tags: Mapping[str, Any]
    metrics: Mapping[str, float]
    artifacts: Sequence[str | Path] = ()


def publish_study(
    cells: Sequence[StudyCell],
    *,
    repo_root: str | Path,
    files: Mapping[str, Sequence[str | Path]] | None = None,
    folders: Mapping[str, str | Path] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, str]]:
    """A new parent run ``study`` in experiment ``seqvision-study`` with ``files`` (``{artifact path: files}``) and
    ``folders`` (``{artifact path: folder}``), and one FINISHED child run per cell (explicit ``parent_run_id``: no
    fluent run stack, so it works from any thread); then the parent is ended FINISHED (FAILED, and the error
    re-raised, when any of it fails). Neither ``$SEQVISION_PARENT_RUN_ID`` nor ``$MLFLOW_RUN_ID`` applies: those
    hand over the comparison's runs. Returns (parent run id, ``{cell name: child run id}``)."""
    root = Path(repo_root)
    uri = tracking_uri(root)
    check_tracking(uri)
    client = _client(uri)
    data_dvc = root / DATA_DVC
    lineage = lineage_tags(repo_root=root, data_dvc=data_dvc if data_dvc.is_file() else None)
    with _reaching(uri):
        experiment = _experiment_id(client, STUDY_EXPERIMENT, uri)
        parent = client.create_run(experiment, run_name=STUDY_RUN_NAME,
                                   tags=_stringify({**lineage, "seqvision.stage": "study", **(tags or {})}))
    parent_id = parent.info.run_id
    children: dict[str, str] = {}
    with Tracker(client, parent_id) as tracker:
        for artifact_path, paths in (files or {}).items():
            for path in paths:
                tracker.log_artifact(path, artifact_path)
        for artifact_path, folder in (folders or {}).items():
            if Path(folder).is_dir():
                tracker.log_artifact(folder, artifact_path)
        for cell in cells:
            with _reaching(uri):
                run = client.create_run(experiment, run_name=cell.name, tags={
                    PARENT_TAG: parent_id, **_stringify({**lineage, "seqvision.stage": "study", **cell.tags})})
            with Tracker(client, run.info.run_id) as child:
                child.log_epoch(cell.metrics, step=0)
                for path in cell.artifacts:
                    child.log_artifact(path, "study")
            children[cell.name] = run.info.run_id
    return parent_id, children


# --------------------------------------------------------------------------------------------------------
# The model registry: the best model of each task, loadable with one call.

BEST_ALIAS = "best"
MODEL_ARTIFACT = "model"  # the model's folder among its run's artifacts

# The pyfunc model's code, saved beside its checkpoint ("models from code": MLflow loads it without unpickling
# anything, so loading needs no MLFLOW_ALLOW_PICKLE_DESERIALIZATION; the checkpoint holds plain data only).
MODEL_CODE = '''"""A seqvision model as an MLflow pyfunc model, written by seqvision.tracking.log_model.

``load_context`` rebuilds the network from ``checkpoint.pt`` (its spec and state dict, seqvision.checkpoint's layout)
with seqvision.models.build_from_checkpoint, on the CPU and in eval mode, as ``self.module``. ``predict`` takes a
batch of what the model was trained on: float features (B, T, D) of clips or (B, G, D) image grids (uint8 pixels for
a model with its encoder) and returns activity class indices (B,) int64 or greedy caption token ids (B, L) int64,
L <= 20 (decode them with the tokens folder's vocab.json).
"""

import mlflow
import numpy as np
import torch

from seqvision import checkpoint, decode, models


class SeqvisionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        state = checkpoint.load(context.artifacts["checkpoint"])
        self.spec = state["spec"]
        self.module = models.build_from_checkpoint(state).eval()

    def predict(self, context, model_input, params=None):
        visual = torch.as_tensor(np.asarray(model_input))
        if visual.is_floating_point():
            visual = visual.float()
        pixels_of_images = "encoder" in self.spec and self.spec["task"] == "image_captioning"
        lengths = torch.full((visual.size(0),), 1 if pixels_of_images else visual.size(1), dtype=torch.long)
        with torch.no_grad():
            if self.spec["task"] == "activity":
                logits, _ = self.module(visual, lengths)  # (B, C)
                return logits.argmax(-1).numpy()
            return decode.greedy_decode(self.module, visual, lengths, max_length=20).tokens.numpy()


mlflow.models.set_model(SeqvisionModel())
'''


def registered_model_name(task: str) -> str:
    """``seqvision-{task}``: one registered model per task, its versions the best models of successive comparisons."""
    return f"seqvision-{task}"


def log_model(
    checkpoint_path: str | Path,
    *,
    run_id: str,
    repo_root: str | Path,
    register_as: str | None = None,
    alias: str = BEST_ALIAS,
    tags: Mapping[str, Any] | None = None,
) -> str | None:
    """Log the model of a training checkpoint on run ``run_id`` (artifact folder ``model/``) as an MLflow pyfunc model
    holding only its spec and weights; with ``register_as``, register it as a new version of that model, tagged
    ``tags``, and point ``alias`` at it. Returns the version (None when not registered).

    Loading (``mlflow.pyfunc.load_model("models:/seqvision-activity@best")``) imports seqvision and torch and needs
    nothing else: no network, no pickled code."""
    import mlflow.pyfunc
    import numpy
    import torch

    from seqvision import checkpoint

    state = checkpoint.load(checkpoint_path)
    uri = tracking_uri(repo_root)
    client = _client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        slim, code, local = Path(tmp) / "checkpoint.pt", Path(tmp) / "seqvision_model.py", Path(tmp) / "model"
        checkpoint.save(slim, {"spec": state["spec"], "model": state["model"]})  # no optimizer, rng, history
        code.write_text(MODEL_CODE, encoding="utf-8")
        # Explicit requirements: MLflow would otherwise infer them by loading the model in a subprocess.
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}"]
        mlflow.pyfunc.save_model(str(local), python_model=str(code), artifacts={"checkpoint": str(slim)},
                                 pip_requirements=requirements)
        with _reaching(uri):
            client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    if register_as is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    with _reaching(uri):
        try:
            client.create_registered_model(register_as, description=(
                "The best model family of the comparison on its task's primary test metric (alias "
                f"'{alias}'); load with mlflow.pyfunc.load_model('models:/{register_as}@{alias}')"))
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        version = client.create_model_version(register_as, f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id,
                                              tags=_stringify(tags or {}))
        client.set_registered_model_alias(register_as, alias, version.version)
    return str(version.version)
