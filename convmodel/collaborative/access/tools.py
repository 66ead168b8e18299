"""The two commands of a private swarm: print a peer's id, and (the owner, offline) issue it a token."""

import os
import time

from convmodel.errors import UserError


def peer_id(identity_path: str, create: bool = False) -> None:
    """Print the peer id of an identity file (what allowed_peers lists and a token names).

    Args:
        identity_path: The peer's identity file (its trainer.strategy.init_args.identity_path).
        create: Make the identity file first if it does not exist.
    """
    from convmodel.collaborative.access.tokens import peer_id_of_identity

    if not create and not os.path.exists(identity_path):
        raise UserError(f"--identity_path: {identity_path!r} does not exist; add --create to make it")
    try:
        print(peer_id_of_identity(identity_path, create=create))
    except (OSError, ValueError) as exc:
        raise UserError(f"--identity_path: {identity_path!r} is not a hivemind identity file ({exc})") from exc


def issue_token(owner_key: str, run_id: str, peer_id: str, hours: float = 24.0, output: str | None = None,
                create_owner_key: bool = False) -> None:
    """Issue an access token admitting one peer to a run until it expires (the run's owner, offline).

    Args:
        owner_key: The owner's private key file; its public half (owner_key.pub) is every peer's owner_public_key.
        run_id: The run the token admits to (trainer.strategy.init_args.run_id).
        peer_id: The peer's id, from python trainer/peer_id.py --identity_path FILE on that peer.
        hours: Hours the token stays valid; expiry is how access ends, so prefer short tokens reissued.
        output: Write the token to this file (the peer's access_token); default print it.
        create_owner_key: Make the owner key (and .pub) first if it does not exist.
    """
    from convmodel.collaborative.access.tokens import create_owner_key as make_key
    from convmodel.collaborative.access.tokens import format_time, is_peer_id, read_private_key
    from convmodel.collaborative.access.tokens import issue_token as sign

    if not is_peer_id(str(peer_id)):
        raise UserError(f"--peer_id: {peer_id!r} is not a peer id; print it with python trainer/peer_id.py "
                        "--identity_path FILE on that peer")
    if not isinstance(hours, int | float) or not hours > 0:
        raise UserError(f"--hours must be > 0, got {hours!r}")
    if not os.path.exists(owner_key):
        if not create_owner_key:
            raise UserError(f"--owner_key: {owner_key!r} does not exist; add --create_owner_key to make it")
        key = make_key(owner_key)
        print(f"[convmodel] new owner key {owner_key}; give every peer owner_public_key: {owner_key}.pub")
    else:
        try:
            key = read_private_key(owner_key)
        except (OSError, ValueError) as exc:
            raise UserError(f"--owner_key: {owner_key!r} is not an owner key ({exc})") from exc
    expires = time.time() + hours * 3600
    token = sign(key, str(run_id), str(peer_id), expires)
    if output is None:
        print(token)
        return
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(token + "\n")
    print(f"[convmodel] token for peer {peer_id} in run {run_id!r}, valid until {format_time(expires)}: {output}")


def peer_id_main(argv: list[str] | None = None) -> None:
    """Entry point of trainer/peer_id.py."""
    from convmodel.tool_cli import run_tool

    run_tool(peer_id, argv, "peer_id.py")


def issue_token_main(argv: list[str] | None = None) -> None:
    """Entry point of trainer/issue_token.py."""
    from convmodel.tool_cli import run_tool

    run_tool(issue_token, argv, "issue_token.py")
