"""The sweep manifest ``<results dir>/<sweep>/manifest.json``: what was planned and what was submitted.

One typed document per sweep (:class:`Manifest`)::

    sweep, updated, models, experiments (name → resolved config)
    units        the latest plan: one (experiment, model) store each, with its shard count and job template
    submissions  one per submit / resubmit (``command``, ``executor``, ``time``, pinned Hub revisions) or
                 in-process run (``mode: debug``)
      arrays     one per submitted SLURM array (model, template, resources, throttle)
        tasks    one per array task: its job id, its (experiment, shard) work list, its stdout/stderr

Contracts: :meth:`Manifest.path` is the only place that builds the file's path; :meth:`Manifest.edit`
is the only read-modify-write (under an exclusive ``fcntl`` lock on ``.manifest.json.lock`` beside it, so
concurrent submits never lose each other's updates: read or start, change, save atomically via a temp file +
rename). A submission is recorded **before** ``sbatch`` with ``state: pending`` and completed after
(:meth:`Manifest.update_submission`: ``submitted``, or ``failed``/``partial`` with the error), so a
submitter that dies or cannot write in between leaves a manifest whose pending submission ``status`` reports;
:meth:`Manifest.load` is what the commands read, refusing a missing or unreadable manifest with one line
naming ``--sweep``. Readers are lenient about fields an older bayesflip did not write (defaults) and
keep fields they do not know (``extra="allow"``), so a manifest survives a round trip through any version.
Store paths are never taken from the manifest: a store is always ``<results dir>/<sweep>/<experiment>/
<model>.zarr`` under the results dir given now (a moved or copied sweep reads its own stores).
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from ..config import check_name
from ..errors import BayesflipError, ConfigError
from ..paths import RESULTS_DIR
from ..atomic import atomic_write_text, file_lock

FILENAME = "manifest.json"


class ManifestError(BayesflipError):
    """The manifest exists but cannot be read (not JSON, or not a manifest)."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def parse_time(s: Optional[str]) -> Optional[_dt.datetime]:
    try:
        return _dt.datetime.fromisoformat(s) if s else None
    except ValueError:
        return None


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)   # job ids written as numbers


class TaskRecord(_Doc):
    """One array task: its SLURM job id (``123_4``) and the (experiment, shard) pairs it was given."""

    task: int = 0
    job_id: str
    work: list[tuple[str, int]] = []
    stdout: str = ""
    stderr: str = ""


class ArrayRecord(_Doc):
    """One submitted job array: every task loads ``model`` with ``template``'s resources."""

    model: str
    template: Optional[str] = None
    array_id: str
    resources: Optional[dict] = None
    throttle: Optional[int] = None
    n_tasks: Optional[int] = None
    tasks: list[TaskRecord] = []


class Submission(_Doc):
    """One ``submit``/``resubmit`` (``command``, ``executor``, ``arrays``) or in-process run (``mode``)."""

    command: Optional[str] = None
    executor: Optional[str] = None       # absent in old manifests: slurm
    mode: Optional[str] = None           # "debug": an in-process run, no arrays
    time: Optional[str] = None
    arrays: list[ArrayRecord] = []
    pinned_revisions: Optional[dict[str, str]] = None
    uid: Optional[str] = None            # set when recorded before sbatch (absent in old manifests)
    state: Optional[str] = None          # pending (sbatch not yet answered) | submitted | partial | failed
    error: Optional[str] = None

    @property
    def on_slurm(self) -> bool:
        return (self.executor or "slurm") == "slurm"

    @property
    def pending(self) -> bool:
        """Recorded before sbatch and never completed: its arrays may run without being recorded here."""
        return self.state == "pending"


class PlannedUnit(_Doc):
    """One (experiment, model) store of the latest plan (``store`` is relative to the sweep's folder)."""

    experiment: str
    model: str
    store: str = ""
    n_shards: int
    template: Optional[str] = None


def new_uid() -> str:
    return uuid.uuid4().hex[:12]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<dir>/.manifest.json.lock`` for the duration (released when the process
    dies, so a killed submitter never blocks the next one)."""
    with file_lock(path.with_name(f".{path.name}.lock")):
        yield


class Manifest(_Doc):
    sweep: str
    updated: Optional[str] = None
    models: list[str] = []
    experiments: dict[str, dict] = {}
    units: list[PlannedUnit] = []
    submissions: list[Submission] = []

    # ------------------------------------------------------------------ where and how it is stored
    @staticmethod
    def path(sweep: str, results_dir: Path | str | None = None) -> Path:
        """``<results dir>/<sweep>/manifest.json`` (the default results dir when None)."""
        return Path(results_dir or RESULTS_DIR) / sweep / FILENAME

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        """The manifest at ``path``; :class:`ManifestError` when it is not JSON or not a manifest."""
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:    # json.JSONDecodeError and pydantic's ValidationError are ValueErrors
            why = f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']}" if isinstance(e, ValidationError) else str(e)
            raise ManifestError(f"unreadable manifest {path}: {why}") from None

    @classmethod
    def read_if_exists(cls, sweep: str, results_dir: Path | str | None = None) -> Optional["Manifest"]:
        """The sweep's manifest, or None when there is none; :class:`ManifestError` when unreadable."""
        path = cls.path(sweep, results_dir)
        return cls.read(path) if path.exists() else None

    @classmethod
    def load(cls, sweep: str, results_dir: Path | str | None = None) -> "Manifest":
        """What ``status``/``resubmit`` read: one ``--sweep`` error line when missing (naming the sweeps that
        have one) or unreadable."""
        check_name(sweep, "--sweep")
        path = cls.path(sweep, results_dir)
        if not path.exists():
            root = Path(results_dir or RESULTS_DIR)
            known = sorted(p.parent.name for p in root.glob(f"*/{FILENAME}")) if root.exists() else []
            raise ConfigError("--sweep", f"no manifest at {path}: plan or submit the sweep first", allowed=known)
        try:
            return cls.read(path)
        except ManifestError as e:
            raise ConfigError("--sweep", str(e)) from None

    def save(self, results_dir: Path | str | None = None) -> Path:
        """Write atomically (temp file + rename); returns the path."""
        path = self.path(self.sweep, results_dir)
        atomic_write_text(path, json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2, default=str))
        return path

    @classmethod
    @contextmanager
    def edit(cls, sweep: str, results_dir: Path | str | None = None) -> Iterator["Manifest"]:
        """Read the sweep's manifest (or start an empty one), let the caller change it, save it.

        An unreadable manifest is never overwritten: :class:`ManifestError`, nothing written."""
        with _locked(cls.path(sweep, results_dir)):
            m = cls.read_if_exists(sweep, results_dir) or cls(sweep=sweep)
            yield m
            m.updated = now_iso()
            m.save(results_dir)

    @classmethod
    def update_submission(cls, sweep: str, uid: str, results_dir: Path | str | None = None, **fields) -> None:
        """Set ``fields`` (state, arrays, error) of the submission ``uid`` (under the lock)."""
        with cls.edit(sweep, results_dir) as m:
            for sub in m.submissions:
                if sub.uid == uid:
                    for k, v in fields.items():
                        setattr(sub, k, v)
                    return
            raise ManifestError(f"{cls.path(sweep, results_dir)}: no submission {uid} (edited by hand?)")

    def pending_submissions(self) -> list[Submission]:
        return [s for s in self.submissions if s.pending]

    # ------------------------------------------------------------------ what the cluster side asks
    def slurm_array_ids(self) -> list[str]:
        """Every SLURM array id of every submission (local-executor submissions have none)."""
        return [str(a.array_id) for s in self.submissions if s.on_slurm for a in s.arrays]

    def latest_tasks(self) -> dict[tuple[str, str, int], tuple[str, Optional[_dt.datetime], str]]:
        """(model, experiment, shard) → (job id, submission time, stderr path) of the latest task given it."""
        out = {}
        for sub in self.submissions:
            when = parse_time(sub.time)
            for arr in sub.arrays:
                for t in arr.tasks:
                    for exp, shard in t.work:
                        out[(arr.model, exp, int(shard))] = (str(t.job_id), when, t.stderr)
        return out

    def submitted_units(self) -> list[tuple[str, str]]:
        """(experiment, model) of every task of every submission, in order, without repeats."""
        seen: dict[tuple[str, str], None] = {}
        for sub in self.submissions:
            for arr in sub.arrays:
                for t in arr.tasks:
                    for exp, _ in t.work:
                        seen.setdefault((exp, arr.model), None)
        return list(seen)
