"""miStudio settings: one file, every knob read from the environment.

Embedded default (fresh clone): SQLite in the data dir, django-q2 ORM broker, in-process channel
layer with a DB→group relay. `DATABASE_URL` switches to PostgreSQL, `REDIS_URL` to the Redis
broker and channels_redis.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
# A self-hosted workbench does not phone home (huggingface_hub reads this at import).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from exc


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


DATA_DIR = Path(env_str("MISTUDIO_DATA_DIR", str(BASE_DIR / "data"))).expanduser().resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
# auto, cpu, cuda, cuda:N or cpu:N: the device of this process's GPU worker (manage.py worker
# --device D sets it; indexed CPU devices are workers of a CPU-only machine).
MISTUDIO_DEVICE = (os.environ.get("MISTUDIO_DEVICE") or "auto").strip().lower()
if not re.fullmatch(r"auto|cpu|cuda|(cpu|cuda):\d+", MISTUDIO_DEVICE):
    raise ImproperlyConfigured(
        f"MISTUDIO_DEVICE={MISTUDIO_DEVICE!r} must be auto, cpu, cuda, cuda:N or cpu:N"
    )
# Models are downloaded into the shared HF cache (HF_HOME / HF_HUB_CACHE as huggingface_hub defines
# them) so other tools reuse them; the data dir holds activations and datasets.
ACTIVATIONS_DIR = DATA_DIR / "activations"
DATASETS_DIR = DATA_DIR / "datasets"
# Keep this much free after a download or extraction (bytes).
DISK_MARGIN_BYTES = env_int("MISTUDIO_DISK_MARGIN_MB", 512) * 1024 * 1024
# Bytes per shard file and hook; unset: the extraction's own default (models_app.ml.storage).
# An extraction is split into at most this many parts (whole shards each), which the GPU workers
# (one per device, on any machine sharing the database, the broker and the data dir) share.
EXTRACTION_PARTS = env_int("MISTUDIO_EXTRACTION_PARTS", 8)
# Bytes of one shard file (MISTUDIO_SHARD_KB: finer, for tests); None: storage's default.
EXTRACTION_SHARD_BYTES = (
    env_int("MISTUDIO_SHARD_MB", 0) * 1024 * 1024 or env_int("MISTUDIO_SHARD_KB", 0) * 1024
) or None
ALLOW_PICKLE_WEIGHTS = env_bool("MISTUDIO_ALLOW_PICKLE_WEIGHTS", False)
# huggingface_hub reads these at import; we pass them to every call so tests can override them.
HF_ENDPOINT = env_str("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
MODELS_CACHE_DIR = Path(
    env_str("HF_HUB_CACHE")
    or Path(env_str("HF_HOME", str(Path.home() / ".cache" / "huggingface"))) / "hub"
).expanduser()
HUB_TIMEOUT_SECONDS = float(env_str("MISTUDIO_HUB_TIMEOUT", "20"))
# A download that receives no new byte for this long ends with a message (a slow but moving
# one never does); its partial files are removed.
HUB_STALL_SECONDS = float(env_str("MISTUDIO_HUB_STALL_S", "60"))


def _secret_key() -> str:
    key = env_str("DJANGO_SECRET_KEY")
    if key:
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
# Login is required when serving anything but loopback (see models_app.checks / the serve command).
LOGIN_REQUIRED = env_bool("MISTUDIO_LOGIN_REQUIRED", False)
BIND_HOST = env_str("MISTUDIO_HOST", "127.0.0.1")
BIND_PORT = env_int("MISTUDIO_PORT", 8000)
ALLOWED_HOSTS = [h for h in env_str("DJANGO_ALLOWED_HOSTS", "").split(",") if h] or [
    "127.0.0.1",
    "localhost",
    "[::1]",
]
CSRF_TRUSTED_ORIGINS = [o for o in env_str("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "template_partials",
    "django_q",
    "ninja",  # serves Swagger UI's files itself: the API docs work offline
    "models_app",
    "templates_app",
    "datasets_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "mistudio.middleware.RefuseNulInUrl",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "mistudio.middleware.LoginRequiredWhenEnabled",
]

ROOT_URLCONF = "mistudio.urls"
ASGI_APPLICATION = "mistudio.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "mistudio.context_processors.shell",
            ],
            "builtins": ["template_partials.templatetags.partials"],
            "libraries": {"mistudio_format": "mistudio.templatetags.mistudio_format"},
        },
    },
]


def _databases() -> dict:
    url = env_str("DATABASE_URL")
    if url:
        db = dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True)
        return {"default": db}
    sqlite_path = Path(env_str("MISTUDIO_SQLITE_PATH") or DATA_DIR / "mistudio.sqlite3")
    return {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": sqlite_path,
            # WAL + a busy timeout: the web server and two worker clusters write concurrently.
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
            "TEST": {"NAME": env_str("MISTUDIO_TEST_SQLITE", str(DATA_DIR / "test.sqlite3"))},
        }
    }


DATABASES = _databases()
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL")

# channels_redis waits for a consumer's messages with a blocking read of 5 s (BZPOPMIN); redis-py
# ≥ 8 gives every connection a 5 s socket timeout, which ends that read first: every idle
# consumer then died after ~5 s and its page missed what was sent until it reconnected.
CHANNEL_REDIS_SOCKET_TIMEOUT = 30

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": CHANNEL_REDIS_SOCKET_TIMEOUT}],
                "capacity": 1000,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# With an in-process layer the workers cannot reach the web process; a relay inside the web process
# polls job rows and turns changes into group messages.
PROGRESS_RELAY = not REDIS_URL
PROGRESS_RELAY_INTERVAL = float(env_str("MISTUDIO_RELAY_INTERVAL", "0.2"))

# django-q2: downloads and dataset imports in the default cluster, GPU work in a one-worker cluster.
# Tasks take ids only. No automatic retries: a failed task is not run again. The ORM broker hands
# a task whose worker died to a worker again after `retry` seconds (once: the job's exactly-once
# claim makes that delivery a no-op, then the task is acknowledged); `retry` must exceed `timeout`
# or a task that is still running would start a second time.
TASK_TIMEOUT = env_int("MISTUDIO_TASK_TIMEOUT", 6 * 3600)
TASK_RETRY = env_int("MISTUDIO_TASK_RETRY_S", TASK_TIMEOUT + 600)
if TASK_RETRY <= TASK_TIMEOUT:
    raise ImproperlyConfigured(
        f"MISTUDIO_TASK_RETRY_S={TASK_RETRY} must exceed MISTUDIO_TASK_TIMEOUT={TASK_TIMEOUT}"
    )
Q_CLUSTER = {
    "name": "mistudio",
    "workers": env_int("MISTUDIO_DOWNLOAD_WORKERS", 2),
    "timeout": TASK_TIMEOUT,
    "retry": TASK_RETRY,
    "max_attempts": 1,
    "ack_failures": True,
    "save_limit": 200,
    "catch_up": False,
    "poll": 0.2,
    "label": "Task queue",
    "ALT_CLUSTERS": {"gpu": {"workers": 1, "recycle": 1000}},
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
GPU_CLUSTER = "gpu"
DOWNLOAD_CLUSTER = "mistudio"
# A job whose heartbeat is older than this is considered dead by the reconciler. Running jobs
# beat at a quarter of it (mistudio.jobs.Job.heartbeat).
STALE_HEARTBEAT_SECONDS = env_int("MISTUDIO_STALE_HEARTBEAT_S", 60)
# The reconciler also runs every this many minutes from django-q2's scheduler (0: only when a
# worker starts, and once more when the heartbeats from before that start are stale).
RECONCILE_MINUTES = env_int("MISTUDIO_RECONCILE_MINUTES", 1)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/admin/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
# WhiteNoise serves static files under daphne with DEBUG off, straight from the app folders
# (no collectstatic step for the embedded setup).
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Uploads: template imports are capped at 1 MB before parsing; dataset files stream to disk.
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# The largest request body of any route but the dataset upload, refused at the headers by the
# web server (mistudio.webserver) before a byte of it is read.
REQUEST_BODY_MAX_BYTES = env_int("MISTUDIO_REQUEST_MAX_MB", 4) * 1024 * 1024
# Dataset uploads are refused above this size (checked before the body is parsed). The request
# only stores the file and checks its first rows (a bad line is a 4xx at once); every upload is
# normalized by a worker.
DATASET_UPLOAD_MAX_BYTES = env_int("MISTUDIO_DATASET_UPLOAD_MAX_MB", 2048) * 1024 * 1024
# Decompression-bomb caps, applied by the worker (the row cap also by the request's check of the
# first rows): the largest row (one text) and the largest normalized dataset.
DATASET_ROW_MAX_BYTES = env_int("MISTUDIO_DATASET_ROW_MAX_MB", 64) * 1024 * 1024
DATASET_INFLATED_MAX_BYTES = env_int("MISTUDIO_DATASET_INFLATED_MAX_MB", 8192) * 1024 * 1024

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # HTMX reads the token from the page, not the cookie
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
if env_bool("MISTUDIO_HTTPS", False):
    # TLS ends at the reverse proxy, which must set X-Forwarded-Proto (and daphne must be
    # reachable through it only); without this the redirect loops and CSRF refuses every POST.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = 31536000
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "mistudio.logging.RedactSecrets"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]}
    },
    "root": {"handlers": ["console"], "level": env_str("MISTUDIO_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
