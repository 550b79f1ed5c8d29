"""The test vectors for readers in other languages (docs/feature-store-vectors.json) are
what the pipeline computes, and their feature hashes are the reference model's."""

from __future__ import annotations

import json
from pathlib import Path

from dataflow.core import keys
from dataflow.tools import vectors
from tests.reference_model import diff_stores, expected_store, select_families

FILE = Path(__file__).resolve().parents[2] / "docs" / "feature-store-vectors.json"


def test_the_file_is_what_the_pipeline_computes() -> None:
    assert FILE.read_text(encoding="utf-8") == vectors.render(), (
        "docs/feature-store-vectors.json is stale: regenerate it with "
        "`python -m dataflow.tools.vectors --write docs/feature-store-vectors.json`"
    )


def test_feature_hashes_equal_the_reference_model() -> None:
    for case in json.loads(FILE.read_text(encoding="utf-8"))["features"]:
        expected = select_families(
            expected_store(case["events"], prefix=vectors.PREFIX),
            ["doc", "qd", "ac", "acq"],
            prefix=vectors.PREFIX,
        )
        assert not diff_stores(case["hashes"], expected), case["name"]
        assert case["hashes"], case["name"]


def test_keys_are_the_golden_key_functions_and_their_utf8_bytes() -> None:
    data = json.loads(FILE.read_text(encoding="utf-8"))
    for vector in data["keys"]:
        assert bytes.fromhex(vector["key_utf8_hex"]).decode("utf-8") == vector["key"]
    doc = {v["doc_id"]: v["key"] for v in data["keys"] if v["family"] == "doc"}
    assert doc["a:b"] == "feat:doc:a%3Ab"
    assert doc["ＡＢＣ"] == "feat:doc:%EF%BC%A1%EF%BC%A2%EF%BC%A3"
    for q in data["queries"]:
        assert keys.query_hash(q["query"]) == q["query_hash"]
