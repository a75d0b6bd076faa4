"""Prometheus metrics: counts after a scripted mix of requests, per-app registries."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from flask_oauth_verify import ConfigurationError, OAuthVerify
from flask_oauth_verify.errors import InsufficientScopeError
from flask_oauth_verify.extension import get_state
from flask_oauth_verify.metrics import DURATION_BUCKETS, metrics_registry
from flask_oauth_verify.testing import IssuerServer, Reply, TokenIssuer, auth_header

from .conftest import FakeClock, free_port, make_app
from .test_shared_cache import wait_for_port


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_counts_after_a_scripted_mix_of_requests(tokens: TokenIssuer, clock: FakeClock) -> None:
    app = make_app(tokens.config(METRICS=True), clock=clock)
    client = app.test_client()
    now = clock()
    good = tokens.mint(now=now, scopes=["read:users"], custom_claims={"client_type": "m2m"})
    unscoped = tokens.mint(now=now)
    expired = tokens.mint(now=now - 7200, expires_in=60)
    future = tokens.mint(now=now + 3600)
    script = [
        ("/protected", good, 200),
        ("/protected", good, 200),  # a token-cache hit counts as well
        ("/read", good, 200),
        ("/read", unscoped, 403),
        ("/protected", expired, 401),
        ("/protected", expired, 401),
        ("/protected", future, 401),
        ("/protected", good + "x", 401),
        ("/protected", None, 401),
    ]
    for path, token, status in script:
        headers = auth_header(token) if token else {}
        assert client.get(path, headers=headers).status_code == status

    registry = metrics_registry(app)
    jwks = {"strategy": "jwks"}
    assert (
        sample(registry, "token_validations_total", status="valid", token_type="m2m", **jwks) == 3
    )
    assert (
        sample(registry, "token_validations_total", status="valid", token_type="unknown", **jwks)
        == 1
    )
    assert (
        sample(
            registry,
            "token_validations_total",
            status="token_expired",
            token_type="unknown",
            **jwks,
        )
        == 2
    )
    assert (
        sample(
            registry,
            "token_validations_total",
            status="token_not_active",
            token_type="unknown",
            **jwks,
        )
        == 1
    )
    assert (
        sample(
            registry,
            "token_validations_total",
            status="invalid_token",
            token_type="unknown",
            **jwks,
        )
        == 1
    )
    assert (
        sample(
            registry,
            "token_validations_total",
            status="missing_token",
            token_type="unknown",
            **jwks,
        )
        == 1
    )
    assert sample(registry, "token_authorization_denials_total", error="insufficient_scope") == 1
    # every request that carried a token was timed, the one without was not
    assert sample(registry, "token_validation_duration_seconds_count") == 8
    assert sample(registry, "token_validation_duration_seconds_bucket", le="+Inf") == 8
    assert sample(registry, "token_validation_duration_seconds_sum") > 0
    assert sample(registry, "token_key_set_keys", issuer=tokens.issuer) == 1
    # a label never comes from an unverified token
    families = {f.name: f for f in registry.collect()}
    label_names = {name for s in families["token_validations"].samples for name in s.labels}
    assert "client_id" not in label_names


def test_a_claims_check_denial_counts_like_a_scope_denial(
    tokens: TokenIssuer, clock: FakeClock
) -> None:
    """A ``@claims_check`` raising InsufficientScopeError: a valid token,
    denied. It was counted as a denial only, missing from the validations
    and the duration histogram."""
    app = make_app(tokens.config(METRICS=True), clock=clock)

    @get_state(app).extension.claims_check
    def admins_only(claims: Any) -> bool:
        if claims.get("role") != "admin":
            raise InsufficientScopeError(scopes=("admin",), reason="admin role required")
        return True

    client = app.test_client()
    admin, plain = tokens.mint(now=clock(), role="admin"), tokens.mint(now=clock(), role="user")
    assert client.get("/protected", headers=auth_header(admin)).status_code == 200
    assert client.get("/protected", headers=auth_header(plain)).status_code == 403
    registry = metrics_registry(app)
    valid = {"status": "valid", "strategy": "jwks"}
    assert sample(registry, "token_validations_total", token_type="unknown", **valid) == 2
    assert sample(registry, "token_validation_duration_seconds_count") == 2
    assert sample(registry, "token_authorization_denials_total", error="insufficient_scope") == 1


def test_histogram_buckets_span_a_tenth_of_a_millisecond_to_half_a_second() -> None:
    assert DURATION_BUCKETS[0] == 0.0001
    assert DURATION_BUCKETS[-1] == 0.5
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_client_id_label_is_opt_in(tokens: TokenIssuer, clock: FakeClock) -> None:
    app = make_app(tokens.config(METRICS=True, METRICS_CLIENT_ID_LABEL=True), clock=clock)
    client = app.test_client()
    client.get("/protected", headers=auth_header(tokens.mint(now=clock(), client_id="svc-a")))
    client.get("/protected", headers=auth_header(tokens.mint(now=clock(), client_id="svc-b")))
    forged = tokens.mint(now=clock(), client_id="attacker-chosen") + "x"
    client.get("/protected", headers=auth_header(forged))
    registry = metrics_registry(app)
    labels = {"strategy": "jwks", "token_type": "unknown"}
    assert (
        sample(registry, "token_validations_total", status="valid", client_id="svc-a", **labels)
        == 1
    )
    assert (
        sample(registry, "token_validations_total", status="valid", client_id="svc-b", **labels)
        == 1
    )
    assert (
        sample(registry, "token_validations_total", status="invalid_token", client_id="", **labels)
        == 1
    )
    exposed = "".join(str(s.labels) for f in registry.collect() for s in f.samples)
    assert "attacker-chosen" not in exposed


def test_key_fetches_failures_stale_and_age(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    app = make_app(served_tokens.config(METRICS=True), clock=clock)
    client = app.test_client()
    token = served_tokens.mint(now=clock(), expires_in=7 * 86400)
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    registry = metrics_registry(app)
    issuer = served_tokens.issuer
    assert sample(registry, "token_key_fetches_total", issuer=issuer, outcome="success") == 1
    assert sample(registry, "token_key_set_age_seconds", issuer=issuer) == 0

    issuer_server.route("/jwks", Reply(503, "down"))
    clock.advance(900)  # past the 600 s TTL
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert sample(registry, "token_key_fetches_total", issuer=issuer, outcome="failure") == 1
    assert sample(registry, "token_stale_keys_served_total", issuer=issuer) == 1
    assert sample(registry, "token_key_set_age_seconds", issuer=issuer) == 900
    # inside the retry cooldown no further fetch is attempted or counted
    assert client.get("/protected", headers=auth_header(token)).status_code == 200
    assert sample(registry, "token_key_fetches_total", issuer=issuer, outcome="failure") == 1


def test_introspection_failures_by_kind(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    config = served_tokens.config(
        METRICS=True,
        STRATEGY="introspection",
        INTROSPECTION_ENDPOINT=f"{issuer_server.url}/introspect",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
    )
    app = make_app(config, clock=clock)
    client = app.test_client()
    token = served_tokens.mint_opaque()
    issuer_server.route("/introspect", Reply(500, "boom"))
    assert client.get("/protected", headers=auth_header(token)).status_code == 503
    registry = metrics_registry(app)
    assert sample(registry, "token_introspections_total", outcome="server_error") == 1
    assert (
        sample(
            registry,
            "token_validations_total",
            status="temporarily_unavailable",
            strategy="introspection",
            token_type="unknown",
        )
        == 1
    )


def test_introspection_calls_and_cache_hits(
    served_tokens: TokenIssuer, issuer_server: IssuerServer, clock: FakeClock
) -> None:
    config = served_tokens.config(
        METRICS=True,
        STRATEGY="introspection",
        INTROSPECTION_CLIENT_ID="resource-server",
        INTROSPECTION_CLIENT_SECRET="rs-secret",
        INTROSPECTION_CACHE_TTL=60,
    )
    app = make_app(config, clock=clock)
    client = app.test_client()
    active = served_tokens.mint_opaque()
    revoked = served_tokens.mint_opaque()
    served_tokens.revoke(revoked)
    for token, status in [(active, 200), (active, 200), (active, 200), (revoked, 401)]:
        assert client.get("/protected", headers=auth_header(token)).status_code == status
    registry = metrics_registry(app)
    assert sample(registry, "token_introspections_total", outcome="active") == 1
    assert sample(registry, "token_introspections_total", outcome="inactive") == 1
    assert sample(registry, "token_introspection_cache_hits_total") == 2
    assert issuer_server.hits["/introspect"] == 2
    labels = {"strategy": "introspection", "token_type": "unknown"}
    assert sample(registry, "token_validations_total", status="valid", **labels) == 3
    assert sample(registry, "token_validations_total", status="invalid_token", **labels) == 1


def test_introspection_outcome_label_is_bounded(tokens: TokenIssuer) -> None:
    app = make_app(tokens.config(METRICS=True))
    app.extensions["oauth_verify"].events.emit("introspection_request", {"outcome": "<x>"})
    assert sample(metrics_registry(app), "token_introspections_total", outcome="other") == 1


def test_two_apps_in_one_process_do_not_collide(tokens: TokenIssuer, clock: FakeClock) -> None:
    first = make_app(tokens.config(METRICS=True), clock=clock, name="first")
    second = make_app(tokens.config(METRICS=True), clock=clock, name="second")
    first.test_client().get("/protected", headers=auth_header(tokens.mint(now=clock())))
    labels = {"status": "valid", "strategy": "jwks", "token_type": "unknown"}
    assert sample(metrics_registry(first), "token_validations_total", **labels) == 1
    assert sample(metrics_registry(second), "token_validations_total", **labels) == 0
    # nothing lands in the process-wide default registry unless asked for
    assert REGISTRY.get_sample_value("token_validations_total", labels) is None


def test_a_shared_registry_is_refused_by_the_second_app(tokens: TokenIssuer) -> None:
    shared = CollectorRegistry()
    config = tokens.config(METRICS=True, METRICS_REGISTRY=shared)
    make_app(config, name="first")
    with pytest.raises(ConfigurationError, match="OAUTH_VERIFY_METRICS_REGISTRY"):
        make_app(config, name="second")
    with pytest.raises(ConfigurationError, match="CollectorRegistry"):
        make_app(tokens.config(METRICS=True, METRICS_REGISTRY="default"), name="third")


def test_endpoint_serves_the_registry(tokens: TokenIssuer, clock: FakeClock) -> None:
    app = make_app(tokens.config(METRICS=True, METRICS_ENDPOINT="/internal/metrics"), clock=clock)
    client = app.test_client()
    client.get("/protected", headers=auth_header(tokens.mint(now=clock())))
    response = client.get("/internal/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.get_data(as_text=True))}
    valid = [s for s in families["token_validations"].samples if s.name.endswith("_total")]
    assert [(s.labels["status"], s.value) for s in valid] == [("valid", 1.0)]
    assert "token_validation_duration_seconds" in families
    assert client.get("/metrics").status_code == 404  # only the configured path


def test_metrics_off_imports_nothing_and_registers_nothing() -> None:
    code = (
        "import sys\n"
        "from flask import Flask\n"
        "from flask_oauth_verify import OAuthVerify\n"
        "from flask_oauth_verify.testing import TokenIssuer\n"
        "app = Flask('off')\n"
        "app.config.update(TokenIssuer().config())\n"
        "OAuthVerify(app)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "assert 'flask_oauth_verify.metrics' not in sys.modules\n"
        "assert not any(r.rule == '/metrics' for r in app.url_map.iter_rules())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # noqa: S603


def test_registry_of_an_app_without_metrics_raises(app: Flask) -> None:
    with pytest.raises(RuntimeError, match="OAUTH_VERIFY_METRICS is off"):
        OAuthVerify().metrics_registry(app)


# -- several gunicorn workers (PROMETHEUS_MULTIPROC_DIR) -----------------------

MULTIPROCESS_APP = """
import json
import os

from flask import Flask

from flask_oauth_verify import OAuthVerify, require_token


def create_app():
    app = Flask("metrics-worker")
    app.config.update(json.loads(os.environ["WORKER_CONFIG"]))
    OAuthVerify(app)

    @app.get("/protected")
    @require_token
    def protected():
        return {"pid": os.getpid()}

    return app
"""


def _scrape(url: str) -> dict[str, float]:
    """``token_validations_total`` by status, from one scrape of ``/metrics``."""
    families = text_string_to_metric_families(requests.get(url, timeout=10).text)
    counts: dict[str, float] = {}
    for family in families:
        for sample_ in family.samples:
            if sample_.name == "token_validations_total":
                status = sample_.labels["status"]
                counts[status] = counts.get(status, 0.0) + sample_.value
    return counts


@pytest.mark.slow
def test_gunicorn_workers_report_one_aggregated_count(tokens: TokenIssuer, tmp_path: Path) -> None:
    (tmp_path / "metrics_worker.py").write_text(MULTIPROCESS_APP)
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    config = tokens.config(audience="api", METRICS=True, METRICS_ENDPOINT=True)
    env = {
        **os.environ,
        "WORKER_CONFIG": json.dumps(config),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
    }
    port = free_port()
    log = tmp_path / "gunicorn.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(  # noqa: S603
            [
                sys.executable, "-m", "gunicorn", "--workers", "2", "--graceful-timeout", "2",
                "--bind", f"127.0.0.1:{port}", "metrics_worker:create_app()",
            ],
            cwd=tmp_path, env=env, stdout=log_file, stderr=log_file,
        )  # fmt: skip
        try:
            wait_for_port(port, process)
            base = f"http://127.0.0.1:{port}"
            good, bad = tokens.mint(), tokens.mint() + "x"

            def call(token: str) -> tuple[int, int | None]:
                response = requests.get(base + "/protected", headers=auth_header(token), timeout=30)
                pid = response.json().get("pid") if response.status_code == 200 else None
                return response.status_code, pid

            valid = 0
            pids: set[int | None] = set()
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                # Until both workers have booted and served (a start-up, bounded).
                for _ in range(50):
                    warm = list(pool.map(call, [good] * 8))
                    valid += sum(status == 200 for status, _ in warm)
                    pids |= {pid for _, pid in warm}
                    if len(pids - {None}) == 2:
                        break
                assert len(pids - {None}) == 2, "both workers served"
                results = list(pool.map(call, [good] * 40 + [bad] * 10))
            assert sorted(status for status, _ in results) == [200] * 40 + [401] * 10
            valid += 40
            for _ in range(6):  # whichever worker answers the scrape sees every worker's counts
                assert _scrape(base + "/metrics") == {"valid": valid, "invalid_token": 10.0}
        finally:
            process.send_signal(signal.SIGTERM)  # graceful: no request cut mid-answer
            process.wait(30)
    assert "Traceback" not in log.read_text()


def test_a_label_value_utf8_cannot_encode_never_breaks_the_scrape(tokens: TokenIssuer) -> None:
    """An unpaired surrogate (valid in JSON, not in UTF-8) in a label value is
    written as an escape: otherwise every later scrape fails."""
    from prometheus_client import generate_latest

    app = make_app(tokens.config(METRICS=True))
    events = app.extensions["oauth_verify"].events
    events.emit("keys_refreshed", {"issuer": "https://issuer.example/\ud800"})
    exposed = generate_latest(metrics_registry(app)).decode("utf-8")
    assert 'issuer="https://issuer.example/\\\\ud800"' in exposed
