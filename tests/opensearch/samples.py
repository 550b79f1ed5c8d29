"""Index specs, updates and feature hashes as the state shards write them, for the OpenSearch
tests."""

from __future__ import annotations

from dataflow.config import OpenSearchSettings
from dataflow.core import keys
from dataflow.opensearch.updates import DOC_FEATURES, DocUpdate, IndexSpec, specs_for

SUPPORT = IndexSpec("support", "doc-features", "doc", DOC_FEATURES)
DOCS = IndexSpec(
    "docs", "search", "doc", DOC_FEATURES, op="update", id_field=None, time_field="popularity_as_of"
)
AC = specs_for(OpenSearchSettings())[1]


def up(doc: str, p7: float, p30: float = 10.0, ctr: float = 0.1, as_of: int = 1000) -> DocUpdate:
    return DocUpdate("support", doc, (p7, p30, ctr), as_of)


def delete(doc: str, spec: str = "support") -> DocUpdate:
    return DocUpdate(spec, doc, None, 0)


def fields(p7: float, p30: float, ctr: float, as_of: int = 1000) -> dict[str, str]:
    return {
        "popularity_7d": repr(p7),
        "popularity_30d": repr(p30),
        "ctr_30d": repr(ctr),
        "as_of": str(as_of),
        "clicks_7d": "9",  # fields the spec does not read are ignored
    }


def acq_fields(selects: int, rate: float, as_of: int = 1000) -> dict[str, str]:
    return {
        "selects_7d": str(selects),
        "searched_7d": "0",
        "clicked_7d": "0",
        "selects_30d": str(selects),
        "searched_30d": "0",
        "clicked_30d": "0",
        "search_rate_30d": repr(1 / 21),
        "click_rate_30d": repr(rate),
        "as_of": str(as_of),
    }


def acq(candidate: str) -> str:
    return keys.acq_suffix(keys.query_hash(candidate))
