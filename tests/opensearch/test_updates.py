"""The pure OpenSearch update logic: values rank_feature accepts, the change threshold, specs,
routing and the outbox.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest

from dataflow import metrics
from dataflow.config import Config, OpenSearchSettings
from dataflow.core.shard import StepResult
from dataflow.errors import RecoveryFormatError
from dataflow.opensearch.sink import (
    _count_offers,
)
from dataflow.opensearch.updates import (
    AC_FEATURES,
    DOC_FEATURES,
    FLOAT32_MAX,
    FLOAT32_MIN_NORMAL,
    DocUpdate,
    IndexSpec,
    OfferCounts,
    Outbox,
    Outcome,
    Outgoing,
    Router,
    changed_enough,
    partition_names,
    rank_value,
    restore_states,
    snapshot_bytes,
    specs_for,
)
from tests.opensearch.samples import AC, DOCS, SUPPORT, acq, acq_fields, delete, fields, up
from tests.registry import sample

ROOT = Path(__file__).resolve().parents[2]


# --- zero handling and the threshold -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, None),
        (-0.0, None),
        (-1.0, None),
        (math.nan, None),
        (-math.inf, None),
        (1e-39, None),  # subnormal as float32: OpenSearch refuses it
        (FLOAT32_MIN_NORMAL * 0.999, None),
        (FLOAT32_MIN_NORMAL, FLOAT32_MIN_NORMAL),
        (1e-30, 1e-30),
        (0.047619047619047616, 0.047619047619047616),
        (3.0, 3.0),
        (1e39, FLOAT32_MAX),
        (math.inf, FLOAT32_MAX),
    ],
)
def test_rank_value_keeps_only_what_rank_feature_accepts(
    value: float, expected: float | None
) -> None:
    assert rank_value(value) == expected


@pytest.mark.parametrize(
    ("old", "new", "min_change", "send"),
    [
        (None, (1.0, 1.0, 0.1), 0.05, True),  # first value
        (None, (None, None, None), 0.05, True),  # first value, even all zero
        ((10.0, 10.0, 0.1), (10.0, 10.0, 0.1), 0.05, False),  # same
        ((10.0, 10.0, 0.1), (10.49, 10.0, 0.1), 0.05, False),  # 4.9%
        ((10.0, 10.0, 0.1), (10.5, 10.0, 0.1), 0.05, True),  # exactly 5%
        ((10.0, 10.0, 0.1), (9.5, 10.0, 0.1), 0.05, True),  # -5%
        ((10.0, 10.0, 0.1), (9.51, 10.0, 0.1), 0.05, False),  # -4.9%
        ((10.0, 10.0, 0.1), (10.0, 10.0, 0.106), 0.05, True),  # any feature counts
        ((10.0, 10.0, 0.1), (10.0, 10.0, 0.1049), 0.05, False),
        ((None, 10.0, 0.1), (1e-30, 10.0, 0.1), 0.05, True),  # from zero, however small
        ((1e-30, 10.0, 0.1), (None, 10.0, 0.1), 0.05, True),  # to zero
        ((None, 10.0, 0.1), (None, 10.0, 0.1), 0.05, False),  # stays zero
        ((10.0, 10.0, 0.1), (10.0001, 10.0, 0.1), 0.0, True),  # 0: every change...
        ((10.0, 10.0, 0.1), (10.0, 10.0, 0.1), 0.0, False),  # ...but not a repeat
        ((10.0, 10.0, 0.1), (14.0, 10.0, 0.1), 0.5, False),  # a coarser threshold
    ],
)
def test_changed_enough(
    old: tuple[float | None, ...] | None,
    new: tuple[float | None, ...],
    min_change: float,
    send: bool,
) -> None:
    assert changed_enough(old, new, min_change) is send


# --- specs and routing -------------------------------------------------------------------


def test_specs_support_and_ac_by_default_and_docs_index_in_main_index_mode() -> None:
    assert specs_for(OpenSearchSettings())[0] == SUPPORT
    assert (AC.name, AC.target, AC.family, AC.features) == (
        "ac",
        "ac-features",
        "acq",
        ("selects_30d", "click_rate_30d"),
    )
    assert (AC.op, AC.id_field, AC.time_field, AC.id_from_label) == (
        "index",
        "candidate",
        "as_of",
        True,
    )
    assert AC.features == AC_FEATURES
    main = specs_for(
        Config.from_env(
            {"OPENSEARCH_DOCS_INDEX": "search", "OPENSEARCH_AC_INDEX": "my-ac"}
        ).opensearch
    )
    assert [s.name for s in main] == ["support", "ac", "docs"]
    assert main[1].target == "my-ac"
    assert main[2] == DOCS


def test_update_for_decodes_the_doc_id_and_reads_the_spec_fields() -> None:
    update = SUPPORT.update_for("a%3Ab%20%C3%A9", fields(2.0, 5.0, 0.25, as_of=77))
    assert update == DocUpdate("support", "a:b é", (2.0, 5.0, 0.25), 77)
    assert SUPPORT.update_for("x", None) == DocUpdate("support", "x", None, 0)
    assert SUPPORT.update_for("", fields(1, 1, 1)) is None  # no id, no document


def test_router_sends_doc_writes_to_a_stable_partition_per_document() -> None:
    router = Router([SUPPORT, DOCS], partitions=4)
    writes = [
        ("doc:d1", fields(1.0, 2.0, 0.1)),
        ("qd:0123456789abcdef:d1", {"ctr_30d": "0.5", "as_of": "1"}),
        ("ac:ip:iphone", {"selects_30d": "3", "as_of": "1"}),
        ("doc:d2", None),
    ]
    out = router(
        [StepResult(writes=writes), StepResult(writes=[("doc:d1", fields(3.0, 4.0, 0.2))])]
    )
    assert {key for key, _ in out} <= set(partition_names(4))
    by_doc: dict[str, set[str]] = {}
    updates = []
    for key, batch in out:
        for update in batch:
            by_doc.setdefault(update.doc_id, set()).add(key)
            updates.append(update)
    assert set(by_doc) == {"d1", "d2"}  # qd and ac families are not doc-features
    assert all(len(keys) == 1 for keys in by_doc.values())
    d1 = [u for u in updates if u.doc_id == "d1"]
    assert [(u.spec, u.values) for u in d1] == [
        ("support", (1.0, 2.0, 0.1)),
        ("docs", (1.0, 2.0, 0.1)),
        ("support", (3.0, 4.0, 0.2)),
        ("docs", (3.0, 4.0, 0.2)),
    ]
    # Same partition for the same document in another router (another worker, another run).
    again = Router([SUPPORT], partitions=4)([StepResult(writes=[("doc:d1", fields(1, 1, 1))])])
    assert again[0][0] == next(iter(by_doc["d1"]))


def test_partition_names_sort_in_number_order() -> None:
    names = partition_names(12)
    assert names == sorted(names)
    assert [int(n) for n in names] == list(range(12))


def routed(out: list[tuple[str, list[DocUpdate]]]) -> dict[str, tuple[str, DocUpdate]]:
    """doc id -> (partition, update) of the `ac` updates (one each in these tests)."""
    got = {}
    for part, batch in out:
        for update in batch:
            if update.spec == "ac":
                assert update.doc_id not in got
                got[update.doc_id] = (part, update)
    return got


def test_router_takes_ac_document_ids_from_the_labels_not_the_key() -> None:
    reported: list[OfferCounts] = []
    router = Router([SUPPORT, AC], partitions=4, report=reported.append)
    case, ipad = acq("iphone case"), acq("ipad")
    result = StepResult(
        writes=[
            (case, acq_fields(3, 0.2, as_of=77)),
            (ipad, acq_fields(0, 1 / 21)),
            ("doc:d1", fields(1.0, 2.0, 0.1)),
            ("ac:ip:iphone%20case", {"selects_30d": "3", "as_of": "1"}),  # not the acq family
        ],
        labels={case: "iphone case", ipad: "ipad"},
    )
    got = routed(router([result]))
    assert set(got) == {"iphone case", "ipad"}  # the candidate text, never the hash
    assert got["iphone case"][1] == DocUpdate("ac", "iphone case", (3.0, 0.2), 77)
    assert got["ipad"][1].values == (0.0, 1 / 21)  # a zero is left to the zero rule
    # Partitioned by the key, like every other key: the same in another router.
    again = routed(
        Router([AC], partitions=4)(
            [StepResult([(case, acq_fields(1, 0.1))], labels={case: "iphone case"})]
        )
    )
    assert again["iphone case"][0] == got["iphone case"][0]
    assert reported == []  # nothing skipped, nothing reported


def test_router_deletes_the_ac_document_named_by_the_label_of_a_deleted_key() -> None:
    router = Router([AC], partitions=4)
    case = acq("iphone case")
    written = routed(
        router([StepResult([(case, acq_fields(2, 0.1))], labels={case: "iphone case"})])
    )
    deleted = routed(router([StepResult([(case, None)], labels={case: "iphone case"})]))
    assert deleted["iphone case"][1] == DocUpdate("ac", "iphone case", None, 0)
    assert deleted["iphone case"][0] == written["iphone case"][0]  # same partition, in order


def test_router_skips_and_counts_unlabelled_keys_and_unusable_ids() -> None:
    reported: list[OfferCounts] = []
    router = Router([SUPPORT, AC], partitions=2, report=reported.append)
    long_text = "é" * 257  # 514 UTF-8 bytes: over OpenSearch's 512-byte `_id` limit
    fits = "é" * 256  # 512 bytes: allowed
    case, bare, gone, long_key, fits_key = (
        acq("iphone case"),
        acq("bare"),
        acq("gone"),
        acq(long_text),
        acq(fits),
    )
    out = router(
        [
            StepResult(
                writes=[(case, acq_fields(1, 0.1)), (bare, acq_fields(1, 0.1)), (gone, None)],
                labels={case: "iphone case"},
            ),
            StepResult(
                writes=[
                    (long_key, acq_fields(1, 0.1)),
                    (fits_key, acq_fields(1, 0.1)),
                    ("doc:", fields(1.0, 1.0, 0.1)),  # an empty doc id
                ],
                labels={long_key: long_text, fits_key: fits},
            ),
        ]
    )
    assert set(routed(out)) == {"iphone case", fits}
    assert reported == [OfferCounts(unlabelled=2, invalid_id=2)]
    # The sink's reporter turns them into outcomes of opensearch_updates_total.
    name = "search_features_opensearch_updates_total"
    before = {o: sample(name, outcome=o) for o in ("unlabelled", "invalid_id")}
    Router([AC], partitions=1, report=_count_offers)([StepResult([(bare, None)])])
    assert sample(name, outcome="unlabelled") == before["unlabelled"] + 1
    assert sample(name, outcome="invalid_id") == before["invalid_id"]


def test_every_update_outcome_is_a_metric_label_and_documented() -> None:
    counted = [f for f in OfferCounts.__dataclass_fields__]
    assert counted == list(metrics.OPENSEARCH_UPDATE_OUTCOMES)
    for doc in ("docs/observability.md", "docs/opensearch.md"):
        text = (ROOT / doc).read_text()
        missing = [o for o in counted if f"`{o}`" not in text]
        assert not missing, f"{doc} does not describe {missing}"


# --- the outbox --------------------------------------------------------------------------


def ack_all(box: Outbox, limit: int = 1000) -> list[Outgoing]:
    sent = box.select(limit, OfferCounts())
    box.settle(sent, [Outcome("ok")] * len(sent))
    return sent


def test_first_value_is_queued_and_small_moves_are_skipped() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=10)
    counts = OfferCounts()
    box.offer([up("a", 100.0)], counts)
    assert counts.queued == 1
    ack_all(box)
    box.offer([up("a", 104.0), up("a", 96.0)], counts)
    assert counts.skipped == 2
    assert len(box) == 0
    box.offer([up("a", 105.0)], counts)
    assert len(box) == 1


def test_coalescing_keeps_the_latest_value_and_the_first_position() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=10)
    box.offer([up("a", 1.0), up("b", 1.0), up("a", 2.0, as_of=2000), up("c", 1.0)], OfferCounts())
    sent = box.select(10, OfferCounts())
    assert [(o.doc_id, o.sent, o.as_of) for o in sent] == [
        ("a", (2.0, 10.0, 0.1), 2000),
        ("b", (1.0, 10.0, 0.1), 1000),
        ("c", (1.0, 10.0, 0.1), 1000),
    ]


def test_select_rechecks_the_threshold_against_what_was_acknowledged_meanwhile() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=10)
    box.offer([up("a", 100.0)], OfferCounts())
    ack_all(box)
    box.offer([up("a", 110.0)], OfferCounts())
    in_flight = box.select(10, OfferCounts())
    # While 110 is in flight, 111 arrives: queued (what OpenSearch will hold is unknown)...
    box.offer([up("a", 111.0)], OfferCounts())
    box.settle(in_flight, [Outcome("ok")])
    assert len(box) == 1  # ...kept, because it is a newer version than the one acknowledged
    counts = OfferCounts()
    assert box.select(10, counts) == []  # ...and dropped here: within 5% of the acked 110
    assert counts.withdrawn == 1
    assert len(box) == 0


def test_a_value_back_within_threshold_while_pending_is_not_sent() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=10)
    box.offer([up("a", 100.0)], OfferCounts())
    ack_all(box)
    box.offer([up("a", 150.0), up("a", 101.0)], OfferCounts())
    assert box.select(10, OfferCounts()) == []


def test_limit_and_oldest_first() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=10)
    box.offer([up(f"d{i}", 1.0) for i in range(5)], OfferCounts())
    assert [o.doc_id for o in box.select(2, OfferCounts())] == ["d0", "d1"]


def test_deletions_are_always_sent_and_forget_the_document() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=10)
    box.offer([up("a", 1.0)], OfferCounts())
    ack_all(box)
    box.offer([delete("a"), delete("never-seen")], OfferCounts())
    sent = ack_all(box)
    assert [(o.doc_id, o.sent) for o in sent] == [("a", None), ("never-seen", None)]
    box.offer([up("a", 1.0)], OfferCounts())  # the same value again is a first value now
    assert len(box) == 1


def test_full_outbox_sheds_new_updates_and_forgets_what_was_sent() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=2)
    box.offer([up("x", 100.0)], OfferCounts())
    ack_all(box)
    counts = OfferCounts()
    box.offer([up("a", 1.0), up("b", 1.0), up("x", 200.0), up("a", 3.0)], counts)
    assert (counts.queued, counts.coalesced, counts.shed_update) == (2, 1, 1)  # `a` coalesces
    assert [o.doc_id for o in box.select(10, OfferCounts())] == ["a", "b"]
    assert "x" not in box.last_sent
    ack_all(box)
    box.offer([up("x", 100.0)], OfferCounts())  # unchanged value, but must be re-sent now
    assert [o.doc_id for o in box.select(10, OfferCounts())] == ["x"]


def test_full_outbox_makes_room_for_a_deletion_by_shedding_the_newest_update() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=2)
    box.offer([up("a", 1.0), up("b", 1.0)], OfferCounts())
    counts = OfferCounts()
    box.offer([delete("gone")], counts)
    assert (counts.queued, counts.shed_update, counts.shed_delete) == (1, 1, 0)
    assert list(box.pending) == ["a", "gone"]
    box.offer([delete("gone2"), delete("gone3")], counts)
    assert list(box.pending) == ["gone", "gone2"]
    assert counts.shed_delete == 1  # only deletions left: the deletion itself is shed


def test_settle_ok_fail_and_retry() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=10)
    box.offer([up("ok", 1.0), up("bad", 1.0), up("later", 1.0)], OfferCounts())
    sent = box.select(10, OfferCounts())
    counts = box.settle(
        sent,
        [Outcome("ok"), Outcome("fail", "mapper_parsing_exception"), Outcome("retry", "x")],
    )
    assert (counts.ok, counts.retry, dict(counts.failed)) == (1, 1, {"mapper_parsing_exception": 1})
    assert counts.examples == {"mapper_parsing_exception": "bad"}
    assert list(box.pending) == ["later"]
    assert set(box.last_sent) == {"ok"}
    counts = box.settle(
        box.select(10, OfferCounts()), [Outcome("retry", "index_not_found_exception")]
    )
    assert counts.index_missing


def test_snapshot_is_immutable_bytes_and_round_trips() -> None:
    box = Outbox(SUPPORT, 0.05, capacity=10)
    box.offer([up("a", 1.0), delete("b")], OfferCounts())
    box.settle(box.select(1, OfferCounts()), [Outcome("ok")])
    box.offer([up("a", 5.0), up("c", 2.0)], OfferCounts())
    blob = snapshot_bytes({"support": box})
    box.offer([up("d", 1.0)], OfferCounts())  # later work must not leak into the snapshot
    restored = Outbox.restore(SUPPORT, 0.05, 10, restore_states(blob)["support"])
    assert list(restored.pending) == ["b", "a", "c"]
    assert restored.pending["a"].values == (5.0, 10.0, 0.1)
    assert restored.last_sent == {"a": box.last_sent["a"]}
    restored.offer([up("e", 1.0)], OfferCounts())
    assert restored.pending["e"].seq > max(p.seq for k, p in restored.pending.items() if k != "e")
    # Pointed at another index: pending values still go, but nothing is known there.
    moved = Outbox.restore(
        IndexSpec("support", "other", "doc", DOC_FEATURES),
        0.05,
        10,
        restore_states(blob)["support"],
    )
    assert moved.last_sent == {}
    assert list(moved.pending) == ["b", "a", "c"]


def test_restore_refuses_an_unknown_snapshot_version() -> None:
    with pytest.raises(RecoveryFormatError, match="replay"):
        restore_states(pickle.dumps((1, {})))  # the layout before the versioned envelope
