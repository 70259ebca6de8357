"""``file:///path/dir``: images as files in a directory (a shared volume or a PVC on one machine or many)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from service.queue.results.base import ImageMissing, ObjectStore, StoreUnavailable, parse_object_key


class DirectoryStore(ObjectStore):
    """Objects at ``<dir>/<job id>/<index>.<ext>``, written atomically (a temporary file, then a rename).

    Nothing expires by itself: ``prune`` (run on a timer by the API and the workers) deletes files
    older than the job TTL, when their job records have expired too.
    """

    scheme = "file"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def describe(self) -> str:
        return f"file://{self.directory}"

    def _path(self, key: str) -> Path:
        if parse_object_key(key) is None:  # keys are ours; anything else could climb out of the directory
            raise ImageMissing(f"not an image key: {key!r}")
        return self.directory / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:
            raise StoreUnavailable(f"cannot write {path}: {error}") from error

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as error:
            raise ImageMissing(f"no object {key!r}") from error
        except OSError as error:
            raise StoreUnavailable(f"cannot read {path}: {error}") from error

    def prune(self, max_age_seconds: float) -> int:
        horizon = time.time() - max_age_seconds
        removed = 0
        try:
            job_dirs = [entry for entry in self.directory.iterdir() if entry.is_dir()]
        except FileNotFoundError:
            return 0
        for job_dir in job_dirs:
            with contextlib.suppress(FileNotFoundError):  # another pruner (API or worker) got there first
                for path in job_dir.iterdir():
                    if path.stat().st_mtime < horizon:
                        path.unlink(missing_ok=True)
                        removed += 1
                with contextlib.suppress(OSError):  # not empty: a newer image of that job stays
                    job_dir.rmdir()
        return removed
