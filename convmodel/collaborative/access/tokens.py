"""Access tokens: the run's owner signs "peer P may join run R until T" with an RSA key, offline.

A token is one line, `cmv1.<payload>.<signature>`: the payload is base64 JSON with run_id,
peer_id and expires (Unix seconds), the signature is the owner's RSA-PSS signature of the payload
(hivemind.utils.crypto). A token names one peer id, and libp2p's secure channel proves that id on
every connection, so a copied token is useless to anyone without that peer's identity file.
Expiry is the only revocation: issue short-lived tokens and reissue them.
"""

import base64
import json
import os
import time
from dataclasses import dataclass

from convmodel.errors import UserError

TOKEN_PREFIX = "cmv1"


@dataclass(frozen=True)
class AccessToken:
    """A parsed token; `text` is the line it came from (what a peer hands over when asked)."""

    run_id: str
    peer_id: str
    expires: float
    payload: bytes
    signature: bytes
    text: str

    def problem(self, public_key, run_id: str, peer_id: str, now: float | None = None) -> str | None:
        """Why this token does not admit `peer_id` to `run_id` under the owner's `public_key`; None if it does."""
        if not public_key.verify(self.payload, self.signature):
            return "its access token is not signed by this run's owner key"
        if self.run_id != run_id:
            return f"its access token is for run {self.run_id!r}"
        if self.peer_id != peer_id:
            return f"its access token is for peer {self.peer_id}"
        if self.expires <= (time.time() if now is None else now):
            return f"its access token expired at {format_time(self.expires)}"
        return None


def format_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def issue_token(owner_key, run_id: str, peer_id: str, expires: float) -> str:
    """The token line admitting `peer_id` to `run_id` until `expires` (Unix seconds)."""
    payload = json.dumps({"run_id": run_id, "peer_id": peer_id, "expires": int(expires)}, sort_keys=True).encode()
    signature = owner_key.sign(payload)  # hivemind returns it base64-encoded already
    return f"{TOKEN_PREFIX}.{base64.urlsafe_b64encode(payload).decode()}.{signature.decode()}"


def parse_token(text: str) -> AccessToken:
    """Parse a token line; ValueError says what is wrong with it."""
    text = text.strip()
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise ValueError(f"not an access token (one line starting with {TOKEN_PREFIX}.)")
    try:
        payload = base64.urlsafe_b64decode(parts[1])
        fields = json.loads(payload)
        return AccessToken(str(fields["run_id"]), str(fields["peer_id"]), float(fields["expires"]),
                           payload, parts[2].encode(), text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not an access token (its payload does not decode: {exc})") from exc


def read_token(path: str, option: str) -> AccessToken:
    """The token in file `path`; one UserError naming `option` when it is missing or malformed."""
    try:
        with open(path) as f:
            return parse_token(f.read())
    except OSError as exc:
        raise UserError(f"{option}: cannot read {path!r} ({exc.strerror}); it is the file issue_token.py "
                        "wrote for this peer") from exc
    except ValueError as exc:
        raise UserError(f"{option}: {path!r} is {exc}; ask the run's owner for a new one "
                        "(python trainer/issue_token.py)") from exc


# ---- keys ------------------------------------------------------------------------------------------


def read_private_key(path: str):
    """An RSA private key file (DER), as hivemind stores its keys."""
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey.__new__(RSAPrivateKey)
    with open(path, "rb") as f:
        key.__setstate__({"_private_key": f.read()})
    return key


def create_owner_key(path: str):
    """A new owner key at `path` (mode 600) and its public half at `path`.pub; returns the private key."""
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(key.to_bytes())
    with open(f"{path}.pub", "wb") as f:
        f.write(key.get_public_key().to_bytes() + b"\n")
    return key


def read_public_key(value: str, option: str):
    """The owner's public key: an `ssh-rsa AAAA...` line itself, or a file holding one."""
    from hivemind.utils.crypto import RSAPublicKey

    text = value.strip()
    if not text.startswith("ssh-rsa "):
        try:
            with open(text, "rb") as f:
                text = f.read().decode(errors="replace").strip()
        except OSError as exc:
            raise UserError(f"{option}: cannot read {value!r} ({exc.strerror}); give the owner's .pub file "
                            "that issue_token.py wrote, or its ssh-rsa line") from exc
    try:
        return RSAPublicKey.from_bytes(text.encode())
    except (ValueError, TypeError) as exc:
        raise UserError(f"{option}: {value!r} is not an RSA public key ({exc}); give the owner's .pub file "
                        "that issue_token.py wrote") from exc


def is_peer_id(text: str) -> bool:
    """Whether `text` is a base58 libp2p peer id: a multihash (sha2-256 `Qm...` or identity `12D3...`)."""
    from hivemind.p2p import PeerID

    try:
        raw = PeerID.from_base58(text).to_bytes()
    except Exception:  # not base58
        return False
    return len(raw) > 2 and raw[0] in (0x00, 0x12) and raw[1] == len(raw) - 2


def peer_id_of_identity(identity_path: str, create: bool = False) -> str:
    """The peer id (base58) that hivemind derives from an identity file; `create` makes the file if missing."""
    from hivemind.p2p import P2P, PeerID

    if create and not os.path.exists(identity_path):
        os.makedirs(os.path.dirname(os.path.abspath(identity_path)), exist_ok=True)
        P2P.generate_identity(identity_path)
    with open(identity_path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()
