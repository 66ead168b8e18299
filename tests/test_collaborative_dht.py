"""The peer's DHT process: requests from processes that already exited, and the metrics signing key."""

import socket
import threading
from multiprocessing import resource_sharer

import pytest

pytest.importorskip("hivemind")

from convmodel.collaborative.dht import _DropDeadSenderErrors, _quiet_dead_sender_errors, metrics_key  # noqa: E402
from convmodel.errors import UserError  # noqa: E402


def test_a_request_from_a_sender_that_hung_up_is_a_connection_error_the_dht_survives(tmp_path):
    """hivemind's DHT loop logs OSErrors of a request it cannot unpickle and goes on; EOFError killed it.

    The sender here is a real socket that accepts the DHT's connection for the file descriptor and
    closes it at once, as an averager process does when it exits at that moment.
    """
    import logging

    _quiet_dead_sender_errors()
    address = str(tmp_path / "sender.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(1)

    def hang_up():
        connection, _ = listener.accept()
        connection.close()

    sender = threading.Thread(target=hang_up, daemon=True)
    sender.start()
    fd = resource_sharer.DupFd.__new__(resource_sharer.DupFd)
    fd._id = (address, 0)  # what a pickled DupFd carries: the sender's address and a key
    try:
        with pytest.raises(ConnectionResetError) as caught:
            fd.detach()
    finally:
        sender.join(10)
        listener.close()
    assert isinstance(caught.value.__cause__, EOFError)
    # and the DHT's log line about it is dropped: the request has nobody left to answer
    record = logging.LogRecord("hivemind.dht.dht", logging.ERROR, __file__, 1, "lost", None,
                               (type(caught.value), caught.value, caught.value.__traceback__))
    assert not _DropDeadSenderErrors().filter(record)
    other = ValueError("a real problem")
    assert _DropDeadSenderErrors().filter(
        logging.LogRecord("hivemind.dht.dht", logging.ERROR, __file__, 1, "x", None, (ValueError, other, None)))


def test_metrics_key_is_kept_next_to_the_identity_so_a_restarted_peer_signs_the_same_record(tmp_path):
    identity = str(tmp_path / "peer" / "identity.key")
    first, again = metrics_key(identity), metrics_key(identity)
    assert first.get_public_key().to_bytes() == again.get_public_key().to_bytes()
    other = metrics_key(str(tmp_path / "other.key"))
    assert other.get_public_key().to_bytes() != first.get_public_key().to_bytes()
    (tmp_path / "peer" / "identity.key.metrics_key").write_bytes(b"not a key")
    with pytest.raises(UserError, match=r"identity\.key\.metrics_key .*not a private key"):
        metrics_key(identity)


def test_a_node_that_stops_answering_costs_a_request_seconds_not_the_bootstrap_timeout():
    """Each DHT request waits hivemind's per-request timeout for a node's answer; bootstrap_timeout bounds the
    start only (it was also every request's timeout: a dead node cost each get and store the whole of it)."""
    import os
    import signal
    import time

    from convmodel.collaborative.dht import DHT_REQUEST_TIMEOUT_S, start_dht

    bootstrap_timeout = 60.0

    def node(initial_peers):
        return start_dht(initial_peers, ["/ip4/127.0.0.1/tcp/0"], None, None, False, False, False, False, False,
                         False, bootstrap_timeout)

    first = node([])
    second = node([str(a) for a in first.get_visible_maddrs()])
    try:
        assert second.store("key", "value", expiration_time=time.time() + 60)
        os.kill(first.pid, signal.SIGSTOP)  # its p2pd still accepts streams; its DHT process answers nothing
        try:
            started = time.monotonic()
            second.get("another key", latest=True)
            took = time.monotonic() - started
        finally:
            os.kill(first.pid, signal.SIGCONT)
        # one request (or a few in parallel) to the silent node, each bounded by the per-request timeout
        assert took < bootstrap_timeout / 2, f"a get waited {took:.1f} s on a silent node"
        assert took >= DHT_REQUEST_TIMEOUT_S * 0.9, f"the get did not ask the silent node ({took:.1f} s)"
    finally:
        second.shutdown()
        first.shutdown()
