"""Store URLs and snapshot addresses: ``s3://bucket[/prefix]/NAME`` and ``file:///dir/NAME``."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from .errors import BadAddressError

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")
SCHEMES = ("file", "s3")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise BadAddressError(
            f"snapshot name {name!r} is not 1-200 letters, digits, '.', '_' or '-' "
            "(not starting with '.' or '-')"
        )
    return name


def split_store_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket or directory, prefix) of a store URL; the prefix has no slashes at its
    ends. A file store's 'bucket' is its absolute directory and its prefix is empty."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise BadAddressError(f"store URL {url!r} is not file:///DIR or s3://BUCKET[/PREFIX]")
    if parts.query or parts.fragment:
        raise BadAddressError(f"store URL {url!r} has a query or fragment")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise BadAddressError(f"store URL {url!r} is not file:///ABSOLUTE/DIR")
        path = "/" + parts.path.strip("/")
        return "file", path, ""
    if not parts.netloc:
        raise BadAddressError(f"store URL {url!r} names no bucket")
    return "s3", parts.netloc, parts.path.strip("/")


def store_url(scheme: str, where: str, prefix: str) -> str:
    if scheme == "file":
        return "file://" + where
    return f"s3://{where}/{prefix}" if prefix else f"s3://{where}"


def parse_address(address: str) -> tuple[str, str]:
    """(store URL, snapshot name) of an address: its last path segment is the name."""
    if "://" not in address:
        raise BadAddressError(
            f"snapshot address {address!r} is not file:///DIR/NAME or s3://BUCKET[/PREFIX]/NAME"
        )
    scheme, where, prefix = split_store_url(address)
    full = where if scheme == "file" else prefix
    head, _, name = full.rpartition("/")
    if not name or (scheme == "s3" and not prefix):
        raise BadAddressError(f"snapshot address {address!r} names no snapshot")
    check_name(name)
    if scheme == "file":
        return store_url("file", head or "/", ""), name
    return store_url("s3", where, head), name
