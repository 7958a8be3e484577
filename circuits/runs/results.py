"""Results on disk: parquet parts written atomically, a manifest, and resumable runs.

A run directory holds one folder per table (`tokens/`, `images/`, ...) of parquet parts,
one part per batch, each written to a temporary file and renamed into place, and a
`manifest.json` recording the run's settings and which dataset indices are done. A rerun
with the same settings skips the done indices; a rerun with different settings refuses
to mix results. `pandas.read_parquet(run_dir / "images")` loads a table in one line.

Under torchrun (`circuits.runs.distributed`) each rank writes its own parts (batches are
disjoint) and its own manifest part (`manifest-rank<r>.json`, rank 0 keeps
`manifest.json`); the done set is the union of all parts, so any number of processes
resumes any earlier run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from circuits.files import atomic_write_bytes, atomic_write_text
from circuits.runs.distributed import Dist, init_distributed

from hooked_vit.errors import UserError

log = logging.getLogger("circuits.runs.results")


# Settings recorded for reading but not part of a run's identity: the model as it was named
# (a path, relative or absolute: the weights fingerprint identifies it) and how many items were
# asked for and how they were sampled (a larger --limit continues the same run).
RECORDED_ONLY = frozenset({"model", "n", "limit_sample"})


class RunStore:
    """A results directory for one analysis run.

    Args:
        root: the run directory (created if needed).
        settings: everything that determines the results (weights fingerprint, dataset
            content, sites, k, ...); a rerun must pass equal settings to resume, except the
            keys in RECORDED_ONLY, which the rerun updates.
        overwrite: start afresh, deleting earlier parts.
    """

    def __init__(self, root: str | Path, settings: dict[str, Any], overwrite: bool = False,
                 dist: Optional[Dist] = None):
        self.dist = dist if dist is not None else init_distributed()
        self.root = Path(root)
        self.settings = json.loads(json.dumps(settings, default=str))
        # Under torchrun every rank opens the store; rank 0 alone deletes, and nobody writes
        # until every rank has read the same done set (so all compute the same shards).
        if overwrite and self.dist.is_main and manifest_files(self.root):
            clear_run(self.root)
        self.dist.barrier()
        self.reload()
        self.dist.barrier()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            self._drop_orphan_parts()
            self._save_manifest()  # readers find the settings even if rank 0 has no batch
        self.dist.barrier()

    @property
    def manifest_path(self) -> Path:
        """This process' own manifest part: rank 0 writes manifest.json, rank r another file."""
        name = "manifest.json" if self.dist.rank == 0 else f"manifest-rank{self.dist.rank:05d}.json"
        return self.root / name

    def reload(self) -> None:
        """The done set and skipped records: the union of every rank's manifest part, so a
        rerun with any number of processes resumes every shard."""
        self.done: set[int] = set()
        self.parts: dict[str, dict] = {}  # part id -> {"tables": {table: rows}, "indices": [...]}
        skipped: dict[int, dict] = {}
        for manifest in manifest_files(self.root):
            state = load_manifest_file(manifest)
            if not state["done"] and not state.get("skipped") and not has_results(self.root):
                continue  # a run that stopped before any work locks nothing (issue 23 item 7)
            old = state["settings"]
            diff = {k: (old.get(k), self.settings.get(k)) for k in {*old, *self.settings} - RECORDED_ONLY
                    if old.get(k) != self.settings.get(k)}
            if diff:
                raise UserError(
                    f"{self.root} holds results of a run with other settings {diff} (old, new); "
                    "use another output directory or pass overwrite=True (--overwrite)"
                )
            self.done.update(state["done"])
            self.parts.update(state.get("parts", {}))
            skipped.update((int(r["index"]), r) for r in state.get("skipped", []))
        self.skipped: list[dict] = [skipped[i] for i in sorted(skipped)]
        # Parts the manifest lists that are gone or damaged: their items are redone.
        for part_id, problem in damaged_parts(self.root, self.parts).items():
            log.warning("%s: %s; its %d items are recomputed", self.root, problem, len(self.parts[part_id]["indices"]))
            self.done.difference_update(self.parts.pop(part_id)["indices"])

    def _drop_orphan_parts(self) -> None:
        """A part written by a run that stopped before marking its batch done is removed:
        the batch is redone, so nothing is counted twice."""
        for part in self.root.glob("*/part-*.parquet"):
            try:
                schema = pq.read_schema(part)
            except (pa.ArrowException, OSError) as err:
                if self.done and not self.parts:  # a manifest from before parts were listed
                    raise UserError(f"{part} is damaged ({err}); rerun with --overwrite (overwrite=True) to start "
                                    "the run afresh") from None
                part.unlink()  # unlisted (its batch never finished) or listed and damaged: redone
                continue
            if "index" not in schema.names:
                continue  # run-level tables carry no dataset index
            indices = pq.read_table(part, columns=["index"]).column("index").to_pylist()
            if not set(indices) <= self.done:
                part.unlink()

    def pending(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if i not in self.done]

    def write_batch(self, part_id: int, tables: dict[str, pa.Table], indices: Iterable[int],
                    skipped: Iterable[dict] = ()) -> None:
        """Write one batch's tables, then mark its indices done (in that order, so a crash
        between the two redoes the batch rather than losing it)."""
        indices = [int(i) for i in indices]
        for name, table in tables.items():
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            atomic_write_bytes(self.root / name / f"part-{part_id:09d}.parquet", sink.getvalue().to_pybytes())
        if tables:  # what the manifest expects on disk, verified on resume and on read
            self.parts[f"{part_id:09d}"] = {"tables": {n: t.num_rows for n, t in tables.items()}, "indices": indices}
        self.done.update(indices)
        self.skipped.extend(skipped)
        self._save_manifest()

    def _save_manifest(self, **extra: Any) -> None:
        state = {"settings": self.settings, "done": sorted(self.done), "skipped": self.skipped, "parts": self.parts,
                 **extra}
        atomic_write_text(self.manifest_path, json.dumps(state))

    def write_json(self, name: str, obj: Any) -> None:
        """A run-level file, written by rank 0 only (every rank computes the same object)."""
        if self.dist.is_main:
            atomic_write_text(self.root / name, json.dumps(obj, indent=2, default=_json_default))

    def read(self, table: str) -> pd.DataFrame:
        return read_table(self.root, table)


def read_table(root: str | Path, table: str) -> pd.DataFrame:
    """Load one table of a run directory (all parts), sorted by dataset index."""
    folder = Path(root) / table
    listed = _listed_parts(root)
    problems = [problem for pid, problem in damaged_parts(root, listed).items() if table in listed[pid]["tables"]]
    if problems:
        raise UserError(f"{problems[0]}: rerun the same command to recompute the missing items, or rerun with "
                        "--overwrite to start afresh")
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no results in {folder}; run the analysis first")
    df = pd.concat([_read_part(p) for p in parts], ignore_index=True)
    order = [c for c in ("index", "site", "layer") if c in df.columns]
    return df.sort_values(order, kind="stable").reset_index(drop=True) if order else df


def _read_part(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path} is damaged ({err}); rerun the same command to recompute it, or rerun with "
                        "--overwrite to start afresh") from None


def _listed_parts(root: str | Path) -> dict[str, dict]:
    parts: dict[str, dict] = {}
    for manifest in manifest_files(root):
        parts.update(load_manifest_file(manifest).get("parts", {}))
    return parts


def damaged_parts(root: str | Path, parts: dict[str, dict]) -> dict[str, str]:
    """part id -> what is wrong, for each part the manifest lists that is missing, unreadable or
    holds another number of rows than was written."""
    problems = {}
    for part_id, info in parts.items():
        for table, rows in info["tables"].items():
            path = Path(root) / table / f"part-{part_id}.parquet"
            if not path.exists():
                problems[part_id] = f"{path} is missing"
                break
            try:
                found = pq.read_metadata(path).num_rows
            except (pa.ArrowException, OSError) as err:
                problems[part_id] = f"{path} is damaged ({err})"
                break
            if found != rows:
                problems[part_id] = f"{path} holds {found} rows, {rows} were written"
                break
    return problems


def has_results(root: str | Path) -> bool:
    """Whether a run directory holds anything beyond its manifests and labels.json (tables,
    a summary, a nested run): a run with nothing written has not started its work."""
    bookkeeping = lambda p: p.name in ("manifest.json", "labels.json") or p.name.startswith(("manifest-rank", "."))  # noqa: E731
    return any(not bookkeeping(p) for p in Path(root).iterdir())


def load_manifest_file(path: Path) -> dict:
    """One manifest file, parsed; an empty or damaged one is refused naming the file and the fix."""
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or "settings" not in state or "done" not in state:
            raise UserError("it lacks the settings and done items")
    except ValueError as err:  # json.JSONDecodeError included
        raise UserError(f"{path} is damaged ({err}); rerun with --overwrite (overwrite=True) to start the run "
                        "afresh") from None
    return state


def clear_run(root: Path) -> None:
    """Everything a run wrote into its directory (tables, run-level files, manifests), for
    overwrite. Only called on a run directory (one with a manifest); runs nested inside it (a
    folder with its own manifest, e.g. `sae train`'s activations) are left alone."""
    for child in root.iterdir():
        if child.is_dir():
            if not manifest_files(child):
                shutil.rmtree(child)
        else:
            child.unlink()


def manifest_files(root: str | Path) -> list[Path]:
    """Every rank's manifest part of a run directory (manifest.json first)."""
    root = Path(root)
    return [p for p in [root / "manifest.json", *sorted(root.glob("manifest-rank*.json"))] if p.exists()]


def read_manifest(root: str | Path) -> dict:
    """A run's settings, and its done indices and skipped records over every rank's part."""
    files = manifest_files(root)
    if not files:
        raise FileNotFoundError(f"no manifest.json in {root}; run the analysis first")
    states = [load_manifest_file(p) for p in files]
    skipped = {int(r["index"]): r for state in states for r in state.get("skipped", [])}
    return {**states[0], "done": sorted(set().union(*(state["done"] for state in states))),
            "skipped": [skipped[i] for i in sorted(skipped)]}


def fixed_size_list(values: np.ndarray) -> pa.Array:
    """[rows, n] numpy -> a parquet fixed-size list column (compact, no per-row objects)."""
    rows, n = values.shape[0], int(np.prod(values.shape[1:]))
    flat = pa.array(np.ascontiguousarray(values).reshape(rows * n))
    return pa.FixedSizeListArray.from_arrays(flat, n)


def stack_column(df: pd.DataFrame, column: str) -> np.ndarray:
    """A list column back to a dense [rows, n] array."""
    return np.stack(df[column].to_numpy())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)

