"""`dataflow.run`'s start-up checks."""

import socket

from dataflow.run import port_problem


def test_a_listening_port_is_reported_and_a_free_one_is_not() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104
        taken.listen()
        port = taken.getsockname()[1]
        problem = port_problem(str(port))
        assert problem is not None and "not free" in problem
    assert port_problem(str(port)) is None  # closed again: free (even if in TIME_WAIT)


def test_a_malformed_port_is_reported() -> None:
    assert port_problem("http") == "must be a port number (got 'http')"
    assert port_problem("70000") is not None
