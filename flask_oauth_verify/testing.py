"""Test helpers: a token issuer with real keys and a real HTTP server.

For users' own test suites, the example app's development issuer, and ours::

    tokens = TokenIssuer()                       # one RS256 key
    app.config.update(tokens.config(audience="api"))
    token = tokens.mint(scopes=["read:users"], organization_id="org_1")
    client.get("/users", headers=auth_header(token))

``tokens.serve()`` starts an :class:`IssuerServer` on 127.0.0.1 that serves
discovery metadata, the JWK Set and an RFC 7662 introspection endpoint, so
the fetching paths run against a real server. Never use this in production:
the keys are generated in memory and minting is unrestricted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, JWKRegistry, Key, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

__all__ = ["IssuerServer", "Reply", "TokenIssuer", "auth_header"]

_ALG_KEYS: dict[str, Callable[[], Key]] = {
    "RS256": lambda: RSAKey.generate_key(2048),
    "RS384": lambda: RSAKey.generate_key(2048),
    "RS512": lambda: RSAKey.generate_key(2048),
    "PS256": lambda: RSAKey.generate_key(2048),
    "PS384": lambda: RSAKey.generate_key(2048),
    "PS512": lambda: RSAKey.generate_key(2048),
    "ES256": lambda: ECKey.generate_key("P-256"),
    "ES384": lambda: ECKey.generate_key("P-384"),
    "ES512": lambda: ECKey.generate_key("P-521"),
    "EdDSA": lambda: OKPKey.generate_key("Ed25519"),
    "Ed25519": lambda: OKPKey.generate_key("Ed25519"),
}


def auth_header(token: str) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` for a test client call.

    :param token: the access token.
    """
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes | str | Mapping[str, Any]) -> str:
    """base64url without padding, of bytes, text or a JSON object."""
    if isinstance(data, Mapping):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Reply:
    """A scripted HTTP answer for :class:`IssuerServer` routes.

    :param status: the HTTP status.
    :param body: bytes, text, or a JSON-serialisable object.
    :param headers: extra response headers.
    """

    def __init__(
        self, status: int = 200, body: Any = b"", headers: Mapping[str, str] | None = None
    ) -> None:
        self.status = status
        if isinstance(body, bytes):
            self.body = body
            content_type = "application/octet-stream"
        elif isinstance(body, str):
            self.body = body.encode()
            content_type = "text/plain"
        else:
            self.body = json.dumps(body).encode()
            content_type = "application/json"
        self.headers = {"Content-Type": content_type, **(headers or {})}


class Request:
    """What a route handler sees of an incoming request."""

    def __init__(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body

    def form(self) -> dict[str, str]:
        """The body as ``application/x-www-form-urlencoded`` (last value wins)."""
        return {k: v[-1] for k, v in parse_qs(self.body.decode(errors="replace")).items()}

    def json(self) -> Any:
        """The body as JSON (``None`` when it is not)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


Handler = Callable[[Request], Reply]


class _QuietHTTPServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (a timeout, a size cap) is no error."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class IssuerServer:
    """A real HTTP server on 127.0.0.1 whose routes a test controls.

    Routes map a path to a handler ``(Request) -> Reply``. Each request is
    counted (:attr:`hits`), and :meth:`hold` makes a route block until
    :meth:`release` (an outage that hangs, without sleeping in the test).

    :param host: the address to listen on (a free port is chosen).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Handler] = {}
        self.hits: Counter[str] = Counter()
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._held: dict[str, threading.Event] = {}
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def setup(self) -> None:
                super().setup()
                server._connections.add(self.connection)

            def finish(self) -> None:
                server._connections.discard(self.connection)
                super().finish()

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                request = Request(self.command, path, dict(self.headers), body)
                reply = server._dispatch(request)
                if reply is None:
                    self.close_connection = True  # released: drop it, no answer
                    return
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = _serve
            do_POST = _serve

        #: open keep-alive connections, cut by close() as a real outage would
        self._connections: set[socket.socket] = set()
        self._httpd = _QuietHTTPServer((host, 0), _Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        # A short poll interval: close() returns in ~20 ms instead of 0.5 s.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def _dispatch(self, request: Request) -> Reply | None:
        with self._cond:
            self.hits[request.path] += 1
            self.requests.append(request)
            self._cond.notify_all()
            held = self._held.get(request.path)
        if held is not None:
            held.wait(timeout=30)
            return None  # drop the connection after the hold
        handler = self.routes.get(request.path)
        if handler is None:
            return Reply(404, {"error": "not_found"})
        return handler(request)

    def route(self, path: str, handler: Handler | Reply) -> None:
        """Serve ``path`` with ``handler`` (or always the same ``Reply``).

        :param path: the URL path, e.g. ``"/jwks"`` (query strings are ignored).
        :param handler: a function ``(Request) -> Reply``, or one
            :class:`Reply` for every request.
        """
        if isinstance(handler, Reply):
            reply = handler
            self.routes[path] = lambda _request: reply
        else:
            self.routes[path] = handler

    def hold(self, path: str) -> None:
        """Make requests to ``path`` hang until :meth:`release`.

        :param path: the URL path to hold.
        """
        self._held[path] = threading.Event()

    def release(self, path: str | None = None) -> None:
        """Let held requests (of ``path``, or all) go; they get no answer.

        :param path: the held path to release; every held path when ``None``.
        """
        for name in [path] if path else list(self._held):
            event = self._held.pop(name, None)
            if event is not None:
                event.set()

    def wait_for_hits(self, path: str, count: int, timeout: float = 10.0) -> bool:
        """Block until ``path`` was requested ``count`` times (or timeout).

        :param path: the URL path.
        :param count: the number of requests to wait for (in total, since
            the server started).
        :param timeout: seconds to wait at most.
        :returns: ``True`` when the count was reached, ``False`` on timeout.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self.hits[path] >= count, timeout=timeout)

    def close(self) -> None:
        """Stop the server and cut open connections (clients see it go down)."""
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> IssuerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TokenIssuer:
    """Makes keys, publishes their JWK Set and mints tokens.

    :param issuer: the ``iss`` of minted tokens (replaced by the server URL
        when :meth:`serve` is called).
    :param alg: the algorithm of the first key.
    :param audience: the default ``aud`` of minted tokens.
    """

    def __init__(
        self,
        issuer: str = "https://issuer.example.test",
        *,
        alg: str = "RS256",
        audience: str = "api",
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._keys: dict[str, tuple[str, Key]] = {}
        self.current_kid = self.add_key(alg)
        self.opaque: dict[str, dict[str, Any]] = {}
        self._revoked: set[str] = set()
        self.introspection_credentials: tuple[str, str] = ("resource-server", "rs-secret")
        #: The one client-authentication method the introspection endpoint
        #: accepts (``client_secret_basic``, ``client_secret_post``,
        #: ``bearer``, ``none``); ``None`` accepts Basic or post.
        self.introspection_auth: str | None = None
        #: The token accepted with ``introspection_auth = "bearer"``.
        self.introspection_bearer: str = "introspect-scope-token"
        #: The one body format accepted (``"form"`` or ``"json"``); ``None``
        #: accepts both.
        self.introspection_body: str | None = None
        #: How the endpoint reads HTTP Basic credentials: ``"form"`` (form-
        #: decoded first, RFC 6749 §2.3.1), ``"raw"`` (as they are, as VoxKey
        #: and Beyond Identity do), or ``None`` (accepts either spelling).
        self.introspection_basic_encoding: str | None = None
        self.server: IssuerServer | None = None

    @classmethod
    def persistent(
        cls,
        path: str | os.PathLike[str],
        issuer: str = "https://issuer.example.test",
        *,
        alg: str = "RS256",
        audience: str = "api",
    ) -> TokenIssuer:
        """An issuer whose signing key is kept in the file ``path`` (created,
        owner-only, on first use), so that every process that builds it —
        the app, ``flask oauth-verify mint``, a second worker — signs and
        publishes the same key. A development issuer built at import without
        it has a new key in each process, and a token minted by one is
        unknown to the other.

        :param path: the key file (a private JWK; never commit it).
        :param issuer: the ``iss`` of minted tokens.
        :param alg: the algorithm of the key (the stored key must be one).
        :param audience: the default ``aud`` of minted tokens.
        :raises ValueError: when the file holds no private key for ``alg``.
        """
        made = cls(issuer, alg=alg, audience=audience)
        if not os.path.exists(path):
            key = made._keys[made.current_kid][1]
            mine = {"alg": alg, "kid": made.current_kid, "key": key.as_dict(private=True)}
            # Written whole beside it, then linked into place: a process
            # starting at the same moment reads one whole key file or the other's.
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)  # e.g. a new app.instance_path
            text = json.dumps(mine)
            descriptor, draft = tempfile.mkstemp(dir=folder)
            try:
                with os.fdopen(descriptor, "w", encoding="utf-8") as written:  # mode 0600
                    written.write(text)
                _publish_new_file(draft, path, text)
                return made
            except FileExistsError:
                pass  # another process was first: use its key
            finally:
                os.unlink(draft)
        with open(path, encoding="utf-8") as stored:
            data = json.load(stored)
        if not isinstance(data, dict) or data.get("alg") != alg or "key" not in data:
            raise ValueError(f"{os.fspath(path)!r} holds no {alg} key of a TokenIssuer")
        stored_key = JWKRegistry.import_key(data["key"])
        if not stored_key.is_private:
            raise ValueError(f"{os.fspath(path)!r} holds no private key")
        made.remove_key(made.current_kid)
        made.current_kid = made.add_key(alg, kid=str(data["kid"]), key=stored_key)
        return made

    # -- keys -----------------------------------------------------------------

    def add_key(self, alg: str = "RS256", *, kid: str | None = None, key: Key | None = None) -> str:
        """Add a signing key (generated unless given); return its ``kid``.

        The key is published in :meth:`jwks` at once; tokens are still
        signed with the current key (see :meth:`rotate`).

        :param alg: the key's JWS algorithm (``RS256``, ``ES256``,
            ``EdDSA``...).
        :param kid: the key id; a random ``key-...`` when ``None``.
        :param key: the private key to use; generated for ``alg`` when
            ``None``.
        :returns: the ``kid``.
        :raises ValueError: for an algorithm no key can be generated for.
        """
        if key is None:
            if alg not in _ALG_KEYS:
                raise ValueError(f"unsupported algorithm {alg!r}")
            key = _ALG_KEYS[alg]()
        kid = kid or f"key-{uuid.uuid4().hex[:12]}"
        self._keys[kid] = (alg, key)
        return kid

    def rotate(self, alg: str | None = None, *, drop_old: bool = False) -> str:
        """Add a new key and sign with it from now on; return its ``kid``.

        :param alg: the new key's algorithm; the current key's when ``None``.
        :param drop_old: stop publishing the previous key too (tokens it
            signed stop verifying once the resource server refreshes its
            keys); by default both are published, as in a real rotation.
        :returns: the new ``kid``.
        """
        old = self.current_kid
        new = self.add_key(alg or self._keys[old][0])
        self.current_kid = new
        if drop_old:
            self.remove_key(old)
        return new

    def remove_key(self, kid: str) -> None:
        """Stop publishing ``kid``.

        :param kid: the key id; unknown ids are ignored.
        """
        self._keys.pop(kid, None)

    def key(self, kid: str | None = None) -> Key:
        """The private key object of ``kid`` (the current key by default).

        :param kid: the key id; the current key when ``None``.
        :raises KeyError: for an unknown ``kid``.
        """
        return self._keys[kid or self.current_kid][1]

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set: ``{"keys": [...]}`` with ``kid``, ``alg``, ``use``."""
        keys = []
        for kid, (alg, key) in self._keys.items():
            public = key.as_dict(private=False)
            public.update({"kid": kid, "alg": alg, "use": "sig"})
            keys.append(public)
        return {"keys": keys}

    @property
    def algorithms(self) -> list[str]:
        """The algorithms of the published keys."""
        return sorted({alg for alg, _key in self._keys.values()})

    def config(self, audience: str | None = None, **extra: Any) -> dict[str, Any]:
        """``OAUTH_VERIFY_*`` settings that trust this issuer.

        Without a server the key set is given statically (``JWKS``); after
        :meth:`serve`, ``JWKS_URI`` points at the server.

        :param audience: ``OAUTH_VERIFY_AUDIENCE``; the issuer's default
            audience when ``None``.
        :param extra: further settings without their prefix, e.g.
            ``LEEWAY=0`` for ``OAUTH_VERIFY_LEEWAY``; they override the
            ones above.
        :returns: a dict to pass to ``app.config.update()``.
        """
        config: dict[str, Any] = {
            "OAUTH_VERIFY_ISSUER": self.issuer,
            "OAUTH_VERIFY_AUDIENCE": audience or self.audience,
            "OAUTH_VERIFY_ALGORITHMS": self.algorithms,
        }
        if self.server is None:
            config["OAUTH_VERIFY_JWKS"] = self.jwks()
        else:
            config["OAUTH_VERIFY_JWKS_URI"] = f"{self.server.url}/jwks"
        config.update({f"OAUTH_VERIFY_{k}": v for k, v in extra.items()})
        return config

    # -- tokens ---------------------------------------------------------------

    def claims(
        self,
        *,
        subject: str | None = "user_1",
        audience: str | list[str] | None = None,
        scopes: Iterable[str] | None = None,
        organization_id: str | None = None,
        expires_in: int = 3600,
        now: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The claims :meth:`mint` would sign (RFC 9068 shape).

        Always ``iss``, ``iat``, ``nbf``, ``exp``, a random ``jti`` and
        ``client_id`` ``"client-1"``, plus the ones below.

        :param subject: ``sub``; left out when ``None``.
        :param audience: ``aud``; the issuer's default audience when ``None``.
        :param scopes: ``scope``, joined with spaces; left out when ``None``.
        :param organization_id: ``oid``; left out when ``None``.
        :param expires_in: seconds from ``now`` to ``exp``.
        :param now: the issue time (seconds since the epoch); the current
            time when ``None``.
        :param extra: more claims, which override the ones above; a claim
            given as ``None`` is left out.
        :returns: the claims.
        """
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience if audience is not None else self.audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + expires_in,
            "jti": uuid.uuid4().hex,
            "client_id": "client-1",
        }
        if subject is not None:
            claims["sub"] = subject
        if scopes is not None:
            claims["scope"] = " ".join(scopes)
        if organization_id is not None:
            claims["oid"] = organization_id
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        kid: str | None = None,
        headers: Mapping[str, Any] | None = None,
        typ: str | None = "at+jwt",
        **options: Any,
    ) -> str:
        """Sign a token.

        :param claims: the exact claims; built by :meth:`claims` from
            ``options`` when omitted.
        :param kid: which key signs (the current key by default).
        :param headers: extra or overriding protected-header members, any
            name and any value (``crit``, a ``kid`` that is no string...):
            the header is signed as given, never checked.
        :param typ: the ``typ`` header (``None`` leaves it out).
        :param options: arguments of :meth:`claims`, when ``claims`` is
            omitted.
        :returns: the compact JWS.
        :raises KeyError: for an unknown ``kid``.
        """
        kid = kid or self.current_kid
        alg, key = self._keys[kid]
        payload = dict(claims) if claims is not None else self.claims(**options)
        header: dict[str, Any] = {"alg": alg, "kid": kid}
        if typ is not None:
            header["typ"] = typ
        header.update(headers or {})
        # Compact serialisation by hand: jwt.encode() adds typ "JWT" and
        # refuses header members its registry does not know.
        named = header["alg"]
        algorithm = JWSRegistry.algorithms.get(named if isinstance(named, str) else alg)
        signing_input = f"{b64url(header)}.{b64url(payload)}"
        with warnings.catch_warnings():
            # "EdDSA" is deprecated by RFC 9864 but still issued widely.
            warnings.simplefilter("ignore", SecurityWarning)
            signature = (algorithm or JWSRegistry.algorithms[alg]).sign(signing_input.encode(), key)
        return f"{signing_input}.{b64url(signature)}"

    def mint_opaque(self, **options: Any) -> str:
        """An opaque (reference) token known to the introspection endpoint.

        :param options: arguments of :meth:`claims`: the claims the
            endpoint answers for the token.
        :returns: the token (random URL-safe text).
        """
        token = secrets.token_urlsafe(32)
        self.opaque[token] = self.claims(**options)
        return token

    def revoke(self, token: str) -> None:
        """Make ``token`` inactive at the introspection endpoint (RFC 7009).

        :param token: an opaque token or a JWT this issuer minted.
        """
        self.opaque.pop(token, None)
        self._revoked.add(token)

    def introspect(self, token: str) -> dict[str, Any]:
        """The RFC 7662 answer for ``token``.

        :param token: an opaque token or a JWT.
        :returns: ``{"active": True, "token_type": "Bearer", ...claims}`` for
            a known, unexpired, unrevoked token, else ``{"active": False}``.
        """
        if token in self._revoked:
            return {"active": False}
        claims = self.opaque.get(token)
        if claims is None:
            claims = self._decode_own(token)
        if claims is None or claims.get("exp", 0) <= time.time():
            return {"active": False}
        return {"active": True, "token_type": "Bearer", **claims}

    def _decode_own(self, token: str) -> dict[str, Any] | None:
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        try:
            # the published set: each key carries its kid, as the token header does
            keys = KeySet.import_key_set(self.jwks())  # type: ignore[arg-type]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SecurityWarning)
                decoded = jwt.decode(token, keys, algorithms=self.algorithms)
        except (JoseError, ValueError):
            return None
        return dict(decoded.claims)

    # -- serving --------------------------------------------------------------

    def serve(self, server: IssuerServer | None = None) -> IssuerServer:
        """Serve discovery, ``/jwks`` and ``/introspect`` on 127.0.0.1.

        The issuer becomes the server's URL, so discovery works.

        :param server: the server to add the routes to; a new one when
            ``None``.
        :returns: the server (close it when done, or use it as a context
            manager).
        """
        server = server or IssuerServer()
        self.server = server
        self.issuer = server.url
        server.route("/.well-known/openid-configuration", lambda _r: Reply(200, self.metadata()))
        server.route("/jwks", lambda _r: Reply(200, self.jwks()))
        server.route("/introspect", self._introspection_handler)
        return server

    def metadata(self) -> dict[str, Any]:
        """The discovery document of the served issuer."""
        base = self.issuer.rstrip("/")
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{base}/jwks",
            "introspection_endpoint": f"{base}/introspect",
            "token_endpoint": f"{base}/token",
        }

    def _introspection_handler(self, request: Request) -> Reply:
        """RFC 7662 §2: check the client authentication and body, then answer."""
        content_type = _header(request, "Content-Type").split(";")[0].strip().lower()
        is_json = content_type == "application/json"
        wanted = self.introspection_body
        if (wanted == "json" and not is_json) or (
            wanted == "form" and content_type != "application/x-www-form-urlencoded"
        ):
            return Reply(400, {"error": "invalid_request", "error_description": "body format"})
        body = request.json() if is_json else request.form()
        params: dict[str, Any] = body if isinstance(body, dict) else {}
        if not self._introspection_client_ok(_header(request, "Authorization"), params):
            return Reply(401, {"error": "invalid_client"}, {"WWW-Authenticate": "Basic"})
        token = params.get("token")
        if not isinstance(token, str) or not token:
            return Reply(400, {"error": "invalid_request"})
        return Reply(200, self.introspect(token))

    def _introspection_client_ok(self, authorization: str, params: Mapping[str, Any]) -> bool:
        method = self.introspection_auth
        if method == "bearer":
            return authorization == f"Bearer {self.introspection_bearer}"
        if method == "none":
            return True
        client_id, secret = self.introspection_credentials
        given = _basic_credentials(authorization)
        encoding = self.introspection_basic_encoding
        basic = given is not None and (
            (
                encoding != "raw"
                and tuple(unquote_plus(part) for part in given) == (client_id, secret)
            )
            or (encoding != "form" and given == (client_id, secret))
        )
        post = params.get("client_id") == client_id and params.get("client_secret") == secret
        # RFC 6749 §2.3: a client MUST NOT use more than one method per request.
        if method == "client_secret_basic":
            return basic and "client_secret" not in params
        if method == "client_secret_post":
            return post and not authorization
        return basic or post


def _header(request: Request, name: str) -> str:
    """A request header, looked up case-insensitively ("" when absent)."""
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def _basic_credentials(authorization: str) -> tuple[str, str] | None:
    """Decode ``Basic`` credentials (RFC 7617), as sent (not form-decoded)."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def _publish_new_file(draft: str, path: str | os.PathLike[str], text: str) -> None:
    """Put the whole file ``draft`` at ``path`` unless ``path`` exists.

    A hard link is atomic; on a file system without them, ``path`` is
    created exclusively (owner-only) and written, which a reader starting at
    that very moment could see half-written.

    :raises FileExistsError: when ``path`` already exists.
    """
    try:
        os.link(draft, path)
        return
    except FileExistsError:
        raise
    except OSError:
        pass  # no hard links here (some network and FAT file systems)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as written:
        written.write(text)
