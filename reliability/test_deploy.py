"""`manage.py check --deploy` is clean under the production settings the README documents
(DEBUG off, PostgreSQL, Redis, HTTPS behind a proxy, login required), and the embedded default
stays a loopback-only app that needs none of them."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

from mistudio.testing.live import ROOT

PRODUCTION = {
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
    "DATABASE_URL": "postgres://mistudio@127.0.0.1:5432/mistudio",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "MISTUDIO_HTTPS": "1",
    "DJANGO_ALLOWED_HOSTS": "mistudio.example.org",
    "MISTUDIO_LOGIN_REQUIRED": "1",
}
# the test run's own settings (the browser tests allow async-unsafe DB access) stay out
CLEARED = (
    "DATABASE_URL",
    "REDIS_URL",
    "DJANGO_SECRET_KEY",
    "DJANGO_ALLOWED_HOSTS",
    "DJANGO_ALLOW_ASYNC_UNSAFE",
)


def check(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return subprocess.run(
        [sys.executable, "manage.py", "check", *args],
        cwd=ROOT,
        env={**base, "MISTUDIO_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_check_deploy_reports_nothing_under_the_production_settings(tmp_path):
    r = check(tmp_path, "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "System check identified no issues" in r.stdout


def test_production_without_login_is_refused(tmp_path):
    r = check(tmp_path, "--deploy", **{**PRODUCTION, "MISTUDIO_LOGIN_REQUIRED": "0"})
    assert r.returncode != 0 and "mistudio.E002" in r.stderr


def test_the_embedded_default_passes_the_plain_check(tmp_path):
    r = check(tmp_path, "--fail-level", "WARNING")
    assert r.returncode == 0, r.stdout + r.stderr


def test_serve_on_a_database_without_its_tables_says_to_migrate(tmp_path):
    """A fresh data dir served with manage.py serve (not scripts/run) used to answer every API call
    with a 500 ('no such table'); it is refused at start-up with the command that fixes it."""
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env = {**base, "MISTUDIO_DATA_DIR": str(tmp_path)}
    cmd = [sys.executable, "manage.py", "serve", "--port", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "manage.py migrate" in r.stderr, r.stderr[-2000:]
    assert "lacks" in r.stderr and "0001_initial" in r.stderr
    assert "Traceback" not in r.stderr
