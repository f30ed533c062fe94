"""The broker's settings: every knob, its default, and what a wrong value is told.

The embedded default needs no file at all. A TOML file (``broker serve --config FILE``)
overrides any field by name; an unknown field or a value of the wrong type or range is
refused with a message naming the field, before anything starts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .inventory import Host, InventoryError, parse_hosts


class ConfigError(ValueError):
    """The configuration is wrong; the message names the field and what is expected."""


_ICE_SERVER_KEYS = frozenset({"urls", "username", "credential"})
_SHELL_KEY_KEYS = frozenset({"key", "role"})
# Every duration setting lies between these, in seconds: a shorter interval is a busy
# loop, and an infinite one ends up in JSON (Infinity) or past the last date there is.
SHORTEST = 0.01
LONGEST = 10 * 365 * 86_400.0
MAX_LOCAL_TOWERS = 256
# A DNS name: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?")


def check_ice_servers(ice_servers: Sequence[Any]) -> None:
    """Refuse STUN/TURN server entries a peer connection could not use.

    Each entry is a mapping with ``urls`` (a ``stun:``, ``stuns:``, ``turn:`` or
    ``turns:`` URL, or a non-empty list of them) and optionally ``username`` and
    ``credential`` (strings).

    Raises:
        ValueError: naming the entry and what is wrong with it.
    """
    # Imported here: aiortc takes a fifth of a second to load, and the command line
    # (``broker --version``, ``broker tower csr``) reads settings without it.
    from aiortc.rtcicetransport import parse_stun_turn_uri

    for index, entry in enumerate(ice_servers):
        if not isinstance(entry, Mapping):
            raise ValueError(f"ICE server {index} is not a table of urls, username, credential")
        unknown = set(entry) - _ICE_SERVER_KEYS
        if unknown:
            raise ValueError(f"ICE server {index}: unknown keys {sorted(unknown)}")
        urls = entry.get("urls")
        url_list = [urls] if isinstance(urls, str) else urls
        if not isinstance(url_list, (list, tuple)) or not url_list:
            raise ValueError(f"ICE server {index}: 'urls' must be a URL or a list of URLs")
        for url in url_list:
            if not isinstance(url, str):
                raise ValueError(f"ICE server {index}: every URL must be a string")
            try:
                parse_stun_turn_uri(url)
            except ValueError as error:
                raise ValueError(f"ICE server {index}: {url!r} is not usable: {error}") from None
        for name in ("username", "credential"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise ValueError(f"ICE server {index}: {name!r} must be a string")
        if any(url.startswith(("turn:", "turns:")) for url in url_list) and (
                entry.get("username") is None or entry.get("credential") is None):
            # A browser refuses the whole configuration (InvalidAccessError) otherwise.
            raise ValueError(f"ICE server {index}: a TURN server needs 'username' and "
                             "'credential'")


def check_seconds(name: str, value: float) -> None:
    """Refuse a duration setting outside ``SHORTEST`` to ``LONGEST`` seconds (or NaN).

    Raises:
        ConfigError: naming the setting.
    """
    if not SHORTEST <= value <= LONGEST:
        raise ConfigError(f"{name} must be a number of seconds from {SHORTEST:g} "
                          f"to {LONGEST:.0f} (ten years)")


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/session-broker``, or ``~/.local/state/session-broker``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "session-broker"


def default_tower_count() -> int:
    """One local tower agent per CPU core, at least two and at most ``MAX_LOCAL_TOWERS``."""
    return min(MAX_LOCAL_TOWERS, max(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class Settings:
    """Everything the broker and its local towers are configured with.

    Times are seconds. Ports may be 0 (any free port; the broker prints what it got).
    """

    state_dir: Path = field(default_factory=default_state_dir)
    host: str = "127.0.0.1"
    # The name browsers use for the broker; also the host of the signaling URLs.
    public_host: str = "127.0.0.1"
    https_port: int = 8443
    http_port: int = 8080
    # Strict-Transport-Security max-age on HTTPS responses; 0 sends no HSTS header.
    hsts_max_age: int = 31_536_000
    # Origins a browser's signaling WebSocket may come from; empty means the broker's own.
    allowed_origins: tuple[str, ...] = ()
    # STUN/TURN servers handed to clients and towers; none unless configured.
    ice_servers: tuple[dict[str, Any], ...] = ()
    local_towers: int = field(default_factory=default_tower_count)
    tower_capacity: int = 500
    # A session a tower sends video to counts as this many against its capacity.
    video_weight: int = 25
    # Offers a tower has not answered yet; a new session finding every tower with room
    # at this is refused (503 towers_busy).
    max_unanswered_offers: int = 64
    max_sessions_per_key: int = 50
    token_lifetime: float = 60.0
    negotiation_deadline: float = 10.0
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 5.0
    # Negotiation retries on one tower within negotiation_restart_period, then re-placement.
    negotiation_restarts: int = 2
    negotiation_restart_period: float = 60.0
    # Towers a session may be placed on in all before it fails.
    placements_per_session: int = 2
    # A tower link with no load report taken for this long is considered lost. Five
    # reports' worth: under load, a full garbage collection on either side (up to 1.5 s
    # at 3,000 sessions) and a busy tower loop together outlasted 3 s.
    tower_silence: float = 5.0
    tower_load_interval: float = 1.0
    # The operators' SSH shell: its own address, so that a broker serving browsers on
    # every interface does not offer its admin shell there too; port 0 picks a free one.
    shell_host: str = "127.0.0.1"
    shell_port: int = 8022
    # Authorized operator keys: [{key = "ssh-ed25519 AAAA...", role = "admin"}]; the role
    # is "admin" or "read-only". With none configured, the user's own public keys
    # (~/.ssh/*.pub, ~/.ssh/authorized_keys) are admin, as is the `broker shell` key.
    shell_keys: tuple[dict[str, str], ...] = ()
    # The internal CA: the key type of a CA made on first start and of the keys towers
    # make ("ec": ECDSA P-256; "rsa": RSA-2048; signatures are SHA-256), and how long a
    # tower certificate lasts (renewed over the link at 2/3 of it).
    ca_key_type: str = "ec"
    tower_key_type: str = "ec"
    tower_certificate_lifetime: float = 86_400.0
    # The broker's public HTTPS certificate and key (PEM files); empty: a self-signed
    # one for localhost, made in the state directory.
    https_certificate: str = ""
    https_key: str = ""
    # Hosts that can become towers ([[hosts]] tables, see broker/inventory.py).
    hosts: tuple[dict[str, Any], ...] = ()
    # A provisioning step's deadline; a job's restarts within a period before its host
    # is marked failed.
    provision_step_timeout: float = 60.0
    provision_restarts: int = 3
    provision_restart_period: float = 600.0
    # Scale-out when the used share of ready towers' capacity stays above the threshold
    # for scale_out_after seconds; scale-in when a tower beyond min_towers has been idle
    # for scale_in_after seconds. scale_interval is how often the policy looks.
    scale_out_threshold: float = 0.7
    scale_out_after: float = 30.0
    scale_in_after: float = 300.0
    min_towers: int = 1
    scale_interval: float = 5.0

    def __post_init__(self) -> None:
        for name in ("https_port", "http_port", "shell_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a port number (0-65535), not {port}")
        for name in (
            "token_lifetime",
            "negotiation_deadline",
            "heartbeat_interval",
            "heartbeat_timeout",
            "negotiation_restart_period",
            "tower_silence",
            "tower_load_interval",
            "tower_certificate_lifetime",
            "provision_step_timeout",
            "provision_restart_period",
            "scale_out_after",
            "scale_in_after",
            "scale_interval",
        ):
            check_seconds(name, getattr(self, name))
        for name in ("local_towers", "negotiation_restarts", "hsts_max_age",
                     "provision_restarts", "min_towers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} cannot be negative")
        if self.local_towers > MAX_LOCAL_TOWERS:
            raise ConfigError(f"local_towers is at most {MAX_LOCAL_TOWERS}")
        for name in ("tower_capacity", "video_weight", "max_unanswered_offers",
                     "max_sessions_per_key", "placements_per_session"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("heartbeat_timeout must be longer than heartbeat_interval")
        if self.tower_silence <= self.tower_load_interval:
            raise ConfigError("tower_silence must be longer than tower_load_interval")
        for name in ("host", "shell_host"):
            try:
                ipaddress.ip_address(getattr(self, name))
            except ValueError:
                raise ConfigError(
                    f"{name} must be an IP address to listen on, not {getattr(self, name)!r}"
                ) from None
        self._check_public_host()
        for origin in self.allowed_origins:
            _check_origin(origin)
        shell_keys: dict[str, int] = {}
        for index, entry in enumerate(self.shell_keys):
            key = _check_shell_key(index, entry)
            if key in shell_keys:
                raise ConfigError(f"shell key {index} is shell key {shell_keys[key]} again: "
                                  "give each key once, with its role")
            shell_keys[key] = index
        for name in ("ca_key_type", "tower_key_type"):
            if getattr(self, name) not in ("ec", "rsa"):
                raise ConfigError(f"{name} is 'ec' (ECDSA P-256) or 'rsa' (RSA-2048)")
        if self.tower_certificate_lifetime < 10:
            raise ConfigError("tower_certificate_lifetime must be at least 10 seconds")
        if bool(self.https_certificate) != bool(self.https_key):
            raise ConfigError("https_certificate and https_key go together")
        # Scaling out when the share used stays above it: never, at 1 (nothing is above).
        if not 0 < self.scale_out_threshold < 1:
            raise ConfigError("scale_out_threshold is a share of capacity: above 0, below 1")
        try:
            inventory = parse_hosts(self.hosts)
        except InventoryError as error:
            raise ConfigError(str(error)) from None
        for host in inventory:
            local = re.fullmatch(r"tower-([1-9][0-9]*)", host.name)
            if local and int(local.group(1)) <= self.local_towers:
                raise ConfigError(f"the host {host.name!r} has the name of a local tower "
                                  f"(tower-1 to tower-{self.local_towers}); rename it")
        try:
            check_ice_servers(self.ice_servers)
        except ValueError as error:
            raise ConfigError(f"ice_servers: {error}") from None
        # As the tower link carries them: plain data holds tuples, not lists.
        object.__setattr__(self, "ice_servers", tuple(
            {**entry, "urls": tuple(entry["urls"])} if isinstance(entry["urls"], list)
            else dict(entry)
            for entry in self.ice_servers))

    def _check_public_host(self) -> None:
        host = self.public_host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            last_label = host.rstrip(".").rsplit(".", 1)[-1]
            # One of digits alone reads as an IPv4 address to browsers ("1.2.3").
            if not _HOSTNAME.fullmatch(host.lower()) or last_label.isdigit():
                raise ConfigError(
                    f"public_host must be a DNS name or an IP address, not {host!r}") from None
        # Browsers send their origin's host in lower case.
        object.__setattr__(self, "public_host", host.lower())

    @property
    def inventory(self) -> tuple[Host, ...]:
        return parse_hosts(self.hosts)

    @property
    def local_tower_names(self) -> tuple[str, ...]:
        """The towers the broker runs itself: ``tower-1`` to ``tower-N``."""
        return tuple(f"tower-{number}" for number in range(1, self.local_towers + 1))

    @property
    def https_origin(self) -> str:
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{self.url_host}{port}"

    @property
    def url_host(self) -> str:
        """``public_host`` as a URL takes it (an IPv6 address in brackets)."""
        return f"[{self.public_host}]" if ":" in self.public_host else self.public_host

    def with_ports(self, https_port: int, http_port: int) -> Settings:
        """These settings with the ports actually bound (when 0 was asked for)."""
        return dataclasses.replace(self, https_port=https_port, http_port=http_port)


def _check_origin(origin: Any) -> None:
    if not isinstance(origin, str):
        raise ConfigError(f"allowed_origins must be strings, not {origin!r}")
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.path not in ("", "/") or parts.query or parts.fragment
            or parts.username is not None):
        raise ConfigError(f"allowed_origins: {origin!r} is not an origin such as "
                          "'https://app.example.com' or 'https://app.example.com:8443'")


def _check_shell_key(index: int, entry: Any) -> str:
    """Returns the key's ``public_key_id``."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("key"), str):
        raise ConfigError(f"shell key {index} needs 'key', not {entry!r}")
    unknown = set(entry) - _SHELL_KEY_KEYS
    if unknown:
        raise ConfigError(f"shell key {index}: unknown keys {sorted(unknown)}")
    if entry.get("role", "read-only") not in ("admin", "read-only"):
        raise ConfigError(f"shell key {index}: the role is 'admin' or 'read-only'")
    try:
        return public_key_id(entry["key"])
    except ValueError as error:
        raise ConfigError(
            f"shell key {index} is not a public key (OpenSSH's 'type base64', RFC 4716 or "
            f"PEM): {error}"
        ) from None


def public_key_id(text: str) -> str:
    """A public key's type and data as OpenSSH writes them (whatever form it was given
    in: OpenSSH, RFC 4716, PEM), without its comment: what tells two keys apart.

    Raises:
        ValueError: ``text`` is no public key (asyncssh's KeyImportError is one).
    """
    import asyncssh  # here: the command line reads settings without it

    return " ".join(asyncssh.import_public_key(text).export_public_key().decode().split()[:2])


# Settings that name files: relative ones in a configuration file are taken from the
# file's own directory, wherever the broker is started from.
_PATH_SETTINGS = ("state_dir", "https_certificate", "https_key")


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from a TOML file (optional), then ``overrides`` (from the command line).

    Raises:
        ConfigError: the file does not parse, names an unknown field, or a value is
            of the wrong type or out of range.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                values = tomllib.load(file)
        except OSError as error:
            raise ConfigError(f"cannot read {path}: {error.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
        for name in _PATH_SETTINGS:
            value = values.get(name)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                values[name] = str(path.parent / value)
    values.update({key: value for key, value in overrides.items() if value is not None})
    return settings_from_mapping(values)


def settings_from_mapping(values: dict[str, Any]) -> Settings:
    """Build and check ``Settings`` from plain values, converting where TOML cannot say."""
    known = {item.name: item for item in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    converted: dict[str, Any] = {}
    defaults = Settings.__dataclass_fields__
    for name, value in values.items():
        expected = defaults[name].type
        converted[name] = _convert(name, str(expected), value)
    return Settings(**converted)


def _convert(name: str, expected: str, value: Any) -> Any:
    if expected == "Path":
        # (An empty one would be the broker's working directory, whatever it is.)
        if not isinstance(value, (str, Path)) or not str(value):
            raise ConfigError(f"{name} must be a path, not {value!r}")
        return Path(value).expanduser()
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, not {value!r}")
        return value
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, not {value!r}")
        return float(value)
    if expected == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, not {value!r}")
        return value
    if expected.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, not {value!r}")
        return tuple(value)
    raise ConfigError(f"{name} cannot be set")
