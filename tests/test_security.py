"""Connecting to secured services, without the services: which options every Redis client
gets (TLS verified against REDIS_CA_FILE, the password from REDIS_PASSWORD), the settings
that contradict each other, how a refused certificate is told apart, and every secret read
from the file its `_FILE` companion names. The real TLS and ACL connections are in
tests/integration/test_security.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis

from dataflow import settings
from dataflow.config import Config, RedisSettings, redis_options
from dataflow.errors import ConfigError
from dataflow.preflight import _certificate_problem
from dataflow.reader import AsyncFeatureReader, FeatureReader
from dataflow.settings import SETTINGS, Secret, Setting
from dataflow.sinks.redis import connect


def test_a_plain_url_gets_no_tls_options_and_the_password_only_when_given() -> None:
    assert redis_options("redis://cache:6379/0") == {}
    assert redis_options("redis://u@cache:6379/0", "pw") == {"password": "pw"}
    assert redis_options("unix:///run/redis.sock", "pw") == {"password": "pw"}


def test_a_rediss_url_verifies_the_certificate_and_the_host_name() -> None:
    assert redis_options("rediss://u@cache:6380/0") == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }
    assert redis_options("rediss://u@cache:6380/0", "pw", "/etc/ca.pem") == {
        "password": "pw",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": "/etc/ca.pem",
    }


def test_the_sink_client_is_built_with_them(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed before a connection is made\n")
    settings = RedisSettings(
        url=Secret("rediss://search-features@cache:6380/0"),
        password=Secret("pw"),
        ca_file=str(ca),
    )
    client = connect(settings, socket_timeout=3)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["username"] == "search-features"
    assert kwargs["password"] == "pw"
    assert kwargs["ssl_ca_certs"] == str(ca)
    assert kwargs["ssl_check_hostname"] is True
    assert kwargs["socket_timeout"] == 3


def test_the_reader_takes_the_password_and_the_ca_from_arguments_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "rediss://ranking@cache:6380/0"
    monkeypatch.setenv("REDIS_PASSWORD", "from-env")
    monkeypatch.setenv("REDIS_CA_FILE", "/env/ca.pem")
    kwargs = FeatureReader.from_url(url).client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["ssl_ca_certs"]) == ("from-env", "/env/ca.pem")
    given = FeatureReader.from_url(url, password="given", ca_file="/given/ca.pem")
    kwargs = given.client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["ssl_ca_certs"]) == ("given", "/given/ca.pem")
    areader = AsyncFeatureReader.from_url(url)
    kwargs = areader.client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["ssl_ca_certs"]) == ("from-env", "/env/ca.pem")
    # A password in the URL wins (redis-py reads the URL last).
    kwargs = FeatureReader.from_url(
        "rediss://u:in-url@c:1/0"
    ).client.connection_pool.connection_kwargs
    assert kwargs["password"] == "in-url"


def test_contradicting_or_unreadable_redis_settings_name_the_variable(tmp_path: Path) -> None:
    cases = [
        (
            {"REDIS_URL": "redis://u:pw@cache:6379/0", "REDIS_PASSWORD": "pw2"},
            "REDIS_PASSWORD: REDIS_URL holds a password too; set the password in one place",
        ),
        (
            {"REDIS_URL": "redis://cache:6379/0", "REDIS_CA_FILE": "/etc/ca.pem"},
            "REDIS_CA_FILE: is set but REDIS_URL is not a rediss:// (TLS) URL",
        ),
        (
            {"REDIS_URL": "rediss://cache:6380/0", "REDIS_CA_FILE": str(tmp_path / "nope.pem")},
            f"REDIS_CA_FILE: cannot read '{tmp_path / 'nope.pem'}' (No such file or directory)",
        ),
    ]
    for env, message in cases:
        with pytest.raises(ConfigError) as caught:
            Config.from_env(env)
        assert str(caught.value) == message
        assert "pw2" not in str(caught.value)


def test_the_redis_password_is_masked_in_describe(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = Config.from_env(
        {
            "REDIS_URL": "rediss://search-features@cache:6380/0",
            "REDIS_PASSWORD": "hunter2",
            "REDIS_CA_FILE": str(ca),
        }
    )
    described = config.describe()["redis"]
    assert described["password"] == "********"
    assert described["ca_file"] == str(ca)
    assert "hunter2" not in repr(config) + str(config.describe())


def test_a_refused_certificate_is_told_apart_from_other_connection_errors() -> None:
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "self-signed certificate in certificate chain"
    try:
        try:
            raise refused
        except ssl.SSLError as exc:
            raise redis.ConnectionError("Error 1 connecting to cache:6380.") from exc
    except redis.ConnectionError as wrapped:
        assert _certificate_problem(wrapped) == "self-signed certificate in certificate chain"
    # Only the text is left (another redis-py version): read it from there.
    text = redis.ConnectionError(
        "Error 1 connecting to c:6380. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed: Hostname mismatch, certificate is not valid for 'c'. (_ssl.c:1006)."
    )
    assert _certificate_problem(text) == "Hostname mismatch, certificate is not valid for 'c'."
    assert _certificate_problem(redis.ConnectionError("Connection refused")) is None


# --- secrets from files -------------------------------------------------------------------

SECRET_ROWS = tuple(row for row in SETTINGS if row.secret)
VALUES = {"REDIS_URL": "rediss://u:hunter2@r:6380/0", "OPENSEARCH_URL": "https://u:hunter2@o"}


def test_every_secret_has_a_file_companion_right_after_it() -> None:
    rows = list(SETTINGS)
    for row in SECRET_ROWS:
        companion = settings.BY_NAME[row.file_variable]
        assert companion.name == f"{row.name}_FILE"
        assert rows.index(companion) == rows.index(row) + 1
        assert (companion.secret, companion.section, companion.default) == (False, row.section, "")
        assert getattr(settings, companion.name) is companion
    companions = {row.file_variable for row in SECRET_ROWS}
    ca_files = {"REDIS_CA_FILE", "OPENSEARCH_CA_FILE"}
    assert {r.name for r in SETTINGS if r.name.endswith("_FILE")} - companions == ca_files
    assert not any(row.file_variable for row in SETTINGS if not row.secret)


@pytest.mark.parametrize("row", SECRET_ROWS, ids=[row.name for row in SECRET_ROWS])
def test_a_secret_is_read_from_its_file(row: Setting[Secret], tmp_path: Path) -> None:
    value = VALUES.get(row.name, "hunter2")
    path = tmp_path / "secret"
    path.write_text(f"{value}\n")  # as `kubectl create secret --from-file` often leaves it
    secret = row.read({row.file_variable: str(path)})
    assert (secret.get(), secret.source) == (value, row.file_variable)
    assert row.read({row.name: value}).source == row.name
    assert row.read({row.name: " ", row.file_variable: str(path)}).get() == value  # empty: no clash
    with pytest.raises(ConfigError) as caught:
        row.read({row.name: value, row.file_variable: str(path)})
    assert str(caught.value) == f"{row.file_variable}: {row.name} is set too; set one of the two"


def test_a_bad_secret_file_names_the_file_variable_and_never_the_value(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "binary").write_bytes(b"\xffhunter2")
    (tmp_path / "url").write_text("http://u:hunter2@r:6379\n")
    cases = [
        (
            "REDIS_PASSWORD",
            "nope",
            f"cannot read '{tmp_path / 'nope'}' (No such file or directory)",
        ),
        ("REDIS_PASSWORD", ".", f"cannot read '{tmp_path / '.'}' (Is a directory)"),
        ("KAFKA_SASL_PASSWORD", "empty", f"'{tmp_path / 'empty'}' is empty"),
        ("OPENSEARCH_PASSWORD", "binary", f"'{tmp_path / 'binary'}' is not UTF-8 text"),
        (
            "REDIS_URL",
            "url",
            "must be a redis://, rediss:// or unix:// URL (got 'http://u:****@r:6379')",
        ),
    ]
    for name, file, problem in cases:
        with pytest.raises(ConfigError) as caught:
            Config.from_env({f"{name}_FILE": str(tmp_path / file)})
        assert caught.value.variable == f"{name}_FILE"
        assert caught.value.problem == problem
        assert "hunter2" not in str(caught.value)


def test_a_configuration_from_files_shows_no_secret(tmp_path: Path) -> None:
    for name, value in {
        "kafka": "kafka-s3cret",
        "redis": "redis-s3cret",
        "opensearch": "os-s3cret",
        "ca.pem": "-----BEGIN CERTIFICATE-----\n",
    }.items():
        (tmp_path / name).write_text(value)
    config = Config.from_env(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "search-features",
            "KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "kafka"),
            "REDIS_URL": "rediss://search-features@cache:6380/0",
            "REDIS_PASSWORD_FILE": str(tmp_path / "redis"),
            "REDIS_CA_FILE": str(tmp_path / "ca.pem"),
            "OPENSEARCH_PASSWORD_FILE": str(tmp_path / "opensearch"),
        }
    )
    assert config.kafka.client_config()["sasl.password"] == "kafka-s3cret"
    assert config.redis.client_options()["password"] == "redis-s3cret"
    assert config.opensearch.password.get() == "os-s3cret"
    shown = repr(config) + str(config.describe())
    for secret in ("kafka-s3cret", "redis-s3cret", "os-s3cret"):
        assert secret not in shown


def test_the_reader_reads_the_password_file_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "password").write_text("from-a-file\n")
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(tmp_path / "password"))
    reader = FeatureReader.from_url("rediss://ranking@cache:6380/0")
    assert reader.client.connection_pool.connection_kwargs["password"] == "from-a-file"


# --- Kafka over SASL_SSL -------------------------------------------------------------------


def test_kafka_over_sasl_ssl_verifies_the_brokers_against_the_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = Config.from_env(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "search-features",
            "KAFKA_SASL_PASSWORD": "pw",
            "KAFKA_SSL_CA_LOCATION": str(ca),
        }
    )
    client = config.kafka.client_config()
    assert client["security.protocol"] == "SASL_SSL"
    assert client["ssl.ca.location"] == str(ca)
    assert client["ssl.endpoint.identification.algorithm"] == "https"
    assert (client["sasl.mechanism"], client["sasl.username"]) == (
        "SCRAM-SHA-512",
        "search-features",
    )
    assert config.describe()["kafka"]["sasl_password"] == "********"
    plain = Config.from_env({}).kafka.client_config()
    assert not {"security.protocol", "ssl.ca.location", "sasl.mechanism"} & set(plain)


def test_contradicting_kafka_security_settings_name_the_variable(tmp_path: Path) -> None:
    sasl = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"}
    cases = [
        (
            {"KAFKA_SSL_CA_LOCATION": "/etc/ca.pem"},
            "KAFKA_SSL_CA_LOCATION: is set but KAFKA_SECURITY_PROTOCOL is PLAINTEXT (no TLS)",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_LOCATION": str(tmp_path / "x")},
            f"KAFKA_SSL_CA_LOCATION: cannot read '{tmp_path / 'x'}' (No such file or directory)",
        ),
        (
            {"KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
            "KAFKA_SASL_MECHANISM: is set but KAFKA_SECURITY_PROTOCOL is PLAINTEXT (no SASL)",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            "KAFKA_SASL_MECHANISM: is empty but KAFKA_SECURITY_PROTOCOL is SASL_SSL; set it "
            "(e.g. SCRAM-SHA-512)",
        ),
        (sasl, "KAFKA_SASL_USERNAME: is empty but SCRAM-SHA-512 needs a user"),
        (
            {**sasl, "KAFKA_SASL_USERNAME": "u"},
            "KAFKA_SASL_PASSWORD: is empty (and KAFKA_SASL_PASSWORD_FILE unset) but "
            "SCRAM-SHA-512 needs one",
        ),
    ]
    for env, message in cases:
        with pytest.raises(ConfigError) as caught:
            Config.from_env(env)
        assert str(caught.value) == message


class _Event:
    """A librdkafka error event as `error_cb` gets it."""

    def __init__(self, code: int, text: str) -> None:
        self._code, self._text = code, text

    def code(self) -> int:
        return self._code

    def str(self) -> str:
        return self._text


def test_librdkafka_error_events_become_one_line_naming_the_variable() -> None:
    from confluent_kafka import KafkaError

    from dataflow.config import KafkaSettings
    from dataflow.errors import PreflightError
    from dataflow.preflight import _refused

    settings = KafkaSettings(
        brokers=("b:9094",),
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="search-features",
        sasl_password=Secret("hunter2", "KAFKA_SASL_PASSWORD_FILE"),
    )
    _refused(settings, "b:9094", [_Event(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")])
    login = _Event(
        KafkaError._AUTHENTICATION,
        "sasl_ssl://b:9094/bootstrap: SASL authentication error: Authentication failed "
        "(after 314ms in state AUTH_REQ)",
    )
    with pytest.raises(PreflightError) as caught:
        _refused(settings, "b:9094", [login])
    assert str(caught.value) == (
        "KAFKA_SASL_USERNAME=search-features: Kafka at b:9094 refused the credentials (SASL "
        "authentication error: Authentication failed); check KAFKA_SASL_USERNAME and "
        "KAFKA_SASL_PASSWORD_FILE"
    )
    untrusted = _Event(
        KafkaError._SSL,
        "sasl_ssl://b:9094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::"
        "certificate verify failed (after 6ms in state SSL_HANDSHAKE)",
    )
    with pytest.raises(PreflightError) as caught:
        _refused(settings, "b:9094", [untrusted])
    assert caught.value.variable == "KAFKA_SSL_CA_LOCATION"
    assert "the system's trusted CAs" in str(caught.value)
    assert "hunter2" not in str(caught.value)


# --- OpenSearch over https ----------------------------------------------------------------


def test_opensearch_over_https_is_verified_against_the_ca(tmp_path: Path) -> None:
    from dataflow.opensearch.index import client_for

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    env = {"OPENSEARCH_URL": "https://search:9200", "OPENSEARCH_CA_FILE": str(ca)}
    connection = client_for(Config.from_env(env).opensearch).transport.get_connection()
    pool = connection.pool
    assert (pool.cert_reqs, pool.ca_certs) == ("CERT_REQUIRED", str(ca))
    off = Config.from_env({"OPENSEARCH_URL": "https://search:9200", "OPENSEARCH_VERIFY_CERTS": "0"})
    assert client_for(off.opensearch).transport.get_connection().pool.cert_reqs == "CERT_NONE"
    plain = client_for(Config.from_env({}).opensearch).transport.get_connection()
    assert not plain.use_ssl


def test_contradicting_opensearch_tls_settings_name_the_variable(tmp_path: Path) -> None:
    cases = [
        (
            {"OPENSEARCH_CA_FILE": "/etc/ca.pem"},
            "OPENSEARCH_CA_FILE: is set but OPENSEARCH_URL is not https://",
        ),
        (
            {
                "OPENSEARCH_URL": "https://s:9200",
                "OPENSEARCH_CA_FILE": "/etc/ca.pem",
                "OPENSEARCH_VERIFY_CERTS": "false",
            },
            "OPENSEARCH_CA_FILE: is set but OPENSEARCH_VERIFY_CERTS is false: it would not be used",
        ),
        (
            {"OPENSEARCH_URL": "https://s:9200", "OPENSEARCH_CA_FILE": str(tmp_path / "x")},
            f"OPENSEARCH_CA_FILE: cannot read '{tmp_path / 'x'}' (No such file or directory)",
        ),
    ]
    for env, message in cases:
        with pytest.raises(ConfigError) as caught:
            Config.from_env(env)
        assert str(caught.value) == message
