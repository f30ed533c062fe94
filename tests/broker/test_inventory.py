"""The inventory: ``[[hosts]]`` entries checked and built, directly and through Settings."""

import pytest

from broker.config import ConfigError, settings_from_mapping
from broker.inventory import Host, InventoryError, parse_host, parse_hosts

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJw9F2hooJ2uFXbr1VLSKFQGuaSqb4RMcE0548PcHRje"


def entry(**overrides):
    values = {"name": "tower-eu-1", "address": "10.0.0.7", "user": "tower", "host_key": KEY}
    values.update(overrides)
    return {key: value for key, value in values.items() if value is not None}


def refusal(value, where="host") -> str:
    with pytest.raises(InventoryError) as caught:
        parse_host(value, where)
    return str(caught.value)


def config_refusal(*entries) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"hosts": list(entries)})
    return str(caught.value)


# Valid hosts and defaults.


def test_a_minimal_host_gets_the_documented_defaults():
    host = parse_host(entry())
    assert host == Host(name="tower-eu-1", address="10.0.0.7", user="tower", host_key=KEY)
    assert host.trust_on_first_use is False
    assert (host.ssh_port, host.tower_port) == (22, 8443)
    assert host.tower_address == ""
    assert host.root == "session-tower"
    assert host.tower_command == "broker"
    assert host.nginx == "/usr/sbin/nginx"


def test_trust_on_first_use_stands_in_for_a_host_key():
    host = parse_host(entry(host_key=None, trust_on_first_use=True))
    assert (host.host_key, host.trust_on_first_use) == ("", True)


def test_every_field_can_be_set():
    host = parse_host(entry(
        ssh_port=2222, tower_address="192.168.1.9", tower_port=9443, root="/srv/tower",
        tower_command="/opt/venv/bin/broker --quiet", nginx="/usr/local/sbin/nginx",
        host_key=KEY + " root@tower", trust_on_first_use=False, address="tower.example.org",
        user="deploy_user.1",
    ))
    assert host.ssh_port == 2222 and host.tower_port == 9443
    assert host.tower_address == "192.168.1.9"
    assert host.root == "/srv/tower"
    assert host.tower_command == "/opt/venv/bin/broker --quiet"
    assert host.nginx == "/usr/local/sbin/nginx"
    assert host.address == "tower.example.org" and host.user == "deploy_user.1"


def test_the_link_address_is_the_ssh_address_unless_a_tower_address_is_given():
    assert parse_host(entry()).link_address == "10.0.0.7"
    assert parse_host(entry(tower_address="10.1.0.7")).link_address == "10.1.0.7"
    assert parse_host(entry(tower_address="fd00::7")).link_address == "fd00::7"


def test_parse_hosts_keeps_the_order_and_accepts_none():
    hosts = parse_hosts([entry(name="b-1"), entry(name="a-1", address="10.0.0.8")])
    assert [host.name for host in hosts] == ["b-1", "a-1"]
    assert parse_hosts([]) == ()


def test_settings_take_hosts_and_build_the_inventory():
    second = entry(name="tower-eu-2", address="10.0.0.8")
    settings = settings_from_mapping({"hosts": [entry(), second]})
    assert [host.name for host in settings.inventory] == ["tower-eu-1", "tower-eu-2"]
    assert settings.inventory[0] == parse_host(entry())


# Missing, unknown and mistyped fields.


@pytest.mark.parametrize("field", ["name", "address", "user"])
def test_each_required_field_is_named_when_missing(field):
    message = refusal(entry(**{field: None}), "hosts[3]")
    assert message.startswith("hosts[3]")
    assert f"'{field}' is required" in message
    assert f"'{field}' is required" in config_refusal(entry(**{field: None}))


def test_an_unknown_field_is_named():
    message = refusal(entry(hostkey=KEY, port=22))
    assert "unknown field" in message and "hostkey" in message and "port" in message
    assert "hostkey" in config_refusal(entry(hostkey=KEY))


def test_a_host_that_is_not_a_table_is_refused():
    assert "a host is a table" in refusal("tower-eu-1")
    assert "hosts[0]" in config_refusal("tower-eu-1")


def test_hosts_must_be_a_list():
    with pytest.raises(ConfigError, match="hosts must be a list"):
        settings_from_mapping({"hosts": {"name": "tower-eu-1"}})


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("ssh_port", True, "ssh_port must be an integer"),
    ("tower_port", False, "tower_port must be an integer"),
    ("ssh_port", "22", "ssh_port must be an integer"),
    ("tower_port", 8443.0, "tower_port must be an integer"),
    ("trust_on_first_use", 1, "trust_on_first_use must be true or false"),
    ("trust_on_first_use", "true", "trust_on_first_use must be true or false"),
    ("name", 7, "name must be a string"),
    ("address", ["10.0.0.7"], "address must be a string"),
    ("host_key", 25519, "host_key must be a string"),
    ("root", 0, "root must be a string"),
])
def test_wrong_types_are_refused_naming_the_field(field, value, expected):
    assert expected in refusal(entry(**{field: value}))
    assert expected in config_refusal(entry(**{field: value}))


# Names.


@pytest.mark.parametrize("name", [
    "", "Tower", "tower_1", "tower.eu", "-tower", "tower-", "a" * 64, "tower eu", "töwer",
])
def test_a_name_must_be_a_dns_label(name):
    message = refusal(entry(name=name))
    assert "name must be a DNS label" in message
    assert "DNS label" in config_refusal(entry(name=name))


@pytest.mark.parametrize("name", ["a", "1", "a" * 63, "tower-eu-1", "0-0"])
def test_dns_labels_are_accepted(name):
    assert parse_host(entry(name=name)).name == name


def test_a_name_with_a_trailing_newline_is_refused():
    refusal(entry(name="tower\n"))


def test_broker_is_the_broker_s_name_not_a_tower_s():
    assert "other than 'broker'" in refusal(entry(name="broker"))
    assert "other than 'broker'" in config_refusal(entry(name="broker"))


def test_a_name_used_twice_is_refused_naming_the_second_entry():
    entries = [entry(), entry(name="tower-eu-2", address="10.0.0.8"), entry(address="10.0.0.9")]
    with pytest.raises(InventoryError) as caught:
        parse_hosts(entries)
    assert "hosts[2]" in str(caught.value)
    assert "'tower-eu-1' is used twice" in str(caught.value)
    assert "used twice" in config_refusal(*entries)


@pytest.mark.parametrize("first, second", [
    # The same user's home, the same root.
    (entry(), entry(name="tower-eu-2", tower_port=8444)),
    (entry(root="/opt/tower"),
     entry(name="tower-eu-2", tower_port=8444, user="other", root="/opt/tower")),
    # One inside the other: taking out the first would remove the second's directory.
    (entry(root="towers"), entry(name="tower-eu-2", tower_port=8444, root="towers/nginx")),
    (entry(root="/opt/towers/eu-2/x"),
     entry(name="tower-eu-2", tower_port=8444, root="/opt/towers/eu-2")),
])
def test_two_towers_in_one_directory_of_one_machine_are_refused(first, second):
    message = config_refusal(first, second)
    assert "hosts[1] (tower-eu-2): tower-eu-1 has its tower in the same directory" in message


def test_towers_in_directories_side_by_side_are_taken():
    hosts = parse_hosts([entry(root="/opt/towers/eu-1"),
                         entry(name="tower-eu-2", tower_port=8444, root="/opt/towers/eu-10")])
    assert len(hosts) == 2


def test_two_towers_on_one_machine_need_their_own_directory_and_port():
    one, two = entry(), entry(name="tower-eu-2", root="second-tower")
    assert "listens on the same address and tower_port" in config_refusal(one, two)
    assert len(parse_hosts([one, {**two, "tower_port": 8444}])) == 2


# Ports and addresses.


@pytest.mark.parametrize("field", ["ssh_port", "tower_port"])
@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_ports_out_of_range_are_refused(field, port):
    message = refusal(entry(**{field: port}))
    assert f"{field} must be a port number (1-65535)" in message
    assert "(tower-eu-1)" in message  # the message names the host
    assert field in config_refusal(entry(**{field: port}))


@pytest.mark.parametrize("port", [1, 65535])
def test_the_ends_of_the_port_range_are_accepted(port):
    assert parse_host(entry(ssh_port=port, tower_port=port)).ssh_port == port


UNSAFE = [
    "two words", "a;b", "$(id)", "`id`", "a'b", 'a"b', "a\\b", "a|b", "a&b", "a>b", "a<b",
    "a\nb", "a\tb", "${HOME}", "a*", "~x", "#x", "t[12]", "",
]


@pytest.mark.parametrize("field", ["address", "user", "root", "nginx"])
@pytest.mark.parametrize("value", UNSAFE)
def test_shell_unsafe_or_empty_words_are_refused(field, value):
    message = refusal(entry(**{field: value}))
    assert f"{field} must be a plain word" in message
    assert field in config_refusal(entry(**{field: value}))


@pytest.mark.parametrize("root", [
    "/", ".", "//", "a/../..", "/etc", "/etc/nginx", "/usr/local/tower", "/tmp", "/home",
    "/opt", "/var/lib", "/var/www", "/boot/x", "/sys/x",
])
def test_a_root_shared_with_the_system_is_refused(root):
    assert "root must be a directory of its own" in refusal(entry(root=root))


@pytest.mark.parametrize("root", [
    "session-tower", "towers/eu-1", "/opt/session-tower", "/srv/tower", "/home/tower/t",
    "/var/lib/session-tower", "/tmp/pytest-of-root/host/root",
])
def test_a_root_of_its_own_is_taken(root):
    assert parse_host(entry(root=root)).root == root


def test_a_root_with_a_colon_is_refused():
    # proxy_pass http://unix:<root>/agent.sock: NGINX ends the path at the first ':'.
    assert "root must not contain ':'" in refusal(entry(root="/srv/tow:er"))


@pytest.mark.parametrize("command", [
    "broker; rm -rf /", "broker $(id)", "broker `id`", "'broker'", 'broker "x"',
    "broker && id", "broker | tee", "", "   ",
    # A newline ends the command on the host, and the next line runs on its own.
    "broker\nrm -rf x", "broker\trm", "broker\r",
])
def test_an_unsafe_or_empty_tower_command_is_refused(command):
    assert "tower_command must be plain words" in refusal(entry(tower_command=command))
    assert "tower_command" in config_refusal(entry(tower_command=command))


@pytest.mark.parametrize("address", [
    "tower.example", "10.0.0", "", "10.0.0.7:8443", "[::1]", "fe80::1%eth0",
    "fe80::1%eth0\nssl_verify_client optional_no_ca;\nlisten [::1",
])
def test_a_tower_address_must_be_an_ip_address(address):
    if address == "":
        # Empty means "the SSH address".
        assert parse_host(entry(tower_address=address)).link_address == "10.0.0.7"
        return
    assert "tower_address must be an IP address" in refusal(entry(tower_address=address))
    assert "tower_address" in config_refusal(entry(tower_address=address))
    assert "\n" not in config_refusal(entry(tower_address=address))


# Host keys.


def test_a_host_without_a_key_or_trust_on_first_use_is_refused():
    message = refusal(entry(host_key=None))
    assert "host_key" in message and "trust_on_first_use" in message
    assert "host_key" in config_refusal(entry(host_key=None, trust_on_first_use=False))


@pytest.mark.parametrize("key", ["AAAAC3NzaC1lZDI1NTE5", "ssh-ed25519", "  ssh-ed25519  "])
def test_a_host_key_must_be_a_type_and_a_key(key):
    assert "host_key is a public key line" in refusal(entry(host_key=key))
    assert "host_key" in config_refusal(entry(host_key=key))
    # Trusting on first use does not excuse a malformed pinned key.
    assert "host_key" in refusal(entry(host_key=key, trust_on_first_use=True))


@pytest.mark.parametrize("key", ["ssh-ed25519 not-base64!!", "10.0.0.7 " + KEY, "hello world"])
def test_a_host_key_that_is_no_public_key_is_refused(key):
    refusal(entry(host_key=key))


@pytest.mark.parametrize("extra", [
    "\n@cert-authority * " + KEY, "\n* " + KEY, "\r\n" + KEY,
    # Line breaks to str.splitlines, which reads the known hosts, if not to a shell.
    " c\x0b@cert-authority * " + KEY, " c\x0c* " + KEY, " c\x1c* " + KEY, " c\u2028* " + KEY,
])
def test_a_host_key_of_more_than_one_line_is_refused(extra):
    # Only its first line was checked, and every line pinned: a second key, or a CA
    # whose certificates the host could then show.
    assert "host_key is a public key line" in refusal(entry(host_key=KEY + extra))
