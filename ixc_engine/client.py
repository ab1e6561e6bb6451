"""`RewardClient(url)`: score conversations against an `ixc-engine serve` server, with retries and backoff.

Standard library only (urllib), so RL workers need nothing beyond this package. Thread-safe: one client may be shared
by many threads (each call opens its own connection). Retries cover what a restarted or busy server answers:
connection errors, 502/503/504 (Retry-After honoured) and 429; other errors raise `RewardServerError` at once.
Scoring is idempotent, so a retried request gives the same answer; every call returns one result per input.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RETRY_STATUSES = (429, 502, 503, 504)
_PER_REQUEST = re.compile(r"over the limit of (\d+) per request")  # the server's 413 for too many items
_PER_ITEM = re.compile(r"per item")  # its 413 for too many media in one item
_BODY_LIMIT = re.compile(r"body .*over the limit of (\d+)")  # its 413 for too large a body
_MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".bmp": "image/bmp",
         ".webp": "image/webp", ".mp4": "video/mp4", ".avi": "video/x-msvideo", ".mkv": "video/x-matroska",
         ".mov": "video/quicktime", ".wmv": "video/x-ms-wmv"}


class RewardServerError(RuntimeError):
    """The server refused a request (4xx/5xx after retries) or could not be reached; `status` is None for the latter."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


def to_data_uri(media: Any) -> str:
    """A local image/video file or a PIL image -> a data: URI (PIL images as PNG; files byte for byte)."""
    if hasattr(media, "save") and hasattr(media, "mode"):  # PIL.Image.Image
        buf = io.BytesIO()
        media.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    path = Path(os.fspath(media))
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: unknown media extension {path.suffix!r} (known: {', '.join(_MIME)})")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


class RewardClient:
    """Client of `ixc-engine serve`.

    url: the server, e.g. "http://127.0.0.1:8000". api_key: sent as ``Authorization: Bearer``.
    embed_media: True sends local files as data: URIs (server and client need not share a disk); False sends paths,
      which the server resolves below its --media-root. PIL images are always sent as data: URIs.
    retries / backoff / max_backoff: attempts after the first on retryable failures, with exponential backoff and
      jitter (a Retry-After header is honoured). timeout: seconds per attempt. batch_size: items per HTTP request; a
      request the server refuses as too large (413: more items than its --max-items, or a body over --max-body-mb) is
      split and sent again in parts, and later calls keep to the server's item limit (results stay in input order).
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 180.0, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 10.0, embed_media: bool = False,
                 batch_size: int = 64) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if retries < 0 or backoff < 0 or timeout <= 0 or batch_size < 1:
            raise ValueError("retries and backoff must be >= 0, timeout > 0, batch_size >= 1")
        self.url = url.rstrip("/")
        self.api_key, self.timeout, self.retries = api_key, timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.embed_media, self.batch_size = embed_media, batch_size
        self.attempts = 0  # HTTP attempts made (retries included), for tests and logs
        self._server_limit: int | None = None  # items per request the server accepts, once a 413 said so
        self._body_limit: int | None = None  # body bytes the server accepts, once a 413 said so

    # --- endpoints ------------------------------------------------------------------------------------------------
    def score(self, conversations: Sequence[list[dict]], images: Sequence[Any] | None = None,
              hd_num: int | None = None) -> list[float]:
        """One reward per conversation, as `RewardEngine.score`; raises RewardServerError naming a conversation
        that cannot be scored."""
        results = self.score_results(conversations, images, hd_num)
        bad = [(i, e) for i, (_, _, e) in enumerate(results) if e is not None]
        if bad:
            detail = "; ".join(f"conversation {i}: {e}" for i, e in bad[:5])
            raise RewardServerError(f"{len(bad)} of {len(results)} conversations could not be scored: {detail}", 400)
        return [s for s, _, _ in results]

    def score_results(self, conversations: Sequence[list[dict]], images: Sequence[Any] | None = None,
                      hd_num: int | None = None) -> list[tuple[float | None, int | None, str | None]]:
        """(score, n_tokens, error) per conversation; errors are per item, not raised."""
        if images is not None and len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")

        def body(lo: int, hi: int) -> dict:
            b: dict[str, Any] = {"conversations": [list(c) for c in conversations[lo:hi]]}
            if images is not None:
                b["images"] = [self._media(m) for m in images[lo:hi]]
            if hd_num is not None:
                b["hd_num"] = hd_num
            return b

        return self._post_items("/v1/score", len(conversations), body,
                                lambda r: list(zip(r["scores"], r["n_tokens"], r["errors"])))

    def best_of_n(self, messages: list[dict], candidates: Sequence[str], images: Any = None,
                  hd_num: int | None = None) -> tuple[int, list[float]]:
        """(index of the best candidate, all scores), as `RewardEngine.best_of_n`. More candidates than the server takes
        in one request go in several (the server's prefix cache still computes the shared prompt once)."""
        media = self._media(images) if images is not None else None

        def body(lo: int, hi: int) -> dict:
            b: dict[str, Any] = {"messages": list(messages), "candidates": list(candidates[lo:hi])}
            if media is not None:
                b["images"] = media
            if hd_num is not None:
                b["hd_num"] = hd_num
            return b

        scores = self._post_items("/v1/best_of_n", len(candidates), body, lambda r: r["scores"], at_least_one=True)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the server's rule: the first of the highest
        return best, scores

    def get_reward(self, queries: Sequence[str], images: Sequence[Any] | None = None) -> list[float]:
        """OpenRLHF's call: decoded policy texts (chat markers kept) -> rewards."""
        def body(lo: int, hi: int) -> dict:
            b: dict[str, Any] = {"query": list(queries[lo:hi])}
            if images is not None:
                b["images"] = [self._media(m) for m in images[lo:hi]]
            return b

        return self._post_items("/get_reward", len(queries), body, lambda r: r["rewards"])

    # --- splitting ------------------------------------------------------------------------------------------------
    def _post_items(self, path: str, n: int, body, results, at_least_one: bool = False) -> list:
        """POST items [0, n) in requests of at most `batch_size` items (or the server's per-request limit, once it
        said it); a request refused as too large (413: too many items, or too large a body) is split and sent again
        in parts, transparently. Results come back in input order."""
        out: list = []
        if n == 0 and at_least_one:  # let the server name the problem
            return results(self.post(path, body(0, 0)))
        lo = 0
        while lo < n:
            step = min(self.batch_size, self._server_limit or n, n - lo)
            out += self._post_part(path, lo, lo + step, body, results)
            lo += step
        return out

    def _post_part(self, path: str, lo: int, hi: int, body, results) -> list:
        data = json.dumps(body(lo, hi)).encode()
        step = None
        if self._body_limit is not None and len(data) > self._body_limit and hi - lo > 1:
            step = (hi - lo + 1) // 2  # over the body size the server said it takes: halves, without asking
        else:
            try:
                got = results(self.request("POST", path, data))
            except RewardServerError as exc:
                if exc.status != 413 or hi - lo <= 1 or _PER_ITEM.search(str(exc)):
                    raise  # one item too large (media per item, or its own bytes): splitting cannot help
                m, b = _PER_REQUEST.search(str(exc)), _BODY_LIMIT.search(str(exc))
                if m and 1 <= int(m.group(1)) < hi - lo:
                    step = int(m.group(1))
                    self._server_limit = step if self._server_limit is None else min(self._server_limit, step)
                else:  # too large a body: halves
                    if b:
                        self._body_limit = int(b.group(1))
                    step = (hi - lo + 1) // 2
        if step is not None:
            out: list = []
            for a in range(lo, hi, step):
                out += self._post_part(path, a, min(a + step, hi), body, results)
            return out
        if len(got) != hi - lo:
            raise RewardServerError(f"POST {path}: the server answered {len(got)} results for {hi - lo} items", None,
                                    got)
        return got

    def health(self) -> dict:
        return self.request("GET", "/health")

    # --- transport ------------------------------------------------------------------------------------------------
    def _media(self, media: Any):
        if media is None:
            return None
        if isinstance(media, (str, os.PathLike)) or hasattr(media, "mode"):
            media = [media]
        out = []
        for m in media:
            if hasattr(m, "mode") or self.embed_media and not str(m).startswith("data:"):
                out.append(to_data_uri(m))
            else:
                out.append(os.fspath(m))
        return out

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, json.dumps(body).encode())

    def request(self, method: str, path: str, data: bytes | None = None) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.attempts += 1
            wait = None
            try:
                req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except ValueError:  # e.g. a proxy's HTML page
                    raise RewardServerError(f"{method} {path}: HTTP {resp.status}: the answer is not JSON: "
                                            f"{raw[:200]!r}", resp.status, raw) from None
            except urllib.error.HTTPError as exc:
                payload = _json_or_text(exc.read())
                if exc.code not in RETRY_STATUSES or attempt == self.retries:
                    err = payload.get("error", payload) if isinstance(payload, dict) else payload
                    msg = err.get("message", err) if isinstance(err, dict) else err  # {"error": "..."} too
                    raise RewardServerError(f"{method} {path}: HTTP {exc.code}: {msg}", exc.code, payload) from None
                retry_after = exc.headers.get("Retry-After")
                if retry_after and retry_after.strip().isdigit():
                    wait = float(retry_after)
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError, OSError) as exc:
                if attempt == self.retries:
                    hint = ""
                    if data is not None and len(data) > 1 << 20 and isinstance(exc, (ConnectionError, OSError)):
                        hint = (f" (a server refuses a body of {len(data)} bytes over 4x its --max-body-mb at once, "
                                "which looks like this: send fewer items per request, batch_size=...)")
                    raise RewardServerError(f"{method} {path}: {self.url} unreachable after {attempt + 1} attempts: "
                                            f"{exc}{hint}") from None
            if wait is None:
                wait = delay * (0.5 + random.random())  # jitter: retries of many clients do not arrive together
                delay = min(delay * 2, self.max_backoff)
            time.sleep(min(wait, self.max_backoff))
        raise AssertionError("unreachable")


def _json_or_text(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
