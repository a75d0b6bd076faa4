"""HTTP_PROXY and HTTP_CA_BUNDLE: an issuer reached through a forward proxy,
or behind a private certificate authority.

Real parts: an HTTPS key-set server on 127.0.0.1 with a certificate from a CA
made here, and a forward proxy on 127.0.0.1 (absolute-form ``GET`` for http
URLs, a ``CONNECT`` tunnel for https) that notes what it was asked.
"""

from __future__ import annotations

import datetime
import gc
import ipaddress
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flask_oauth_verify import ConfigurationError
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.testing import IssuerServer, TokenIssuer, auth_header

from .conftest import JSONHandler, make_app
from .test_faults import BUDGET, MARGIN, RawServer, drip_closing_body, drip_headers


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, Any], ca: bool
) -> x509.Certificate:
    issuer_name, issuer_key = issuer
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # What strict X.509 checking wants (urllib3 turns it on with Python 3.13)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
        .add_extension(_key_usage(ca), critical=True)
    )
    if not ca:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a server's key signs its handshakes."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class PrivateCA:
    """A CA made for the test, and a certificate for 127.0.0.1 it signed."""

    def __init__(self, directory: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("Test Private CA", ca_key, ("Test Private CA", ca_key), ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = _certificate("127.0.0.1", server_key, ("Test Private CA", ca_key), ca=False)
        self.bundle = directory / "private-ca.pem"
        self.bundle.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.chain = directory / "server.pem"
        self.chain.write_bytes(
            server.public_bytes(serialization.Encoding.PEM)
            + server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


class _KeySet(JSONHandler):
    jwks: dict[str, Any]

    def do_GET(self) -> None:
        self.send_json(self.jwks)


def _serve(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def private_ca(tmp_path: Path) -> PrivateCA:
    return PrivateCA(tmp_path)


@pytest.fixture
def https_keys(private_ca: PrivateCA, tokens: TokenIssuer) -> Iterator[str]:
    """The issuer's key set over HTTPS, certificate from the private CA: its URL."""

    class Handler(_KeySet):
        pass

    Handler.jwks = tokens.jwks()
    for running in _serve(_over_tls(ThreadingHTTPServer(("127.0.0.1", 0), Handler), private_ca)):
        yield f"https://127.0.0.1:{running.server_port}/jwks"


def _over_tls(server: ThreadingHTTPServer, private_ca: PrivateCA) -> ThreadingHTTPServer:
    """``server`` answering over TLS with the private CA's certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(private_ca.chain)
    # the handshake in the request's thread, whose socket is closed when it
    # fails (a client that refuses the certificate), not in accept()
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    return server


class _Proxy(JSONHandler):
    """A forward proxy: relays absolute-form GETs, tunnels CONNECT."""

    protocol_version = "HTTP/1.1"
    asked: list[str]

    def do_GET(self) -> None:
        self.asked.append(f"GET {self.path}")
        with urlopen(self.path, timeout=5) as upstream:
            body = upstream.read()
            content_type = upstream.headers.get("Content-Type", "application/json")
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_CONNECT(self) -> None:
        self.asked.append(f"CONNECT {self.path}")
        host, port = self.path.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as upstream:
            self.send_response(200, "Connection established")
            self.end_headers()
            _relay(self.connection, upstream)
        self.close_connection = True


def _relay(one: socket.socket, other: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    while True:
        ready, _, _ = select.select([one, other], [], [], 5)
        if not ready:
            return
        for source in ready:
            data = source.recv(65536)
            if not data:
                return
            (other if source is one else one).sendall(data)


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    """A forward proxy on 127.0.0.1: its URL, and what it was asked."""
    asked: list[str] = []

    class Handler(_Proxy):
        pass

    Handler.asked = asked
    for running in _serve(ThreadingHTTPServer(("127.0.0.1", 0), Handler)):
        yield f"http://127.0.0.1:{running.server_port}", asked


def _fetched(tokens: TokenIssuer, **settings: Any) -> dict[str, Any]:
    """Settings that fetch the key set (``JWKS_URI`` in ``settings``), never static."""
    config = tokens.config(audience="api", **settings)
    config.pop("OAUTH_VERIFY_JWKS", None)
    return config


def _status(config: dict[str, Any], token: str) -> int:
    app = make_app(config)
    try:
        return app.test_client().get("/protected", headers=auth_header(token)).status_code
    finally:
        get_state(app).fetcher.close()  # its TLS connections, not left to the GC


# -- a private certificate authority -------------------------------------------------


def test_an_issuer_behind_a_private_ca_needs_its_bundle(
    tokens: TokenIssuer, https_keys: str, private_ca: PrivateCA
) -> None:
    token = tokens.mint()
    without = _fetched(tokens, JWKS_URI=https_keys, HTTP_TIMEOUT=(1, 2))
    assert _status(without, token) == 503  # the default bundle does not know the CA
    trusted = {**without, "OAUTH_VERIFY_HTTP_CA_BUNDLE": str(private_ca.bundle)}
    assert _status(trusted, token) == 200


def test_the_ca_bundle_must_exist() -> None:
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_HTTP_CA_BUNDLE"):
        make_app(
            {
                "OAUTH_VERIFY_ISSUER": "https://issuer.example.test",
                "OAUTH_VERIFY_AUDIENCE": "api",
                "OAUTH_VERIFY_HTTP_CA_BUNDLE": "/nonexistent/ca.pem",
            }
        )


# -- a forward proxy -----------------------------------------------------------------


def test_an_issuer_is_reached_through_the_proxy(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, proxy: tuple[str, list[str]]
) -> None:
    url, asked = proxy
    config = served_tokens.config(audience="api", HTTP_PROXY=url)
    assert _status(config, served_tokens.mint()) == 200
    assert asked == [f"GET {issuer_server.url}/jwks"]


def test_https_goes_through_the_proxy_in_a_tunnel_with_tls_end_to_end(
    tokens: TokenIssuer,
    https_keys: str,
    private_ca: PrivateCA,
    proxy: tuple[str, list[str]],
) -> None:
    url, asked = proxy
    config = _fetched(tokens, JWKS_URI=https_keys, HTTP_PROXY=url)
    token = tokens.mint()
    assert _status(config, token) == 503  # the certificate is still checked
    trusted = {**config, "OAUTH_VERIFY_HTTP_CA_BUNDLE": str(private_ca.bundle)}
    assert _status(trusted, token) == 200
    assert asked == [f"CONNECT {https_keys.split('/')[2]}"] * 2


# A tunnel whose CONNECT answer the deadline cut leaves urllib3 one socket
# for the garbage collector (its ResourceWarning): collected here, in this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_trickles_is_cut_at_the_deadline(tokens: TokenIssuer, scheme: str) -> None:
    """Its answer to a GET (http) or to the CONNECT of a tunnel (https, set
    up before the request proper: it ran unwatched for as long as the proxy
    dripped)."""
    trickling = RawServer(drip_headers)
    try:
        config = _fetched(
            tokens,
            JWKS_URI=f"{scheme}://127.0.0.1:9/jwks",  # never reached: the proxy answers
            HTTP_PROXY=trickling.url,
            HTTP_TIMEOUT=(0.25, 0.5),
        )
        started = time.monotonic()
        assert _status(config, tokens.mint()) == 503
        assert time.monotonic() - started <= BUDGET + MARGIN
    finally:
        trickling.close()
        gc.collect()


@pytest.fixture
def tls_proxy(private_ca: PrivateCA) -> Iterator[str]:
    """A forward proxy reached over TLS itself (an ``https://`` proxy URL):
    a tunnel to an https issuer is then TLS inside TLS."""

    class Handler(_Proxy):
        pass

    Handler.asked = []
    for running in _serve(_over_tls(ThreadingHTTPServer(("127.0.0.1", 0), Handler), private_ca)):
        yield f"https://127.0.0.1:{running.server_port}"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_body_trickled_through_an_https_proxy_is_cut_at_the_deadline(
    tokens: TokenIssuer,
    private_ca: PrivateCA,
    tls_proxy: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """TLS in TLS: urllib3's transport for it has no shutdown(), so cutting
    it failed (an ERROR with a traceback) and the request ran on for as long
    as the issuer dripped."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(private_ca.chain)

    def tls_drip(conn: socket.socket, stop: threading.Event) -> None:
        drip_closing_body(context.wrap_socket(conn, server_side=True), stop)

    issuer = RawServer(tls_drip)
    try:
        config = _fetched(
            tokens,
            JWKS_URI=f"https://127.0.0.1:{issuer.port}/jwks",
            HTTP_PROXY=tls_proxy,
            HTTP_CA_BUNDLE=str(private_ca.bundle),
            HTTP_TIMEOUT=(0.25, 0.5),
        )
        started = time.monotonic()
        assert _status(config, tokens.mint()) == 503
        assert time.monotonic() - started <= BUDGET + MARGIN
        assert issuer.connections == 1  # through the tunnel, to the dripping issuer
        assert not [r for r in caplog.records if "deadline failed" in r.getMessage()]
    finally:
        issuer.close()
        gc.collect()


@pytest.mark.parametrize(
    "value",
    [
        "user:pw@corp-proxy:3128",
        "socks5://user:pw@corp-proxy:1080",
        "ftp://corp-proxy",
        3128,
        "http://",
    ],
)
def test_the_proxy_must_be_an_http_url(value: object) -> None:
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_HTTP_PROXY") as raised:
        make_app(
            {
                "OAUTH_VERIFY_ISSUER": "https://issuer.example.test",
                "OAUTH_VERIFY_AUDIENCE": "api",
                "OAUTH_VERIFY_HTTP_PROXY": value,
            }
        )
    assert "corp-proxy" not in str(raised.value)  # never echoed: it may hold a password


def test_the_proxy_password_is_not_in_the_settings_repr() -> None:
    app = make_app(
        {
            "OAUTH_VERIFY_ISSUER": "https://issuer.example.test",
            "OAUTH_VERIFY_AUDIENCE": "api",
            "OAUTH_VERIFY_JWKS": {"keys": []},
            "OAUTH_VERIFY_HTTP_PROXY": "http://ops:s3cr3t-pw@proxy.internal:3128",
        }
    )
    shown = repr(get_state(app).settings)
    assert "s3cr3t-pw" not in shown
    assert "ops:" not in shown
    assert "http://***@proxy.internal:3128" in shown  # where it goes stays visible
