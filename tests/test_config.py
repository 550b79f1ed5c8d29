"""Configuration: defaults, validation that names the variable, masked secrets."""

import pytest

from dataflow.config import Config, Secret, mask_url
from dataflow.errors import ConfigError


def test_defaults_match_the_contract() -> None:
    config = Config.from_env({})
    assert config.kafka.brokers == ("localhost:9092",)
    assert config.kafka.topics == ("search-events",)
    assert config.kafka.dlq_topic == "search-events-dlq"
    assert config.redis.prefix == "feat"
    assert config.redis.ttl_seconds == 35 * 86_400
    assert config.opensearch.url.get() == "http://localhost:9200"
    assert config.opensearch.index == "doc-features"
    assert (config.features.doc.alpha, config.features.doc.beta) == (1.0, 20.0)
    assert config.features.weight_click == 1.0
    assert config.features.weight_impression == 0.0
    assert config.future_tolerance_ms == 600_000


def test_values_are_parsed() -> None:
    config = Config.from_env(
        {
            "KAFKA_TOPICS": "a, b ,c",
            "SMOOTHING_QD_ALPHA": "2.5",
            "SMOOTHING_QD_BETA": "50",
            "OPENSEARCH_URL": "",
            "KAFKA_STOP_AT_END": "yes",
            "FEATURE_PREFIX": "feat_v2",
        }
    )
    assert config.kafka.topics == ("a", "b", "c")
    assert (config.features.qd.alpha, config.features.qd.beta) == (2.5, 50.0)
    assert config.features.doc.beta == 20.0
    assert not config.opensearch.enabled
    assert config.kafka.stop_at_end is True
    assert config.redis.prefix == "feat_v2"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("KAFKA_BROKERS", "localhost", "host:port"),
        ("KAFKA_TOPICS", " , ", "at least one"),
        ("KAFKA_DLQ_TOPIC", "search-events", "loop"),
        ("KAFKA_BATCH_SIZE", "0", "between"),
        ("KAFKA_BATCH_SIZE", "ten", "whole number"),
        ("REDIS_URL", "http://x", "redis://"),
        ("FEATURE_PREFIX", "feat:v2", "no ':'"),
        ("FEATURE_TTL_SECONDS", "60", "between"),
        ("SMOOTHING_DOC_ALPHA", "nan", "between"),
        ("SMOOTHING_AC_BETA", "-1", "between"),
        ("POPULARITY_WEIGHT_CLICK", "x", "number"),
        ("OPENSEARCH_URL", "localhost:9200", "http://"),
        ("OPENSEARCH_INDEX", "Doc-Features", "lowercase"),
        ("LOG_FORMAT", "xml", "text, json"),
        ("KAFKA_STOP_AT_END", "maybe", "true or false"),
        ("FEATURE_SHARDS", "0", "between"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert says in str(caught.value)


def test_zero_prior_is_rejected() -> None:
    with pytest.raises(ConfigError, match="SMOOTHING_ACQ_BETA"):
        Config.from_env({"SMOOTHING_ACQ_ALPHA": "0", "SMOOTHING_ACQ_BETA": "0"})


def test_secrets_never_show() -> None:
    config = Config.from_env(
        {
            "REDIS_URL": "redis://user:hunter2@redis:6379/0",
            "KAFKA_SASL_PASSWORD": "kafka-secret",
            "OPENSEARCH_PASSWORD": "os-secret",
        }
    )
    text = repr(config) + str(config.describe())
    for secret in ("hunter2", "kafka-secret", "os-secret"):
        assert secret not in text
    assert config.describe()["redis"]["url"] == "redis://user:****@redis:6379/0"
    assert config.redis.url.get().endswith("hunter2@redis:6379/0")
    assert repr(Secret("x")) == "Secret('********')"


def test_mask_url_without_password_is_unchanged() -> None:
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
