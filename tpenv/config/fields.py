"""The small validated strings every section of telepresence.yaml shares, and how validators fail.

Helpers private to tpenv.config (the underscore names are imported by its model modules only).
Validators raise ``_fail`` errors whose context carries a ``suggestion``; the loader (loader.py)
turns every pydantic error into a located ``Problem``.
"""
from __future__ import annotations

import difflib
import re
from typing import Annotated, Any

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")  # what Kubernetes accepts as an env var name
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token


def _fail(message: str, suggestion: str | None = None) -> PydanticCustomError:
    # "{message}" as the template: our messages may hold braces (Jinja sources) that must not be formatted.
    return PydanticCustomError("tpenv", "{message}", {"message": message, "suggestion": suggestion})


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


# --- small validated strings --------------------------------------------------------------------------------------

def is_dns_label(value: str) -> bool:
    """A valid Kubernetes namespace (or service) name."""
    return len(value) <= 63 and bool(_DNS_LABEL.fullmatch(value))


def _dns_label(what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not is_dns_label(value):
            raise _fail(f"{value!r} is not a valid {what}: lowercase letters, digits and '-', at most 63 characters")
        return value
    return AfterValidator(check)


def _env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise _fail(f"{value!r} is not a valid environment variable name")
    return value


Namespace = Annotated[str, _dns_label("namespace name")]
ServiceName = Annotated[str, _dns_label("service name")]
EnvName = Annotated[str, AfterValidator(_env_name)]

def _context_name(value: str) -> str:
    if not _DNS_LABEL.fullmatch(value) or len(value) > 63:
        raise _fail(f"{value!r} is not a valid context name: lowercase letters, digits and '-', at most 63 characters")
    return value


ContextName = Annotated[str, AfterValidator(_context_name)]


def _port_number(value: int) -> int:
    if not 1 <= value <= 65535:
        raise _fail(f"port {value} is out of range (1-65535)")
    return value


PortNumber = Annotated[int, AfterValidator(_port_number)]


def _by_kind(**kinds: type) -> Any:
    """A discriminator choosing a union branch by the YAML node's kind, so errors come from one branch only."""
    def kind(value: Any) -> str | None:
        for tag, types in kinds.items():
            if isinstance(value, types) and not (isinstance(value, bool) and bool not in _flat(types)):
                return tag
        return None
    return kind


def _flat(types: Any) -> tuple:
    return types if isinstance(types, tuple) else (types,)


# --- ports ----------------------------------------------------------------------------------------------------------
