"""The gate: every incoming RPC of a peer's DHT and averagers is refused unless the caller is admitted.

hivemind registers every RPC of its DHT and averagers through `P2P.add_protobuf_handler` (via
ServicerBase.add_p2p_handlers), in the process that serves it: the DHT process and each averager
process (forked children). `install_gate` replaces that one method, once, before hivemind forks;
the children inherit it. The replacement wraps each handler in a check of `context.remote_id`,
which libp2p's secure channel has authenticated. hivemind's own TokenAuthorizerBase guards only
DHT requests and needs every request to carry a token; the averagers would still answer anyone.

A caller is admitted when its peer id is in the policy's allowlist, or when it hands over, on
request, an access token from the run's owner for that very peer id (the gate asks it back over
the same authenticated connection, with the ungated TOKEN_PROTOCOL, and remembers the answer
until the token expires). A refused RPC is answered with the reason, which hivemind delivers to
the caller as P2PHandlerError text, and logged once per peer on this side.

The policy for a P2P instance is looked up by its peer id (`_policies`, filled in the parent
after the DHT started, so averager processes forked later find it) or, in the DHT process whose
peer id was unknown before it forked, `_next_daemon_policy`, set just around the fork.
"""

import asyncio
import sys
import time
from collections.abc import AsyncIterable
from contextlib import contextmanager
from dataclasses import dataclass, field

#: a peer answers this with its access token (or nothing); never gated: it is how admission starts
TOKEN_PROTOCOL = "/convmodel/access/token/1"
#: a joiner asks "am I admitted?" with its token; the answer is empty or the reason it is not
CHECK_PROTOCOL = "/convmodel/access/check/1"
README_HINT = "ask the run's owner for an access token (see README, Private swarms)"
REFUSAL_MEMORY_S = 10.0  # a refused peer is asked for its token again after this long


class AccessRefused(Exception):
    """Raised to a caller that is not admitted; its repr is the message (hivemind sends repr for unary RPCs)."""

    def __repr__(self) -> str:
        return str(self)


@dataclass
class AccessPolicy:
    """Who this peer admits (allowlist and/or the owner's public key) and the token it presents itself."""

    run_id: str
    allowed_peers: frozenset[str] = frozenset()
    owner_public_key: object | None = None  # hivemind RSAPublicKey
    own_token: str | None = None
    token_timeout: float = 5.0


@dataclass
class _Gate:
    """The admission state of one P2P instance in one process: who is admitted until when, who was told no."""

    policy: AccessPolicy
    p2p: object
    admitted_until: dict = field(default_factory=dict)  # PeerID -> Unix time
    refused: dict = field(default_factory=dict)  # PeerID -> (Unix time, reason)
    asking: dict = field(default_factory=dict)  # PeerID -> asyncio.Task of the token request in flight

    async def refusal(self, remote_id) -> str | None:
        """None if `remote_id` may call this peer's RPCs, else the message for it."""
        now = time.time()
        if remote_id == self.p2p.peer_id or self.admitted_until.get(remote_id, 0) > now:
            return None
        if remote_id.to_base58() in self.policy.allowed_peers:
            self.admitted_until[remote_id] = float("inf")
            return None
        since, reason = self.refused.get(remote_id, (0.0, None))
        if reason is not None and now - since < REFUSAL_MEMORY_S:
            return reason
        if remote_id not in self.asking:
            self.asking[remote_id] = asyncio.ensure_future(self._ask_token(remote_id))
        try:
            token = await asyncio.shield(self.asking[remote_id])
        finally:
            self.asking.pop(remote_id, None)
        return self.decide(remote_id, token)

    async def _ask_token(self, remote_id) -> str | None:
        if self.policy.owner_public_key is None:
            return None
        try:
            answer = await asyncio.wait_for(
                self.p2p._client.call_unary_handler(remote_id, TOKEN_PROTOCOL, b""), self.policy.token_timeout)
        except Exception:  # no such protocol (a peer without convmodel's access options), gone, or too slow
            return None
        return answer.decode(errors="replace").strip() or None

    def decide(self, remote_id, token_text: str | None) -> str | None:
        """Admit `remote_id` with `token_text` (remembered until it expires) or return why not (logged once)."""
        from convmodel.collaborative.access.tokens import parse_token

        if remote_id.to_base58() in self.policy.allowed_peers:
            return None
        if self.policy.owner_public_key is None:
            why = "it is not in allowed_peers"
        elif not token_text:
            why = "it is not in allowed_peers and presents no access token"
        else:
            try:
                token = parse_token(token_text)
                why = token.problem(self.policy.owner_public_key, self.policy.run_id, remote_id.to_base58())
            except ValueError as exc:
                why = f"its access token is {exc}"
            if why is None:
                self.admitted_until[remote_id] = token.expires
                self.refused.pop(remote_id, None)
                return None
        reason = f"peer {remote_id} is not admitted to run {self.policy.run_id!r} by {self.p2p.peer_id}: {why}"
        if self.refused.get(remote_id, (0, None))[1] != reason:
            print(f"[convmodel] refused {reason}", file=sys.stderr, flush=True)
        self.refused[remote_id] = (time.time(), reason)
        return reason

    def guard(self, handler, streaming: bool):
        """`handler` behind the gate: a refused stream gets an RPCError message (hivemind would log a
        traceback per refused request if the handler raised), a refused unary call an AccessRefused."""
        if streaming:
            from hivemind.proto.p2pd_pb2 import RPCError

            async def guarded_stream(request, context):
                reason = await self.refusal(context.remote_id)
                if reason is not None:
                    yield RPCError(message=f"{reason}; {README_HINT}")
                    return
                output = handler(request, context)
                if isinstance(output, AsyncIterable):
                    async for item in output:
                        yield item
                else:
                    yield await output

            return guarded_stream

        async def guarded(request, context):
            reason = await self.refusal(context.remote_id)
            if reason is not None:
                raise AccessRefused(f"{reason}; {README_HINT}")
            return await handler(request, context)

        return guarded

    async def serve_admission(self) -> None:
        """On the process that owns the daemon: answer TOKEN_PROTOCOL and CHECK_PROTOCOL (ungated)."""
        token = (self.policy.own_token or "").encode()

        async def answer_token(request: bytes, remote_id) -> bytes:
            return token

        async def answer_check(request: bytes, remote_id) -> bytes:
            # the joiner hands its token over with the question
            reason = self.decide(remote_id, request.decode(errors="replace").strip() or None)
            return (reason or "").encode()

        await self.p2p._client.add_unary_handler(TOKEN_PROTOCOL, answer_token)
        await self.p2p._client.add_unary_handler(CHECK_PROTOCOL, answer_check)


_policies: dict[str, AccessPolicy] = {}
_next_daemon_policy: AccessPolicy | None = None


async def _gate_of(p2p) -> "_Gate | None":
    gate = p2p.__dict__.get("_convmodel_gate", False)
    if gate is not False:
        return gate
    owns_daemon = p2p._child is not None
    policy = _policies.get(p2p.peer_id.to_base58()) or (_next_daemon_policy if owns_daemon else None)
    gate = _Gate(policy, p2p) if policy is not None else None
    p2p._convmodel_gate = gate
    if gate is not None and owns_daemon:
        await gate.serve_admission()
    return gate


def install_gate() -> None:
    """Wrap P2P.add_protobuf_handler (once per process, before hivemind forks) so each RPC passes the gate.

    A P2P without a policy (a peer of a public swarm, or the other peers a test starts) is untouched.
    """
    from hivemind.p2p import P2P

    original = P2P.add_protobuf_handler
    if getattr(original, "convmodel_gate", False):
        return

    async def add_protobuf_handler(self, name, handler, input_protobuf_type, *, stream_input=False,
                                   stream_output=False, balanced=False):
        gate = await _gate_of(self)
        if gate is not None:
            handler = gate.guard(handler, streaming=stream_input or stream_output)
        return await original(self, name, handler, input_protobuf_type, stream_input=stream_input,
                              stream_output=stream_output, balanced=balanced)

    add_protobuf_handler.convmodel_gate = True
    add_protobuf_handler.__doc__ = original.__doc__
    P2P.add_protobuf_handler = add_protobuf_handler


@contextmanager
def gating_next_daemon(policy: AccessPolicy | None):
    """Around `dht.start()`: the DHT process forked inside gates its daemon with `policy`."""
    global _next_daemon_policy
    if policy is not None:
        install_gate()
    _next_daemon_policy = policy
    try:
        yield
    finally:
        _next_daemon_policy = None


def register_policy(peer_id, policy: AccessPolicy | None) -> None:
    """After the DHT started: the averager processes forked from here on gate with `policy` too."""
    if policy is not None:
        _policies[peer_id.to_base58()] = policy


def forget_policy(peer_id) -> None:
    _policies.pop(peer_id.to_base58(), None)


def ask_admission(initial_peers: list[str], identity_path: str | None, token: str | None,
                  timeout: float) -> str | None:
    """Why the first initial peer that runs a gate does not admit this peer; None if none refuses.

    Called after the DHT could not bootstrap: a short-lived P2P with this peer's identity asks
    each initial peer over CHECK_PROTOCOL, handing over its token.
    """
    return run_in_own_thread(_ask_admission(initial_peers, identity_path, token, timeout))


def run_in_own_thread(coroutine):
    """Run `coroutine` to its end on an event loop of a thread of its own (whether or not the caller's
    thread runs one, e.g. in a notebook); its result."""
    import threading

    outcome = {}

    def target():
        try:
            outcome["result"] = asyncio.run(coroutine)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="convmodel-access", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def _ask_admission(initial_peers, identity_path, token, timeout) -> str | None:
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

    p2p = await P2P.create(identity_path=identity_path, host_maddrs=["/ip4/127.0.0.1/tcp/0"], dht_mode="client",
                           use_relay=False, nat_port_map=False, auto_nat=False)
    try:
        for address in initial_peers:
            maddr = Multiaddr(address)
            peer_id = PeerID.from_base58(maddr.value_for_protocol("p2p"))
            try:
                await asyncio.wait_for(p2p._client.connect(peer_id, [maddr.decapsulate(f"/p2p/{peer_id}")]), timeout)
                answer = await asyncio.wait_for(
                    p2p._client.call_unary_handler(peer_id, CHECK_PROTOCOL, (token or "").encode()), timeout)
            except Exception:  # unreachable, or a peer without a gate: not the reason
                continue
            if answer:
                return answer.decode(errors="replace").replace(f"by {peer_id}", f"by {address}", 1)
        return None
    finally:
        await p2p.shutdown()
