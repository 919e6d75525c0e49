"""The feature folder written by :meth:`fastdiff.FeatureExtractor.extract_to`: shards, indexes and the run
they belong to, so that a folder never mixes two runs.

A folder holds one run:

- ``run.json``, written first: ``{"format": 2, "run": id, "settings_hash": h, "settings": {...},
  "world_size": W, "created": unix time}``; ``id`` is random (or the caller's ``run_id``), ``h`` the hash
  of the extraction settings (model class and a fingerprint of its weights, schedule, layers, timesteps,
  ensemble, seed, pool, upsample, concat, labels, dtype);
- ``shard-r{rank:03d}-{batch:06d}.safetensors``: the features of one batch, every file written under a
  temporary name and renamed into place; its safetensors metadata carries ``fastdiff.run``,
  ``fastdiff.settings``, ``fastdiff.rank``, ``fastdiff.batch``, ``fastdiff.start``, ``fastdiff.count``;
- ``index-rank{r}.json``: rank r's part, written when the rank starts (``"complete": false``, which marks
  the rank as having joined the run) and again when it ends (``"complete": true`` with its shards);
- ``index.json``, written last: the merge of every rank's complete index of this run.

Opening a folder for writing (:meth:`FeatureRun.open`): an empty (or missing) folder starts a new run;
a rank joins a run that it has not written to yet when the settings and the world size match (the other
ranks of one torchrun); any other run in the folder, an interrupted one included, is refused unless
``overwrite=True`` (its files are removed first, identified by their run) or ``resume=True`` (the run is
continued with identical settings, finished shards skipped). Under ``torch.distributed`` rank 0 decides
and the others join its run; without a process group, start rank 0 first or give every rank one
``run_id``, or a rank that starts before rank 0 has replaced an old run may join the old one (its
shards are then removed with it, and the merge refuses the incomplete new run: runs are never mixed).

:func:`merge_index` merges only the complete rank indexes of the run named in ``run.json`` (stale rank
indexes of earlier runs are ignored, a missing rank is an error), and :func:`load_features` checks that
every shard it reads belongs to the indexed run and covers the indexed images.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from fastdiff.io import TEMP_MARK, atomic_path, create_exclusive, write_json

__all__ = ["FORMAT", "FeatureRun", "FeatureFolderError", "settings_hash", "merge_index", "load_features",
           "read_run"]

FORMAT = 2
RUN_FILE, INDEX_FILE = "run.json", "index.json"
PathLike = Union[str, os.PathLike]


class FeatureFolderError(ValueError):
    """A feature folder that holds another run, mixes runs, or is incomplete."""


def settings_hash(settings: dict) -> str:
    """A short hash of the settings (canonical JSON)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rank_index_name(rank: int) -> str:
    return f"index-rank{rank}.json"


def shard_name(rank: int, batch: int) -> str:
    return f"shard-r{rank:03d}-{batch:06d}.safetensors"


def _read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _shard_meta(path: Path) -> Optional[dict]:
    """A shard's safetensors metadata (header only), or None when missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # truncated, corrupt or not a safetensors file
        return None


def _is_ours(name: str) -> bool:
    """Whether a file name is one fastdiff writes into a feature folder (or a temporary of one)."""
    base = name[1:].split(TEMP_MARK)[0] if name.startswith(".") and TEMP_MARK in name else name
    return base in (RUN_FILE, INDEX_FILE) or (base.startswith("index-rank") and base.endswith(".json")) or (
        base.startswith("shard-r") and base.endswith(".safetensors"))


def _file_run(path: Path) -> Optional[str]:
    """The run a folder file belongs to (None: no identity: an older format, a temporary, unreadable)."""
    if TEMP_MARK in path.name:
        return None
    if path.suffix == ".json":
        data = _read_json(path)
        return data.get("run") if data else None
    meta = _shard_meta(path)
    return meta.get("fastdiff.run") if meta else None


def read_run(folder: PathLike) -> Optional[dict]:
    """The ``run.json`` of a feature folder, or None."""
    return _read_json(Path(folder) / RUN_FILE)


def _describe(folder: Path, run: Optional[dict]) -> str:
    shards = sorted(p.name for p in folder.glob("shard-r*.safetensors"))
    if run is None:
        return f"files of an unidentified run (no readable {RUN_FILE}; {len(shards)} shards)"
    state = "complete" if (_read_json(folder / INDEX_FILE) or {}).get("run") == run.get("run") else \
        "interrupted or still running"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.get("created", 0)))
    return f"run {run.get('run')!r} ({state}, started {when}, {len(shards)} shards)"


def _settings_diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class FeatureRun:
    """One rank's handle on the run it writes into a feature folder (see the module docstring)."""

    def __init__(self, folder: Path, run: dict, rank: int, resumed: bool):
        self.folder, self.run, self.rank, self.resumed = folder, run, rank, resumed
        self.run_id: str = run["run"]
        self.world_size: int = run["world_size"]
        self.shards: list[dict] = []
        self._reopened = False

    # ---- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: PathLike, settings: dict, *, rank: int = 0, world_size: int = 1,
             overwrite: bool = False, resume: bool = False, run_id: Optional[str] = None) -> "FeatureRun":
        """Start, join, resume or replace the run in ``folder`` (created if missing; its parent must
        exist). Raises :class:`FeatureFolderError` when the folder holds another run and neither
        ``overwrite`` nor ``resume`` is given, or when ``resume`` meets other settings."""
        if overwrite and resume:
            raise ValueError("overwrite and resume exclude each other: overwrite replaces the run in the "
                             "folder, resume continues it")
        if run_id is not None and (not isinstance(run_id, str) or not run_id or "/" in run_id):
            raise ValueError(f"run_id must be a non-empty string without '/', got {run_id!r}")
        folder = Path(folder)
        if not folder.is_dir():
            if folder.exists():
                raise NotADirectoryError(f"folder: {str(folder)!r} exists and is not a folder")
            if not folder.resolve().parent.is_dir():
                raise FileNotFoundError(f"folder: the parent of {str(folder)!r} does not exist (create it first)")
            folder.mkdir(exist_ok=True)
        settings = json.loads(json.dumps(settings, default=str))  # as stored: tuples become lists
        digest = settings_hash(settings)
        for _ in range(8):  # a lost race for run.json (another rank created it) is decided again
            run = read_run(folder)
            legacy = run is None and any(_is_ours(p.name) and TEMP_MARK not in p.name for p in folder.iterdir())
            if run is None and not legacy:
                new = {"format": FORMAT, "run": run_id or secrets.token_hex(8), "settings_hash": digest,
                       "settings": settings, "world_size": world_size, "created": time.time(),
                       "host": socket.gethostname()}
                if cls._create_run_file(folder, new):
                    return cls(folder, new, rank, resumed=False)._start()
                continue
            joined = run is not None and (_read_json(folder / _rank_index_name(rank)) or {}).get("run") == run["run"]
            same = (run is not None and run.get("settings_hash") == digest
                    and run.get("world_size") == world_size)
            complete = run is not None and (_read_json(folder / INDEX_FILE) or {}).get("run") == run["run"]
            wanted = run_id is None or (run is not None and run["run"] == run_id)
            if run is not None and same and wanted and not joined and not complete:
                return cls(folder, run, rank, resumed=False)._start()  # a sibling rank's run
            if resume:
                if run is None:
                    raise FeatureFolderError(f"folder {str(folder)!r} holds {_describe(folder, run)}: it cannot "
                                             "be resumed; pass overwrite=True to replace it")
                if not wanted:
                    raise FeatureFolderError(f"resume: folder {str(folder)!r} holds run {run['run']!r}, not "
                                             f"run_id {run_id!r}")
                if not same:
                    diff = _settings_diff(run.get("settings") or {}, settings)
                    if run.get("world_size") != world_size:
                        diff.append(f"world_size ({run.get('world_size')} there, {world_size} here)")
                    raise FeatureFolderError(f"resume needs the settings of the run in {str(folder)!r}; these "
                                             f"differ: {', '.join(diff)}. Pass overwrite=True to replace it")
                return cls(folder, run, rank, resumed=True)._start()
            if not overwrite:
                raise FeatureFolderError(
                    f"folder {str(folder)!r} holds another feature run: {_describe(folder, run)}. Pass "
                    "overwrite=True to replace it, resume=True to continue it (identical settings), or "
                    "another folder")
            cls._remove_run(folder, run["run"] if run is not None else None)
            overwrite = False  # replaced once; what is found next is a new run (maybe a sibling's)
        raise FeatureFolderError(f"folder {str(folder)!r}: could not settle which run it holds (other "
                                 "processes keep changing it)")

    @staticmethod
    def _create_run_file(folder: Path, run: dict) -> bool:
        """Create run.json only if absent; False when another process created it first."""
        return create_exclusive(folder / RUN_FILE, json.dumps(run, indent=1).encode(), argument="folder")

    @staticmethod
    def _remove_run(folder: Path, run_id: Optional[str]) -> None:
        """Remove the files of run ``run_id`` and the leftovers of any run that is not the folder's
        current one (files with no identity, temporaries, other runs' files), keeping run.json to last
        so that an interrupted removal is still seen as that run. A file of the run named in run.json at
        the moment it is looked at is kept unless that run is ``run_id``: a sibling rank that has already
        started the next run (its run.json is created before any of its files) keeps its files."""
        for path in sorted(folder.iterdir()):
            if not path.is_file() or not _is_ours(path.name) or path.name == RUN_FILE:
                continue
            owner = _file_run(path)
            current = (read_run(folder) or {}).get("run")
            if owner is None or owner == run_id or owner != current:
                path.unlink(missing_ok=True)
        if (read_run(folder) or {}).get("run") in (run_id, None):
            (folder / RUN_FILE).unlink(missing_ok=True)

    def _start(self) -> "FeatureRun":
        mine = _read_json(self.folder / _rank_index_name(self.rank)) or {}
        if not (self.resumed and mine.get("run") == self.run_id):
            self._write_rank_index(complete=False, num_images=None)  # this rank has joined the run
        return self

    def _reopen(self) -> None:
        """Before a resumed run changes its first shard: its index and this rank's part are no longer
        complete (index.json comes back when the run completes)."""
        if self.resumed and not self._reopened:
            self._reopened = True
            index = self.folder / INDEX_FILE
            if (_read_json(index) or {}).get("run") == self.run_id:
                index.unlink()
            self._write_rank_index(complete=False, num_images=None)

    # ---- writing --------------------------------------------------------------------------------

    def finished(self, batch: int, start: int, count: int) -> bool:
        """Whether a resumed run already holds this rank's shard of ``batch`` for images
        ``[start, start + count)`` (then it is recorded and not extracted again)."""
        if not self.resumed:
            return False
        name = shard_name(self.rank, batch)
        meta = _shard_meta(self.folder / name)
        if meta is None or meta.get("fastdiff.run") != self.run_id or meta.get("fastdiff.start") != str(start) \
                or meta.get("fastdiff.count") != str(count):
            return False
        self.shards.append({"file": name, "start": start, "count": count, "batch": batch})
        return True

    def write_shard(self, batch: int, start: int, count: int, tensors: dict[str, Tensor]) -> str:
        from safetensors.torch import save_file

        self._reopen()
        name = shard_name(self.rank, batch)
        meta = {"fastdiff.format": str(FORMAT), "fastdiff.run": self.run_id,
                "fastdiff.settings": self.run["settings_hash"], "fastdiff.rank": str(self.rank),
                "fastdiff.batch": str(batch), "fastdiff.start": str(start), "fastdiff.count": str(count)}
        with atomic_path(self.folder / name, argument="folder") as tmp:
            save_file(tensors, tmp, metadata=meta)
        self.shards.append({"file": name, "start": start, "count": count, "batch": batch})
        return name

    def _write_rank_index(self, complete: bool, num_images: Optional[int]) -> None:
        meta = {"format": FORMAT, "run": self.run_id, "settings_hash": self.run["settings_hash"],
                **(self.run.get("settings") or {}),
                "rank": self.rank, "world_size": self.world_size, "complete": complete,
                "num_images": num_images, "shards": list(self.shards)}
        write_json(self.folder / _rank_index_name(self.rank), meta, argument="folder")

    def finish(self, num_images: int) -> None:
        """Record this rank's part as complete (its index written after its last shard)."""
        self._write_rank_index(complete=True, num_images=num_images)


# ---------------------------------------------------------------------------------------------
# merging and reading
# ---------------------------------------------------------------------------------------------


def merge_index(folder: PathLike) -> dict:
    """Merge the complete ``index-rank*.json`` of the run in ``run.json`` into ``index.json`` (written last;
    shards sorted by start). Rank indexes of other runs are ignored; a rank of this run that is missing or
    did not finish is an error (nothing is written)."""
    folder = Path(folder)
    run = read_run(folder)
    if run is None:
        if list(folder.glob("index-rank*.json")):
            raise FeatureFolderError(f"folder {str(folder)!r} has rank indexes but no {RUN_FILE} (written by an "
                                     "older fastdiff, or not a feature folder): their runs cannot be told "
                                     "apart, so they are not merged; extract again with overwrite=True")
        raise FeatureFolderError(f"folder {str(folder)!r} is not a feature folder (no {INDEX_FILE}, no {RUN_FILE})")
    parts, missing = [], []
    for r in range(run["world_size"]):
        part = _read_json(folder / _rank_index_name(r))
        if part is None or part.get("run") != run["run"] or not part.get("complete"):
            missing.append(r)
        else:
            parts.append(part)
    if missing:
        raise FeatureFolderError(f"folder {str(folder)!r}: run {run['run']!r} is incomplete: rank(s) {missing} of "
                                 f"{run['world_size']} have not finished (no complete "
                                 f"{_rank_index_name(missing[0])} of this run)")
    merged = {k: v for k, v in parts[0].items() if k not in ("rank", "shards", "complete")}
    merged["num_images"] = max(p["num_images"] for p in parts)
    merged["shards"] = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["start"])
    write_json(folder / INDEX_FILE, merged, argument="folder")
    return merged


def load_features(folder: PathLike) -> dict[str, Tensor]:
    """Every shard of a feature folder concatenated in stream order: ``{key: tensor}`` (with "index", and
    "labels" when stored). Merges the rank indexes first when ``index.json`` is missing. Raises
    :class:`FeatureFolderError` when a shard does not belong to the indexed run or does not hold the
    images the index says."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: {str(folder)!r} is not a folder")
    index_path = folder / INDEX_FILE
    meta = _read_json(index_path) if index_path.exists() else merge_index(folder)
    if meta is None or not isinstance(meta.get("shards"), list):
        raise FeatureFolderError(f"{str(index_path)!r} is not a readable feature index")
    run_id = meta.get("run")
    if run_id is None:
        warnings.warn(f"{str(index_path)!r} was written by an older fastdiff without a run identity: its shards "
                      "cannot be checked to belong to one run", stacklevel=2)
    chunks: dict[str, list] = {}
    for shard in meta["shards"]:
        path = folder / shard["file"]
        try:
            f = safe_open(str(path), "pt")
        except Exception as e:
            raise FeatureFolderError(f"shard {str(path)!r} listed in the index is missing or unreadable: "
                                     f"{type(e).__name__}: {e}") from None
        with f:
            info = dict(f.metadata() or {})
            if run_id is not None:
                if info.get("fastdiff.run") != run_id:
                    raise FeatureFolderError(
                        f"shard {str(path)!r} belongs to run {info.get('fastdiff.run')!r}, not to the indexed run "
                        f"{run_id!r}: the folder mixes runs; extract again with overwrite=True")
                if info.get("fastdiff.start") != str(shard["start"]) or info.get("fastdiff.count") != str(
                        shard["count"]):
                    held = f"[{info.get('fastdiff.start')}, +{info.get('fastdiff.count')})"
                    raise FeatureFolderError(f"shard {str(path)!r} holds images {held} but the index says "
                                             f"[{shard['start']}, +{shard['count']})")
            for k in f.keys():
                chunks.setdefault(k, []).append(f.get_tensor(k))
    return {k: torch.cat(v) for k, v in chunks.items()}
