"""Credentials for a TLS-secured, node-authenticated Flower deployment.

``fedpeft credentials DIR [--nodes N] [--host NAME ...]`` writes

- ``ca.crt``/``ca.key``: a private certificate authority (ECDSA P-384, 10 years);
- ``server.crt``/``server.key``: the SuperLink's certificate, signed by that CA, valid
  for ``localhost``, ``127.0.0.1`` and every ``--host`` (the names nodes dial);
- ``node-<i>``/``node-<i>.pub``: one OpenSSH ECDSA key pair per SuperNode, which
  ``flwr supernode register`` admits when the SuperLink runs with
  ``--enable-supernode-auth``.

The SuperLink gets ``--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile
server.key``, each SuperNode ``--root-certificates ca.crt`` and its key pair, and the
``flwr`` CLI ``root-certificates = "ca.crt"`` in its connection. Private keys are
written with mode 0600. A directory that already holds any of these files is refused
unless ``--force``: a new CA and new keys would lock out every node deployed so far.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedpeft.config import ConfigError

VALID_DAYS = 3650


def write_credentials(
    out: Path, nodes: int, hosts: list[str] | None = None, force: bool = False
) -> list[Path]:
    """Write the CA, the SuperLink's certificate and ``nodes`` node key pairs; returns
    the files written.

    Refuses (:class:`fedpeft.config.ConfigError`, one sentence) when any of those files
    already exists, unless ``force``: a new CA and new node keys silently replacing the
    old ones would make the SuperLink stop trusting every node deployed with them.
    """
    names = ["ca.crt", "ca.key", "server.crt", "server.key"]
    names += [f"node-{i}{suffix}" for i in range(nodes) for suffix in ("", ".pub")]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"Cannot create the credentials directory '{out}' ({err.strerror or err})."
        ) from err
    # lexists: a dangling symlink named ca.key would still be written through
    existing = [out / name for name in names if os.path.lexists(out / name)]
    if existing and not force:
        raise ConfigError(
            f"'{existing[0]}' already exists; pass --force to replace the credentials in "
            f"'{out}' (every node set up with the old CA or keys then has to get the new ones)."
        )
    try:
        return _write_all(out, nodes, hosts)
    except OSError as err:
        raise ConfigError(
            f"Cannot write the credentials file '{err.filename or out}' ({err.strerror or err})."
        ) from err


def _write_all(out: Path, nodes: int, hosts: list[str] | None) -> list[Path]:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate("fedpeft CA", ca_key.public_key(), ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = ["localhost", "127.0.0.1", *(hosts or [])]
    server_cert = _certificate(
        "fedpeft SuperLink", server_key.public_key(), ca_key, ca_cert, names=names
    )
    written = [
        _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        _write(out / "ca.key", _pem_private(ca_key), private=True),
        _write(out / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM)),
        _write(out / "server.key", _pem_private(server_key), private=True),
    ]
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        written.append(_write(out / f"node-{i}", private, private=True))
        written.append(_write(out / f"node-{i}.pub", public + b"\n"))
    return written


def _certificate(
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    ca: bool = False,
    names: list[str] | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
    return builder.sign(signer, hashes.SHA384())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path
