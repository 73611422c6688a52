"""The one versioned-table store: every table qmoe measures and keeps on disk goes through it.

Two tables use it today: the tuning table (`qmoe tune`: how fast each backend ran each shape,
read by backend="auto") and the triton backend's launch-config table (`qmoe tune --kernels`).

    store = TableStore(kind="qmoe-tuning", filename="tuning.json", env_var="QMOE_TUNING_FILE")
    table = store.read()                       # {"schema", "kind", "entries": {key: entry}}
    store.update(lambda entries: entries.update(new))   # locked, atomic merge

One file holds many entries, each keyed by the problem it measured and the library versions
it was measured under (`entry_key`): environments that share one cache file keep their own
measurements, and an entry measured under other versions never chooses anything (`stale`).

Where: an explicit path > $<env_var> > $XDG_CACHE_HOME/qmoe/<filename> > ~/.cache/qmoe/<filename>.

Damage: a table that cannot be read (missing is fine; a folder at the path, unreadable or non-
UTF-8 bytes, invalid JSON, another schema or kind, fields of the wrong type) is ignored with a
warning that names the file, and a damaged entry is skipped with a warning naming its key;
nothing raises out of `read`. `update` replaces a damaged file (after the same warning).

Concurrency: readers never lock; a writer takes an exclusive lock on "<file>.lock" (fcntl.flock),
re-reads the file, applies its change, writes a temporary file in the same folder, fsyncs it and
renames it over the table (os.replace is atomic), so a reader sees the old table or the new one,
and concurrent writers do not lose each other's entries.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

SCHEMA = 2
"""Layout of every table file: {"schema": 2, "kind": <kind>, "entries": {key: entry}}."""


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/qmoe, else ~/.cache/qmoe."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "qmoe"


def entry_key(problem: str, versions: dict) -> str:
    """"<problem>|<lib> <version> ...": the versions sorted by library name, '-' for None."""
    return problem + "|" + " ".join(f"{k} {v or '-'}" for k, v in sorted(versions.items()))


def stale(problem: str, versions: dict, entries: dict) -> list:
    """[(key, why)] for entries of the same problem measured under other library versions."""
    out = []
    for key, entry in entries.items():
        if key.startswith(problem + "|") and isinstance(entry, dict):
            theirs = entry.get("versions") if isinstance(entry.get("versions"), dict) else {}
            diff = ", ".join(f"{k} {theirs.get(k) or '-'} (now {v or '-'})"
                             for k, v in sorted(versions.items()) if theirs.get(k) != v)
            if diff:
                out.append((key, diff))
    return out


class TableStore:
    """A JSON table of entries in one file (see the module doc).

    kind: names what the file holds (a file of another kind is not read as this one);
    filename: the file's name in the cache folder; env_var: the variable that overrides the path;
    validate: entry -> None if usable, else why not (entries failing it are skipped on read).
    """

    def __init__(self, kind: str, filename: str, env_var: str, validate=None):
        self.kind, self.filename, self.env_var = kind, filename, env_var
        self.validate = validate or (lambda entry: None if isinstance(entry, dict) else "not a JSON object")

    def path(self, path=None) -> Path:
        """The table's path: `path` if given, else $env_var, else the cache folder's file."""
        if path is not None:
            return Path(os.fspath(path)).expanduser()
        if os.environ.get(self.env_var):
            return Path(os.environ[self.env_var]).expanduser()
        return cache_dir() / self.filename

    def empty(self) -> dict:
        return {"schema": SCHEMA, "kind": self.kind, "entries": {}}

    def read(self, path=None, *, warn: bool = True) -> dict:
        """The table (an empty one when the file is missing or damaged, with a warning); never raises."""
        path = self.path(path)
        table, why = self._load(path)
        if why is not None:
            if warn:
                warnings.warn(f"qmoe: ignoring {self.kind} table {path}: {why}", stacklevel=2)
            return self.empty()
        if table is None:
            return self.empty()
        good = {}
        for key, entry in table["entries"].items():
            bad = self._entry_problem(entry)
            if bad is None:
                good[key] = entry
            elif warn:
                warnings.warn(f"qmoe: ignoring entry {key!r} of {self.kind} table {path}: {bad}", stacklevel=2)
        table["entries"] = good
        return table

    def _entry_problem(self, entry):
        try:
            return self.validate(entry)
        except Exception as e:  # a validator meeting a field of the wrong type: the entry is damaged
            return f"{type(e).__name__}: {e}"

    def _load(self, path: Path):
        """(table or None if missing, None) or (None, why it cannot be used)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None, None
        except IsADirectoryError:
            return None, "it is a folder, not a file"
        except OSError as e:
            return None, f"cannot be read ({type(e).__name__}: {e})"
        try:
            table = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, f"it is not UTF-8 text ({e})"
        except json.JSONDecodeError as e:
            return None, f"it is not valid JSON ({e})"
        if not isinstance(table, dict):
            return None, f"expected a JSON object, got {type(table).__name__}"
        if table.get("schema") != SCHEMA or table.get("kind") != self.kind:
            return None, (f"it holds schema {table.get('schema')!r} of kind {table.get('kind')!r}, this qmoe "
                          f"reads schema {SCHEMA} of kind {self.kind!r} (run the command that writes it to "
                          f"replace it)")
        if not isinstance(table.get("entries"), dict):
            return None, f"'entries' is not a JSON object (got {type(table.get('entries')).__name__})"
        return table, None

    def check_writable(self, path=None) -> Path:
        """The path, after making sure a table can be written there (ValueError naming the file
        and why not): run before long work, so that no measurement is lost at the end."""
        path = self.path(path)
        if path.is_dir():
            raise ValueError(f"{self.kind} table {path}: is a folder; give a file path")
        folder = path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{self.kind} table {path}: cannot create folder {folder} ({e})") from None
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"{self.kind} table {path}: not writable")
        return path

    def update(self, change, path=None) -> Path:
        """Apply change(entries) (it edits the dict in place) to the table at `path`, atomically
        and under the lock; a damaged file is replaced (with a warning). Returns the path."""
        path = self.check_writable(path)
        with _Locked(path.with_name(path.name + ".lock")):
            table, why = self._load(path)
            if why is not None:
                warnings.warn(f"qmoe: replacing damaged {self.kind} table {path}: {why}", stacklevel=2)
            if table is None:
                table = self.empty()
            entries = {k: v for k, v in table["entries"].items() if self._entry_problem(v) is None}
            change(entries)
            table["entries"] = entries
            _atomic_write(path, table)
        return path


def _atomic_write(path: Path, table: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class _Locked:
    """An exclusive advisory lock on a lock file (kept, never deleted: deleting it races)."""

    def __init__(self, lock_path: Path):
        self.lock_path = lock_path

    def __enter__(self):
        self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # no flock (Windows): writes stay atomic, concurrent merges may lose one
            return self
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the flock


def _fsync_dir(folder: Path):
    # make the rename itself durable; not every platform lets a folder be opened
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["SCHEMA", "TableStore", "cache_dir", "entry_key", "stale"]
