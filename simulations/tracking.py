"""Experiment tracking of a simulated run with MLflow (``tracking=mlflow``; conf/tracking/).

MLflow is an optional extra (``pip install -e '.[tracking]'``) and is imported only here, only when
tracking is on. One MLflow run per run folder (a Hydra multirun gives one per job):

- parameters: the resolved config, flattened (``federation.num_sites``, ``train.local_steps``, ...);
- metrics, with the round as the step, logged while the run trains (the run folder's summary.json
  is read every ``tracking.poll_s`` seconds): ``global/<metric>``, ``<site>/evaluate/<metric>``,
  ``<site>/train/<metric>`` (losses, loss weights, acceptance per class, ...), ``round/seconds``,
  ``round/bytes_to_sites``, ``round/bytes_from_sites``, ``round/sites_left_out``;
- artifacts at the end: the sample grids (``samples/``), the run report (``report/``), the
  exported classifier (``classifier/``: classifier.pt2 + model.json) and ``summary.json``.

The default store is local: ``./mlruns`` (an SQLite database, ``mlruns/mlflow.db``, and the artifacts
in ``mlruns/artifacts``; browse it with ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``).
``tracking.uri`` points at a tracking server instead.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from common.config import ConfigError

logger = logging.getLogger("fedvitgan.tracking")

BACKENDS: tuple[str, ...] = ("none", "mlflow")
LOCAL_STORE = Path("mlruns")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")
_BATCH = 500  # metrics per log_batch call (MLflow accepts up to 1000)


def metric_key(*parts: str) -> str:
    """An MLflow metric name from parts joined by '/', characters MLflow refuses replaced by '_'."""
    return _UNSAFE.sub("_", "/".join(parts))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a.b": "value"}`` for every leaf of a nested config (lists as JSON)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def round_metrics(entry: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, value) of every finite number of one summary.json round."""
    for name, value in (entry.get("global") or {}).items():
        if _finite(value) is not None:
            yield metric_key("global", name), float(value)
    for site, phases in (entry.get("sites") or {}).items():
        for phase, metrics in (phases or {}).items():
            for name, value in (metrics or {}).items():
                if _finite(value) is not None:
                    yield metric_key(site, phase, name), float(value)
    sent = entry.get("bytes") or {}
    yield "round/seconds", float(entry.get("seconds") or 0.0)
    yield "round/bytes_to_sites", float(int(sent.get("train_to_sites", 0)) + int(sent.get("evaluate_to_sites", 0)))
    yield "round/bytes_from_sites", float(sent.get("train_from_sites", 0))
    yield "round/sites_left_out", float(len(entry.get("excluded") or []))


def tracking_config(run: Mapping[str, Any]) -> dict[str, Any]:
    """The run's ``tracking`` section; ``ConfigError`` for an unknown backend."""
    cfg = dict(run.get("tracking") or {"backend": "none"})
    if str(cfg.get("backend", "none")) not in BACKENDS:
        raise ConfigError(f"tracking.backend {cfg.get('backend')!r} is not known; choose one of {list(BACKENDS)} "
                          f"(tracking=mlflow on the command line)")
    return cfg


class MlflowTracker:
    """One MLflow run that follows a run folder: params now, rounds as they finish, artifacts at the end."""

    def __init__(self, cfg: Mapping[str, Any], run: Mapping[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as error:
            raise ConfigError("tracking=mlflow needs MLflow, an optional extra: pip install -e '.[tracking]' "
                              "(or pip install mlflow)") from error
        for name in ("mlflow", "alembic"):  # their INFO lines (database set-up) are noise on the console
            logging.getLogger(name).setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.cfg = dict(cfg)
        self.run_dir = Path(str(run["output_dir"]))
        uri, artifacts = self.cfg.get("uri"), None
        if not uri:
            LOCAL_STORE.mkdir(exist_ok=True)
            uri = f"sqlite:///{(LOCAL_STORE / 'mlflow.db').resolve()}"
            artifacts = (LOCAL_STORE / "artifacts").resolve().as_uri()
        self.uri = str(uri)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        name = str(self.cfg.get("experiment") or "fedvitgan")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=self._run_name(),
                                             tags={"fedvitgan.run_folder": str(self.run_dir)}).info.run_id
        params = [mlflow.entities.Param(k, v[:6000]) for k, v in flatten(run).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.logged: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run_name(self) -> str:
        if self.cfg.get("run_name"):
            return str(self.cfg["run_name"])
        try:
            return str(self.run_dir.resolve().relative_to(Path.cwd()))
        except ValueError:
            return self.run_dir.name

    def log_new_rounds(self) -> int:
        """Log the rounds of summary.json not logged yet; returns how many."""
        try:
            rounds = json.loads((self.run_dir / "summary.json").read_text()).get("rounds", [])
        except (OSError, ValueError):
            return 0  # not written yet
        with self._lock:
            new = [e for e in rounds if int(e["round"]) not in self.logged]
            for entry in new:
                stamp = int(time.time() * 1000)
                metrics = [self.mlflow.entities.Metric(k, v, stamp, int(entry["round"])) for k, v in round_metrics(entry)]
                for start in range(0, len(metrics), _BATCH):
                    self.client.log_batch(self.run_id, metrics=metrics[start:start + _BATCH])
                self.logged.add(int(entry["round"]))
        return len(new)

    def _follow(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.log_new_rounds()
            except Exception:  # tracking must never stop training; the final pass retries
                logger.exception("MLflow: could not log a round; retrying at the end of the run")

    def follow(self) -> None:
        """Log finished rounds in the background while the run trains."""
        self._thread = threading.Thread(target=self._follow, args=(float(self.cfg.get("poll_s", 5)),),
                                        name="fedvitgan-tracking", daemon=True)
        self._thread.start()

    def _log_classifier(self) -> None:
        from simulations.export import export_classifier
        from simulations.run_model import load_run_model

        with tempfile.TemporaryDirectory() as folder:
            export_classifier(load_run_model(self.run_dir), Path(folder))
            self.client.log_artifacts(self.run_id, folder, "classifier")

    def finish(self, succeeded: bool, report: Mapping[str, Path] | None = None) -> None:
        """Log what is left and the artifacts, and close the MLflow run (FINISHED or FAILED)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.log_new_rounds()
            if self.cfg.get("log_samples", True) and (self.run_dir / "samples").is_dir():
                self.client.log_artifacts(self.run_id, str(self.run_dir / "samples"), "samples")
            for path in (report or {}).values():
                self.client.log_artifact(self.run_id, str(path), "report")
            if (self.run_dir / "summary.json").is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / "summary.json"), "run")
            if succeeded and self.cfg.get("log_classifier", True) and self.logged:
                self._log_classifier()
        finally:
            self.client.set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED")


def open_tracker(run: Mapping[str, Any]) -> MlflowTracker | None:
    """The tracker the run's ``tracking`` section asks for (None: tracking off)."""
    cfg = tracking_config(run)
    if cfg.get("backend", "none") == "none":
        return None
    return MlflowTracker(cfg, run)
