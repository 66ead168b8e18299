"""Who may join a private swarm: signed access tokens, an allowlist of peer ids, and the gate on every RPC.

tokens.py makes and checks the owner's tokens (offline, no network); gate.py refuses the RPCs of
peers that are neither allowlisted nor hold a valid token, in every hivemind process of a peer;
policy.py turns the swarm options into the gate's policy; tools.py holds the two commands.
"""
