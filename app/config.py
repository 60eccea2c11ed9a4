"""Settings: one typed object read from the environment and `.env`.

The names are the configuration contract in DESIGN.md; the README documents each.
"""

from __future__ import annotations

import base64
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from app.capacity import OverloadAction
from app.modes import Mode

__all__ = ["ConfigError", "Settings", "load_settings"]

Network = IPv4Network | IPv6Network


def _url(value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"must be a {wanted} URL, got {value!r}")
    return value


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=1, le=65535)
    public_url: str | None = None
    trusted_proxies: Annotated[tuple[Network, ...], NoDecode] = ()
    allow_unsigned: bool = False
    stream_token_secret: SecretStr | None = None
    stream_start_timeout: float = Field(5.0, gt=0)
    http_timeout: float = Field(15.0, gt=0)
    max_connections_per_client: int = Field(64, ge=0)
    max_calls: int = Field(100, ge=0)
    overload_action: OverloadAction = OverloadAction.REJECT
    max_loop_lag_ms: float = Field(100.0, ge=0)

    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_api_base: str = "https://api.twilio.com"
    twilio_from_number: str | None = None

    telnyx_public_key: str | None = None  # base64 Ed25519 key that signs Telnyx webhooks
    telnyx_api_key: SecretStr | None = None
    telnyx_api_base: str = "https://api.telnyx.com"
    telnyx_account_sid: str | None = None  # for outbound calls: the TeXML Calls API
    telnyx_texml_app_id: str | None = None
    telnyx_from_number: str | None = None
    plivo_auth_id: str | None = None
    plivo_auth_token: SecretStr | None = None
    plivo_api_base: str = "https://api.plivo.com"
    plivo_from_number: str | None = None
    signalwire_signing_key: SecretStr | None = None
    signalwire_space_url: str | None = None  # https://<space>.signalwire.com
    signalwire_project_id: str | None = None
    signalwire_api_token: SecretStr | None = None
    signalwire_from_number: str | None = None

    agent_mode: Mode = Mode.REALTIME
    realtime_url: str = "wss://api.openai.com/v1/realtime"
    realtime_model: str = "gpt-realtime"
    realtime_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("REALTIME_API_KEY", "OPENAI_API_KEY")
    )
    realtime_dialect: Literal["ga", "beta"] = "ga"
    realtime_connect_timeout: float = Field(5.0, gt=0)
    realtime_max_session_minutes: float = Field(55.0, gt=0)
    realtime_session_timeout: float = Field(2.5, gt=0)
    realtime_response_timeout: float = Field(2.5, gt=0)

    live_url: str = "wss://api.openai.com/v1/live/sessions"
    live_model: str = "gpt-live-1.1"
    live_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("LIVE_API_KEY", "OPENAI_API_KEY")
    )
    live_backend_model: str = "gpt-5.5"
    live_session_timeout: float = Field(2.5, gt=0)
    engine_order: Annotated[tuple[Mode, ...], NoDecode] = (Mode.REALTIME, Mode.LIVE, Mode.CHAINED)

    together_api_key: SecretStr | None = None
    together_base_url: str = "https://api.together.ai/v1"
    stt_model: str = "openai/whisper-large-v3"
    llm_model: str = "Qwen/Qwen2.5-7B-Instruct-Turbo"
    tts_model: str = "hexgrad/Kokoro-82M"
    tts_voice: str = "af_heart"

    persona: str = "kira"
    prompts_dir: Path = Path("prompts")

    interrupt_dtmf_digit: str = "*"
    vad_model_path: Path = Path("silero_vad.onnx")
    vad_start_threshold: float = Field(0.5, gt=0, lt=1)
    vad_min_speech_ms: int = Field(64, ge=0)
    vad_echo_gate_db: float = Field(-20.0, le=0)
    vad_batch_ms: float = Field(20.0, ge=0, le=100)
    backchannel_ms: int = Field(300, ge=0)
    turn_silence_ms: int = Field(600, ge=100)
    turn_min_speech_ms: int = Field(200, ge=0)
    playback_lead_ms: int = Field(250, ge=40)

    tools_signing_secret: SecretStr | None = None
    tool_filler_ms: int = Field(700, ge=0)

    admin_token: SecretStr | None = None
    redis_url: str | None = None
    call_registry_ttl: float = Field(15.0, gt=0)
    archive_dir: Path = Path("calls")  # the archive, or with an s3:// ARCHIVE_URL its spool
    archive_url: str | None = None  # file:///path or s3://bucket/prefix
    archive_retention_days: float | None = Field(None, gt=0)
    s3_endpoint_url: str | None = None  # MinIO, SeaweedFS, R2...; unset: AWS
    aws_access_key_id: str | None = None  # unset: botocore's chain (profile, web identity)
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    aws_region: str | None = Field(
        None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    call_webhook_url_ttl: int = Field(3600, ge=1, le=604_800)  # SigV4 presigns 7 days at most
    call_webhook_url: str | None = None  # each finished call is POSTed here, signed
    call_webhook_secret: SecretStr | None = None
    prices_file: Path | None = None  # overrides rows of the shipped app/records/prices.toml
    drain_timeout: float = Field(600.0, ge=0)
    workers: int | Literal["auto"] = 1

    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"
    redact_pii: bool = False  # mask phone numbers, e-mails and cards in text (app.redact)

    # Traces, under OpenTelemetry's own names: on when an OTLP endpoint is set.
    otel_exporter_otlp_endpoint: str | None = None  # the base URL; /v1/traces is added
    otel_exporter_otlp_traces_endpoint: str | None = None  # the full URL, if not the above
    otel_exporter_otlp_headers: SecretStr | None = None  # key=value,key=value
    otel_exporter_otlp_protocol: Literal["http/protobuf"] | None = None
    otel_service_name: str = "phone-agent"
    otel_sdk_disabled: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _BlankNameFallsThrough.around(env_settings),
            _BlankNameFallsThrough.around(dotenv_settings),
            file_secret_settings,
        )

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """`NAME=` (an empty line in `.env`) leaves an optional setting unset, never empty."""
        if not isinstance(data, dict):
            return data
        optional = {
            name.lower()
            for field_name, info in cls.model_fields.items()
            if not info.is_required() and info.default is None
            for name in (field_name, *_aliases(info.validation_alias))
        }
        return {
            key: value
            for key, value in data.items()
            if not (key.lower() in optional and isinstance(value, str) and not value.strip())
        }

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        """A number of processes (1 or more), or `auto`: one per usable core."""
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit() or int(text) < 1:
            raise ValueError("must be a number of processes (1 or more) or auto")
        return int(text)

    @field_validator("archive_url")
    @classmethod
    def _archive_url(cls, value: str | None) -> str | None:
        """`file:///absolute/path` or `s3://bucket[/prefix]`."""
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
            return value
        if parts.scheme == "s3" and parts.netloc:
            return value
        raise ValueError(f"must be file:///path or s3://bucket/prefix, got {value!r}")

    @model_validator(mode="after")
    def _archive_dir_from_url(self) -> Settings:
        """A file:// ARCHIVE_URL is where the archive goes: ARCHIVE_DIR follows it."""
        if self.archive_url and urlsplit(self.archive_url).scheme == "file":
            self.archive_dir = Path(unquote(urlsplit(self.archive_url).path))
        return self

    @field_validator("max_calls", "overload_action", "max_loop_lag_ms", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """`NAME=` leaves these at their default, as it leaves optional settings unset."""
        if isinstance(value, str) and not value.strip():
            return cls.model_fields[str(info.field_name)].default
        return value

    @field_validator("realtime_url", "live_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        return _url(value, ("ws", "wss"))

    @field_validator("engine_order", mode="before")
    @classmethod
    def _modes(cls, value: Any) -> Any:
        """A comma-separated list of modes, each once, e.g. `live,realtime,chained`."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("must name at least one mode")
            if len(set(value)) != len(value):
                raise ValueError(f"names a mode twice: {','.join(map(str, value))}")
        return value

    @field_validator(
        "together_base_url",
        "twilio_api_base",
        "telnyx_api_base",
        "plivo_api_base",
        "signalwire_space_url",
        "s3_endpoint_url",
        "call_webhook_url",
    )
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else _url(value, ("http", "https"))

    @field_validator("telnyx_public_key")
    @classmethod
    def _ed25519_key(cls, value: str | None) -> str | None:
        """Telnyx's public key as the portal shows it: base64 of the 32-byte Ed25519 key."""
        if value is not None:
            try:
                raw = base64.b64decode(value, validate=True)
            except ValueError:
                raise ValueError("must be base64 (the key as Telnyx's portal shows it)") from None
            if len(raw) != 32:
                raise ValueError(f"must be a 32-byte Ed25519 key, not {len(raw)} bytes")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        """A comma-separated list of addresses or networks, e.g. `127.0.0.1,10.0.0.0/8`."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return tuple(ip_network(str(part), strict=False) for part in value)
        return value

    @field_validator("interrupt_dtmf_digit")
    @classmethod
    def _one_key(cls, value: str) -> str:
        if value and (len(value) != 1 or value not in "0123456789*#"):
            raise ValueError("must be one keypad key (0-9, * or #) or empty")
        return value

    @field_validator("public_url")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) origin such as https://agent.example.com")
        return value.rstrip("/")

    @field_validator("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint")
    @classmethod
    def _otlp_url(cls, value: str | None) -> str | None:
        return None if value is None else _url(value, ("http", "https"))

    @property
    def dev_mode(self) -> bool:
        """Without a Twilio auth token, requests are unsigned and accepted from loopback."""
        return self.twilio_auth_token is None

    def secret_values(self) -> list[str]:
        """Every secret this process holds, for the logs to mask wherever it appears: the
        SecretStr settings, and the password in REDIS_URL."""
        values = (getattr(self, name) for name in type(self).model_fields)
        secrets = [v.get_secret_value() for v in values if isinstance(v, SecretStr)]
        password = urlsplit(self.redis_url).password if self.redis_url else None
        return [*secrets, password] if password else secrets


class _BlankNameFallsThrough(PydanticBaseSettingsSource):
    """An environment source where an optional setting with several names (`REALTIME_API_KEY`
    or `OPENAI_API_KEY`) set blank under one is read under the next: a source gives each
    setting the first name it holds, so `REALTIME_API_KEY=` hid `OPENAI_API_KEY`."""

    def __init__(self, inner: EnvSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self._inner = inner

    @classmethod
    def around(cls, source: PydanticBaseSettingsSource) -> PydanticBaseSettingsSource:
        return cls(source) if isinstance(source, EnvSettingsSource) else source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = self._inner()
        found = self._inner.env_vars
        for info in self.settings_cls.model_fields.values():
            names = _aliases(info.validation_alias) if info.default is None else []
            if len(names) < 2 or not _blank(data.get(names[0])):
                continue
            held = (found.get(n if self._inner.case_sensitive else n.lower()) for n in names)
            value = next((v for v in held if not _blank(v)), None)
            if value is None:
                del data[names[0]]
            else:
                data[names[0]] = value
        return data


def _blank(value: object) -> bool:
    return isinstance(value, str) and not value.strip()


def _aliases(alias: object) -> list[str]:
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    return [alias] if isinstance(alias, str) else []


class ConfigError(Exception):
    """The configuration cannot run the service; the message is one line for the operator."""


def load_settings(*, serving: bool = True) -> Settings:
    """Read and check the settings; a bad value or a missing key is one clear line.

    `serving=False` skips the model-key checks, for commands that answer no call (dial).
    """
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"]).upper() or "settings"
        raise ConfigError(f"{name}: {first['msg']}") from None
    if not serving:
        return settings
    keys = (settings.realtime_api_key, settings.live_api_key, settings.together_api_key)
    if all(key is None for key in keys):
        raise ConfigError(
            "REALTIME_API_KEY (or OPENAI_API_KEY) is not set, nor LIVE_API_KEY, and no "
            "TOGETHER_API_KEY for the chained engine: no model can answer calls"
        )
    if settings.agent_mode == "chained" and settings.together_api_key is None:
        raise ConfigError("AGENT_MODE=chained needs TOGETHER_API_KEY")
    if settings.agent_mode == "live" and settings.live_api_key is None:
        raise ConfigError("AGENT_MODE=live needs LIVE_API_KEY (or OPENAI_API_KEY)")
    return settings
