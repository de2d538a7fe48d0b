"""Where shards live: a local folder, or a URL (object storage, HTTP, a shell pipe).

One `Store` per shard root, for the shard job (writes) and the training loader (reads):

* a local path (or `file://`): a folder, written through a temporary name and a rename (fsynced);
* `s3://bucket/prefix` (s3fs, the `s3` extra) and `gs://bucket/prefix` (gcsfs, the `gcs` extra): objects, each
  written whole in one upload (multipart where large: s3fs switches at 50 MiB), so a reader never sees half of one.
  Credentials and endpoints come from each SDK's own environment and config files (AWS_ACCESS_KEY_ID,
  AWS_ENDPOINT_URL for MinIO or Ceph, ~/.aws/config, GOOGLE_APPLICATION_CREDENTIALS, ...), never from the
  project's configs;
* `http://` and `https://` (read only): fetched with webdataset's `gopen` (curl, with its retries);
* `pipe:COMMAND` (read only): WebDataset's shell-pipe convention, the command printing the object on stdout. The
  command holds `{path}`, replaced by the object's path under the root (`manifest.json`, `skip05/shard-000000.tar`),
  e.g. `pipe:aws s3 cp s3://bucket/shards/{path} -`.

Reads of remote objects are whole and sequential (one GET, one curl, one pipe): never a seek or a ranged read.
Listing a remote root uses its manifest.json (what the shard job wrote), never a directory listing (HTTP has none).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

OBJECT_SCHEMES = ("s3", "gs")  # written and read through fsspec
READ_ONLY_SCHEMES = ("http", "https", "pipe")  # read through webdataset.gopen
EXTRA = {"s3": "s3", "gs": "gcs"}


class StorageError(OSError):
    """A remote object that cannot be read or written; the message names the URL."""


def scheme(root: str | os.PathLike) -> str:
    """'' for a local path (or file://), else the URL's scheme ('s3', 'gs', 'http', 'https', 'pipe')."""
    s = str(root)
    if s.startswith("pipe:"):
        return "pipe"
    head, sep, _ = s.partition("://")
    if not sep or head == "file":
        return ""
    return head.lower()


def is_remote(root: str | os.PathLike) -> bool:
    return scheme(root) != ""


def local_path(root: str | os.PathLike) -> Path:
    s = str(root)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


# The environment variables that configure an SDK's client (endpoint, profile, static keys, region): a process
# whose environment changes them gets a new client (fsspec would hand back the one made for the old endpoint).
CLIENT_ENV = {"s3": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_REGION",
                     "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"),
              "gs": ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")}
_FS: dict[tuple, Any] = {}


def _fsspec(kind: str):
    """The fsspec filesystem of s3 or gs for the current environment, or a clear error naming the extra."""
    key = (kind, *(os.environ.get(k) for k in CLIENT_ENV[kind]))
    if key in _FS:
        return _FS[key]
    import fsspec

    try:
        # no listings cache: a rerun of the shard job, or a loader after a deletion, must see the bucket as it is
        fs = fsspec.filesystem(kind, use_listings_cache=False, skip_instance_cache=True)
    except ImportError as e:
        raise StorageError(f"{kind}:// needs {'s3fs' if kind == 's3' else 'gcsfs'}: pip install "
                           f"'s3vos[{EXTRA[kind]}]' ({e})") from e
    _FS[key] = fs
    return fs


class Store:
    """The objects under one shard root, by path relative to it ('manifest.json', 'skip05/shard-000000.tar')."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root).rstrip("/") if is_remote(root) else str(local_path(root))
        self.scheme = scheme(root)
        if self.scheme and self.scheme not in OBJECT_SCHEMES + READ_ONLY_SCHEMES:
            raise StorageError(f"{root}: unsupported scheme {self.scheme}:// (local path, s3://, gs://, http://, "
                               "https:// or pipe:)")
        if self.scheme == "pipe" and "{path}" not in self.root:
            raise StorageError(f"{root}: a pipe: shard root must hold {{path}} (the object's path under the root), "
                               "e.g. pipe:aws s3 cp s3://bucket/shards/{path} -")

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    @property
    def local(self) -> bool:
        return self.scheme == ""

    @property
    def writable(self) -> bool:
        return self.scheme in ("", *OBJECT_SCHEMES)

    @property
    def fs(self):
        return _fsspec(self.scheme)

    def url(self, rel: str) -> str:
        """The object's URL (or local path)."""
        if self.scheme == "pipe":
            return self.root.replace("{path}", rel)
        if self.local:
            return str(Path(self.root) / rel)
        return f"{self.root}/{rel}"

    # -- reading
    def exists(self, rel: str) -> bool:
        if self.local:
            return (Path(self.root) / rel).is_file()
        if self.scheme in OBJECT_SCHEMES:
            return self.fs.exists(self.url(rel))
        try:
            self.read_bytes(rel)
        except (FileNotFoundError, StorageError):
            return False
        return True

    def read_bytes(self, rel: str) -> bytes:
        """The whole object, read sequentially. FileNotFoundError when it is not there, StorageError on any other
        failure; both name the URL."""
        return read_url(self.url(rel))

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(f"{self.url(rel)} is not valid JSON: {e}") from e

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Several small objects at once (s3fs/gcsfs fetch them concurrently)."""
        if self.scheme in OBJECT_SCHEMES and rels:
            got = self.fs.cat([self.url(r) for r in rels], on_error="raise")
            by_url = {self.fs._strip_protocol(k): v for k, v in got.items()}
            return {r: by_url[self.fs._strip_protocol(self.url(r))] for r in rels}
        return {r: self.read_bytes(r) for r in rels}

    def find(self, suffix: str) -> list[str]:
        """Paths (relative) of every object under the root ending in `suffix` (writable stores only)."""
        if self.local:
            root = Path(self.root)
            return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{suffix}")) if root.is_dir() else []
        if self.scheme not in OBJECT_SCHEMES:
            raise StorageError(f"{self.root}: cannot list an {self.scheme}: root (it has no listing; read its "
                               "manifest.json)")
        base = self.fs._strip_protocol(self.root)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(p[len(base) + 1:] for p in found if p.endswith(suffix))

    # -- writing
    def _check_writable(self) -> None:
        if not self.writable:
            raise StorageError(f"{self.root}: {self.scheme}: is read-only here; write shards to a local folder, "
                               "s3:// or gs://")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """The object whole: locally through `<name>.tmp`, fsync and rename; remotely in one upload."""
        self._check_writable()
        if self.local:
            path = Path(self.url(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            return
        try:
            self.fs.pipe_file(self.url(rel), data)
        except OSError as e:
            raise StorageError(f"{self.url(rel)}: upload failed: {type(e).__name__}: {e}") from e

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        """A finished local file as the object `rel` (local: moved into place; remote: one upload, multipart where
        large); the local file is gone afterwards."""
        self._check_writable()
        if self.local:
            dest = Path(self.url(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            if _same_fs(local, dest.parent):
                os.replace(local, dest)
            else:
                shutil.move(str(local), dest)
            return
        try:
            self.fs.put_file(str(local), self.url(rel))
        except OSError as e:
            raise StorageError(f"{self.url(rel)}: upload failed: {type(e).__name__}: {e}") from e
        finally:
            Path(local).unlink(missing_ok=True)

    def scratch_for(self, rel: str) -> Path:
        """Where to build the object before it is put: beside it locally (then renamed), a temporary file else."""
        if self.local:
            dest = Path(self.url(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            return dest.with_name(dest.name + ".tmp")
        # named by the URL: a job killed mid-write leaves at most one per shard, which its rerun overwrites
        tag = hashlib.sha256(self.url(rel).encode()).hexdigest()[:24]
        return Path(tempfile.gettempdir()) / f"s3vos-{tag}.{rel.rpartition('/')[2]}.tmp"



def read_url(url: str) -> bytes:
    """The whole object at `url` (a local path, s3://, gs://, http(s)://, pipe:COMMAND), read sequentially.
    FileNotFoundError when it is not there, StorageError on any other failure; both name the URL."""
    kind = scheme(url)
    if not kind:
        return local_path(url).read_bytes()
    if kind in OBJECT_SCHEMES:
        try:
            return _fsspec(kind).cat_file(url)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{url}: no such object") from e
        except OSError as e:
            raise StorageError(f"{url}: {type(e).__name__}: {e}") from e
    if kind in READ_ONLY_SCHEMES:
        return _gopen_read(url)
    raise StorageError(f"{url}: unsupported scheme {kind}://")


def _same_fs(a: str | os.PathLike, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def _gopen_read(url: str) -> bytes:
    """An http(s):// or pipe: object, read whole through webdataset's gopen (curl -f with retries, or the shell
    command); a non-zero exit (404: curl's 22) is FileNotFoundError for a 404 and StorageError otherwise."""
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - a spawn failure (no curl) names the URL
        raise StorageError(f"{url}: cannot open: {type(e).__name__}: {e}") from e
    try:
        data = stream.read()
        stream.close()
    except Exception as e:  # noqa: BLE001 - gopen's Pipe raises IOError "...: exit N (read)" on a failed exit
        m = re.search(r"exit (\d+)", str(e))
        if m and m.group(1) == "22" and url.startswith(("http://", "https://")):  # curl -f: HTTP status >= 400
            raise FileNotFoundError(f"{url}: the server answered an HTTP error (curl exit 22: 404, 403, ...)") from e
        raise StorageError(f"{url}: {'exit ' + m.group(1) if m else type(e).__name__}: {e}") from e
    return data
