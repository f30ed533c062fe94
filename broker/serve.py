"""``broker serve``: the broker with its local towers, as one supervision tree.

    /broker                 one_for_one
    ├── towers              one_for_one; tower:<name> per tower (agent process, link)
    ├── sessions            one_for_one; session:<id> per session, each with its negotiation
    └── endpoint            HTTPS + WSS for browsers, 301 from HTTP

Children start in that order and stop in reverse: the endpoint stops taking requests
first, then sessions close their peers, then the tower agents stop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import trio

from actors import Backoff, ChildSpec, SupervisorFlags, open_system

from .config import Settings
from .endpoint import Endpoint
from .metrics import SessionCounters
from .pki import client_ssl_context
from .sessions import sessions_spec
from .signaling import SignalingTokens
from .state import BrokerFiles, prepare, prepare_local_tower
from .towers import TowerDirectory, local_tower_spec, towers_spec

logger = logging.getLogger(__name__)


async def serve_broker(settings: Settings, announce: Callable[[Settings, BrokerFiles], None]) -> None:
    """Run the broker until cancelled; ``announce`` is called once it listens."""
    files, authority = prepare(settings.state_dir)
    towers = TowerDirectory(stale_after=settings.tower_silence)
    counters = SessionCounters()
    tokens = SignalingTokens(files.token_secret, settings.token_lifetime)
    link_tls = client_ssl_context(
        files.ca_certificate, files.client_certificate, files.client_key
    )
    tower_specs = []
    for number in range(1, settings.local_towers + 1):
        name = f"tower-{number}"
        credentials = functools.partial(
            prepare_local_tower, files.directory, authority, name, settings.host
        )
        tower_specs.append(local_tower_spec(name, credentials, towers, link_tls, settings))
    listening: list[Settings] = []

    def make_endpoint() -> Endpoint:
        return Endpoint(settings, (files.api_key,), tokens, towers, counters,
                        str(files.https_certificate), str(files.https_key), listening.append)

    children = [
        towers_spec(lambda: tower_specs),
        sessions_spec(),
        ChildSpec("endpoint", make_endpoint),
    ]
    flags = SupervisorFlags(intensity=5, period=60, backoff=Backoff(initial=0.5, maximum=10))
    async with open_system("broker", children=children, flags=flags):
        announce(listening[-1], files)
        await trio.sleep_forever()
