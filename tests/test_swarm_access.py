"""Who may join a private swarm: real hivemind peers on 127.0.0.1 behind convmodel's access gate.

The owner's peer admits one peer by allowlist and others by the owner's signed tokens; an
outsider, and a peer whose token has expired, are refused by the DHT and by the averagers, and
told why on their side.
"""

import time

import pytest

hivemind = pytest.importorskip("hivemind")

from test_collaborative import peer_args, run_cli_error, shards  # noqa: E402, F401  (shards: a fixture)

from convmodel.collaborative.access import gate, tokens  # noqa: E402
from convmodel.collaborative.access.policy import access_policy  # noqa: E402
from convmodel.collaborative.access.tools import issue_token_main, peer_id_main  # noqa: E402
from convmodel.collaborative.dht import start_dht  # noqa: E402
from convmodel.collaborative.swarm_options import OPTION, SwarmOptions  # noqa: E402
from convmodel.errors import UserError  # noqa: E402

RUN = "private_run"
LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_ipfs=False, use_relay=False, use_auto_relay=False,
                nat_port_map=False, auto_nat=False)
BOOTSTRAP_S = 20.0
ROUND_TIMEOUT = 60


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """The owner key (and .pub) and a helper making identity + token files for named peers."""
    folder = tmp_path_factory.mktemp("access")
    key = tokens.create_owner_key(str(folder / "owner.key"))

    def member(name: str, hours: float | None = 1.0, run_id: str = RUN):
        identity = str(folder / f"{name}.id")
        peer_id = tokens.peer_id_of_identity(identity, create=True)
        token_path = None
        if hours is not None:
            token_path = folder / f"{name}.token"
            token_path.write_text(tokens.issue_token(key, run_id, peer_id, time.time() + hours * 3600) + "\n")
        return identity, peer_id, None if token_path is None else str(token_path)

    return folder, key, member


def options(owner, identity=None, token=None, allowed=None, run_id=RUN) -> SwarmOptions:
    folder = owner[0]
    return SwarmOptions(run_id=run_id, identity_path=identity, access_token=token, allowed_peers=allowed,
                        owner_public_key=str(folder / "owner.key.pub"))


def dht_with(policy, identity, initial_peers=()):
    return start_dht(list(initial_peers), LOOPBACK["host_maddrs"], None, identity, False, False, False, False,
                     False, False, BOOTSTRAP_S, access_policy=policy)


def test_tokens_admit_only_their_peer_run_and_time(owner):
    _, key, member = owner
    _, peer, token_path = member("t1")
    public = key.get_public_key()
    token = tokens.parse_token(open(token_path).read())
    assert token.problem(public, RUN, peer) is None
    assert f"is for run '{RUN}'" in token.problem(public, "other", peer)
    assert f"is for peer {peer}" in token.problem(public, RUN, "QmSomeoneElse")
    assert "expired at" in token.problem(public, RUN, peer, now=token.expires + 1)
    stranger = tokens.create_owner_key(str(owner[0] / "stranger.key"))
    assert "not signed by this run's owner" in token.problem(stranger.get_public_key(), RUN, peer)
    forged = tokens.parse_token(token.text.replace(token.text.split(".")[1], tokens.issue_token(
        key, RUN, peer, token.expires + 9e6).split(".")[1]))  # a longer expiry pasted onto the old signature
    assert "not signed" in forged.problem(public, RUN, peer)
    with pytest.raises(ValueError, match="not an access token"):
        tokens.parse_token("cmv1.garbage")


def test_bad_access_options_are_one_error_naming_the_option(owner):
    folder, _, member = owner
    identity, _, token_path = member("t2")
    with pytest.raises(UserError, match=r"allowed_peers: 'alice' is not a peer id"):
        options(owner, allowed=["alice"]).check()
    with pytest.raises(UserError, match="access_token needs identity_path"):
        options(owner, token=token_path).check()
    with pytest.raises(UserError, match=rf"{OPTION}.owner_public_key: cannot read"):
        access_policy(SwarmOptions(run_id=RUN, owner_public_key=str(folder / "missing.pub")), OPTION)
    with pytest.raises(UserError, match=r"access_token: .* does not admit this peer .* for run 'private_run'"):
        access_policy(options(owner, identity, token_path, run_id="another_run"), OPTION)
    _, _, expired = member("t3", hours=-1)
    with pytest.raises(UserError, match=r"access_token: .* does not admit this peer .*: expired at"):
        access_policy(options(owner, str(folder / "t3.id"), expired), OPTION)
    assert access_policy(SwarmOptions(run_id=RUN), OPTION) is None  # a public swarm: no gate
    assert access_policy(options(owner, identity, token_path), OPTION).own_token.startswith("cmv1.")


def test_commands_print_a_peer_id_and_issue_a_token(owner, tmp_path, capsys):
    identity = str(tmp_path / "me.id")
    peer_id_main(["--identity_path", identity, "--create"])
    peer = capsys.readouterr().out.strip()
    assert tokens.is_peer_id(peer) and peer == tokens.peer_id_of_identity(identity)
    issue_token_main(["--owner_key", str(tmp_path / "o.key"), "--create_owner_key", "--run_id", RUN,
                      "--peer_id", peer, "--hours", "2", "--output", str(tmp_path / "me.token")])
    token = tokens.read_token(str(tmp_path / "me.token"), "test")
    public = tokens.read_public_key(str(tmp_path / "o.key.pub"), "test")
    assert token.problem(public, RUN, peer) is None and 7000 < token.expires - time.time() <= 7200
    with pytest.raises(SystemExit) as stop:
        issue_token_main(["--owner_key", str(tmp_path / "o.key"), "--run_id", RUN, "--peer_id", "bob"])
    assert stop.value.code == 2 and "--peer_id: 'bob' is not a peer id" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_an_expired_token_stops_the_trainer_with_one_line(owner, shards, tokenizer_dir, capsys,  # noqa: F811
                                                          tmp_path, monkeypatch):
    folder, _, member = owner
    identity, peer, expired = member("cli_peer", hours=-1, run_id="bert_tiny")  # the config's run_id
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(peer_args(shards, tokenizer_dir, identity_path=identity, access_token=expired,
                                  owner_public_key=str(folder / "owner.key.pub")), capsys)
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"trainer.strategy.init_args.access_token: '{expired}' does not admit this peer ({peer}) to run " \
           "'bert_tiny': expired at" in err and "ask the run's owner for a new one" in err


async def _download_state(identity_path, server_id, server_maddrs, prefix, tries: int) -> list[str]:
    """An outsider that found the server's address asks its averager for the state `tries` times directly;
    the errors it got back."""
    from hivemind.proto import averaging_pb2

    p2p = await hivemind.p2p.P2P.create(identity_path=identity_path, host_maddrs=LOOPBACK["host_maddrs"])
    errors = []
    try:
        await p2p._client.connect(server_id, server_maddrs)
        # the handler's name spelled out: DecentralizedAverager.get_stub here would cache its stub class for
        # every subclass in this process (hivemind's ServicerBase), and the averagers forked later would call
        # their peers' TrainingStateAverager handlers by the wrong name
        name = f"{prefix}::DecentralizedAverager.rpc_download_state"
        for _ in range(tries):
            try:
                stream = await p2p.iterate_protobuf_handler(server_id, name, averaging_pb2.DownloadRequest(),
                                                            averaging_pb2.DownloadData)
                errors.append(f"downloaded {len([message async for message in stream])} parts")
            except hivemind.p2p.P2PHandlerError as exc:
                errors.append(str(exc))
    finally:
        await p2p.shutdown()
    return errors


@pytest.mark.timeout(180)
def test_private_swarm_admits_members_and_refuses_outsiders(owner, capfd):
    folder, _, member = owner
    server_identity, server_id, server_token = member("server")
    token_identity, _, token_file = member("holder")
    listed_identity, listed_id, _ = member("listed", hours=None)
    outsider_identity, outsider_id, _ = member("outsider", hours=None)
    expired_identity, expired_id, expired_token = member("expired", hours=-0.01)
    prefix = "access_avg"
    dhts, averagers = [], []
    try:
        server = dht_with(access_policy(options(owner, server_identity, server_token, [listed_id]), OPTION),
                          server_identity)
        dhts.append(server)
        address = [str(a) for a in server.get_visible_maddrs()]

        # a token holder and an allowlisted peer (without a gate of its own) join the DHT as before;
        # every member has the same access options (the holder too admits the allowlisted peer)
        holder = dht_with(access_policy(options(owner, token_identity, token_file, [listed_id]), OPTION),
                          token_identity, address)
        dhts.append(holder)
        listed = hivemind.DHT(initial_peers=address, identity_path=listed_identity, start=True, **LOOPBACK)
        dhts.append(listed)
        assert holder.store("greeting", "hello", hivemind.utils.get_dht_time() + 60)
        assert listed.get("greeting", latest=True).value == "hello"

        # the token holder averages with the owner's peer: both averagers admit each other
        for dht, value in ((server, 0.0), (holder, 2.0)):
            import torch

            averagers.append(hivemind.averaging.DecentralizedAverager(
                averaged_tensors=[torch.full((8,), value)], dht=dht, prefix=prefix, target_group_size=2,
                min_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5, start=True))
        controls = [a.step(wait=False, timeout=ROUND_TIMEOUT) for a in averagers]
        assert all(control.result(timeout=ROUND_TIMEOUT) is not None for control in controls)
        with averagers[1].get_tensors() as tensors:
            assert torch.allclose(tensors[0], torch.full((8,), 1.0))

        # an outsider cannot join, and is told why and what to do
        with pytest.raises(UserError, match=rf"peer {outsider_id} is not admitted to run '{RUN}' by "
                                            rf"{address[0]}: it is not in allowed_peers and presents no access "
                                            r"token; ask the run's owner for an access token"):
            dht_with(None, outsider_identity, address)
        # ... nor download the state from the averager even knowing its address
        maddrs = [hivemind.utils.multiaddr.Multiaddr(a).decapsulate(f"/p2p/{server_id}") for a in address]
        errors = gate.run_in_own_thread(_download_state(outsider_identity, server.peer_id, maddrs, prefix, tries=3))
        assert len(errors) == 3 and all(f"peer {outsider_id} is not admitted" in e for e in errors), errors

        # an expired token is refused: said at join with the expiry
        expired_policy = gate.AccessPolicy(RUN, owner_public_key=tokens.read_public_key(
            str(folder / "owner.key.pub"), "test"), own_token=open(expired_token).read().strip())
        with pytest.raises(UserError, match=rf"peer {expired_id} is not admitted .*: its access token expired at"):
            dht_with(expired_policy, expired_identity, address)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()
    err = capfd.readouterr().err
    # the owner's side logs each refused peer once per hivemind process (DHT, averager), not per request
    assert err.count(f"[convmodel] refused peer {outsider_id} ") == 2, err[-3000:]
    assert err.count(f"[convmodel] refused peer {expired_id} ") == 1, err[-3000:]


@pytest.mark.timeout(120)
def test_swarm_peers_with_tokens_share_state_and_a_peer_without_is_told_at_join(owner):
    """The whole SwarmPeer path (options, hivemind.Optimizer's averagers and progress tracker) behind the gate."""
    import torch

    from convmodel.collaborative.swarm_peer import SwarmPeer

    swarm = dict(LOOPBACK, matchmaking_time=0.5, averaging_timeout=5.0, bootstrap_timeout=15.0,
                 load_state_timeout=15.0, metadata_expiration=10.0)

    def make_peer(name, seed, with_token=True, **extra):
        identity, _, token_path = member(name, hours=1.0 if with_token else None)
        access = dict(access_token=token_path, owner_public_key=str(folder / "owner.key.pub")) if with_token else {}
        torch.manual_seed(seed)
        model = torch.nn.Linear(16, 16)
        peer = SwarmPeer(SwarmOptions(run_id=RUN, identity_path=identity, **access, **swarm, **extra))
        return peer, model

    folder, _, member = owner
    peers = []
    try:
        server, server_model = make_peer("peer_server", 0)
        peers.append(server)
        server.join(torch.optim.AdamW(server_model.parameters()))
        joiner, joiner_model = make_peer("peer_joiner", 1, initial_peers=server.peer_addresses)
        peers.append(joiner)
        joiner.join(torch.optim.AdamW(joiner_model.parameters()))
        for _ in range(100):  # a try finds no one until the server's offer to share reaches the DHT
            joiner.optimizer.load_state_from_peers()
            if torch.equal(joiner_model.weight, server_model.weight):
                break
        assert torch.equal(joiner_model.weight, server_model.weight), "the admitted joiner got no state"

        stranger, stranger_model = make_peer("peer_stranger", 2, with_token=False,
                                             initial_peers=server.peer_addresses)
        with pytest.raises(UserError, match=rf"is not admitted to run '{RUN}' by /ip4/127\.0\.0\.1/.*presents "
                                            r"no access token; ask the run's owner for an access token"):
            stranger.join(torch.optim.AdamW(stranger_model.parameters()))
        assert stranger.dht is None
    finally:
        for peer in reversed(peers):
            peer.leave()
