"""Secrets stay in the environment: their values are masked in anything bioray prints.

Credentials reach bioray only through environment variables (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``,
an endpoint URL with ``user:password@`` in it), read by the libraries that need them. bioray never
copies them into a config, a checkpoint or a report; what it can still print is a library's own
error text, which may quote them (pyarrow names the user of an endpoint URL it cannot resolve).
Every error line and traceback the jobs print goes through :func:`redact`.
"""

from __future__ import annotations

import base64
import os
import re
from urllib.parse import quote, unquote, urlsplit

# Variables whose whole value is a secret.
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "RAY_AUTH_TOKEN", "WANDB_API_KEY",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN")
# Variables holding a URL whose user:password part is a secret.
URL_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
MASK = "***"
# user[:password]@ in any URL, whether or not its values are known.
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# Shorter values would mask ordinary words.
_MIN_LEN = 4


def secret_values(environ: dict | None = None) -> list[str]:
    """The secret strings in the environment, longest first (so a value inside another goes last)."""
    env = os.environ if environ is None else environ
    values = {env[k] for k in SECRET_VARS if env.get(k)}
    for k in URL_VARS:
        parts = urlsplit(env.get(k) or "")
        for v in (parts.username, parts.password):
            if v:
                values |= {v, unquote(v)}
    return sorted((v for v in values if len(v) >= _MIN_LEN), key=len, reverse=True)


def encodings(value: str) -> set[str]:
    """The forms a secret may take in text: as is, URL-encoded, base64 (as in a Basic auth header)."""
    raw = value.encode()
    return {value, quote(value, safe=""), base64.b64encode(raw).decode().rstrip("=")}


def redact(text: str, environ: dict | None = None) -> str:
    """``text`` with every secret of the environment (in any of its :func:`encodings`) and every
    URL's ``user:password@`` replaced by ``***``."""
    for value in secret_values(environ):
        for form in sorted(encodings(value), key=len, reverse=True):
            text = text.replace(form, MASK)
    return _USERINFO.sub(MASK + "@", text)
