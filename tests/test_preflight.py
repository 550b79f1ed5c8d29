"""The preflight's messages, without services: one line naming the variable and its value,
secrets masked."""

from __future__ import annotations

import socket

import pytest

from dataflow import settings
from dataflow.config import RedisSettings, Secret
from dataflow.errors import PreflightError
from dataflow.preflight import check_redis


def test_a_secret_is_displayed_masked_and_other_values_as_they_are() -> None:
    assert settings.REDIS_URL.display("redis://u:pw@cache:6379/0") == "redis://u:****@cache:6379/0"
    assert settings.KAFKA_SASL_PASSWORD.display("hunter2") == "********"
    assert settings.KAFKA_SASL_PASSWORD.display("") == ""
    assert settings.KAFKA_TOPICS.display("a,b") == "a,b"


def test_a_closed_redis_port_fails_with_the_url_masked() -> None:
    with socket.socket() as sock:  # bound and released: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://user:pa55word@127.0.0.1:{port}/0"
    with pytest.raises(PreflightError) as caught:
        check_redis(RedisSettings(url=Secret(url)), timeout_s=2)
    error = caught.value
    assert (error.variable, error.value) == ("REDIS_URL", f"redis://user:****@127.0.0.1:{port}/0")
    assert str(error).startswith(f"REDIS_URL=redis://user:****@127.0.0.1:{port}/0: cannot connect")
    assert "pa55word" not in str(error)
    assert "\n" not in str(error)
