"""A search folder in a URI storage, and this machine's copy of it.

The store holds the truth; :class:`~stain_search.search_dir.SearchDir` paths
point into a local mirror of it (``stain_search.storage.mirror_of``). This
module moves files between the two, and nothing else knows how:

- :func:`pull`: before a command reads a search (``best``, ``export``,
  ``report``, ``status``, ``resume``): the record, the space, the summary, the
  study journal and every kept checkpoint's ``meta.json``. A checkpoint's
  weights are not copied: a pointer stands for them
  (``stain_search.checkpoint.STATE_POINTER``), fetched when loaded.
- :func:`push`: after the driver writes one of its files.
- :class:`JournalSync`: the driver's study journal, sent every few seconds
  while the search runs and once more at the end, so a search killed
  with its driver loses at most the last seconds of pruning reports (the
  trials' checkpoints and MLflow have them too).
- :func:`pull_trial` / :func:`push_checkpoint`: a trial's checkpoints,
  between its node's scratch and the store (``trainables/cyclegan.py``).

The study journal is append-only, so of two copies the longer one that
begins with the other is the newer: a driver restarted on the machine it
was killed on keeps its own longer journal rather than the store's.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from stain_search.checkpoint import (META_FILE, PREFIX, STATE_FILE, STATE_POINTER, checkpoint_name,
                                     prune_checkpoints)
from stain_search.storage import Remote

# ``sdir`` below is a stain_search.search_dir.SearchDir (which calls this module).

TOP_FILES = ("search.json", "space.yaml", "summary.json")
JOURNAL = "study.journal"
SKIPPED = ("tune", "exports")  # Tune's own state (Tune reads the store) and local outputs
SYNC_S = 5.0


def pull(sdir) -> None:
    """Bring the mirror up to date with the store (nothing to do for a local folder)."""
    if sdir.remote is None:
        return
    remote, root = sdir.remote, sdir.root
    listing = [(rel, is_dir) for rel, is_dir in remote.list(recursive=True)
               if rel.split("/")[0] not in SKIPPED]
    files = {rel for rel, is_dir in listing if not is_dir}
    root.mkdir(parents=True, exist_ok=True)
    for rel in files:
        name = rel.rsplit("/", 1)[-1]
        if rel in TOP_FILES or (rel.startswith("confirm/") and rel[8:] in TOP_FILES):
            remote.download(rel, root / rel)
        elif name == JOURNAL:
            _pull_journal(remote, rel, root / rel)
    _mirror_checkpoints(remote, root, files)


def pull_trial(sdir, number: int) -> Path:
    """One trial's checkpoints (meta + pointer) into the mirror; returns its folder."""
    folder = sdir.trial(number)
    if sdir.remote is not None:
        rel = f"trials/{folder.name}"
        files = {r for r, is_dir in sdir.remote.list(rel, recursive=True) if not is_dir}
        _mirror_checkpoints(sdir.remote, sdir.root, files, only=rel)
    return folder


def _mirror_checkpoints(remote: Remote, root: Path, files: set[str], *, only: str = "") -> None:
    """Each remote ``…/checkpoint_epoch_N/`` as meta.json + a pointer to its
    state.pt; local checkpoint folders the store no longer has are removed."""
    wanted = {}
    for rel in files:
        parts = rel.split("/")
        if len(parts) >= 2 and parts[-2].startswith(PREFIX) and parts[-1] == STATE_FILE \
                and f"{'/'.join(parts[:-1])}/{META_FILE}" in files:
            wanted["/".join(parts[:-1])] = rel
    for folder_rel, state_rel in wanted.items():
        local = root / folder_rel
        if not (local / META_FILE).is_file():
            remote.download(f"{folder_rel}/{META_FILE}", local / META_FILE)
        if not (local / STATE_FILE).is_file():
            (local / STATE_POINTER).write_text(remote.join(state_rel).uri + "\n")
    scope = root / only if only else root
    for local in scope.rglob(f"{PREFIX}*") if scope.is_dir() else ():
        if local.is_dir() and str(local.relative_to(root)) not in wanted:
            shutil.rmtree(local, ignore_errors=True)


def _pull_journal(remote: Remote, rel: str, local: Path) -> None:
    theirs = remote.read_bytes(rel)
    ours = local.read_bytes() if local.is_file() else b""
    if len(ours) > len(theirs) and ours.startswith(theirs):
        return  # ours is newer: the driver was stopped before its last sync
    from stain_search.atomic import atomic_write_bytes

    atomic_write_bytes(local, theirs)


def push(sdir, *paths: Path) -> None:
    """Send these files of the mirror to the store."""
    if sdir.remote is None:
        return
    for path in paths:
        if Path(path).exists():
            sdir.remote.upload(Path(path), Path(path).relative_to(sdir.root).as_posix())


class JournalSync:
    """``with JournalSync(sdir):`` the driver's study journal reaches the store
    every :data:`SYNC_S` seconds when it changed, and when the block ends."""

    def __init__(self, sdir):
        self.sdir = sdir
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent = -1
        self._lock = threading.Lock()

    def sync(self) -> None:
        path = self.sdir.study_journal
        with self._lock:
            size = path.stat().st_size if path.is_file() else -1
            if size != self._sent and size >= 0:
                push(self.sdir, path)
                self._sent = size

    def _loop(self) -> None:
        while not self._stop.wait(SYNC_S):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the next tick, or the final sync, retries
                pass

    def __enter__(self) -> "JournalSync":
        if self.sdir.remote is not None:
            self._thread = threading.Thread(target=self._loop, name="stain-search-journal-sync",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=SYNC_S + 5)
            self.sync()


# --- a trial's side ------------------------------------------------------------------

def pull_trial_scratch(remote: Remote, scratch: Path) -> None:
    """A (re)started trial's checkpoints, weights included, from the store into
    its node's scratch: the store's set exactly (it may have run elsewhere)."""
    listing = [r for r, is_dir in remote.list(recursive=True) if not is_dir]
    folders = {r.split("/")[0] for r in listing if r.startswith(PREFIX)}
    scratch.mkdir(parents=True, exist_ok=True)
    for local in scratch.glob(f"{PREFIX}*"):
        if local.name not in folders:
            shutil.rmtree(local, ignore_errors=True)
    for name in sorted(folders):
        want = {r.split("/", 1)[1] for r in listing if r.startswith(f"{name}/")}
        if {META_FILE, STATE_FILE} <= want and not (scratch / name / META_FILE).is_file():
            from stain_search.atomic import atomic_dir

            with atomic_dir(scratch / name) as tmp:
                for file in (STATE_FILE, META_FILE):
                    remote.download(f"{name}/{file}", tmp / file)


def push_checkpoint(remote: Remote, scratch: Path, checkpoint: Path, *, keep: int,
                    metric: str, mode: str) -> None:
    """Upload a new checkpoint (weights first, meta.json last: a reader that sees
    meta sees a whole checkpoint), then retire what retention dropped, here
    and in the store."""
    name = Path(checkpoint).name
    remote.upload(Path(checkpoint) / STATE_FILE, f"{name}/{STATE_FILE}")
    remote.upload(Path(checkpoint) / META_FILE, f"{name}/{META_FILE}")
    for gone in prune_checkpoints(scratch, keep=keep, metric=metric, mode=mode):
        remote.delete(gone.name)


def pull_checkpoint(remote: Remote, scratch: Path, *, epoch: int) -> Path | None:
    """A trial's complete checkpoint of ``epoch``, or its newest if that one is
    no longer kept, weights included, from the store into ``scratch`` (a PBT
    exploit takes its donor's); None if it has none."""
    listing = [r for r, is_dir in remote.list(recursive=True) if not is_dir]
    complete = sorted(name for name in {r.split("/")[0] for r in listing if r.startswith(PREFIX)}
                      if {f"{name}/{META_FILE}", f"{name}/{STATE_FILE}"} <= set(listing))
    if not complete:
        return None
    from stain_search.atomic import atomic_dir

    name = checkpoint_name(epoch) if checkpoint_name(epoch) in complete else complete[-1]
    with atomic_dir(Path(scratch) / name) as tmp:
        for file in (STATE_FILE, META_FILE):
            remote.download(f"{name}/{file}", tmp / file)
    return Path(scratch) / name
