"""The browser side in a real Chromium (Debian's), at its default settings.

mDNS host candidates stay on, as in users' browsers. Playwright drives
``/usr/bin/chromium``; no browser is downloaded. A screenshot of the demo page with a
live session is left in ``test-output/`` for a person to look at.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from .conftest import start_broker, stop_broker, wait_for_towers

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
# What a root process on a closed network needs (FACTS.md); nothing that changes WebRTC.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (./scripts/test as root)"
)


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def broker(tmp_path):
    running = start_broker(tmp_path, negotiation_deadline=4.0, heartbeat_interval=0.5,
                           heartbeat_timeout=2.0, token_lifetime=2.0)
    wait_for_towers(running, 2)
    yield running
    stop_broker(running)


def new_page(chromium, **options):
    context = chromium.new_context(
        ignore_https_errors=True, viewport={"width": 1280, "height": 900}, **options
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    return page


@pytest.fixture
def page(chromium):
    page = new_page(chromium)
    yield page
    page.context.close()


@pytest.fixture
def page_without_policy(chromium):
    """The demo page with its sockets let go anywhere: for the client's handling of a
    server that never answers, which the page's own policy refuses at once."""
    page = new_page(chromium, bypass_csp=True)
    yield page
    page.context.close()


def open_demo(page, broker, key=None):
    page.goto(f"{broker.url}/#key={broker.api_key if key is None else key}")
    page.wait_for_function("() => window.demo !== undefined")


def start(page):
    page.click("#start")
    page.wait_for_function(
        "() => document.querySelector('#state').textContent.includes('connected')")


def video_frames_change(page) -> bool:
    """Two frames of the video element, a little apart, differ (the picture is live)."""
    grab = """() => {
        const video = document.querySelector('#video');
        const canvas = document.createElement('canvas');
        canvas.width = video.videoWidth; canvas.height = video.videoHeight;
        const context = canvas.getContext('2d');
        context.drawImage(video, 0, 0);
        return canvas.toDataURL('image/png');
    }"""
    page.wait_for_function(
        "() => { const v = document.querySelector('#video');"
        " return v.readyState >= 2 && v.videoWidth > 0 && !v.paused && v.currentTime > 0.3; }")
    first = page.evaluate(grab)
    page.wait_for_timeout(500)
    return page.evaluate(grab) != first


def chat(page, text: str) -> None:
    page.fill("#chat-input", text)
    page.click("#chat-send")
    page.wait_for_function(
        "text => document.querySelector('#chat-log').textContent.includes('echo: ' + text)",
        arg=text)


def test_the_demo_page_shows_a_live_session_with_video_and_echo(broker, page):
    open_demo(page, broker)
    start(page)
    session_id = page.text_content("#session-id")
    assert session_id.startswith("s-")
    assert video_frames_change(page)
    chat(page, "hello tower")
    page.wait_for_function("() => /\\d/.test(document.querySelector('#rtt').textContent)")
    opened = page.evaluate("() => window.demo.timings.pageLoadToOpen")
    print(f"page load to data channel open: {opened:.0f} ms")
    assert opened > 0
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "demo-page.png"), full_page=True)
    page.click("#end")
    page.wait_for_function("() => document.querySelector('#state').textContent.includes('closed')")


def test_the_page_repairs_a_session_whose_tower_is_killed(broker, page):
    open_demo(page, broker)
    start(page)
    session_id = page.text_content("#session-id")
    tower = page.text_content("#tower").strip()
    os.kill(broker.tower_pids()[tower], signal.SIGKILL)
    killed = time.monotonic()
    page.wait_for_function(
        "() => window.demo.events.some(e => e.type === 'state' && e.detail.state === 'repairing')",
        timeout=10_000)
    page.wait_for_function(
        "() => { const s = window.demo.session; return s.state === 'connected'"
        " && s.negotiation > 1; }", timeout=10_000)
    chat(page, "after the repair")
    repaired_in = time.monotonic() - killed
    print(f"repaired and echoing again {repaired_in:.1f} s after the kill")
    assert page.text_content("#session-id") == session_id
    assert page.text_content("#tower").strip() != tower
    assert repaired_in < 10


def test_ten_peer_connections_in_one_page_all_connect(broker, page):
    open_demo(page, broker)
    results = page.evaluate("""async () => {
        const { BrokerClient } = await import('/client/broker-client.js');
        const client = new BrokerClient({ apiKey: window.demo.client.apiKey });
        const sessions = await Promise.all(Array.from({ length: 10 }, () =>
            client.startSession({ application: 'echo' })));
        const echoed = await Promise.all(sessions.map(session => new Promise(resolve => {
            const go = () => {
                session.addEventListener('message', e => resolve(e.detail.data), { once: true });
                session.send('ping ' + session.id);
            };
            if (session.channel && session.channel.readyState === 'open') go();
            else session.addEventListener('open', go, { once: true });
        })));
        const ids = sessions.map(s => s.id);
        sessions.forEach(s => s.close());
        return { ids, echoed };
    }""")
    assert len(set(results["ids"])) == 10
    assert results["echoed"] == [f"ping {session_id}" for session_id in results["ids"]]


def test_a_refused_api_key_is_shown_as_a_clear_message(broker, page):
    open_demo(page, broker, key="bk_wrong")
    page.click("#start")
    page.wait_for_function("() => document.querySelector('#error').textContent.length > 0")
    message = page.text_content("#error").lower()
    assert "key" in message


def test_an_expired_token_is_reported_and_the_client_gets_a_fresh_one(broker, page):
    open_demo(page, broker)
    outcome = page.evaluate("""async () => {
        const { BrokerClient } = await import('/client/broker-client.js');
        const client = new BrokerClient({ apiKey: window.demo.client.apiKey });
        const grant = await client.createSession({ application: 'echo' });
        await new Promise(resolve => setTimeout(resolve, 2500));  // past token_lifetime
        const session = client.openSession(grant);
        const errors = [];
        session.addEventListener('error', e => errors.push(e.detail.error.code));
        await new Promise((resolve, reject) => {
            session.addEventListener('open', resolve, { once: true });
            setTimeout(() => reject(new Error('never opened')), 15000);
        });
        session.close();
        return { errors, state: session.state };
    }""")
    assert "invalid_token" in outcome["errors"]
    assert outcome["state"] in ("connected", "closed")


# In a page's script: the session as its backend sees it once it is no longer live.
UNTIL_ENDED = """
    async function untilEnded(backend, id) {
        for (let tries = 0; tries < 50; tries++) {
            const shown = await backend.getSession(id).catch(e => ({ state: e.code }));
            if (shown.state !== 'connected' && shown.state !== 'negotiating') return shown;
            await new Promise(resolve => setTimeout(resolve, 100));
        }
        return { state: 'still live' };
    }
"""


def test_a_session_followed_without_an_api_key_is_ended_by_close_while_reconnecting(
        broker, page):
    """A page whose backend made the grant holds no key: with its socket down, its close
    goes over a socket opened for it (it used to end nothing at the broker)."""
    open_demo(page, broker)
    outcome = page.evaluate("""async () => {""" + UNTIL_ENDED + """
        const { BrokerClient } = await import('/client/broker-client.js');
        const backend = new BrokerClient({ apiKey: window.demo.client.apiKey });
        const grant = await backend.createSession({ application: 'echo' });
        const keyless = new BrokerClient({ apiKey: null });
        const session = keyless.openSession(grant, {
            getToken: id => backend.newToken(id) });
        await new Promise((resolve, reject) => {
            session.addEventListener('open', resolve, { once: true });
            setTimeout(() => reject(new Error('never opened')), 15000);
        });
        // Dropped: the session is reconnecting as it closes.
        const down = new Promise(resolve => session.addEventListener(
            'signaling', e => { if (!e.detail.connected) resolve(); }));
        session._socket.close();
        await down;
        await session.close();
        return untilEnded(backend, grant.id);
    }""")
    assert (outcome["state"], outcome.get("reason")) == ("closed", "closed by the client")


def test_a_session_whose_key_is_refused_stops_asking_for_tokens(broker, page):
    """A dropped socket needs a fresh token; once the key asking for it is refused
    (revoked, say), asking again every few seconds cannot help."""
    open_demo(page, broker)
    outcome = page.evaluate("""async () => {
        const { BrokerClient } = await import('/client/broker-client.js');
        const backend = new BrokerClient({ apiKey: window.demo.client.apiKey });
        const grant = await backend.createSession({ application: 'echo' });
        const refused = new BrokerClient({ apiKey: 'bk_revoked' });
        let asked = 0;
        const session = refused.openSession(grant, {
            getToken: id => { asked++; return refused.newToken(id); } });
        const errors = [];
        session.addEventListener('error', e => errors.push(e.detail.error.code));
        await new Promise((resolve, reject) => {
            session.addEventListener('open', resolve, { once: true });
            setTimeout(() => reject(new Error('never opened')), 15000);
        });
        const closed = new Promise((resolve, reject) => {
            session.addEventListener('closed', e => resolve(e.detail), { once: true });
            setTimeout(() => reject(new Error('still following')), 10000);
        });
        session._socket.close();
        const detail = await closed;
        await new Promise(resolve => setTimeout(resolve, 1500));  // past a retry's delay
        await backend.deleteSession(grant.id);
        return { errors, asked, reason: detail.reason };
    }""")
    assert outcome["errors"] == ["unauthorized"]
    assert outcome["asked"] == 1
    assert outcome["reason"].startswith("unauthorized: ")


def test_a_session_refused_while_the_towers_are_busy_is_asked_for_again(broker, page):
    """towers_busy says to come back in a second (Retry-After): the client does, a few
    times, before it gives up with that error."""
    open_demo(page, broker)
    posts = {"refused": 0, "passed": 0}
    refuse_all = {"on": False}

    def busy(route):
        if route.request.method != "POST":
            route.continue_()
        elif refuse_all["on"] or posts["refused"] < 2:
            posts["refused"] += 1
            route.fulfill(status=503, headers={"retry-after": "1"}, json={"error": {
                "code": "towers_busy", "message": "every tower is busy"}})
        else:
            posts["passed"] += 1
            route.continue_()

    page.route("**/v1/sessions", busy)
    outcome = page.evaluate("""async () => {
        const started = performance.now();
        const session = await window.demo.client.startSession({ application: 'echo' });
        await new Promise((resolve, reject) => {
            session.addEventListener('open', resolve, { once: true });
            setTimeout(() => reject(new Error('never opened')), 15000);
        });
        const took = performance.now() - started;
        await session.close();
        return { took };
    }""")
    assert posts == {"refused": 2, "passed": 1}
    assert outcome["took"] >= 2000  # it waited out both Retry-Afters (1 s each)

    refuse_all["on"] = True
    code = page.evaluate("""async () => {
        try { await window.demo.client.createSession({ application: 'echo' }); }
        catch (error) { return error.code; }
        return 'created';
    }""")
    assert code == "towers_busy"
    assert posts == {"refused": 2 + 5, "passed": 1}


def test_a_close_as_the_signaling_socket_connects_goes_over_that_socket(broker, page):
    """Right after openSession: a second socket for the close would replace the first
    (a false 'replaced' error), or be replaced (and its close go nowhere)."""
    open_demo(page, broker)
    outcome = page.evaluate("""async () => {""" + UNTIL_ENDED + """
        const { BrokerClient } = await import('/client/broker-client.js');
        const backend = new BrokerClient({ apiKey: window.demo.client.apiKey });
        const grant = await backend.createSession({ application: 'echo' });
        const keyless = new BrokerClient({ apiKey: null });
        const tokens = [];
        const session = keyless.openSession(grant, {
            getToken: id => { tokens.push(id); return backend.newToken(id); } });
        const errors = [];
        session.addEventListener('error', e => errors.push(e.detail.error.code));
        await session.close();
        return { shown: await untilEnded(backend, grant.id), errors, tokens: tokens.length };
    }""")
    assert outcome["shown"]["state"] == "closed"
    assert outcome["errors"] == [] and outcome["tokens"] == 0


def test_a_session_that_fails_for_good_shows_its_reason(tmp_path, page):
    broker = start_broker(tmp_path, towers=1, negotiation_deadline=3.0, heartbeat_interval=0.5,
                          heartbeat_timeout=2.0, negotiation_restarts=0,
                          placements_per_session=1)
    try:
        wait_for_towers(broker, 1)
        open_demo(page, broker)
        start(page)
        tower_pid = broker.tower_pids()["tower-1"]
        os.kill(tower_pid, signal.SIGSTOP)
        try:
            page.wait_for_function(
                "() => document.querySelector('#state').textContent.includes('failed')",
                timeout=15_000)
        finally:
            os.kill(tower_pid, signal.SIGCONT)
        assert page.text_content("#error").strip() or page.text_content("#state")
        reason = page.evaluate("() => window.demo.session.reason")
        assert reason
    finally:
        stop_broker(broker)


def test_a_broker_stopping_tells_the_page_why(tmp_path, page):
    broker = start_broker(tmp_path, towers=2)
    wait_for_towers(broker, 2)
    open_demo(page, broker)
    start(page)
    stop_broker(broker)
    closed = page.wait_for_function(
        "() => window.demo.events.find(e => e.type === 'closed')").json_value()
    assert closed["detail"] == {"reason": "the broker is shutting down", "state": "closed"}


def test_a_broker_that_crashes_and_comes_back_is_shown(tmp_path, page):
    broker = start_broker(tmp_path, towers=2)
    wait_for_towers(broker, 2)
    open_demo(page, broker)
    start(page)
    agents = [psutil.Process(pid) for pid in broker.tower_pids().values()]
    os.kill(broker.process.pid, signal.SIGKILL)
    broker.process.wait(10)
    _gone, alive = psutil.wait_procs(agents, timeout=10)  # they follow their broker
    for agent in alive:
        agent.kill()
    page.wait_for_function(
        "() => window.demo.events.some(e => e.type === 'signaling' && !e.detail.connected)")
    port = broker.url.rsplit(":", 1)[1]
    again = start_broker(tmp_path, towers=2, https_port=int(port))
    try:
        # The new broker does not know the old session: the page says it is gone.
        page.wait_for_function(
            "() => window.demo.events.some(e => e.type === 'closed')", timeout=20_000)
        assert page.text_content("#error").strip()
    finally:
        stop_broker(again)


def test_a_token_that_does_not_come_is_asked_for_again(broker, page):
    """A getToken that never settles (a backend that hangs) used to stop reconnection for
    good: the page said "reconnecting" while the broker's re-offers went unheard."""
    open_demo(page, broker)
    outcome = page.evaluate("""async () => {
        const { BrokerClient } = await import('/client/broker-client.js');
        const backend = new BrokerClient({ apiKey: window.demo.client.apiKey });
        const grant = await backend.createSession({ application: 'echo' });
        const keyless = new BrokerClient({ apiKey: null, requestTimeout: 1000 });
        let asked = 0;
        const session = keyless.openSession(grant, { getToken: id => {
            asked++;
            return asked === 1 ? new Promise(() => {}) : backend.newToken(id);
        } });
        const errors = [];
        session.addEventListener('error', e => errors.push(e.detail.error.code));
        await new Promise((resolve, reject) => {
            session.addEventListener('open', resolve, { once: true });
            setTimeout(() => reject(new Error('never opened')), 15000);
        });
        const back = new Promise((resolve, reject) => {
            session.addEventListener(
                'signaling', e => { if (e.detail.connected) resolve(); });
            setTimeout(() => reject(new Error('never reconnected')), 15000);
        });
        session._socket.close();
        await back;
        await session.close();
        await backend.deleteSession(grant.id).catch(() => {});
        return { asked, errors };
    }""")
    assert outcome["asked"] == 2
    assert outcome["errors"] == ["unreachable"]


def test_the_page_opens_no_socket_but_to_its_signaling_origin(broker, page):
    with socket.create_server(("127.0.0.1", 0)) as elsewhere:
        port = elsewhere.getsockname()[1]
        open_demo(page, broker)
        refused = page.evaluate("""(port) => new Promise(resolve => {
            document.addEventListener('securitypolicyviolation', e => resolve(
                { directive: e.effectiveDirective, blocked: e.blockedURI }), { once: true });
            try { new WebSocket(`wss://127.0.0.1:${port}/`); } catch (error) { }
        })""", port)
    assert refused == {"directive": "connect-src", "blocked": f"wss://127.0.0.1:{port}/"}


def test_a_signaling_socket_that_never_opens_is_given_up_and_opened_again(
        broker, page_without_policy):
    """A socket stuck connecting (its connection lost on the way) is not waited for as
    long as the browser would: the client opens another with a fresh token."""
    page = page_without_policy
    # Takes connections and never answers: a TLS handshake that does not finish.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        open_demo(page, broker)
        outcome = page.evaluate("""async (port) => {
            const { BrokerClient } = await import('/client/broker-client.js');
            const backend = new BrokerClient({ apiKey: window.demo.client.apiKey });
            const grant = await backend.createSession({ application: 'echo' });
            const keyless = new BrokerClient({ apiKey: null, requestTimeout: 1000 });
            let asked = 0;
            const session = keyless.openSession(grant, { getToken: async id => {
                asked++;
                const granted = await backend.newToken(id);
                return asked === 1 ? `wss://127.0.0.1:${port}/v1/signaling` : granted;
            } });
            await new Promise((resolve, reject) => {
                session.addEventListener('open', resolve, { once: true });
                setTimeout(() => reject(new Error('never opened')), 15000);
            });
            let connected = 0;
            const back = new Promise((resolve, reject) => {
                session.addEventListener('signaling', e => {
                    if (e.detail.connected && ++connected === 1) resolve();
                });
                setTimeout(() => reject(new Error('never reconnected')), 15000);
            });
            session._socket.close();
            await back;
            await session.close();
            await backend.deleteSession(grant.id).catch(() => {});
            return { asked };
        }""", port)
    assert outcome["asked"] == 2


def test_a_key_refused_while_reconnecting_is_shown_as_final(broker, page):
    """The client stops following once its key is refused; the page said it was
    reconnecting, then nothing."""
    open_demo(page, broker)
    start(page)
    page.evaluate("""() => {
        window.demo.client.apiKey = 'bk_revoked';
        window.demo.session._socket.close();
    }""")
    page.wait_for_function("() => document.querySelector('#error').textContent.length > 0")
    assert "unauthorized" in page.text_content("#error").lower() or (
        "key" in page.text_content("#error").lower())
    assert "Reconnecting" not in page.text_content("#notice")


def test_a_page_closed_while_its_socket_connects_ends_its_session(broker, page):
    """Its close waits for the socket to open, which a page going away never sees: the
    DELETE, a keepalive request that outlives the page, ends the session rather than the
    broker's repairs running out."""
    open_demo(page, broker)
    start(page)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # a socket that never opens
        session_id = page.evaluate("""(port) => {
            const session = window.demo.session;
            session._socket.onclose = null;
            session._socket.close();
            session._socket = new WebSocket(`wss://127.0.0.1:${port}/`);
            return session.id;
        }""", silent.getsockname()[1])
        page.close(run_before_unload=True)
    client_page = page.context.new_page()
    try:
        open_demo(client_page, broker)
        shown = client_page.evaluate("""async (id) => {""" + UNTIL_ENDED + """
            const { BrokerClient } = await import('/client/broker-client.js');
            return untilEnded(new BrokerClient({ apiKey: window.demo.client.apiKey }), id);
        }""", session_id)
    finally:
        client_page.close()
    assert (shown["state"], shown["reason"]) == ("closed", "deleted through the API"), shown
