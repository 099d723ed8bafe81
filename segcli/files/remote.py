"""Object storage (S3, GCS, Azure, the Hugging Face hub, ...) through fsspec, in one-line errors.

A URL with a scheme (`s3://bucket/photos`) names a prefix in a store; fsspec's implementations do the
talking (`pip install 'segcli[s3]'` for s3fs; gcsfs, adlfs, huggingface_hub for the others) and
read credentials where those libraries read them (environment, profiles, instance roles), so
segcli never sees or prints them. Objects are written whole: a finished local file is uploaded in
one request (or a multipart upload that only appears when complete), never streamed into the
final key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from segcli.errors import SegcliError, one_line

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


def is_url(text: str | Path) -> bool:
    """'s3://bucket/key' and the like (not a local path; `file://` counts as a URL too)."""
    return isinstance(text, str) and bool(_URL.match(text))


@dataclass(frozen=True)
class Store:
    """A prefix in an object store: `fs` (an fsspec filesystem) and `root` (bucket/prefix, no scheme)."""

    url: str
    fs: object
    root: str

    def key(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def url_of(self, key: str) -> str:
        return f"{self.url.split('://', 1)[0]}://{key}"


def open_store(url: str) -> Store:
    """The filesystem behind `url` (its library imported now, not before)."""
    try:
        import fsspec
    except ImportError:
        raise SegcliError(f"{url}: object storage needs fsspec: pip install 'segcli[s3]' (or gcs, azure)") from None
    scheme = url.split("://", 1)[0].lower()
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError:
        raise SegcliError(f"{url}: {scheme}:// needs its fsspec library: pip install "
                          f"'segcli[{EXTRAS.get(scheme, scheme)}]'") from None
    except ValueError as exc:
        raise SegcliError(f"{url}: {one_line(str(exc), 120)}") from None
    return Store(url.rstrip("/"), fs, root.rstrip("/"))


def store_error(url: str, exc: BaseException) -> SegcliError:
    """One line for what a store said, credentials never included (the libraries do not put them in
    their messages; the URL is the user's)."""
    name = type(exc).__name__
    text = str(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return SegcliError(f"{url}: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           "AWS_PROFILE, or an instance role)")
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        return SegcliError(f"{url}: no such bucket or prefix")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text \
            or "SignatureDoesNotMatch" in text:
        return SegcliError(f"{url}: access denied (check the credentials and the bucket's policy)")
    return SegcliError(f"{url}: {name}: {one_line(text, 160)}")


def list_objects(store: Store) -> list[tuple[str, int]]:
    """(key, size) of every object under the store's prefix, sorted by key; a prefix that names one
    object lists that object."""
    try:
        found = store.fs.find(store.root, detail=True)
        if not found and store.fs.isfile(store.root):
            found = {store.root: store.fs.info(store.root)}
    except Exception as exc:  # the libraries raise their own types: one line each
        raise store_error(store.url, exc) from None
    if not found:
        try:
            bucket = store.root.split("/", 1)[0]
            exists = store.fs.exists(bucket)
        except Exception as exc:
            raise store_error(store.url, exc) from None
        if not exists:
            raise SegcliError(f"{store.url}: no such bucket")
    return sorted((key, int(info.get("size") or 0)) for key, info in found.items()
                  if info.get("type", "file") != "directory")


def read_heads(store: Store, keys: list[str], length: int = 64) -> list[bytes | Exception]:
    """The first `length` bytes of each object, fetched together (concurrently where the store is
    asynchronous, as s3fs is); an object that cannot be read gives its exception."""
    if not keys:
        return []
    try:
        heads = store.fs.cat_ranges(keys, [0] * len(keys), [length] * len(keys), on_error="return")
    except Exception:
        heads = []
        for key in keys:
            try:
                with store.fs.open(key, "rb") as f:
                    heads.append(f.read(length))
            except Exception as exc:
                heads.append(exc)
    return list(heads)


def download(store: Store, key: str, local: Path) -> None:
    """The object at `key` into `local` (whole: written beside it, then renamed)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(local.name + ".part")
    try:
        store.fs.get_file(key, str(part))
        part.replace(local)
    except Exception as exc:
        part.unlink(missing_ok=True)
        raise store_error(store.url_of(key), exc) from None


def upload(store: Store, local: Path, key: str) -> None:
    """A finished local file to `key`, in one piece."""
    try:
        store.fs.put_file(str(local), key)
    except Exception as exc:
        raise store_error(store.url_of(key), exc) from None
