"""Print a peer's id from its identity file (for allowed_peers, or to ask the run's owner for a token).

    python trainer/peer_id.py --identity_path peers/alice.id [--create]
"""

from convmodel.collaborative.access.tools import peer_id_main

if __name__ == "__main__":
    peer_id_main()
