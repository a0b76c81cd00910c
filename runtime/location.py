"""Where a store lives: a local directory, or any fsspec URL (s3://bucket/prefix, gs://…, az://…).

A URL's scheme must be one fsspec knows, with its client installed (`pip install 'sae-sweep[s3]'`
for S3); anything else is refused, never taken as a local path. Credentials and endpoints come
from the usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, …: s3fs and
zarr read them); `storage_options` (a JSON object on the command line) passes anything else to
the filesystem. `cache_dir` keeps a local copy of every chunk file read (read-through), so a
second pass over a remote store reads the local disk.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


class LocationError(ValueError):
    """A store location that cannot be used: an unknown scheme, or its client not installed."""


@dataclass(frozen=True)
class Location:
    """A store's place, with what it takes to open it."""

    url: str  # as given for URLs; an absolute path for local directories
    storage_options: dict = field(default_factory=dict)
    cache_dir: str | None = None

    @property
    def remote(self) -> bool:
        return fsspec.core.split_protocol(self.url)[0] not in (None, "file", "local")

    def filesystem(self, cached: bool = False):
        """(fsspec filesystem, root path within it); `cached`: through the read-through cache."""
        protocol, _ = fsspec.core.split_protocol(self.url)
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as err:
            extra = EXTRAS.get(protocol, protocol)
            raise LocationError(f"{self.url}: the {protocol}:// client is not installed: pip install 'sae-sweep[{extra}]' "
                                f"({err})") from None
        if cached and self.cache_dir and self.remote:
            fs = fsspec.filesystem("filecache", fs=fs, cache_storage=self.cache_dir, same_names=False)
        return fs, root.rstrip("/")

    def holds_store(self) -> bool:
        """Whether a zarr group (an activation store, perhaps unfinished) is here. Needs neither
        zarr nor torch, so a CLI can answer a wrong path at once."""
        fs, root = self.filesystem()
        return fs.exists(f"{root}/zarr.json")

    def open_group(self, mode: str):
        import zarr

        return zarr.open_group(self.url, mode=mode, storage_options=self.storage_options if self.remote else None)


def location(where: str | Path, storage_options: dict | str | None = None, cache_dir: str | None = None) -> Location:
    """A Location from what a user wrote; unknown URL schemes are refused."""
    options = json.loads(storage_options) if isinstance(storage_options, str) else dict(storage_options or {})
    where = str(where)
    protocol, _ = fsspec.core.split_protocol(where)
    if protocol in (None, "file", "local"):
        path = where.split("://", 1)[1] if protocol else where
        return Location(str(Path(path).expanduser().absolute()), options, cache_dir)
    if protocol not in fsspec.available_protocols():
        raise LocationError(f"{where}: {protocol}:// is not a storage scheme fsspec knows; give a local path or a URL "
                            "such as s3://bucket/prefix")
    return Location(where, options, cache_dir)


def parse_storage_options(text: str | None) -> dict:
    """--storage_options JSON → dict, with a one-line error for bad JSON."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise LocationError(f"--storage_options is not JSON ({err}): e.g. '{{\"anon\": false}}'") from None
    if not isinstance(value, dict):
        raise LocationError("--storage_options must be a JSON object")
    return value
