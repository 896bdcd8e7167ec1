"""Settings, read from the environment only.

Bad values do not raise here: they are collected in ``ENV_ERRORS`` and reported by the
``dwctl_site.checks`` system check (and refused by ``asgi.py`` at start), so every problem is
named at once, with the variable that caused it.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import dj_database_url
from cryptography.fernet import Fernet

BASE_DIR = Path(__file__).resolve().parent.parent
ENV_ERRORS: list[str] = []


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    ENV_ERRORS.append(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off).")
    return default


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        ENV_ERRORS.append(f"{name}={raw!r} is not an integer.")
        return default
    if value < minimum:
        ENV_ERRORS.append(f"{name}={raw!r} must be at least {minimum}.")
        return default
    return value


def completion_windows(raw: str) -> dict[str, int]:
    """Batch completion windows ("24h,1h") as seconds by name."""
    windows: dict[str, int] = {}
    for name in (part.strip() for part in raw.split(",")):
        hours = name.removesuffix("h")
        if not name.endswith("h") or not hours.isdigit() or int(hours) < 1:
            ENV_ERRORS.append(f"GATEWAY_BATCH_WINDOWS: {name!r} is not a number of hours such as '24h'.")
            return {"24h": 86400, "1h": 3600}
        windows[name] = int(hours) * 3600
    return windows


def generated_secret(file_name: str, make: Callable[[], str]) -> str:
    """A secret made once into an owner-only file beside the embedded database, then reused.

    The file is written aside and linked into place: of two processes starting at the same moment
    one links first and the other reads that whole file, so neither keeps a secret the file lost.
    """
    path = BASE_DIR / file_name
    if not path.exists():
        draft = path.with_name(f"{file_name}.{os.getpid()}")
        with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(make())
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


def fernet_keys(source: str, raw: str) -> list[str]:
    """Comma-separated Fernet keys; a malformed one is reported by position, never echoed (it is a secret)."""
    keys = [key.strip() for key in raw.split(",") if key.strip()]
    if not keys:
        ENV_ERRORS.append(f"{source} holds no key.")
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except ValueError:
            ENV_ERRORS.append(
                f"{source}: key {position} of {len(keys)} is not a Fernet key (32 url-safe base64-encoded bytes)."
            )
            return []
    return keys


DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()
]

# --- database -------------------------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL", "")
EMBEDDED = not DATABASE_URL
try:
    _database = dj_database_url.parse(DATABASE_URL or f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
except (ValueError, KeyError) as exc:
    ENV_ERRORS.append(f"DATABASE_URL is not a valid database URL ({exc}).")
    _database = dj_database_url.parse(f"sqlite:///{BASE_DIR / 'db.sqlite3'}")

SUPPORTED_ENGINES = {"django.db.backends.postgresql", "django.db.backends.sqlite3"}
if _database["ENGINE"] not in SUPPORTED_ENGINES:
    ENV_ERRORS.append(
        f"DATABASE_URL names an unsupported engine {_database['ENGINE']!r}: use postgres:// or sqlite://."
    )
    _database = dj_database_url.parse(f"sqlite:///{BASE_DIR / 'db.sqlite3'}")

if _database["ENGINE"] == "django.db.backends.postgresql":
    if "qcluster" in sys.argv:
        # django-q2 forks its workers after the parent has connected: an inherited pool would be
        # shared by parent and children, their queries interleaving on one socket. Plain
        # connections are closed before each fork, so every process opens its own.
        _database["CONN_MAX_AGE"] = 60
    else:
        # Under ASGI every request may run on another thread: no persistent connections, a pool.
        # While the database is away, a call that needs it fails within two seconds (503). (Django
        # checks each connection as it leaves the pool, so none broken by an outage is handed out.)
        _database["CONN_MAX_AGE"] = 0
        _database["OPTIONS"] = {
            "connect_timeout": 2,
            "pool": {
                "min_size": 2,
                "max_size": env_int("GATEWAY_DB_POOL_SIZE", 20),
                "timeout": 1.5,
            },
        }
else:
    # The gateway, its workers and the admin share one file: WAL lets readers run beside the
    # writer, IMMEDIATE takes the write lock at BEGIN so read-then-write never deadlocks.
    _database["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not :memory:, so live-server threads and subprocesses of the tests share it; one per
    # test process, so two runs on one checkout never share it.
    _database["TEST"] = {"NAME": str(BASE_DIR / f"test-{os.getpid()}.sqlite3")}

DATABASES = {"default": _database}

# --- secret key -----------------------------------------------------------------------------
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if EMBEDDED:
        # The embedded default keeps a generated key beside the database so sessions survive restarts.
        SECRET_KEY = generated_secret(".secret_key", lambda: secrets.token_urlsafe(50))
    else:
        ENV_ERRORS.append("DJANGO_SECRET_KEY is not set: a deployment with DATABASE_URL needs its own secret key.")
        SECRET_KEY = "unset-" + secrets.token_urlsafe(32)

# --- encryption keys (upstream credentials at rest, common/crypto.py) -----------------------
# The first key encrypts, every key decrypts: a new key goes first, the old one stays after it
# until `manage.py rotate_encryption_key` has re-encrypted what it made.
_encryption_keys = os.environ.get("GATEWAY_ENCRYPTION_KEYS", "")
if _encryption_keys.strip():
    GATEWAY_ENCRYPTION_KEYS = fernet_keys("GATEWAY_ENCRYPTION_KEYS", _encryption_keys)
elif EMBEDDED:
    # Beside the database, like .secret_key: losing this file loses the stored credentials.
    GATEWAY_ENCRYPTION_KEYS = fernet_keys(
        str(BASE_DIR / ".encryption_key"), generated_secret(".encryption_key", lambda: Fernet.generate_key().decode())
    )
else:
    ENV_ERRORS.append(
        "GATEWAY_ENCRYPTION_KEYS is not set: a deployment with DATABASE_URL needs its own key "
        "to encrypt upstream credentials (see README.md, 'Upstream credentials')."
    )
    # No fallback key: a credential encrypted with a key nobody keeps could never be read again.
    GATEWAY_ENCRYPTION_KEYS = []

# --- redis ----------------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    ENV_ERRORS.append(f"REDIS_URL={REDIS_URL!r} must start with redis://, rediss:// or unix://.")
    REDIS_URL = ""
REDIS_PREFIX = os.environ.get("REDIS_PREFIX", "dwctl")

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_PREFIX}:channels"},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- gateway --------------------------------------------------------------------------------
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 10 * 1024 * 1024)
GATEWAY_FLEX_WINDOW = env_int("GATEWAY_FLEX_WINDOW", 3600)
# A queued call (flex or a batch line) is tried at most this many times, however much time its deadline leaves.
GATEWAY_QUEUE_MAX_ATTEMPTS = env_int("GATEWAY_QUEUE_MAX_ATTEMPTS", 5)
# The Batch API's completion windows, each a price tier of its own: "<hours>h" names, comma-separated.
GATEWAY_BATCH_WINDOWS = completion_windows(os.environ.get("GATEWAY_BATCH_WINDOWS", "") or "24h,1h")
# A flex worker holds each job it runs on a lease it renews every third of this; a job whose lease
# lapses (its worker died) is taken by the next worker that claims jobs.
GATEWAY_FLEX_LEASE_SECONDS = float(env_int("GATEWAY_FLEX_LEASE_MS", 30_000, minimum=300)) / 1000
# How often each gateway process checks whether the auth snapshot must be rebuilt.
GATEWAY_SNAPSHOT_POLL_SECONDS = float(env_int("GATEWAY_SNAPSHOT_POLL_MS", 250)) / 1000
# Usage rows are written in batches off the request path. Every flush is a transaction whose
# commit shares the gateway's core (SQLite): 500 ms measured ~5 % more throughput than 200 ms
# with a 100 ms upstream (bench/README.md), and still charges within half a second.
GATEWAY_ACCOUNTING_FLUSH_SECONDS = float(env_int("GATEWAY_ACCOUNTING_FLUSH_MS", 500)) / 1000
# A client that leaves a relayed stream: how long the upstream is read on to learn its usage.
GATEWAY_STREAM_DRAIN_SECONDS = float(env_int("GATEWAY_STREAM_DRAIN_SECONDS", 30, minimum=0))
# Where each process journals its finished calls until they are written (gateway/journal.py): a
# local directory every gateway process and worker of one host shares.
GATEWAY_JOURNAL_DIR = os.environ.get("GATEWAY_JOURNAL_DIR", "") or str(BASE_DIR / "journal")
# With Redis, a process holds a model's capacity slot on a lease it renews; a process that dies
# gives its slots back when their leases run out.
GATEWAY_CAPACITY_LEASE_SECONDS = float(env_int("GATEWAY_CAPACITY_LEASE_MS", 10_000)) / 1000
# Upstream connections per process, and the library under gateway/clients.py.
GATEWAY_UPSTREAM_POOL_SIZE = env_int("GATEWAY_UPSTREAM_POOL_SIZE", 1000)
GATEWAY_UPSTREAM_TRANSPORT = os.environ.get("GATEWAY_UPSTREAM_TRANSPORT", "builtin")
if GATEWAY_UPSTREAM_TRANSPORT not in {"builtin", "aiohttp", "httpx"}:
    ENV_ERRORS.append(f"GATEWAY_UPSTREAM_TRANSPORT={GATEWAY_UPSTREAM_TRANSPORT!r} must be builtin, aiohttp or httpx.")
    GATEWAY_UPSTREAM_TRANSPORT = "builtin"
# Prometheus metrics at /metrics (gateway/exposition.py): off unless on; with a token, a scrape
# must bear it; without one, only loopback clients may read them.
GATEWAY_METRICS = env_bool("GATEWAY_METRICS", False)
GATEWAY_METRICS_TOKEN = os.environ.get("GATEWAY_METRICS_TOKEN", "")
# Request-log rows older than this many days are deleted by a scheduled task (gateway/tasks.py,
# in batches); 0 keeps them forever. The usage pages read the log: keep at least 31 days for a
# month's figures.
GATEWAY_LOG_RETENTION_DAYS = env_int("GATEWAY_LOG_RETENTION_DAYS", 90, minimum=0)
# Django refuses larger bodies itself; the API enforces GATEWAY_MAX_BODY_BYTES with its own 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY_BYTES

# --- files (/ai/v1/files, gateway/file_store.py) -----------------------------------------------
# An upload is spooled to disk as it arrives, up to this size (OpenAI's limit), never held in memory.
GATEWAY_MAX_FILE_BYTES = env_int("GATEWAY_MAX_FILE_BYTES", 200 * 1024 * 1024)
# What a `purpose: "batch"` file may hold (OpenAI's limits).
GATEWAY_BATCH_MAX_BYTES = env_int("GATEWAY_BATCH_MAX_BYTES", 200 * 1024 * 1024)
GATEWAY_BATCH_MAX_LINES = env_int("GATEWAY_BATCH_MAX_LINES", 50_000)
# Where uploaded files live: a local directory beside the database by default, or any storage backend
# (django-storages' S3Storage, say) named by GATEWAY_FILES_STORAGE with its OPTIONS as a JSON object.
GATEWAY_FILES_DIR = os.environ.get("GATEWAY_FILES_DIR", "") or str(BASE_DIR / "files")
_files_backend = os.environ.get("GATEWAY_FILES_STORAGE", "") or "django.core.files.storage.FileSystemStorage"
_files_options: object = {"location": GATEWAY_FILES_DIR}
if os.environ.get("GATEWAY_FILES_STORAGE_OPTIONS", ""):
    try:
        _files_options = json.loads(os.environ["GATEWAY_FILES_STORAGE_OPTIONS"])
    except ValueError:
        _files_options = None
    if not isinstance(_files_options, dict):
        ENV_ERRORS.append("GATEWAY_FILES_STORAGE_OPTIONS is not a JSON object.")
        _files_options = {"location": GATEWAY_FILES_DIR}
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "files": {"BACKEND": _files_backend, "OPTIONS": _files_options},
}

# --- server (dwctl_site/server.py) -------------------------------------------------------------
# What one client may hold of a gateway process. A larger request head gets a 431; a head not
# complete within GATEWAY_HEADER_TIMEOUT seconds, or a body with no byte for GATEWAY_BODY_TIMEOUT
# seconds, a 408. A process serves GATEWAY_MAX_CONNECTIONS connections: as many more get a 503,
# and beyond that a connection is closed at once, so client sockets never take the descriptors
# that upstream calls need.
GATEWAY_MAX_HEADER_BYTES = env_int("GATEWAY_MAX_HEADER_BYTES", 64 * 1024, minimum=1024)
GATEWAY_HEADER_TIMEOUT = env_int("GATEWAY_HEADER_TIMEOUT", 10)
GATEWAY_BODY_TIMEOUT = env_int("GATEWAY_BODY_TIMEOUT", 30)
GATEWAY_MAX_CONNECTIONS = env_int("GATEWAY_MAX_CONNECTIONS", 4096)

# --- django-q2 ------------------------------------------------------------------------------
Q_CLUSTER = {
    "name": "dwctl",
    "orm": "default",
    "workers": env_int("GATEWAY_QCLUSTER_WORKERS", 2),
    # A flex task claims jobs and runs them for at most `timeout` seconds, well inside `retry`,
    # so django-q2 never delivers the same task twice while it is still running. It claims a job
    # only while the job's endpoint timeout (600 s by default) still fits before its own.
    "timeout": 900,
    "retry": 960,
    "max_attempts": 1,
    "catch_up": False,
    "ack_failures": True,
    "save_limit": 1000,
    "poll": 0.2,
    "sync": env_bool("GATEWAY_QCLUSTER_SYNC", False),
}

# --- django ---------------------------------------------------------------------------------
INSTALLED_APPS = [
    "daphne",
    "dwctl_site.admin_site.GatewayAdminConfig",  # django.contrib.admin with the site of dwctl_site/admin_site.py
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_q",
    # Listed so the API docs page renders its own bundled Swagger UI, not one fetched from a CDN.
    "ninja",
    "dwctl_site",
    "accounts",
    "billing",
    "routing_rules",
    "gateway",
    "management_api",
]

# The management API's lists (management_api/): at most this many rows per page.
NINJA_PAGINATION_MAX_LIMIT = 1000
NINJA_PAGINATION_PER_PAGE = 100

# The /ai/ API never passes through these: gateway.handler serves it with the two async
# gateway middlewares only (see gateway/middleware.py).
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "dwctl_site.urls"
ASGI_APPLICATION = "dwctl_site.asgi.application"
AUTH_USER_MODEL = "accounts.User"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "gateway": {"level": os.environ.get("GATEWAY_LOG_LEVEL", "INFO")},
        "django_q": {"level": "WARNING"},
        # 4xx answers are the API working as intended; log server errors only.
        "django.request": {"level": "ERROR"},
    },
}
