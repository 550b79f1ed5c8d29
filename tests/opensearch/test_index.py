"""The index tool: the wanted mappings, the conflict check and how the alias is picked."""

from __future__ import annotations

import pytest

from dataflow.errors import ConfigError
from dataflow.opensearch.index import check_properties, owned_spec, wanted_properties
from tests.opensearch.samples import AC, SUPPORT


def test_wanted_mapping_and_conflict_check() -> None:
    wanted = wanted_properties(SUPPORT)
    assert wanted == {
        "doc_id": {"type": "keyword"},
        "popularity_7d": {"type": "rank_feature"},
        "popularity_30d": {"type": "rank_feature"},
        "ctr_30d": {"type": "rank_feature"},
        "as_of": {"type": "date", "format": "epoch_millis"},
    }
    assert check_properties(wanted, wanted).ok
    existing = {
        "doc_id": {"type": "keyword"},
        "popularity_7d": {"type": "float"},
        "popularity_30d": {"type": "rank_feature", "positive_score_impact": False},
        "as_of": {"type": "date", "format": "strict_date_optional_time"},
    }
    check = check_properties(existing, wanted)
    assert check.missing == ["ctr_30d"]
    assert len(check.conflicts) == 3
    assert "popularity_7d is mapped as float, needs rank_feature" in check.conflicts
    default_date = {**wanted, "as_of": {"type": "date"}}  # default format takes epoch_millis
    assert check_properties(default_date, wanted).ok


def test_ac_mapping() -> None:
    assert wanted_properties(AC) == {
        "candidate": {"type": "keyword"},
        "selects_30d": {"type": "rank_feature"},
        "click_rate_30d": {"type": "rank_feature"},
        "as_of": {"type": "date", "format": "epoch_millis"},
    }


def test_index_command_picks_the_alias_by_option_or_by_generation_name() -> None:
    owned = [SUPPORT, AC]
    assert owned_spec(owned, None, None) is SUPPORT
    assert owned_spec(owned, "ac", None) is AC
    assert owned_spec(owned, "ac-features", "doc-features-000002") is AC  # the option wins
    assert owned_spec(owned, "support", None) is SUPPORT
    assert owned_spec(owned, None, "ac-features-000002") is AC
    assert owned_spec(owned, None, "doc-features-000003") is SUPPORT
    assert owned_spec(owned, None, "ac-features-rebuild") is SUPPORT  # not a generation name
    with pytest.raises(ConfigError, match="none of the managed aliases"):
        owned_spec(owned, "search", None)
