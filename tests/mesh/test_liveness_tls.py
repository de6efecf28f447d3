"""Pinned-certificate https probes of WAN peers (seed 001): a real TLS server on 127.0.0.1 with
a self-signed certificate made here; the probe trusts the pin, not a CA, and refuses others."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleet.clock import ManualClock
from fleet.mesh.liveness import LivenessProbe, Reach, ReachabilityCheck, normal_fingerprint
from fleet.mesh.sqlite_store import SQLiteMeshStore
from fleet.mesh.store import MachineIdentity
from fleet.settings import FleetSettings
from tests.mesh.test_liveness import HealthServer

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
S = FleetSettings()


def self_signed(tmp: Path, name: str) -> tuple[Path, Path, str]:
    """(cert.pem, key.pem, its SHA-256 fingerprint as openssl prints it: AB:CD:…)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return cert_path, key_path, ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def tls_server(cert: Path, key: Path) -> HealthServer:
    """A peer's health endpoint over https with the given certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return HealthServer(tls=context)


@pytest.fixture
def peer(tmp_path):
    cert, key, fingerprint = self_signed(tmp_path, "mac3.wan.example")
    server = tls_server(cert, key)
    yield server, fingerprint
    server.stop()


def test_the_pinned_certificate_is_accepted_and_any_other_refused(peer, tmp_path):
    server, fingerprint = peer
    _, _, other = self_signed(tmp_path, "impostor.example")
    check = ReachabilityCheck(timeout_seconds=2)
    try:
        assert (
            check(server.url, fingerprint) is Reach.REACHABLE
        )  # self-signed: the pin is the trust
        assert check(server.url, fingerprint.replace(":", "").lower()) is Reach.REACHABLE
        assert check(server.url, other) is Reach.UNREACHABLE  # refused: not the machine we pinned
        assert check(server.url.replace("https", "http"), fingerprint) is Reach.UNREACHABLE
        # Without a pin the CA check applies: a self-signed peer is not taken for alive.
        assert check(server.url) is not Reach.REACHABLE
    finally:
        check.close()
    assert server.hits == 3  # the refused answer reached it, but vouched for nothing


def test_a_fingerprint_that_is_not_sha256_is_a_clear_error():
    with pytest.raises(ValueError, match="64 hex digits"):
        normal_fingerprint("AB:CD")


def test_liveness_of_a_wan_peer_goes_by_its_pinned_certificate(peer, tmp_path):
    """Configured per peer (FLEET_LIVENESS_PINNED_CERTS): the peer that shows its pinned
    certificate is alive; once its address shows another certificate it is declared down."""
    server, fingerprint = peer
    store = SQLiteMeshStore(tmp_path / "mesh.db")
    clock = ManualClock(T0)
    store.heartbeat(MachineIdentity(machine_id="mac3", mesh_id="wan"), clock.now(), server.url, [])
    settings = FleetSettings(liveness_pinned_certs={"mac3": fingerprint})
    probe = LivenessProbe.from_settings(store, settings, clock=clock, timeout_seconds=2)
    try:
        report = probe.confirm(clock.advance(2 * S.heartbeat_seconds))
        assert [(v.machine_id, v.outcome) for v in report.checked] == [("mac3", "alive")]

        # Another host now answers at mac3's address with its own certificate.
        cert, key, _ = self_signed(tmp_path, "someone-else.example")
        server.stop()
        impostor = tls_server(cert, key)
        store.heartbeat(
            MachineIdentity(machine_id="mac3", mesh_id="wan"), clock.now(), impostor.url, []
        )
        report = probe.confirm(clock.advance(2 * S.heartbeat_seconds))
        assert report.declared_down == ["mac3"] and impostor.hits == 2
        impostor.stop()
    finally:
        probe.close()
        store.close()
