"""``broker serve``: the broker with its local towers, as one supervision tree.

    /broker                 one_for_one
    ├── towers              one_for_one; tower:<name> per tower (agent process, link)
    ├── jobs                a job:<host> per provisioning or decommission job
    ├── provisioning        starts and cancels jobs
    ├── sessions            one_for_one; session:<id> per session, each with its negotiation
    ├── scaler              provisions, drains and decommissions towers by load
    ├── endpoint            HTTPS + WSS for browsers, 301 from HTTP
    └── shell               the operators' SSH shell

Children start in that order and stop in reverse: the endpoint stops taking requests
first, then sessions close their peers, then the tower agents stop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
from collections.abc import Callable

from actors import ActorSystem, Backoff, ChildSpec, SupervisorFlags, open_system

from .collector import Collector
from .config import Settings
from .endpoint import BrokerApi, Endpoint
from .metrics import SessionCounters
from .pki import CertificateError, client_ssl_context
from .sessions import sessions_spec
from .signaling import SignalingTokens
from .shell.server import ShellServer, authorized_keys
from .scaling import Scaler
from .provisioning import HostBoard, ProvisioningContext, provisioning_specs
from .state import (
    BrokerFiles,
    prepare,
    prepare_local_tower,
    prepare_shell,
    provisioning_identity,
    user_public_keys,
)
from .towers import LinkContext, TowerDirectory, local_tower_spec, towers_spec

logger = logging.getLogger(__name__)


class NotStarted(Exception):
    """The broker could not start; the message says what to fix."""


async def serve_broker(
    settings: Settings, announce: Callable[[Settings, BrokerFiles], None]
) -> None:
    """Run the broker until cancelled; ``announce`` is called once it listens.

    Raises:
        NotStarted: the state directory or the HTTPS certificate cannot be used.
    """
    try:
        files, issuer = prepare(settings)
        shell_files, operator_key = prepare_shell(files.directory)
    except CertificateError as error:
        raise NotStarted(str(error)) from None
    except OSError as error:
        raise NotStarted(f"cannot use {error.filename or settings.state_dir}: "
                         f"{error.strerror or error}") from None
    towers = TowerDirectory(stale_after=settings.tower_silence)
    collector = Collector()
    counters = SessionCounters(collector)
    # Signaling tokens live no longer than this process: its sessions end with it.
    tokens = SignalingTokens(secrets.token_bytes(32), settings.token_lifetime)
    link_tls = client_ssl_context(
        files.ca_certificate, files.client_certificate, files.client_key
    )
    links = LinkContext(towers, link_tls, settings, issuer)
    board = HostBoard(settings.inventory)
    provisioning = ProvisioningContext(
        settings, board, provisioning_identity(files.directory),
        files.directory / "provisioning" / "known_hosts", issuer, links,
    )  # fmt: skip
    tower_specs = []
    for name in settings.local_tower_names:
        credentials = functools.partial(
            prepare_local_tower, files.directory, issuer, name, settings.host
        )
        tower_specs.append(local_tower_spec(name, credentials, links))
    listening: list[Settings] = []

    def make_app(system: ActorSystem) -> BrokerApi:
        return BrokerApi(settings, (files.api_key,), tokens, towers, system, counters)

    def make_endpoint() -> Endpoint:
        return Endpoint(make_app, str(files.https_certificate), str(files.https_key),
                        listening.append)

    own_keys = [] if settings.shell_keys else user_public_keys()
    authorized = authorized_keys(settings.shell_keys, operator_key, own_keys)

    def make_shell() -> ShellServer:
        return ShellServer(
            settings.shell_host, settings.shell_port, shell_files, authorized, towers, board
        )

    # Stopped in the reverse order: the sessions before the endpoint, so that each
    # client hears over its signaling socket that the broker is shutting down.
    children = [
        towers_spec(lambda: tower_specs),
        *provisioning_specs(provisioning),
        ChildSpec("endpoint", make_endpoint),
        sessions_spec(),
        ChildSpec("scaler", lambda: Scaler(settings, towers, board)),
        ChildSpec("shell", make_shell),
    ]
    flags = SupervisorFlags(intensity=5, period=60, backoff=Backoff(initial=0.5, maximum=10))
    async with open_system("broker", children=children, flags=flags):
        shell_port = int(shell_files.port_file.read_text())
        announce(dataclasses.replace(listening[-1], shell_port=shell_port), files)
        await collector.run()  # until cancelled
