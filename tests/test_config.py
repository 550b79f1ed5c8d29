"""Configuration: the settings table, defaults, validation that names the variable, masked
secrets, and the README table generated from the settings table."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataflow import settings
from dataflow.config import CONSUMER_ONLY, Config, KafkaSettings, Secret, mask_url
from dataflow.errors import ConfigError
from dataflow.settings import SETTINGS, Setting

ROOT = Path(__file__).resolve().parents[1]
# Rows that Config.from_env does not read: dataflow.run's own and the demo's.
NOT_IN_CONFIG = {settings.RUN, settings.DEMO}


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


# --- the settings table ------------------------------------------------------------------


def _ids(rows: tuple[Setting[object], ...]) -> list[str]:
    return [row.name for row in rows]


def test_every_row_is_named_once_documented_and_exported_under_its_name() -> None:
    names = [row.name for row in SETTINGS]
    assert len(names) == len(set(names))
    assert set(settings.BY_NAME) == set(names)
    for row in SETTINGS:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", row.name), row.name
        assert getattr(settings, row.name) is row, row.name
        for text in (row.doc, row.values, row.section):
            # One line, and nothing that would break the README's Markdown table.
            assert text and text.strip() == text and "\n" not in text and "|" not in text, row
        assert row.doc.endswith("."), row.name


@pytest.mark.parametrize("row", SETTINGS, ids=_ids(SETTINGS))
def test_defaults_parse_and_are_what_an_empty_environment_reads(row: Setting[object]) -> None:
    assert row.read({}) == row.value
    assert row.text({}) == row.default
    assert row.read({row.name: f"  {row.default}  "}) == row.value  # values are stripped


BOUNDED = tuple(row for row in SETTINGS if row.low is not None or row.high is not None)


@pytest.mark.parametrize("row", BOUNDED, ids=_ids(BOUNDED))
def test_bounds_are_enforced_and_inclusive(row: Setting[object]) -> None:
    assert row.low is not None and row.high is not None
    assert row.low <= row.value <= row.high
    for inside in (row.low, row.high):
        assert row.read({row.name: str(inside)}) == inside
    for outside in (row.low - 1, row.high + 1):
        with pytest.raises(ConfigError) as caught:
            row.read({row.name: str(outside)})
        assert caught.value.variable == row.name
        assert f"between {row.low} and {row.high}" in caught.value.problem


def test_whole_number_rows_reject_fractions() -> None:
    with pytest.raises(ConfigError, match="whole number"):
        settings.FEATURE_SHARDS.read({"FEATURE_SHARDS": "1.5"})


SECRETS = tuple(row for row in SETTINGS if row.secret)


def test_the_secret_rows_are_the_credentials() -> None:
    assert set(_ids(SECRETS)) == {
        "KAFKA_SASL_PASSWORD",
        "REDIS_URL",
        "REDIS_PASSWORD",
        "OPENSEARCH_URL",
        "OPENSEARCH_PASSWORD",
    }


@pytest.mark.parametrize("row", SECRETS, ids=_ids(SECRETS))
def test_secret_rows_read_as_masked_secrets(row: Setting[object]) -> None:
    url = {"REDIS_URL": "redis://u:hunter2@r:6379/0", "OPENSEARCH_URL": "https://u:hunter2@o"}
    value = url.get(row.name, "hunter2")
    secret = row.read({row.name: value})
    assert isinstance(secret, Secret) and secret.get() == value
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(Config.from_env({row.name: value}).describe())


def test_a_bad_secret_is_masked_in_the_error_too() -> None:
    for variable, value, shown in (
        ("REDIS_URL", "http://user:hunter2@redis:6379", "'http://user:****@redis:6379'"),
        ("OPENSEARCH_URL", "ftp://user:hunter2@os", "'ftp://user:****@os'"),
        ("OPENSEARCH_URL", "http://user:hunter2@[::1", "'********'"),  # unsplittable
    ):
        with pytest.raises(ConfigError) as caught:
            Config.from_env({variable: value})
        assert "hunter2" not in str(caught.value)
        assert str(caught.value).endswith(f"(got {shown})"), caught.value
    # Not a secret: the value is shown as it was given.
    with pytest.raises(ConfigError, match=r"\(got 'x'\)"):
        Config.from_env({"KAFKA_BATCH_SIZE": "x"})


def test_the_dataclass_defaults_are_the_table_defaults() -> None:
    # FeatureParams keeps its own defaults in dataflow.core: this is what ties them.
    assert Config() == Config.from_env({})


class _Recording(dict[str, str]):
    """An environment that remembers which variables were looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: object = None) -> object:
        self.asked.add(key)
        return super().get(key, default)


def test_from_env_reads_every_pipeline_row_and_nothing_else() -> None:
    env = _Recording()
    Config.from_env(env)
    expected = {row.name for row in SETTINGS if row.section not in NOT_IN_CONFIG}
    assert env.asked == expected


def _package_sources() -> Iterator[Path]:
    yield from (ROOT / "dataflow").rglob("*.py")


def test_only_the_settings_table_reads_the_environment() -> None:
    # Writes (setdefault, update) and handing the environment on ({**os.environ}) are fine;
    # a read must go through a row, so that its default, check and doc live in one place.
    read = re.compile(r"environ\.get\(|environ\[|getenv\(|in os\.environ\b")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _package_sources()
        if path.name != "settings.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if read.search(line)
    ]
    assert offenders == []


# --- the README table ---------------------------------------------------------------------


def test_readme_configuration_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings.with_table(readme) == readme, (
        "README.md's configuration table differs from dataflow/settings.py; "
        "regenerate it with `python -m dataflow.settings --write README.md`"
    )


def test_the_generated_table_has_a_row_per_variable() -> None:
    table = settings.markdown()
    for row in SETTINGS:
        assert f"| `{row.name}` | " in table
    assert table.count("\n") == 2 + len(SETTINGS) + len({row.section for row in SETTINGS})


def test_the_command_prints_and_writes_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert settings.main(["--markdown"]) == 0
    assert capsys.readouterr().out == settings.markdown()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{settings.README_BEGIN}\nstale\n{settings.README_END}\nafter\n")
    assert settings.main(["--write", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.endswith(f"{settings.README_END}\nafter\n")
    assert settings.with_table(text) == text
    readme.write_text("no markers\n")
    assert settings.main(["--write", str(readme)]) == 2
    assert "no " in capsys.readouterr().err


def test_producer_settings_carry_no_consumer_property() -> None:
    kafka = KafkaSettings(brokers=("b1:9092",), sasl_mechanism="PLAIN", sasl_username="u")
    config = kafka.producer_config({"acks": "all", "auto.offset.reset": "earliest"})
    assert config["acks"] == "all"
    assert config["sasl.mechanism"] == "PLAIN"
    assert "log_level" in config
    assert not set(config) & CONSUMER_ONLY


def test_clients_built_from_producer_settings_print_no_confwarn(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    kafka = KafkaSettings(brokers=("127.0.0.1:1",))
    # What librdkafka says, on the stderr file descriptor, when a consumer setting reaches
    # an admin client: the line this test must be able to see.
    AdminClient({**kafka.client_config(), "auto.offset.reset": "earliest"})
    assert "CONFWARN" in capfd.readouterr().err
    Producer(kafka.producer_config({"linger.ms": 5, "auto.offset.reset": "earliest"}))
    AdminClient(kafka.producer_config())
    assert "CONFWARN" not in capfd.readouterr().err
