"""The run's owner issues a peer an access token to a private swarm (offline, signed with the owner key).

    python trainer/issue_token.py --owner_key owner.key [--create_owner_key] --run_id NAME \
        --peer_id 12D3KooW... [--hours 24] [--output alice.token]
"""

from convmodel.collaborative.access.tools import issue_token_main

if __name__ == "__main__":
    issue_token_main()
