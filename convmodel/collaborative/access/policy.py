"""The access options of a swarm peer (allowed_peers, owner_public_key, access_token): checked, made a policy.

Checked when the peer starts, with the other swarm options: a token that is malformed, for
another run or peer, or already expired stops this peer with one line before it contacts
anyone, rather than as a refusal from every other peer.
"""

import os

from convmodel.collaborative.access.gate import AccessPolicy
from convmodel.collaborative.access.tokens import (
    format_time,
    peer_id_of_identity,
    read_public_key,
    read_token,
)


def access_problems(options, option: str) -> list[str]:
    """The problems of the access options that need no file (each a clause for SwarmOptions' one error)."""
    problems = []
    peers = options.allowed_peers
    if peers is not None and (not isinstance(peers, list | tuple) or not all(isinstance(p, str) for p in peers)):
        problems.append(f"allowed_peers must be a list of peer ids, got {peers!r}")
    elif peers:
        from convmodel.collaborative.access.tokens import is_peer_id

        for peer in peers:
            if not is_peer_id(peer):
                problems.append(f"allowed_peers: {peer!r} is not a peer id (print a peer's id with "
                                "python trainer/peer_id.py --identity_path FILE)")
    if options.access_token and not options.owner_public_key:
        problems.append("access_token needs owner_public_key (the same owner key checks the other peers' tokens)")
    if options.access_token and not options.identity_path:
        problems.append("access_token needs identity_path: the token names this peer's id, which is stable only "
                        "with an identity file")
    return problems


def access_policy(options, option: str) -> AccessPolicy | None:
    """The gate's policy for these options (None: a public swarm, no gate); UserError on a bad key or token."""
    from convmodel.errors import UserError

    if not options.allowed_peers and not options.owner_public_key:
        return None
    public_key = None
    if options.owner_public_key:
        public_key = read_public_key(options.owner_public_key, f"{option}.owner_public_key")
    own_token = None
    if options.access_token:
        token_option = f"{option}.access_token"
        token = read_token(options.access_token, token_option)
        if not os.path.exists(options.identity_path):
            raise UserError(f"{token_option}: identity_path {options.identity_path!r} does not exist yet, so "
                            "no token can be for this peer; run python trainer/peer_id.py --identity_path "
                            f"{options.identity_path} --create and ask the run's owner for a token for that id")
        peer_id = peer_id_of_identity(options.identity_path)
        problem = token.problem(public_key, options.run_id, peer_id)
        if problem is not None:
            raise UserError(f"{token_option}: {options.access_token!r} does not admit this peer ({peer_id}) to run "
                            f"{options.run_id!r}: {problem.removeprefix('its access token ')}; ask the run's "
                            "owner for a new one (python trainer/issue_token.py)")
        if token.expires < float("inf"):
            print(f"[convmodel] access token for peer {peer_id} valid until {format_time(token.expires)}",
                  flush=True)
        own_token = token.text
    return AccessPolicy(options.run_id, frozenset(options.allowed_peers or ()), public_key, own_token)
