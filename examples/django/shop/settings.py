"""Settings of the kbsync example shop: the smallest Django project that owns the four
knowledge sources and reads the knowledge base kbsync keeps for it.

Everything comes from the environment, so the same project runs against any database:
    DATABASE_URL              postgres://user:password@host:port/dbname (required)
    EMBEDDING_BASE_URL        the OpenAI-compatible server kbsync embeds with (for search)
    EMBEDDING_MODEL           the model kbsync's config names (embedding.model)
    OPENAI_API_KEY            sent as a bearer token when set
"""

import os
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured


def database_from_url(url: str) -> dict:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a postgres:// URL, got scheme {parts.scheme!r}"
        )
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


if "DATABASE_URL" not in os.environ:
    raise ImproperlyConfigured(
        "set DATABASE_URL (e.g. the one `just db` prints, with your database's name)"
    )

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "kbsync-example-not-a-secret")
DEBUG = False
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "web_knowledge",
    "ai_model",
]

DATABASES = {"default": database_from_url(os.environ["DATABASE_URL"])}

EMBEDDING_BASE_URL = os.environ.get("EMBEDDING_BASE_URL", "https://api.openai.com/v1")
EMBEDDING_MODEL = os.environ.get("EMBEDDING_MODEL", "text-embedding-3-small")
