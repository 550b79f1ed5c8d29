"""Golden tests: the exact bytes of every key family (docs/contract.md §2).

The ranking service, backfills and other tools rely on these strings; any change here is a
storage-format change and needs a new FEATURE_PREFIX version.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataflow.core import keys


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("iphone case", "4be0417c061d0252"),
        ("ＩＰｈｏｎｅ  Case ", "4be0417c061d0252"),  # NFKC width + casefold + spaces
        ("  iPhone\tCASE\n", "4be0417c061d0252"),
        ("shoes", "85e8e821bb46b71c"),
        ("", "e4a6a0577479b2b4"),
    ],
)
def test_query_hash_golden(query: str, expected: str) -> None:
    assert keys.query_hash(query) == expected


def test_q_norm_rules() -> None:
    assert keys.q_norm("Straße\tﬁ  ÉCOLE") == "strasse fi école"
    assert keys.q_norm("   ") == ""
    assert keys.q_norm("Ａ\u3000Ｂ") == "a b"  # ideographic space is whitespace after NFKC


@pytest.mark.parametrize(
    ("doc_id", "expected"),
    [
        ("d1", b"feat:doc:d1"),
        ("a:b%c d/é", b"feat:doc:a%3Ab%25c%20d%2F%C3%A9"),
        ("ＡＢＣ", b"feat:doc:%EF%BC%A1%EF%BC%A2%EF%BC%A3"),  # used as given, not normalised
        ("Doc-1_x.y~z", b"feat:doc:Doc-1_x.y~z"),  # unreserved ASCII stays as it is
    ],
)
def test_doc_key_golden(doc_id: str, expected: bytes) -> None:
    assert keys.doc_key("feat", doc_id).encode("utf-8") == expected


def test_qd_key_golden() -> None:
    assert keys.qd_key("feat", "iPhone Case", "d:1") == "feat:qd:4be0417c061d0252:d%3A1"


def test_ac_key_golden() -> None:
    assert keys.ac_key("feat", " IP ", "iPhone  Case") == "feat:ac:ip:iphone%20case"
    assert keys.ac_key("v2", "a:b", "c%d") == "v2:ac:a%3Ab:c%25d"


def test_acq_key_golden() -> None:
    assert keys.acq_key("feat", "iPhone Case") == "feat:acq:4be0417c061d0252"


def test_a_colon_never_splits_a_key() -> None:
    key = keys.qd_key("feat", "x", "a:b:c")
    assert key.split(":") == ["feat", "qd", keys.query_hash("x"), "a%3Ab%3Ac"]


def test_stable_hash_is_not_salted() -> None:
    # A fixed value: Python's hash() would differ between processes.
    assert keys.stable_hash64("shard-key") == int.from_bytes(
        bytes.fromhex(__import__("hashlib").blake2b(b"shard-key", digest_size=8).hexdigest()),
        "big",
    )


_IDS = st.lists(
    st.one_of(
        st.sampled_from(["d1", "a/b", "a:b", "100%", "", "/", "x y", "ü", "Doc-1_x.y~z"]),
        st.text(max_size=12),
    ),
    max_size=20,
)


@given(ids=_IDS)
def test_batch_keys_are_the_keys_of_each_id(ids: list[str]) -> None:
    """The reader's batch functions build exactly the writer's keys, id by id."""
    assert keys.enc_many(ids) == [keys.enc(i) for i in ids]
    assert keys.doc_keys("feat", ids) == [keys.doc_key("feat", i) for i in ids]
    qhash = keys.query_hash("iPhone Case")
    assert keys.qd_keys("feat", qhash, ids) == [keys.qd_key("feat", "iPhone Case", i) for i in ids]


def test_a_slash_in_a_batch_of_plain_ids_is_still_encoded() -> None:
    assert keys.enc_many(["a", "b/c", "d"]) == ["a", "b%2Fc", "d"]
    assert keys.enc_many(["/"]) == ["%2F"]
    assert keys.enc_many([]) == []
    assert keys.enc_many([""]) == [""]


@given(st.lists(st.text(max_size=12), min_size=1, max_size=40))
def test_remembered_results_are_the_functions_own(texts: list[str]) -> None:
    # Asked twice (the second time from memory) and against the undecorated function.
    for fn in (keys.enc, keys.q_norm, keys.hash_normalized):
        plain = fn.__wrapped__  # type: ignore[attr-defined]
        assert [fn(t) for t in texts] == [plain(t) for t in texts]
        assert [fn(t) for t in texts] == [plain(t) for t in texts]


def test_results_stay_right_after_the_memory_fills_and_is_cleared() -> None:
    many = [f"id-{i}:x" for i in range(keys._RECENT_MAX + 10)]
    assert [keys.enc(t) for t in many] == [f"id-{i}%3Ax" for i in range(len(many))]
    assert keys.enc("a:b") == "a%3Ab"  # after the memory filled and was cleared
