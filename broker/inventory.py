"""The inventory: hosts the broker may turn into towers over SSH, from configuration.

Each host is a ``[[hosts]]`` table in the broker's TOML file:

    [[hosts]]
    name = "tower-eu-1"                 # the tower's name, in its certificate
    address = "10.0.0.7"                # where to reach its SSH server
    user = "tower"
    host_key = "ssh-ed25519 AAAA..."    # the pinned host key (its .pub line)
    # ssh_port = 22
    # trust_on_first_use = false        # accept and pin an unknown key, this host only
    # tower_address = address           # where the broker reaches the tower's NGINX
    # tower_port = 8443                 # NGINX's TLS port on the host
    # root = "session-tower"            # the tower's directory, relative to the home
    # tower_command = "broker"          # the session-broker command on the host
    # nginx = "/usr/sbin/nginx"

A host with neither ``host_key`` nor ``trust_on_first_use = true`` is refused: an SSH
server the broker cannot recognise is never given a tower certificate.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Characters that would need quoting in a remote shell, or break a config file line.
_UNSAFE = re.compile(r"[\s'\"\\$`;&|<>(){}\[\]*?!#~]")
_NOT_A_SPACE = re.compile(r"[^\S ]")  # whitespace other than a space


def is_plain(text: str) -> bool:
    """Nothing in ``text`` needs quoting in a shell command or an NGINX directive."""
    return not _UNSAFE.search(text)


class InventoryError(ValueError):
    """A host entry that cannot be used; the message names the host and the field."""


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    user: str
    host_key: str = ""
    trust_on_first_use: bool = False
    ssh_port: int = 22
    tower_address: str = ""
    tower_port: int = 8443
    root: str = "session-tower"
    tower_command: str = "broker"
    nginx: str = "/usr/sbin/nginx"

    @property
    def link_address(self) -> str:
        return self.tower_address or self.address


def parse_hosts(entries: Sequence[Any]) -> tuple[Host, ...]:
    """Check the ``hosts`` entries of a configuration and build them.

    Raises:
        InventoryError: an entry is not a table, misses or mistypes a field, names an
            unknown field, or repeats another host's name.
    """
    hosts: list[Host] = []
    for index, entry in enumerate(entries):
        host = parse_host(entry, f"hosts[{index}]")
        for other in hosts:
            if other.name == host.name:
                raise InventoryError(f"hosts[{index}]: the name {host.name!r} is used twice")
            if _nested(_directory(other), _directory(host)):
                # One directory, one tower: two would keep replacing each other's files,
                # and taking out one would remove the other's (in it) too.
                raise InventoryError(f"hosts[{index}] ({host.name}): {other.name} has its "
                                     "tower in the same directory of the same machine, or "
                                     "in one inside the other")
            if (other.link_address, other.tower_port) == (host.link_address, host.tower_port):
                raise InventoryError(f"hosts[{index}] ({host.name}): {other.name} listens "
                                     f"on the same address and tower_port")
        hosts.append(host)
    return tuple(hosts)


def _directory(host: Host) -> tuple[str, int, str, str]:
    """Where the host's tower lives: a relative root is in its user's home."""
    root = posixpath.normpath(host.root)
    return (host.address, host.ssh_port, "" if root.startswith("/") else host.user, root)


def _nested(one: tuple[str, int, str, str], other: tuple[str, int, str, str]) -> bool:
    """Whether two towers' directories are one, or one is inside the other."""
    return one[:3] == other[:3] and nested(one[3], other[3])


def nested(first: str, second: str) -> bool:
    """Whether two normalised paths are one directory, or one is inside the other."""
    first, second = first.rstrip("/"), second.rstrip("/")
    return first == second or first.startswith(second + "/") or second.startswith(first + "/")


# System directories a tower's root must not be, nor be in: provisioning makes its root
# 0700 and decommissioning removes what it put there (nginx/, tls/, ...).
_SYSTEM_PREFIXES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/proc", "/sbin", "/sys", "/usr")


def parse_host(entry: Any, where: str = "host") -> Host:
    if not isinstance(entry, Mapping):
        raise InventoryError(f"{where}: a host is a table, not {entry!r}")
    fields = {item.name: item for item in dataclasses.fields(Host)}
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise InventoryError(f"{where}: unknown field(s): {', '.join(unknown)}")
    for required in ("name", "address", "user"):
        if required not in entry:
            raise InventoryError(f"{where}: '{required}' is required")
    values: dict[str, Any] = {}
    for key, value in entry.items():
        expected = fields[key].type
        if expected == "bool" and not isinstance(value, bool):
            raise InventoryError(f"{where}: {key} must be true or false")
        if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise InventoryError(f"{where}: {key} must be an integer")
        if expected == "str" and not isinstance(value, str):
            raise InventoryError(f"{where}: {key} must be a string")
        values[key] = value
    host = Host(**values)
    where = f"{where} ({host.name})" if isinstance(host.name, str) else where
    if not _NAME.fullmatch(host.name) or host.name == "broker":
        raise InventoryError(
            f"{where}: name must be a DNS label (a-z, 0-9, '-') other than 'broker'"
        )
    for key in ("ssh_port", "tower_port"):
        if not 1 <= getattr(host, key) <= 65535:
            raise InventoryError(f"{where}: {key} must be a port number (1-65535)")
    for key in ("address", "user", "root", "nginx"):
        value = getattr(host, key)
        if not value or _UNSAFE.search(value):
            raise InventoryError(f"{where}: {key} must be a plain word, not {value!r}")
    if ":" in host.root:
        # NGINX ends a unix: socket's path at the first ':' (proxy_pass to the agent).
        raise InventoryError(f"{where}: root must not contain ':', not {host.root!r}")
    if host.tower_address:
        try:
            ipaddress.ip_address(host.tower_address)
        except ValueError:
            raise InventoryError(f"{where}: tower_address must be an IP address") from None
        if "%" in host.tower_address:
            # A zone (fe80::1%eth0) takes any text, and NGINX's listen takes none.
            raise InventoryError(f"{where}: tower_address must be an IP address without "
                                 "a zone")
    # Words apart by spaces only: a newline would end the command it is put in on the
    # host, and start another.
    if not host.tower_command.strip() or _NOT_A_SPACE.search(host.tower_command) or any(
        _UNSAFE.search(word) for word in host.tower_command.split()
    ):
        raise InventoryError(f"{where}: tower_command must be plain words")
    root = posixpath.normpath(host.root)
    if root in ("/", ".", "//") or ".." in host.root.split("/") or (
        root.startswith("/") and (
            root.count("/") == 1  # /opt, /home, /tmp, /var: shared by all
            or root.startswith("/var/") and root.count("/") == 2  # /var/lib, /var/www
            or any(root == prefix or root.startswith(prefix + "/")
                   for prefix in _SYSTEM_PREFIXES)
        )
    ):
        raise InventoryError(f"{where}: root must be a directory of its own (say "
                             f"/opt/session-tower), not {host.root!r}")
    if host.host_key:
        import asyncssh  # only to check keys: the command line loads without it

        try:
            # Any line break Python knows (known_hosts is read with splitlines).
            if len(host.host_key.strip().splitlines()) != 1:
                # Only the first would be checked, and every line pinned: another key, or
                # a certificate authority the host could then show a certificate of.
                raise ValueError("more than one line")
            asyncssh.import_public_key(host.host_key)
        except (asyncssh.KeyImportError, ValueError):
            raise InventoryError(
                f"{where}: host_key is a public key line, 'type base64' (the host's "
                f"ssh_host_*_key.pub line), not {host.host_key[:40]!r}"
            ) from None
    elif not host.trust_on_first_use:
        raise InventoryError(
            f"{where}: give the host's key as host_key (its ssh_host_*_key.pub line), or "
            "set trust_on_first_use = true to accept and pin the key it shows first"
        )
    return host
