"""predict from and into object storage (segcli.files.remote): the run itself stays local.

Inputs under a URL are listed and sniffed (their first bytes, fetched together), then each object is
downloaded into a local staging folder shortly before a worker decodes it (at most `ahead` objects
in flight: the model does not wait on the network, the disk does not fill) and removed once its
outputs are written. An output URL is mirrored by a local run folder: each input's files are
uploaded whole as soon as they are written, then removed locally; the run's state (settings,
records, summary, labels) is uploaded as the run goes and at its end, and fetched at the start of
the next run, which skips every input whose record says done and whose files are in the store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from segcli.errors import SegcliError
from segcli.files.cache import cache_root
from segcli.files.remote import Store, download, list_objects, open_store, read_heads, store_error, upload
from segcli.files.runs import STATE_DIR
from segcli.inputs.images import has_image_signature
from segcli.inputs.sources import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Source, SourceList, looks_like_video

SYNC_EVERY = 50  # records between uploads of the record files (a killed run loses at most these)


class RemoteInputs:
    """The objects under SOURCE URLs as Sources staged on demand (`prepare`) and freed (`release`)."""

    def __init__(self, urls: list[str], ahead: int = 16):
        self.stores = [open_store(url) for url in urls]
        # made by the first download (a run that fails before fetching anything leaves nothing behind)
        self.stage = Path(tempfile.gettempdir()) / f"segcli-inputs-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.ahead = ahead
        self._pool = ThreadPoolExecutor(min(8, ahead), thread_name_prefix="segcli-fetch")
        self._futures: dict[int, Future] = {}
        self._order: list[Source] = []
        self._where: dict[str, tuple[Store, str]] = {}  # staged path -> (store, key)
        self._positions: dict[str, int] = {}  # staged path -> index in the run's order
        self._staged: dict[str, Path] = {}  # URL -> staged path
        self._lock = threading.Lock()

    def collect(self) -> SourceList:
        found = SourceList()
        for store in self.stores:
            objects = list_objects(store)
            heads = read_heads(store, [key for key, _ in objects])
            for (key, _), head in zip(objects, heads):
                rel = key[len(store.root):].lstrip("/") or key.rsplit("/", 1)[-1]
                suffix = PurePosixPath(rel).suffix.lower()
                url = store.url_of(key)
                if isinstance(head, Exception):
                    error, kind = str(store_error(url, head)), ("video" if suffix in VIDEO_SUFFIXES else "image")
                else:
                    error = None
                    kind = "image" if has_image_signature(head) else "video" if looks_like_video(head) else \
                        ("image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None)
                if kind is None:
                    found.skipped.append(url)
                    continue
                local = self.stage / str(len(self._order)) / PurePosixPath(rel).name
                source = Source(local, url, PurePosixPath(rel).with_suffix(""), error=error, video=kind == "video",
                                origin=url)
                self._where[str(local)] = (store, key)
                self._positions[str(local)] = len(self._order)
                self._staged[url] = local
                self._order.append(source)
                found.sources.append(source)
        return found

    def restrict(self, sources: list[Source]) -> None:
        """Only these are fetched (the run's inputs to do: not another shard's, not finished ones)."""
        self._order = [s for s in sources if str(s.path) in self._where]
        self._positions = {str(s.path): i for i, s in enumerate(self._order)}

    def prepare(self, source: Source) -> None:
        """Block until `source` is staged (raising a one-line SegcliError if it cannot be read), and
        start fetching the next ones."""
        index = self._positions[str(source.path)]
        with self._lock:
            for i in range(index, min(index + self.ahead, len(self._order))):
                if i not in self._futures and self._order[i].error is None:
                    store, key = self._where[str(self._order[i].path)]
                    self._futures[i] = self._pool.submit(download, store, key, self._order[i].path)
        self._futures[index].result()

    def release(self, path: str) -> None:
        """An input done (its record's `path` is its URL): its staged file goes."""
        staged = self._staged.get(path)
        if staged is not None:
            shutil.rmtree(staged.parent, ignore_errors=True)

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.stage, ignore_errors=True)


class RemoteOutput:
    """An output URL mirrored by a local run folder (`local`), kept in step with the store."""

    def __init__(self, url: str):
        self.store = open_store(url)
        self.local = cache_root() / "remote" / hashlib.sha256(self.store.url.encode()).hexdigest()[:20]
        self.local.mkdir(parents=True, exist_ok=True)
        self.existing: set[str] = set()
        self.failures: list[str] = []
        self._uploads = ThreadPoolExecutor(4, thread_name_prefix="segcli-upload")
        self._pending: list[Future] = []
        self._since_sync = 0

    def pull_state(self) -> None:
        """The store's run state into the local folder (replacing any older local copy), and the
        list of what is already there."""
        state = self.local / STATE_DIR
        for path in state.glob("records*.jsonl"):
            path.unlink()
        (state / "run.json").unlink(missing_ok=True)
        for key, _ in list_objects(self.store):  # [] for a new prefix; one line for a missing bucket
            rel = key[len(self.store.root):].lstrip("/")
            self.existing.add(rel)
            if rel.startswith(f"{STATE_DIR}/") and (rel.endswith(".jsonl") or rel == f"{STATE_DIR}/run.json"):
                download(self.store, key, self.local / rel)

    def exists(self, path: Path) -> bool:
        """Is this local output path's object in the store (as listed at the start)?"""
        try:
            rel = path.relative_to(self.local).as_posix()
        except ValueError:
            return path.exists()
        return rel in self.existing

    def on_record(self, record: dict) -> None:
        """Upload the input's freshly written files (a reused record's are already there)."""
        for rel in record.get("files", []):
            local = self.local / rel
            if local.exists():
                self._pending.append(self._uploads.submit(self._send, local, rel))
        self._since_sync += 1
        if self._since_sync >= SYNC_EVERY:
            self._since_sync = 0
            self.push_state(final=False)

    def _send(self, local: Path, rel: str) -> None:
        try:
            upload(self.store, local, self.store.key(rel))
            local.unlink(missing_ok=True)
        except SegcliError as exc:
            self.failures.append(str(exc))

    def push_state(self, final: bool = True) -> None:
        """The records (and at the end the settings, labels and summary) to the store, each whole."""
        for fut in self._pending:
            fut.result()
        self._pending.clear()
        names = [p.relative_to(self.local).as_posix() for p in (self.local / STATE_DIR).glob("records*.jsonl")]
        if final:
            names += [f"{STATE_DIR}/run.json"] + [p.name for p in self.local.glob("*.json")]
        for rel in names:
            if (self.local / rel).exists():
                self._send_copy(rel)

    def _send_copy(self, rel: str) -> None:
        """Upload a state file that stays here too (a copy is sent: the file may grow meanwhile)."""
        src = self.local / rel
        with tempfile.NamedTemporaryFile(dir=src.parent, prefix=".up-", delete=False) as tmp, src.open("rb") as f:
            shutil.copyfileobj(f, tmp)
        try:
            upload(self.store, Path(tmp.name), self.store.key(rel))
        except SegcliError as exc:
            self.failures.append(str(exc))
        finally:
            Path(tmp.name).unlink(missing_ok=True)

    def close(self) -> None:
        self._uploads.shutdown(wait=True)
