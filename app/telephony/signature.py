"""Who may reach a carrier's edge: Twilio's signature check, dev mode, proxies.

Every carrier's edge uses the public origin and the dev-mode rules below; each checks its
own signature (Twilio's here, the others' in their modules).

Twilio signs the exact URL it requested plus, for webhooks, the POSTed form fields.
Behind a proxy the URL we see is not the one Twilio used, so the public origin comes
from PUBLIC_URL, or from the X-Forwarded-Proto/Host headers of a proxy listed in
TRUSTED_PROXIES; anyone else's forwarding headers are ignored, so a client cannot pick
the URL its signature is checked against.

Without TWILIO_AUTH_TOKEN (dev mode) nothing is signed: requests are accepted from this
machine only, and not when they carry forwarding headers (a tunnel or local proxy makes
every request look local), unless ALLOW_UNSIGNED says the service may be open.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import ip_address

from aiohttp import web
from twilio.request_validator import RequestValidator

from app.config import Network, Settings

__all__ = [
    "client_address",
    "exposure",
    "is_valid",
    "public_origin",
    "refusal",
    "unsigned_refusal",
]

# Headers a proxy or tunnel adds; X-Forwarded-* is matched by prefix.
_FORWARDING = frozenset(
    {"forwarded", "via", "x-real-ip", "true-client-ip", "cf-connecting-ip", "x-client-ip"}
)


def _in(address: str | None, networks: Iterable[Network]) -> bool:
    try:
        ip = ip_address(address or "")
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _trusted_proxy(request: web.Request, settings: Settings) -> bool:
    return _in(request.remote, settings.trusted_proxies)


def client_address(request: web.Request, settings: Settings) -> str:
    """The client's address: the peer, or behind a trusted proxy the nearest untrusted
    address in X-Forwarded-For."""
    peer = request.remote or ""
    if not _trusted_proxy(request, settings):
        return peer
    headers = request.headers.getall("X-Forwarded-For", [])
    hops = [hop.strip() for header in headers for hop in header.split(",")]
    for hop in reversed(hops):
        if not _in(hop, settings.trusted_proxies):
            return hop
    return peer


def public_origin(request: web.Request, settings: Settings) -> str:
    """The origin Twilio reached, e.g. `https://agent.example.com`."""
    if settings.public_url:
        return settings.public_url
    proto, host = request.scheme, request.host
    if _trusted_proxy(request, settings):
        proto = request.headers.get("X-Forwarded-Proto", proto).split(",")[0].strip()
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
    return f"{proto}://{host}"


def is_valid(auth_token: str, url: str, params: Mapping[str, str], signature: str | None) -> bool:
    """True when `signature` is Twilio's for `url` and `params`."""
    if not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))


def _forwarded(request: web.Request) -> bool:
    return any(
        name.lower() in _FORWARDING or name.lower().startswith("x-forwarded-")
        for name in request.headers
    )


def _loopback(request: web.Request) -> bool:
    try:
        return ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def refusal(
    request: web.Request, settings: Settings, url: str, params: Mapping[str, str]
) -> str | None:
    """Why this request may not reach the Twilio edge, or None when it may."""
    token = settings.twilio_auth_token
    if token is not None:
        signature = request.headers.get("X-Twilio-Signature")
        if is_valid(token.get_secret_value(), url, params, signature):
            return None
        return "invalid Twilio signature"
    return unsigned_refusal(request, settings, "TWILIO_AUTH_TOKEN")


def unsigned_refusal(request: web.Request, settings: Settings, key: str) -> str | None:
    """Dev mode, for a carrier whose signing key (setting `key`) is unset: why this
    unsigned request is refused, or None when it may pass."""
    if settings.allow_unsigned:
        return None
    if not _loopback(request):
        return f"dev mode (no {key}) accepts unsigned requests from loopback only"
    if _forwarded(request):
        return (
            f"dev mode (no {key}) refuses requests that came through a proxy "
            f"(forwarding headers); set {key}, or ALLOW_UNSIGNED=true"
        )
    return None


def exposure(settings: Settings) -> str:
    """What the carriers' edges accept, for the start-up log."""
    keys = {
        "Twilio": ("TWILIO_AUTH_TOKEN", settings.twilio_auth_token),
        "Telnyx": ("TELNYX_PUBLIC_KEY", settings.telnyx_public_key),
        "Plivo": ("PLIVO_AUTH_TOKEN", settings.plivo_auth_token),
        "SignalWire": ("SIGNALWIRE_SIGNING_KEY", settings.signalwire_signing_key),
    }
    signed = [f"{name}'s ({key})" for name, (key, value) in keys.items() if value is not None]
    unsigned = [key for key, value in keys.values() if value is None]
    said = f"requests must carry {', '.join(signed)} signature" if signed else ""
    if not unsigned:
        return said
    if settings.allow_unsigned:
        opened = (
            "ALLOW_UNSIGNED=true: unsigned requests accepted from ANY client, proxied or not; "
            "whoever reaches this port can place calls on your model keys"
        )
    else:
        opened = (
            f"{', '.join(unsigned)} unset: unsigned requests accepted from loopback only, "
            "and not through a proxy or tunnel that adds forwarding headers"
        )
    return f"{said}; for the other carriers, {opened}" if said else opened
