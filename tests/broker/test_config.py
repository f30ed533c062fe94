"""Settings: the defaults, what a wrong value is told, and loading a TOML file."""

import dataclasses
import math
import os
from pathlib import Path

import asyncssh
import pytest

from broker.config import (
    ConfigError,
    Settings,
    default_state_dir,
    default_tower_count,
    load_settings,
    settings_from_mapping,
)
from broker.link import OpenPeer, codec
from broker.tower.application import rtc_configuration


def refusal(**values) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(values)
    return str(caught.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


# Defaults.


def test_the_defaults_are_valid_and_as_documented(monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", "/var/lib/state")
    settings = Settings()
    assert settings.state_dir == Path("/var/lib/state/session-broker")
    assert (settings.host, settings.public_host) == ("127.0.0.1", "127.0.0.1")
    assert (settings.https_port, settings.http_port) == (8443, 8080)
    assert settings.https_origin == "https://127.0.0.1:8443"
    assert settings.allowed_origins == ()
    assert settings.ice_servers == ()
    assert settings.local_towers >= 2
    assert settings.negotiation_deadline == 10.0
    assert settings.heartbeat_timeout == 5.0
    assert (settings.negotiation_restarts, settings.negotiation_restart_period) == (2, 60.0)
    assert settings.placements_per_session == 2
    assert settings.max_sessions_per_key == 50
    assert settings.token_lifetime == 60.0


def test_no_file_and_no_overrides_is_the_defaults():
    assert load_settings() == Settings()


def test_the_state_dir_follows_xdg_state_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "session-broker"
    monkeypatch.setenv("XDG_STATE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / ".local" / "state" / "session-broker"


@pytest.mark.parametrize("cores, towers", [(None, 2), (1, 2), (2, 2), (16, 16)])
def test_one_local_tower_per_core_and_at_least_two(monkeypatch, cores, towers):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert default_tower_count() == towers


def test_with_ports_keeps_everything_else():
    settings = Settings(https_port=0, http_port=0, public_host="broker.example")
    bound = settings.with_ports(9443, 9080)
    assert bound.https_origin == "https://broker.example:9443"
    assert dataclasses.replace(bound, https_port=0, http_port=0) == settings


# What a wrong value is told: every message names the field.


@pytest.mark.parametrize("name", ["https_port", "http_port"])
@pytest.mark.parametrize("port", [-1, 65536, 100_000])
def test_ports_are_port_numbers(name, port):
    message = refusal(**{name: port})
    assert name in message
    assert str(port) in message


@pytest.mark.parametrize("name", ["https_port", "http_port"])
@pytest.mark.parametrize("port", [0, 1, 65535])
def test_every_port_number_is_accepted(name, port):
    assert getattr(settings_from_mapping({name: port}), name) == port


SECONDS = [
    "token_lifetime", "negotiation_deadline", "heartbeat_interval", "heartbeat_timeout",
    "negotiation_restart_period", "tower_silence", "tower_load_interval",
]


@pytest.mark.parametrize("name", SECONDS)
@pytest.mark.parametrize("value", [0, 0.0, -1.5, math.nan, math.inf, 0.001, 1e300])
def test_times_are_finite_and_neither_a_busy_loop_nor_past_ten_years(name, value):
    # An infinite token lifetime was sent to browsers as JSON's non-standard Infinity.
    assert f"{name} must be a number of seconds from 0.01 to 315360000" in refusal(
        **{name: value})


def test_a_tower_certificate_may_not_outlast_the_calendar():
    assert "tower_certificate_lifetime" in refusal(tower_certificate_lifetime=1e12)


def test_the_default_local_towers_stay_under_the_ceiling_on_a_big_machine(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 384)
    assert Settings().local_towers == 256


def test_local_towers_has_a_ceiling():
    assert "local_towers is at most 256" in refusal(local_towers=100_000_000)
    assert settings_from_mapping({"local_towers": 256}).local_towers == 256


@pytest.mark.parametrize("name", ["local_towers", "negotiation_restarts", "hsts_max_age"])
def test_counts_that_may_be_zero_cannot_be_negative(name):
    assert name in refusal(**{name: -1})
    assert getattr(settings_from_mapping({name: 0}), name) == 0


@pytest.mark.parametrize("name", ["tower_capacity", "max_sessions_per_key",
                                  "placements_per_session"])
def test_counts_that_must_be_at_least_one(name):
    assert name in refusal(**{name: 0})
    assert getattr(settings_from_mapping({name: 1}), name) == 1


def test_the_heartbeat_timeout_outlasts_the_interval():
    message = refusal(heartbeat_interval=2.0, heartbeat_timeout=2.0)
    assert "heartbeat_timeout" in message and "heartbeat_interval" in message
    settings = settings_from_mapping({"heartbeat_interval": 2.0, "heartbeat_timeout": 2.5})
    assert settings.heartbeat_timeout == 2.5


def test_tower_silence_outlasts_the_load_interval():
    message = refusal(tower_silence=1.0, tower_load_interval=1.0)
    assert "tower_silence" in message and "tower_load_interval" in message


@pytest.mark.parametrize("host", ["localhost", "broker.example", "", "127.0.0.256"])
def test_the_host_is_an_ip_address(host):
    message = refusal(host=host)
    assert "host" in message
    assert repr(host) in message


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "192.0.2.7"])
def test_ip_addresses_are_hosts(host):
    assert settings_from_mapping({"host": host}).host == host


def test_the_public_host_may_be_a_name():
    assert settings_from_mapping({"public_host": "broker.example"}).https_origin == (
        "https://broker.example:8443"
    )


@pytest.mark.parametrize("host", ["1.2.3", "999.1.1.1", "broker.7"])
def test_a_public_host_that_browsers_would_read_as_an_address_is_refused(host):
    assert f"public_host must be a DNS name or an IP address, not {host!r}" in refusal(
        public_host=host)


def test_an_empty_state_dir_is_refused_not_the_working_directory():
    assert "state_dir must be a path, not ''" in refusal(state_dir="")


def test_the_public_host_is_taken_in_lower_case_as_browsers_send_it():
    settings = settings_from_mapping({"public_host": "Broker.Example.com"})
    assert settings.public_host == "broker.example.com"


def test_an_ipv6_public_host_is_bracketed_in_urls():
    settings = settings_from_mapping({"public_host": "2001:db8::7", "https_port": 443})
    assert settings.https_origin == "https://[2001:db8::7]"


@pytest.mark.parametrize("host", ["", "broker example", "https://broker.example",
                                  "broker.example:8443", "-broker.example", "a/b"])
def test_the_public_host_is_a_name_or_an_address(host):
    assert f"public_host must be a DNS name or an IP address, not {host!r}" in refusal(
        public_host=host)


def test_the_settings_are_checked_when_made_directly_too():
    with pytest.raises(ConfigError, match="tower_capacity"):
        Settings(tower_capacity=0)


# Types.


@pytest.mark.parametrize("value", ["8443", True, 8443.0, 8443.5, None, [8443]])
def test_an_integer_setting_takes_only_integers(value):
    message = refusal(https_port=value)
    assert "https_port must be an integer" in message


@pytest.mark.parametrize("value", ["10", True, None, [10]])
def test_a_time_setting_takes_only_numbers(value):
    assert "negotiation_deadline must be a number" in refusal(negotiation_deadline=value)


def test_a_time_setting_takes_an_integer_as_seconds():
    settings = settings_from_mapping({"negotiation_deadline": 3})
    assert settings.negotiation_deadline == 3.0
    assert isinstance(settings.negotiation_deadline, float)


@pytest.mark.parametrize("name", ["host", "public_host"])
@pytest.mark.parametrize("value", [127, True, ["127.0.0.1"]])
def test_a_string_setting_takes_only_strings(name, value):
    assert f"{name} must be a string" in refusal(**{name: value})


@pytest.mark.parametrize("value", [1, True, ["/tmp"]])
def test_the_state_dir_is_a_path(value):
    assert "state_dir must be a path" in refusal(state_dir=value)


@pytest.mark.parametrize("value", ["https://a.example", {"origin": "x"}, 1])
def test_allowed_origins_is_a_list(value):
    assert "allowed_origins must be a list" in refusal(allowed_origins=value)


@pytest.mark.parametrize("value", [[1], ["https://a.example", None], [["https://a.example"]]])
def test_allowed_origins_are_strings(value):
    assert "allowed_origins" in refusal(allowed_origins=value)


@pytest.mark.parametrize("origin", ["not a url", "ftp://a.example", "https://",
                                    "https://a.example/app", "https://a.example:99999",
                                    "https://user@a.example", "https://a.example?x=1"])
def test_allowed_origins_are_origins(origin):
    # "not a url" refused every browser that sent an Origin, with no word why.
    assert f"allowed_origins: {origin!r} is not an origin" in refusal(allowed_origins=[origin])


def test_allowed_origins_become_a_tuple():
    settings = settings_from_mapping({"allowed_origins": ["https://a.example"]})
    assert settings.allowed_origins == ("https://a.example",)


def test_unknown_settings_are_named():
    message = refusal(https_prot=8443, colour="blue")
    assert "colour" in message and "https_prot" in message


# ICE servers.


def test_ice_servers_are_kept_as_given_and_go_over_the_tower_link():
    servers = [
        {"urls": "stun:stun.example.net:3478"},
        {"urls": ["turn:turn.example.net:3478", "turns:turn.example.net:5349"],
         "username": "u", "credential": "c"},
    ]
    settings = settings_from_mapping({"ice_servers": servers})
    assert settings.ice_servers == (
        servers[0], {**servers[1], "urls": tuple(servers[1]["urls"])})
    # A list of URLs made every offer fail to encode for its tower.
    opened = codec.decode(codec.encode(
        OpenPeer("s-1", 1, "v=0", "echo", settings.ice_servers)))
    assert [server.urls for server in rtc_configuration(opened.ice_servers).iceServers] == [
        "stun:stun.example.net:3478",
        ["turn:turn.example.net:3478", "turns:turn.example.net:5349"],
    ]


@pytest.mark.parametrize("server", [
    "stun:stun.example.net",
    ["stun:stun.example.net"],
    {},
    {"url": "stun:stun.example.net"},
    {"urls": None},
    {"urls": 3478},
    {"urls": {"stun": "stun.example.net"}},
    {"urls": []},
    {"urls": [3478]},
    {"urls": ["stun:stun.example.net", None]},
])
def test_each_ice_server_needs_urls(server):
    assert "ice_servers" in refusal(ice_servers=[server])


@pytest.mark.parametrize("server", [
    {"urls": "turn:turn.example.net:3478"},
    {"urls": ["stun:stun.example.net", "turns:turn.example.net"], "username": "u"},
    {"urls": "turn:turn.example.net", "credential": "c"},
])
def test_a_turn_server_needs_its_credentials(server):
    # A browser refuses a whole configuration with one TURN server lacking them.
    assert "a TURN server needs 'username' and 'credential'" in refusal(ice_servers=[server])


def test_ice_servers_is_a_list():
    assert "ice_servers must be a list" in refusal(ice_servers={"urls": "stun:x"})


# Loading a TOML file.


def test_a_file_overrides_settings_by_name(tmp_path):
    path = write(tmp_path, """
        host = "0.0.0.0"
        public_host = "broker.example"
        https_port = 443
        negotiation_deadline = 15
        heartbeat_timeout = 2.5
        allowed_origins = ["https://app.example"]
        """)
    settings = load_settings(path)
    assert settings.host == "0.0.0.0"
    assert settings.https_origin == "https://broker.example"  # browsers omit :443
    assert settings.negotiation_deadline == 15.0
    assert settings.heartbeat_timeout == 2.5
    assert settings.allowed_origins == ("https://app.example",)
    assert settings.http_port == Settings().http_port


def test_ice_servers_from_a_file(tmp_path):
    path = write(tmp_path, """
        [[ice_servers]]
        urls = "stun:stun.example.net:3478"

        [[ice_servers]]
        urls = ["turn:turn.example.net:3478?transport=tcp"]
        username = "broker"
        credential = "secret"
        """)
    assert load_settings(path).ice_servers == (
        {"urls": "stun:stun.example.net:3478"},
        {"urls": ("turn:turn.example.net:3478?transport=tcp",), "username": "broker",
         "credential": "secret"},
    )


def test_an_empty_file_is_the_defaults(tmp_path):
    assert load_settings(write(tmp_path, "")) == Settings()


def test_the_state_dir_in_a_file_expands_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = load_settings(write(tmp_path, 'state_dir = "~/broker-state"\n'))
    assert settings.state_dir == tmp_path / "broker-state"


def test_an_unknown_field_in_a_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting.*heartbeat_intervall"):
        load_settings(write(tmp_path, "heartbeat_intervall = 1.0\n"))


def test_a_table_of_unknown_settings_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="broker"):
        load_settings(write(tmp_path, "[broker]\nhost = \"0.0.0.0\"\n"))


@pytest.mark.parametrize("line, named", [
    ('https_port = "8443"', "https_port must be an integer"),
    ("https_port = true", "https_port must be an integer"),
    ("https_port = 8443.0", "https_port must be an integer"),
    ("token_lifetime = \"60\"", "token_lifetime must be a number"),
    ("token_lifetime = false", "token_lifetime must be a number"),
    ("token_lifetime = nan", "token_lifetime must be a number of seconds"),
    ("host = 127", "host must be a string"),
    ("host = 2024-01-01", "host must be a string"),
    ("state_dir = 1", "state_dir must be a path"),
    ('allowed_origins = "https://a.example"', "allowed_origins must be a list"),
    ("allowed_origins = [1, 2]", "allowed_origins"),
    ("ice_servers = [\"stun:stun.example.net\"]", "ice_servers"),
    ("https_port = 70000", "https_port must be a port number"),
])
def test_a_wrong_value_in_a_file_is_refused_naming_the_field(tmp_path, line, named):
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, line + "\n"))
    assert named in str(caught.value)


def test_a_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)
    assert "No such file" in str(caught.value)


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path)


@pytest.mark.parametrize("text", [
    "host = \n", "host = '0.0.0.0\n", "[[ice_servers]\n", "https_port = 1\nhttps_port = 2\n",
    "= 1\n",
])
def test_invalid_toml_is_a_config_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert f"{path} is not valid TOML" in str(caught.value)


@pytest.mark.parametrize("content", [b'host = "\xff"\n', b"\xff\xfe", b"# caf\xe9\n"])
def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path, content):
    path = tmp_path / "broker.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)


# Command-line overrides.


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "https_port = 9443\nhttp_port = 9080\nlocal_towers = 4\n")
    settings = load_settings(path, https_port=10443, local_towers=1)
    assert (settings.https_port, settings.http_port, settings.local_towers) == (10443, 9080, 1)


def test_none_overrides_leave_the_file_alone(tmp_path):
    path = write(tmp_path, 'host = "0.0.0.0"\nhttps_port = 9443\nstate_dir = "/srv/broker"\n')
    settings = load_settings(path, host=None, https_port=None, state_dir=None, http_port=None)
    assert settings.host == "0.0.0.0"
    assert settings.https_port == 9443
    assert settings.state_dir == Path("/srv/broker")
    assert settings.http_port == Settings().http_port


def test_overrides_without_a_file(tmp_path):
    settings = load_settings(None, state_dir=tmp_path / "state", https_port=0)
    assert settings.state_dir == tmp_path / "state"
    assert settings.https_port == 0


def test_an_override_is_checked_like_the_file(tmp_path):
    with pytest.raises(ConfigError, match="local_towers cannot be negative"):
        load_settings(None, local_towers=-1)
    with pytest.raises(ConfigError, match="https_port must be an integer"):
        load_settings(None, https_port="443")


def test_an_override_that_makes_the_file_inconsistent_is_refused(tmp_path):
    path = write(tmp_path, "heartbeat_interval = 1.0\nheartbeat_timeout = 2.0\n")
    with pytest.raises(ConfigError, match="heartbeat_timeout"):
        load_settings(path, heartbeat_interval=3.0)


def test_an_override_of_the_state_dir_expands_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings(None, state_dir="~/elsewhere").state_dir == tmp_path / "elsewhere"


def test_an_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="colour"):
        load_settings(None, colour="blue")


ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def test_shell_keys_are_public_keys_with_a_role():
    settings = settings_from_mapping({"shell_keys": [{"key": ED25519, "role": "admin"}]})
    assert settings.shell_keys == ({"key": ED25519, "role": "admin"},)


@pytest.mark.parametrize("entry, refused", [
    ({"key": ED25519, "rol": "admin"}, "shell key 0: unknown keys ['rol']"),
    ({"key": "foo bar"}, "shell key 0 is not a public key"),
    ({"key": ED25519[:40]}, "shell key 0 is not a public key"),
    ({"key": ED25519, "role": "root"}, "shell key 0: the role is 'admin' or 'read-only'"),
    ({"role": "admin"}, "shell key 0 needs 'key'"),
])
def test_a_wrong_shell_key_is_refused_not_ignored(entry, refused):
    # A typo in "role" gave the key read-only access; a bad key locked its operator out.
    assert refused in refusal(shell_keys=[entry])


def test_a_shell_key_given_twice_is_refused_in_whatever_form():
    # With two roles, which one it had depended on the order.
    rfc4716 = asyncssh.import_public_key(ED25519).export_public_key("rfc4716").decode()
    twice = [{"key": ED25519 + " alice", "role": "admin"}, {"key": rfc4716}]
    assert "shell key 1 is shell key 0 again" in refusal(shell_keys=twice)


def test_relative_paths_in_a_file_are_taken_from_its_directory(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    directory = tmp_path / "etc"
    directory.mkdir()
    path = directory / "broker.toml"
    path.write_text('state_dir = "state"\nhttps_certificate = "tls/cert.pem"\n'
                    'https_key = "/keys/key.pem"\n')
    settings = load_settings(path)
    assert settings.state_dir == directory / "state"
    assert settings.https_certificate == str(directory / "tls" / "cert.pem")
    assert settings.https_key == "/keys/key.pem"
    # One given on the command line is the caller's own, from where it runs.
    assert load_settings(path, state_dir="here").state_dir == Path("here")


def test_an_inventory_host_may_not_take_a_local_towers_name():
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    host = {"name": "tower-2", "address": "10.0.0.7", "user": "tower", "host_key": key}
    with pytest.raises(ConfigError, match="name of a local tower"):
        settings_from_mapping({"local_towers": 2, "hosts": [host]})
    settings = settings_from_mapping({"local_towers": 1, "hosts": [host]})
    assert settings.inventory[0].name == "tower-2"


@pytest.mark.parametrize("value", [0, -0.5, 1, 1.0, 1.5, math.nan])
def test_scale_out_threshold_is_a_share_a_load_can_stay_above(value):
    # At 1 nothing is above it: the scaler would never scale out.
    with pytest.raises(ConfigError, match="scale_out_threshold"):
        Settings(scale_out_threshold=value)


def test_scale_out_threshold_may_be_just_below_full():
    assert Settings(scale_out_threshold=0.99).scale_out_threshold == 0.99
