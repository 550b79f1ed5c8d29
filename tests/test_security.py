"""Connecting to secured services, without the services: which options every Redis client
gets (TLS verified against REDIS_CA_FILE, the password from REDIS_PASSWORD), the settings
that contradict each other, and how a refused certificate is told apart. The real TLS and
ACL connections are in tests/integration/test_security.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis

from dataflow.config import Config, RedisSettings, redis_options
from dataflow.errors import ConfigError
from dataflow.preflight import _certificate_problem
from dataflow.reader import AsyncFeatureReader, FeatureReader
from dataflow.settings import Secret
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
    assert kwargs["password"] == "pw"  # noqa: S105
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
    given = FeatureReader.from_url(url, password="given", ca_file="/given/ca.pem")  # noqa: S106
    kwargs = given.client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["ssl_ca_certs"]) == ("given", "/given/ca.pem")
    areader = AsyncFeatureReader.from_url(url)
    kwargs = areader.client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["ssl_ca_certs"]) == ("from-env", "/env/ca.pem")
    # A password in the URL wins (redis-py reads the URL last).
    kwargs = FeatureReader.from_url(
        "rediss://u:in-url@c:1/0"
    ).client.connection_pool.connection_kwargs
    assert kwargs["password"] == "in-url"  # noqa: S105


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
    assert described["password"] == "********"  # noqa: S105
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
