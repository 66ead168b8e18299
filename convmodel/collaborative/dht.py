"""The peer's entry into the swarm: check addresses, raise the open-files limit, start the DHT.

Every mistake here would otherwise surface as a hang or a Go daemon's traceback, so each
address is parsed up front and an unreachable initial peer ends in one message within
`bootstrap_timeout` seconds.
"""

import logging
import os
import resource
import signal
import sys
from functools import partial

from convmodel.collaborative.signals import die_with_parent, shielded_children
from convmodel.errors import UserError

INITIAL_PEERS_ENV = "CONVMODEL_INITIAL_PEERS"
OPEN_FILES_WANTED = 16384  # every anchor's README tells users to run `ulimit -n 16384`


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise the soft RLIMIT_NOFILE toward `wanted` (never above the hard limit); returns the new soft limit.

    hivemind keeps a socket and a stream per peer and part; the default soft limit of 1024 ends
    in "Too many open files" as a swarm grows (learning-at-home/hivemind#312).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def parse_peer_list(value: list[str] | str | None, option: str) -> list[str]:
    """A list of addresses from YAML/CLI (a list, one string, or whitespace/comma separated)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise UserError(f"{option}: expected a list of multiaddrs, got {value!r}")
    return [item.strip() for item in value if item.strip()]


def check_multiaddrs(addresses: list[str], option: str, need_peer_id: bool) -> list[str]:
    """Parse each address with hivemind's multiaddr parser; gather every problem into one UserError."""
    from hivemind.utils.multiaddr import Multiaddr

    problems = []
    for address in addresses:
        try:
            protocols = [p.name for p in Multiaddr(address).protocols()]
        except Exception as exc:  # the parser raises ValueError subclasses and codec errors
            problems.append(f"{address!r} is not a multiaddr ({exc})")
            continue
        if need_peer_id and "p2p" not in protocols:
            problems.append(f"{address!r} has no /p2p/<peer id> part; copy the whole address the first peer printed")
    if problems:
        example = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
        raise UserError(f"{option}: " + "; ".join(problems) + f" (a peer address looks like {example})")
    return addresses


def resolve_initial_peers(initial_peers: list[str] | str | None) -> list[str]:
    """`initial_peers` from the config, else from $CONVMODEL_INITIAL_PEERS; each one checked."""
    option = "trainer.strategy.init_args.initial_peers"
    peers = parse_peer_list(initial_peers, option)
    if not peers and os.environ.get(INITIAL_PEERS_ENV):
        option = f"${INITIAL_PEERS_ENV}"
        peers = parse_peer_list(os.environ[INITIAL_PEERS_ENV], option)
    return check_multiaddrs(peers, option, need_peer_id=True)


class _DropDeadSenderErrors(logging.Filter):
    """Drop the DHT's error about a request whose sending process exited before the DHT read it.

    At shutdown hivemind's averager processes stop while requests they sent still wait in the
    DHT's pipe; unpickling one needs the dead sender's fd and ends in a logged traceback
    (resource_sharer: FileNotFoundError / ConnectionResetError). The request no longer has
    anyone to answer, so the traceback tells the user nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:  # the error and what caused it
            tb = exc.__traceback__
            while tb is not None:
                if tb.tb_frame.f_code.co_filename.endswith("resource_sharer.py"):
                    return False
                tb = tb.tb_next
            exc = exc.__cause__
        return True


def _detach_fd_or_connection_error(detach):
    """DupFd.detach that reports a sender gone mid-handshake as ConnectionResetError, not EOFError.

    The DHT's request loop survives OSErrors from a request it cannot unpickle (it logs them and
    goes on) but not EOFError, which killed the whole DHT process with a traceback when an
    averager process exited at the moment the DHT read its last request.
    """

    def detach_fd(self):
        try:
            return detach(self)
        except EOFError as exc:
            raise ConnectionResetError("the process that sent this request has exited") from exc

    detach_fd.convmodel_wrapped = True
    return detach_fd


def _quiet_dead_sender_errors() -> None:
    """Before the DHT forks (its process inherits both): tolerate and silence requests from dead senders."""
    from multiprocessing import resource_sharer

    if not getattr(resource_sharer.DupFd.detach, "convmodel_wrapped", False):
        resource_sharer.DupFd.detach = _detach_fd_or_connection_error(resource_sharer.DupFd.detach)
    dht_logger = logging.getLogger("hivemind.dht.dht")
    if not any(isinstance(f, _DropDeadSenderErrors) for f in dht_logger.filters):
        dht_logger.addFilter(_DropDeadSenderErrors())


def _detach_p2pd_from_the_terminal() -> None:
    """Before the DHT forks: the p2pd daemon it starts gets a process group of its own, and dies with the DHT.

    A terminal's Ctrl-C goes to every process of its foreground group. The Go daemon handles
    SIGINT itself even when started with it ignored and exits, and the DHT process then waits for
    a daemon that is gone ("DHT did not shut down ... the hard way"). In its own group no terminal
    signal reaches it; PR_SET_PDEATHSIG (Linux) still ends it when the DHT process ends, even by SIGKILL.
    """
    import asyncio.subprocess

    spawn = asyncio.subprocess.create_subprocess_exec
    if getattr(spawn, "convmodel_wrapped", False):
        return

    async def create_subprocess_exec(program, *args, **kwargs):
        if os.path.basename(str(program)) == "p2pd" and "preexec_fn" not in kwargs:
            kwargs["preexec_fn"] = _own_group_dying_with_parent
        return await spawn(program, *args, **kwargs)

    create_subprocess_exec.convmodel_wrapped = True
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec


def _own_group_dying_with_parent() -> None:
    """In the forked child before exec: a new process group, and SIGTERM when the parent process ends."""
    os.setpgid(0, 0)
    die_with_parent(signal.SIGTERM)  # not Linux: the daemon's own idle timeout ends it


DHT_SHUTDOWN_S = 10.0
#: seconds one DHT request (ping, store, find) waits for a node's answer. A node that stopped answering
#: then costs each get/store this long, not the whole bootstrap_timeout. hivemind's default of 3 s was too
#: short here: a first request to a peer includes dialing it, and with 3 s three loopback peers of the
#: production config never formed a group (0 of 20 epochs averaged with 3 peers; 13-16 with 5 s and 15 s)
DHT_REQUEST_TIMEOUT_S = 5.0
BOOTSTRAP_FAILED = "DHTNode bootstrap failed"  # hivemind's warning when its one round of pings found no one


class _DropFirstBootstrapWarning(logging.Filter):
    """Drop hivemind's "bootstrap failed" warning: its single round of pings is only our first try
    (`_bootstrap` pings again until bootstrap_timeout, and a peer that finds no one gets our own error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return BOOTSTRAP_FAILED not in record.getMessage()


async def _bootstrap(_dht, node, initial_peers: list[str], timeout: float) -> bool:
    """Runs in the DHT's process: ping the initial peers until one answers or `timeout` passes, then fill
    the routing table; True when one answered.

    hivemind pings them once, each ping bounded by the per-request timeout (wait_timeout), so a first
    peer that takes longer than that to reach (a relay, a slow link) would fail the start; giving
    wait_timeout the whole bootstrap_timeout instead made every request of the run wait that long on a
    dead node.
    """
    import asyncio
    import time

    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    peer_ids = {PeerID.from_base58(Multiaddr(address)["p2p"]) for address in initial_peers}
    deadline = time.monotonic() + timeout
    while True:
        answers = await asyncio.gather(*(node.protocol.call_ping(peer, validate=True, strict=False)
                                         for peer in peer_ids))
        if any(answer is not None for answer in answers):
            remaining = max(deadline - time.monotonic(), DHT_REQUEST_TIMEOUT_S)
            try:
                await asyncio.wait_for(node.find_nearest_nodes([node.node_id]), remaining)
            except asyncio.TimeoutError:
                pass  # the routing table fills as the run goes on
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
ADMISSION_QUESTION_S = 5.0  # per initial peer, after a failed bootstrap: a gate answers on the connection at once


def start_dht(
    initial_peers: list[str],
    host_maddrs: list[str],
    announce_maddrs: list[str] | None,
    identity_path: str | None,
    client_mode: bool,
    use_ipfs: bool,
    use_relay: bool,
    use_auto_relay: bool,
    nat_port_map: bool,
    auto_nat: bool,
    bootstrap_timeout: float,
    record_validators: list = (),
    access_policy=None,
):
    """Start a hivemind.DHT, turning "could not reach the initial peers" into one UserError.

    `access_policy` (convmodel.collaborative.access): the DHT and the averagers started on it later
    refuse peers it does not admit; an initial peer that refuses this one is said so, with its reason.
    """
    import hivemind

    from convmodel.collaborative.access.gate import gating_next_daemon, register_policy

    raise_open_files_limit()
    _quiet_dead_sender_errors()
    node_logger = logging.getLogger("hivemind.dht.node")
    if not any(isinstance(f, _DropFirstBootstrapWarning) for f in node_logger.filters):
        node_logger.addFilter(_DropFirstBootstrapWarning())
    _detach_p2pd_from_the_terminal()
    if identity_path:
        os.makedirs(os.path.dirname(os.path.abspath(identity_path)), exist_ok=True)
    try:
        dht = hivemind.DHT(
            initial_peers=initial_peers,
            host_maddrs=host_maddrs,
            announce_maddrs=announce_maddrs,
            identity_path=identity_path,
            client_mode=client_mode,
            use_ipfs=use_ipfs,
            use_relay=use_relay,
            use_auto_relay=use_auto_relay,
            nat_port_map=nat_port_map,
            auto_nat=auto_nat,
            record_validators=list(record_validators),
            wait_timeout=DHT_REQUEST_TIMEOUT_S,
            bootstrap_timeout=bootstrap_timeout,
            ensure_bootstrap_success=False,  # _bootstrap below tries again until bootstrap_timeout
            startup_timeout=bootstrap_timeout,
            # hivemind's 3 s grace ran out on a loaded 2-core machine while the DHT closed its connections
            # ("terminating it the hard way"); the goodbye as a whole is bounded in SwarmPeer.leave
            shutdown_timeout=DHT_SHUTDOWN_S,
            start=False,
        )
        # the DHT process ignores a terminal's Ctrl-C from its first instruction on, and gates its RPCs
        with shielded_children(), gating_next_daemon(access_policy):
            dht.start()
        dht.wait_until_ready()  # bounded by startup_timeout and bootstrap_timeout inside the DHT process
    except Exception as exc:
        if initial_peers and "bootstrap" in str(exc).lower():
            _raise_if_refused(initial_peers, identity_path, access_policy, bootstrap_timeout)
        raise _start_error(exc, initial_peers, host_maddrs, announce_maddrs, bootstrap_timeout) from exc
    if initial_peers and not dht.run_coroutine(partial(_bootstrap, initial_peers=initial_peers,
                                                       timeout=bootstrap_timeout)):
        dht.shutdown()
        _raise_if_refused(initial_peers, identity_path, access_policy, bootstrap_timeout)
        raise _start_error(RuntimeError("bootstrap failed"), initial_peers, host_maddrs, announce_maddrs,
                           bootstrap_timeout)
    register_policy(dht.peer_id, access_policy)
    return dht


def _start_error(exc: Exception, initial_peers, host_maddrs, announce_maddrs, bootstrap_timeout) -> UserError:
    """The one message for a DHT that did not start (the caller raises it from `exc`)."""
    if initial_peers and "bootstrap" in str(exc).lower():
        return UserError(
            f"trainer.strategy.init_args.initial_peers: none of {initial_peers} answered within "
            f"{bootstrap_timeout:g} s (bootstrap_timeout). Check that the first peer is running, that the "
            "address is the one it printed (the port changes on every start unless host_maddrs fixes it), "
            "and that its port is reachable from here")
    if "identity" in str(exc).lower():
        return UserError(f"trainer.strategy.init_args.identity_path: {exc}; give each peer its own identity file")
    return UserError(f"trainer.strategy: could not start the DHT: {exc} (check host_maddrs "
                     f"{host_maddrs} and announce_maddrs {announce_maddrs})")


def _raise_if_refused(initial_peers: list[str], identity_path: str | None, access_policy, timeout: float) -> None:
    """After a failed bootstrap: a UserError with the reason if an initial peer's gate refused this peer."""
    from convmodel.collaborative.access.gate import README_HINT, ask_admission

    token = access_policy.own_token if access_policy is not None else None
    try:
        reason = ask_admission(initial_peers, identity_path, token, min(timeout, ADMISSION_QUESTION_S))
    except Exception:  # the question is a courtesy; the bootstrap error below still says what failed
        return
    if reason:
        raise UserError(f"trainer.strategy.init_args: {reason}; {README_HINT}")


def announce_addresses(dht, peers_file: str | None) -> list[str]:
    """Print the addresses other peers should pass as initial_peers, and write them to `peers_file`."""
    addresses = [str(a) for a in dht.get_visible_maddrs()]
    lines = "\n".join(f"  {a}" for a in addresses)
    print(f"[convmodel] this peer's id is {dht.peer_id}. Other peers join with\n"
          f"  --trainer.strategy.init_args.initial_peers '[{', '.join(addresses)}]'\n"
          f"(or export CONVMODEL_INITIAL_PEERS=\"{' '.join(addresses)}\"); the addresses:\n{lines}",
          flush=True)
    if peers_file:
        os.makedirs(os.path.dirname(os.path.abspath(peers_file)), exist_ok=True)
        tmp = f"{peers_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("\n".join(addresses) + "\n")
        os.replace(tmp, peers_file)  # atomic: a reader never sees half a file
    sys.stdout.flush()
    return addresses


def metrics_key(identity_path: str | None):
    """The RSA key that signs this peer's DHT records: kept next to identity_path, so a restarted
    peer writes the same records instead of leaving its old ones to be counted until they expire.

    It becomes hivemind's process-wide key, which its progress tracker signs with too: the DHT keeps
    one RSASignatureValidator (a second one "merges" and is dropped), so with two keys in one process
    the progress records carried one key as owner and the other's signature, every other peer
    rejected them, and a peer with identity_path was never counted by the others ("1 peer" for 100
    epochs while averaging with them). Without identity_path each process signs with a fresh key
    (hivemind's process-wide default).
    """
    from hivemind.utils.crypto import RSAPrivateKey

    if not identity_path:
        return RSAPrivateKey.process_wide()
    path = f"{identity_path}.metrics_key"
    if os.path.exists(path):
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        try:
            with open(path, "rb") as f:
                key.__setstate__({"_private_key": f.read()})  # the way hivemind unpickles its keys (DER)
        except ValueError as exc:
            raise UserError(f"{path} (the metrics key kept next to identity_path) is not a private key ({exc}); "
                            "delete it and a new one is made") from exc
    else:
        key = RSAPrivateKey()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(key.to_bytes())
        os.replace(tmp, path)
    with RSAPrivateKey._process_wide_key_lock:  # before hivemind's tracker makes its validator
        RSAPrivateKey._process_wide_key = key
    return key
