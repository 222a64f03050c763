"""Where searches are kept: a local folder, or a URI of a filesystem pyarrow knows.

``--storage`` is either a local path (one machine, or a filesystem every node
mounts: ``--shared-fs``) or a URI — ``s3://bucket/runs``, ``gs://bucket/runs``,
``hdfs://…`` — the same kinds Ray Tune and Train take as ``storage_path``.
This module is the one place that talks to such a store, through
``pyarrow.fs``. Credentials and endpoints come from the store client's own
environment and files (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``...); nothing here
reads, logs or passes them on.

With a URI storage, everything a search keeps lives in the store; a
machine works on local copies:

- the driver and every reading command keep a **mirror** of a search's small
  files (record, space, study journal, summary, checkpoints' ``meta.json``)
  under :func:`mirror_root`; a checkpoint's weights stay in the store until a
  command loads them (``stain_search.checkpoint`` fetches them then);
- a trial writes its checkpoints into node-local **scratch**
  (:func:`scratch_root`) and uploads each before Tune hears of its epoch, so
  no other node ever needs a trial node's disk.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from stain_search.errors import StainSearchError

SCRATCH_ENV = "STAIN_SEARCH_SCRATCH"  # a node's local scratch (default: the temp dir)
MIRROR_ENV = "STAIN_SEARCH_MIRROR"  # local copies of URI storages (default: ~/.cache)


CACHE_ENV = "STAIN_SEARCH_CACHE"


def cache_root() -> Path:
    """This machine's cache (generated phantoms, Inception statistics, the
    empty MLflow store): ``$STAIN_SEARCH_CACHE``, else ``~/.cache/stain-search``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stain-search"


class StorageUnreachable(StainSearchError):
    """The storage URI cannot be used: no such bucket, refused credentials, no route."""


def is_uri(storage: str | os.PathLike | None) -> bool:
    """``s3://…``, ``gs://…`` and the like; a plain path or ``file://`` is local."""
    if storage is None or isinstance(storage, os.PathLike):
        return False
    scheme = urlparse(str(storage)).scheme
    return len(scheme) > 1 and scheme != "file"  # "C:" is a drive, not a scheme


def local_path(storage: str | os.PathLike) -> Path:
    text = str(storage)
    return Path(urlparse(text).path if text.startswith("file://") else text)


def mirror_root() -> Path:
    env = os.environ.get(MIRROR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stain-search" / "mirror"


def mirror_of(uri: str) -> Path:
    """The local folder that mirrors ``uri``: ``<mirror>/s3/bucket/path``."""
    parsed = urlparse(uri)
    return mirror_root() / parsed.scheme / parsed.netloc / parsed.path.strip("/")


def scratch_root() -> Path:
    """This node's scratch: where a trial works before its files go to the store.
    Read on the node itself (each node may set its own)."""
    return Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "stain-search-scratch")


@functools.lru_cache(maxsize=16)
def _filesystem(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    for key, say in (("NoSuchBucket", "the bucket does not exist"),
                     ("does not exist", "the bucket does not exist"),
                     ("ACCESS_DENIED", "access denied (check the credentials)"),
                     ("AccessDenied", "access denied (check the credentials)"),
                     ("InvalidAccessKeyId", "the access key is refused (check the credentials)"),
                     ("SignatureDoesNotMatch", "the secret key is refused (check the credentials)"),
                     ("Couldn't connect", "cannot connect to the store's endpoint"),
                     ("Connection refused", "cannot connect to the store's endpoint")):
        if key in text:
            return say
    return text[:200]


@dataclass(frozen=True)
class Remote:
    """A folder in a URI storage. Paths inside it are ``/``-separated relative names."""

    uri: str

    def __post_init__(self):
        parsed = urlparse(self.uri)
        if "@" in parsed.netloc:  # s3://KEY:SECRET@bucket: it would end up in logs and MLflow
            raise StorageUnreachable(
                f"--storage {parsed.scheme}://…@{parsed.netloc.rsplit('@', 1)[1]}{parsed.path}: "
                f"credentials in the URI are refused (they would be logged and tagged in "
                f"MLflow); give them to the store's client instead (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)")
        object.__setattr__(self, "uri", self.uri.rstrip("/"))

    def join(self, *parts: str) -> "Remote":
        return Remote("/".join([self.uri, *parts]))

    @property
    def name(self) -> str:
        return PurePosixPath(urlparse(self.uri).path).name

    def _fs(self):
        try:
            return _filesystem(self.uri)
        except (OSError, ValueError) as err:
            raise StorageUnreachable(f"--storage {self.uri}: {_reason(err)}") from None

    def _path(self, rel: str = "") -> str:
        fs, base = self._fs()
        return f"{base}/{rel}".rstrip("/") if rel else base

    def _call(self, what, *args):
        try:
            return what(*args)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise StorageUnreachable(
                f"--storage {self.uri}: {_reason(err)}; check that the bucket exists and that "
                f"the store's credentials (e.g. AWS_ACCESS_KEY_ID / AWS_PROFILE, "
                f"AWS_ENDPOINT_URL) allow reading and writing it") from None

    # --- questions ---------------------------------------------------------------

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        fs, _ = self._fs()
        info = self._call(fs.get_file_info, self._path(rel))
        return info.type == pafs.FileType.File

    def list(self, rel: str = "", *, recursive: bool = False) -> list[tuple[str, bool]]:
        """(name relative to this folder, is a folder) of what is under ``rel``;
        [] when nothing is."""
        import pyarrow.fs as pafs

        fs, _ = self._fs()
        base = self._path(rel)
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        infos = self._call(fs.get_file_info, selector)
        prefix = len(self._path()) + 1
        return sorted((i.path[prefix:], i.type == pafs.FileType.Directory) for i in infos)

    def check_bucket(self) -> None:
        """Fails with one line when the store cannot be listed (no bucket, no access)."""
        import pyarrow.fs as pafs

        fs, base = self._fs()
        bucket = base.split("/")[0]
        info = self._call(fs.get_file_info, bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageUnreachable(f"--storage {self.uri}: the bucket {bucket!r} does not "
                                     f"exist; create it, or pass the --storage it is in")
        self.list()

    def check_writable(self) -> None:
        """Write and remove a probe object: refused credentials fail here, before a
        search writes anything else."""
        probe = f".stain-search-probe-{os.getpid()}"
        self.write_bytes(probe, b"")
        self.delete(probe)

    # --- moving bytes ---------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        fs, _ = self._fs()
        with self._call(fs.open_input_stream, self._path(rel)) as fh:
            return fh.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        fs, _ = self._fs()
        with self._call(fs.open_output_stream, self._path(rel)) as fh:
            fh.write(data)

    def upload(self, local: Path, rel: str) -> None:
        """A file or a whole folder (replacing what was there under that name)."""
        import pyarrow.fs as pafs

        local = Path(local)
        fs, _ = self._fs()
        if local.is_dir():
            self.delete(rel)
        self._call(pafs.copy_files, str(local), self._path(rel), pafs.LocalFileSystem(), fs)

    def download(self, rel: str, local: Path) -> Path:
        """A file, written atomically (a reader never sees half of it)."""
        from stain_search.atomic import atomic_write_bytes

        return atomic_write_bytes(Path(local), self.read_bytes(rel))

    def delete(self, rel: str) -> None:
        """A file or a folder; nothing there is fine."""
        import pyarrow.fs as pafs

        fs, _ = self._fs()
        path = self._path(rel)
        info = self._call(fs.get_file_info, path)
        if info.type == pafs.FileType.Directory:
            self._call(fs.delete_dir, path)
        elif info.type == pafs.FileType.File:
            self._call(fs.delete_file, path)
