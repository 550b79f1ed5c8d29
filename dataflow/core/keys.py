"""Normalisation and the feature-store key formats.

This module is the only place that builds a key string: the writer (`flow`) and the
reader (`reader`) both call it, and `tests/core/test_keys.py` pins the exact bytes.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Final
from urllib.parse import quote, unquote

__all__ = [
    "ac_key",
    "acq_key",
    "doc_key",
    "doc_keys",
    "enc",
    "enc_many",
    "q_norm",
    "qd_key",
    "qd_keys",
    "query_hash",
    "stable_hash64",
]


_RECENT_MAX: Final = 1 << 14


def _recent(fn: Callable[[str], str]) -> Callable[[str], str]:
    """`fn` with its results for the last inputs kept (up to `_RECENT_MAX`, forgotten all at
    once when full). The key builders see the same ids, queries and candidates again and
    again (popular documents, frequent queries), and a dict lookup costs a fraction of
    normalising, hashing or checking the text anew. Pure functions only."""
    results: dict[str, str] = {}

    @functools.wraps(fn)
    def recent(text: str) -> str:
        result = results.get(text)
        if result is None:
            result = fn(text)
            if len(results) >= _RECENT_MAX:
                results.clear()
            results[text] = result
        return result

    return recent


@_recent
def q_norm(text: str) -> str:
    """NFKC, casefold, and collapse every run of whitespace to one space (trimmed)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def query_hash(query: str) -> str:
    """16 lowercase hex chars: BLAKE2b-64 of the normalised query's UTF-8 bytes."""
    return hash_normalized(q_norm(query))


@_recent
def hash_normalized(normalized_query: str) -> str:
    """`query_hash` for a query that is already normalised (the hot path normalises once)."""
    return hashlib.blake2b(normalized_query.encode("utf-8"), digest_size=8).hexdigest()


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


@_recent
def enc(component: str) -> str:
    """Percent-encode a key component so `:` (and anything else) can never split a key."""
    # Most ids are plain ASCII that `quote` would return unchanged: skip its per-byte work.
    if _UNRESERVED.fullmatch(component):
        return component
    return quote(component, safe="")


_UNRESERVED_OR_SLASH = re.compile(r"[A-Za-z0-9_.~/-]*")


def enc_many(components: Sequence[str]) -> list[str]:
    """`enc` of each component, in order. A batch of plain ids (the reader's common case)
    is checked in one pass: joined by `/`, which `enc` never leaves as it is, so the join
    holds exactly `len - 1` of them when no id needs encoding."""
    joined = "/".join(components)
    if _UNRESERVED_OR_SLASH.fullmatch(joined) and joined.count("/") == len(components) - 1:
        return list(components)
    return [enc(c) for c in components]


def dec(component: str) -> str:
    """The inverse of `enc`: the id a key component was built from."""
    return unquote(component)


def stable_hash64(text: str) -> int:
    """A hash that is the same in every process and run (Python's `hash()` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


# Key suffixes (without the configurable prefix). State is keyed by suffix so that a
# replay into a new prefix (`feat_v2`) reuses the same state layout.


def doc_suffix(doc_id: str) -> str:
    return f"doc:{enc(doc_id)}"


def qd_suffix(qhash: str, doc_id: str) -> str:
    return f"qd:{qhash}:{enc(doc_id)}"


def ac_suffix(prefix_norm: str, candidate_norm: str) -> str:
    return f"ac:{enc(prefix_norm)}:{enc(candidate_norm)}"


def acq_suffix(qhash: str) -> str:
    return f"acq:{qhash}"


def doc_key(prefix: str, doc_id: str) -> str:
    """`P:doc:{enc(doc_id)}`."""
    return f"{prefix}:{doc_suffix(doc_id)}"


def qd_key(prefix: str, query: str, doc_id: str) -> str:
    """`P:qd:{query_hash(query)}:{enc(doc_id)}` (`query` raw; it is normalised here)."""
    return f"{prefix}:{qd_suffix(query_hash(query), doc_id)}"


def ac_key(prefix: str, typed_prefix: str, candidate: str) -> str:
    """`P:ac:{enc(q_norm(prefix))}:{enc(q_norm(candidate))}` (inputs raw)."""
    return f"{prefix}:{ac_suffix(q_norm(typed_prefix), q_norm(candidate))}"


def acq_key(prefix: str, candidate: str) -> str:
    """`P:acq:{query_hash(candidate)}` (input raw)."""
    return f"{prefix}:{acq_suffix(query_hash(candidate))}"


def doc_keys(prefix: str, doc_ids: Sequence[str]) -> list[str]:
    """`doc_key(prefix, d)` of each id, in order (the reader's batches)."""
    head = f"{prefix}:doc:"
    return [head + c for c in enc_many(doc_ids)]


def qd_keys(prefix: str, qhash: str, doc_ids: Sequence[str]) -> list[str]:
    """`P:qd:{qhash}:{enc(doc_id)}` of each id, in order (`qhash` from `query_hash`)."""
    head = f"{prefix}:qd:{qhash}:"
    return [head + c for c in enc_many(doc_ids)]
