"""Downloads from the Hugging Face hub that fail fast and in one line when the hub is out of reach.

huggingface_hub retries a refused connection for about 25 s per file and logs every retry; a user
without network would wait most of a minute for ten lines of noise. Here the cache is asked first,
then one quick request tells whether the hub answers at all, and only then is the file downloaded
(with huggingface_hub's progress bar, into its standard cache).
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from segcli.errors import SegcliError, one_line

PROBE_TIMEOUT_S = 10


def cached_hub_file(repo: str, filenames: Sequence[str], repo_type: str = "model") -> Path | None:
    """The first of `filenames` in the local cache for `repo`, without any network access."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo, name, repo_type=repo_type)
        if isinstance(found, str):
            return Path(found)
    return None


def _probe(url: str) -> int:
    """HTTP status of one HEAD request (redirects followed), or OSError when nothing answers."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "segcli"})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def hub_file(repo: str, filenames: Sequence[str], what: str, manual: str, repo_type: str = "model") -> Path:
    """The cached file, else the first of `filenames` that `repo` has, downloaded once and cached.
    `repo_type`: "model", or "space" for files kept in a Space (CAT-Seg's weights).

    `what` names the weights for the error ("the CLIP ViT-B-16 weights (openai)"); `manual` says
    what to do instead. Any failure is one SegcliError line: offline, unreachable, missing, HTTP.
    """
    from huggingface_hub import constants, hf_hub_download

    cached = cached_hub_file(repo, filenames, repo_type)
    if cached is not None:
        return cached
    fail = f"cannot download {what} from the Hugging Face hub ({{}}); {manual}"
    if constants.HF_HUB_OFFLINE:
        raise SegcliError(fail.format("offline: HF_HUB_OFFLINE is set and they are not cached"))
    for name in filenames:
        kind = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{constants.ENDPOINT.rstrip('/')}/{kind}{repo}/resolve/main/{name}"
        try:
            status = _probe(url)
        except OSError as exc:  # refused, DNS, timeout: the hub is out of reach
            reason = getattr(exc, "reason", exc)
            text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
            raise SegcliError(fail.format(f"{one_line(text, 80)} at {constants.ENDPOINT}")) from None
        if status == 404:
            continue
        if status >= 400:
            raise SegcliError(fail.format(f"HTTP {status} for {name}"))
        hub_logger = logging.getLogger("huggingface_hub")
        level = hub_logger.level
        hub_logger.setLevel(logging.ERROR)  # no retry chatter: a failure below is reported once
        try:
            return Path(hf_hub_download(repo_id=repo, filename=name, repo_type=repo_type))
        except Exception as exc:  # a broken transfer, a full disk: one line either way
            raise SegcliError(fail.format(one_line(str(exc) or type(exc).__name__, 120))) from None
        finally:
            hub_logger.setLevel(level)
    raise SegcliError(fail.format(f"{repo} has none of {', '.join(filenames)}"))
