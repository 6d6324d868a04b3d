"""The SSH transport's two answers to delayed acknowledgements: its socket, and reply-less global requests.

No lab: the transport below is built over a socket pair and never started; what
it would send is recorded instead.
"""

from __future__ import annotations

import socket
from typing import Iterator

import paramiko
import pytest

from mutualbackup.remote.sockets import open_socket
from mutualbackup.remote.ssh import _PinnedTransport, ignore_message


@pytest.fixture
def transport(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_PinnedTransport, list[paramiko.Message]]]:
    ours, theirs = socket.socketpair()
    transport = _PinnedTransport(ours)
    sent: list[paramiko.Message] = []
    monkeypatch.setattr(transport, "_send_message", sent.append)
    try:
        yield transport, sent
    finally:
        transport.close()
        ours.close()
        theirs.close()


def global_request(name: str, wants_reply: bool) -> paramiko.Message:
    message = paramiko.Message()
    message.add_string(name)
    message.add_boolean(wants_reply)
    message.rewind()
    return message


def kinds(messages: list[paramiko.Message]) -> list[int]:
    return [message.asbytes()[0] for message in messages]


def test_a_global_request_that_wants_no_reply_is_answered_with_an_ignore_message(transport) -> None:  # noqa: ANN001
    opened, sent = transport
    opened._parse_global_request(global_request("hostkeys-00@openssh.com", wants_reply=False))
    assert kinds(sent) == [paramiko.common.MSG_IGNORE]


def test_paramiko_dispatches_global_requests_to_our_handler(transport) -> None:  # noqa: ANN001
    opened, _ = transport
    handler = opened._handler_table[paramiko.common.MSG_GLOBAL_REQUEST]
    assert handler.__func__ is _PinnedTransport._parse_global_request


def test_a_global_request_that_wants_a_reply_gets_only_paramikos_refusal(transport) -> None:  # noqa: ANN001
    opened, sent = transport
    opened._parse_global_request(global_request("keepalive@openssh.com", wants_reply=True))
    assert kinds(sent) == [paramiko.common.MSG_REQUEST_FAILURE]


def test_the_ignore_message_is_an_empty_ssh_msg_ignore() -> None:
    message = ignore_message()
    message.rewind()
    assert message.get_byte() == paramiko.common.cMSG_IGNORE
    assert message.get_binary() == b""


def test_the_socket_sends_small_packets_at_once_and_gives_up_on_a_silent_peer() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = open_socket("127.0.0.1", server.getsockname()[1], timeout=5)
        with sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) > 0


def test_a_closed_port_is_refused_by_open_socket() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        open_socket("127.0.0.1", closed, timeout=5)
