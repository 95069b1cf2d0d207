"""Settings from a CDNS file, a TOML file, the environment and the command line; and what a user
sees when one of them is wrong. Every address here is on loopback."""

from __future__ import annotations

import json

import pytest

from dnsproxy.cli import parser
from dnsproxy.config import ConfigError, build_settings, strip_json_comments
from dnsproxy.upstreams import UpstreamSpec

from .fakes import GENUINE, free_port
from .process import DIG, DnsproxyProcess, clean_env, dig, dig_answers, dig_status, run_dnsproxy

CDNS_TEMPLATE = """\
// CDNS configuration, as shipped with the old appliance.
// https://github.com/semigodking/cdns
{
    "global": {
        // Not a daemon: the container runs us in the foreground.
        "daemon": false,
        "log": "file:///var/log/cdns.log", // a URL: the // inside a string is no comment
        "log_debug": false,
        "pidfile": "/var/run/cdns.pid"
    },
    "cdns": {
        "listen_ip": "127.0.0.1",
        "listen_port": %(listen_port)d,
        /* Seconds to wait for a genuine reply before giving up. */
        "timeout": 2,
        "servers": [
            {
                "ip_port": "%(first)s",
                "hijack_threshold": %(threshold)d   // ms: anything faster is an injector
            },
            {
                "ip_port": "127.0.0.9"
            },
            {
                "ip_port": "127.0.0.10:5353",
                "hijack_threshold": 0
            }
        ]
    }
}
"""


def cli(*argv: str) -> dict:
    """Only the options given, as the command line hands them to build_settings."""
    args = vars(parser().parse_args(list(argv)))
    args.pop("log_level", None)
    return args


def cdns_text(listen_port: int, first: str, threshold: int = 20) -> str:
    return CDNS_TEMPLATE % {"listen_port": listen_port, "first": first, "threshold": threshold}


def write_cdns(tmp_path, listen_port: int, first: str, threshold: int = 20):
    path = tmp_path / "cdns.json"
    path.write_text(cdns_text(listen_port, first, threshold))
    return path


# --- a CDNS file, unchanged ---


def test_cdns_file_is_read_unchanged(tmp_path):
    path = write_cdns(tmp_path, 5353, "127.0.0.2:5300")
    settings = build_settings(cli("--config", str(path)), {})
    assert settings.listen == ["127.0.0.1:5353"]
    assert settings.listen_addresses() == [("127.0.0.1", 5353)]
    assert settings.timeout == 2.0
    assert settings.upstreams == [
        UpstreamSpec("udp", "127.0.0.2", 5300, hijack_threshold=0.020),
        UpstreamSpec("udp", "127.0.0.9", 53, hijack_threshold=0.0),
        UpstreamSpec("udp", "127.0.0.10", 5353, hijack_threshold=0.0),
    ]
    assert settings.config == str(path)
    # Everything CDNS does not know keeps its default.
    assert settings.cache_size == 10000 and settings.query_log is False


def test_cdns_comment_stripping_keeps_strings():
    text = '{"a": "x//y", /* c */ "b": "/*z*/" // d\n}'
    assert json.loads(strip_json_comments(text)) == {"a": "x//y", "b": "/*z*/"}


def test_cdns_ipv6_listen_address(tmp_path):
    path = tmp_path / "cdns.json"
    path.write_text('{"cdns": {"listen_ip": "::1", "listen_port": 5353,'
                    ' "servers": [{"ip_port": "[::1]:5300"}]}}')
    settings = build_settings(cli("--config", str(path)), {})
    assert settings.listen_addresses() == [("::1", 5353)]
    assert settings.upstreams == [UpstreamSpec("udp", "::1", 5300)]


@pytest.mark.skipif(DIG is None, reason="dig (bind9-dnsutils) is not installed")
def test_cdns_file_runs_the_real_forwarder(tmp_path, upstream):
    """`python -m dnsproxy --config cdns.json`: the file's listen address serves, its servers
    are asked, and its hijack_threshold (ms) throws away a too-fast forgery."""
    port = free_port()
    # 200 ms, not 20: the fake must send its forgery within the threshold, and on a loaded
    # machine the test's own process can take longer than 20 ms to do so.
    path = write_cdns(tmp_path, port, upstream.address, threshold=200)
    upstream.default.delay = 0.4  # the genuine server is "far away": above the threshold
    upstream.rule("blocked.example", forgeries=("too-fast",), delay=0.4)
    proc = DnsproxyProcess("--config", str(path), "--query-log", port=port)
    try:
        output = dig(port, "blocked.example")
        assert dig_status(output) == "NOERROR"
        assert dig_answers(output) == [("blocked.example.", "A", GENUINE)]
    finally:
        code, _ = proc.terminate()
    assert code == 0
    assert upstream.count("blocked.example") >= 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    forgeries = [line for line in lines if line.get("event") == "forgery"]
    assert [(f["upstream"], f["reason"]) for f in forgeries] == [(upstream.address, "too-fast")]
    assert not (tmp_path / "cdns.pid").exists()


# --- TOML ---


def test_toml_file(tmp_path):
    path = tmp_path / "dnsproxy.toml"
    path.write_text("""\
listen = ["127.0.0.1:5353", "[::1]:5353"]
upstreams = ["127.0.0.2:5300", "tcp://127.0.0.3"]
timeout = 1.5
cache-size = 500
query_log = true
edns-marker = false
allow = ["127.0.0.0/8"]

[[upstream]]
address = "tls://127.0.0.4#dns.test"

[[upstream]]
address = "127.0.0.5"
hijack_threshold = 30
""")
    s = build_settings(cli("--config", str(path)), {})
    assert s.listen_addresses() == [("127.0.0.1", 5353), ("::1", 5353)]
    assert s.upstreams == [
        UpstreamSpec("udp", "127.0.0.2", 5300),
        UpstreamSpec("tcp", "127.0.0.3", 53),
        UpstreamSpec("tls", "127.0.0.4", 853, server_name="dns.test"),
        UpstreamSpec("udp", "127.0.0.5", 53, hijack_threshold=0.030),
    ]
    assert (s.timeout, s.cache_size, s.query_log, s.edns_marker) == (1.5, 500, True, False)
    assert s.allow == ["127.0.0.0/8"]


# --- environment ---


def test_environment_variables():
    s = build_settings({}, {
        "DNSPROXY_UPSTREAMS": "127.0.0.2:5300, https://localhost:8443/dns-query",
        "DNSPROXY_LISTEN": "127.0.0.1:5353 [::1]:5353",
        "DNSPROXY_QUERY_LOG": "1",
        "DNSPROXY_CACHE_SIZE": "42",
        "DNSPROXY_TIMEOUT": "0.75",
        "DNSPROXY_FORGED_ADDRESSES": "203.0.113.1,203.0.113.2",
        "DNSPROXY_TCP_FOR_POLLUTED": "off",
        "DNSPROXY_IDENTITY": "lab",
        "UNRELATED": "x",
    })
    assert [u.name for u in s.upstreams] == ["127.0.0.2:5300", "https://localhost:8443/dns-query"]
    assert s.listen == ["127.0.0.1:5353", "[::1]:5353"]
    assert (s.query_log, s.cache_size, s.timeout) == (True, 42, 0.75)
    assert s.forged_address == ["203.0.113.1", "203.0.113.2"]
    assert s.tcp_for_polluted is False and s.identity == "lab"
    assert s.forged_addresses is True  # the list above did not switch the built-in one off


def test_builtin_forged_list_switch_from_environment():
    s = build_settings({}, {"DNSPROXY_UPSTREAMS": "127.0.0.2",
                            "DNSPROXY_BUILTIN_FORGED_ADDRESSES": "0"})
    assert s.forged_addresses is False and s.forged_address == []


def test_every_setting_has_its_own_environment_variable():
    from dnsproxy.config import ENV_NAMES, FIELD_TYPES

    names = [ENV_NAMES.get(key, "DNSPROXY_" + key.upper()) for key in FIELD_TYPES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("1", True), ("true", True),
                                                 ("no", False)])
def test_query_log_from_environment(value, expected):
    s = build_settings({}, {"DNSPROXY_UPSTREAMS": "127.0.0.2", "DNSPROXY_QUERY_LOG": value})
    assert s.query_log is expected


def test_config_file_named_in_the_environment(tmp_path):
    path = tmp_path / "dnsproxy.toml"
    path.write_text('upstreams = ["127.0.0.2:5300"]\n')
    s = build_settings({}, {"DNSPROXY_CONFIG": str(path)})
    assert [u.name for u in s.upstreams] == ["127.0.0.2:5300"]
    assert s.config == str(path)


# --- precedence: file < environment < command line ---


def test_precedence_file_then_environment_then_command_line(tmp_path):
    path = tmp_path / "dnsproxy.toml"
    path.write_text('upstreams = ["127.0.0.2:1"]\ntimeout = 3\ncache_size = 1\n'
                    'max_ttl = 60\nidentity = "file"\n')
    env = {"DNSPROXY_UPSTREAMS": "127.0.0.2:2", "DNSPROXY_TIMEOUT": "2",
           "DNSPROXY_CACHE_SIZE": "2"}
    s = build_settings(cli("--config", str(path), "--upstream", "127.0.0.2:3",
                           "--timeout", "1"), env)
    assert [u.port for u in s.upstreams] == [3]  # command line
    assert s.timeout == 1.0  # command line over environment over file
    assert s.cache_size == 2  # environment over file
    assert (s.max_ttl, s.identity) == (60, "file")  # file over defaults
    s = build_settings(cli("--config", str(path)), env)
    assert ([u.port for u in s.upstreams], s.timeout) == ([2], 2.0)
    s = build_settings(cli("--config", str(path)), {})
    assert ([u.port for u in s.upstreams], s.timeout) == ([1], 3.0)


def test_query_log_switch_on_the_command_line_beats_the_environment():
    env = {"DNSPROXY_UPSTREAMS": "127.0.0.2", "DNSPROXY_QUERY_LOG": "1"}
    assert build_settings(cli("--no-query-log"), env).query_log is False
    env["DNSPROXY_QUERY_LOG"] = "0"
    assert build_settings(cli("--query-log"), env).query_log is True


@pytest.mark.skipif(DIG is None, reason="dig (bind9-dnsutils) is not installed")
def test_precedence_in_the_real_process(tmp_path, upstream):
    """The environment names a dead upstream, the command line the live one: it answers."""
    port = free_port()
    dead = f"127.0.0.4:{free_port('127.0.0.4')}"
    env = clean_env(DNSPROXY_UPSTREAMS=dead, DNSPROXY_LISTEN=f"127.0.0.1:{port}",
                    DNSPROXY_QUERY_LOG="1")
    proc = DnsproxyProcess("--upstream", upstream.address, port=port, env=env)
    try:
        assert dig_answers(dig(port, "env.example")) == [("env.example.", "A", GENUINE)]
    finally:
        code, _ = proc.terminate()
    assert code == 0
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    (line,) = [x for x in lines if x["name"] == "env.example."]
    assert line["upstream"] == upstream.address
    assert upstream.count("env.example") == 1


# --- bad input: one line, exit 2, no traceback ---


def expect_usage_error(result, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dnsproxy: error:"), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def safe_listen():
    """Every run listens on loopback, should one wrongly start."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize(("args", "fragment"), [
    (["--upstream", "127.0.0.2", "--bogus"], "--bogus"),
    (["--upstream", "127.0.0.2", "--timeout", "soon"], "--timeout"),
    (["--upstream", "not-an-address"], "not-an-address"),
    (["--upstream", "ftp://127.0.0.2"], "ftp"),
    (["--upstream", "127.0.0.2:99999"], "99999"),
    (["--upstream", "tcp://127.0.0.2#name"], "#name"),
    (["--upstream", "[::1:53"], "[::1:53"),
    ([], "no upstream"),
    (["--upstream", "127.0.0.2", "--ca-file", "/nonexistent/ca.pem"], "ca_file"),
    (["--upstream", "127.0.0.2", "--allow", "10.0.0.0/33"], "10.0.0.0/33"),
])
def test_bad_command_line(args, fragment, safe_listen):
    expect_usage_error(run_dnsproxy("--listen", safe_listen, *args), fragment)


@pytest.mark.parametrize("listen", ["localhost:5353", "127.0.0.1", "::1:5353", "127.0.0.1:70000",
                                    "[::1]", "300.1.1.1:53"])
def test_bad_listen_address(listen):
    expect_usage_error(run_dnsproxy("--listen", listen, "--upstream", "127.0.0.2"), "listen")


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "cannot read config file"),  # a directory
    ("this is [ neither toml nor json", "neither TOML"),
    ("listen = [\"127.0.0.1:5353\"]\nupstreams = [\"127.0.0.2\"]\nfrobnicate = 1\n",
     "frobnicate"),
    ('upstreams = ["127.0.0.2"]\ntimeout = "soon"\n', "timeout"),
    ('[[upstream]]\naddress = "127.0.0.2"\nweight = 3\n', "hijack_threshold"),
    ('{"global": {"daemon": false}}', "no 'cdns' section"),
    ('{"cdns": {"servers": [{"ip": "127.0.0.2"}]}}', "ip_port"),
    ('{"cdns": {"servers": [{"ip_port": "dns.example"}]}}', "dns.example"),
    ("[1, 2, 3]", "CDNS"),
])
def test_bad_config_file(tmp_path, content, fragment, safe_listen):
    path = tmp_path / "conf"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    # The file's listen address (if any) is overridden, so no run could bind anything but ours.
    expect_usage_error(run_dnsproxy("--config", str(path), "--listen", safe_listen), fragment)


def test_missing_config_file(tmp_path, safe_listen):
    missing = tmp_path / "missing.toml"
    expect_usage_error(run_dnsproxy("--config", str(missing), "--listen", safe_listen),
                       str(missing))


@pytest.mark.parametrize(("name", "value"), [
    ("DNSPROXY_TIMEOUT", "soon"),
    ("DNSPROXY_CACHE_SIZE", "-1"),
    ("DNSPROXY_CACHE_SIZE", "1.5"),
    ("DNSPROXY_QUERY_LOG", "maybe"),
    ("DNSPROXY_UPSTREAMS", "127.0.0.2 bogus"),
    ("DNSPROXY_LISTEN", "127.0.0.1"),
    ("DNSPROXY_CONFIG", "/nonexistent/dnsproxy.toml"),
])
def test_bad_environment_value(name, value, safe_listen):
    env = clean_env(DNSPROXY_UPSTREAMS="127.0.0.2", DNSPROXY_LISTEN=safe_listen)
    env[name] = value
    expect_usage_error(run_dnsproxy(env=env))


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="environment: timeout"):
        build_settings({}, {"DNSPROXY_UPSTREAMS": "127.0.0.2", "DNSPROXY_TIMEOUT": "x"})
    with pytest.raises(ConfigError, match="timeout must be above zero"):
        build_settings({}, {"DNSPROXY_UPSTREAMS": "127.0.0.2", "DNSPROXY_TIMEOUT": "0"})


def test_toml_upstreams_as_a_string_beside_a_single_upstream_table(tmp_path):
    config = tmp_path / "mixed.toml"
    config.write_text('upstreams = "127.0.0.2:53"\n[upstream]\naddress = "127.0.0.3"\n'
                      "hijack_threshold = 5\n")
    settings = build_settings({"config": str(config)}, {})
    assert [u.name for u in settings.upstreams] == ["127.0.0.2:53", "127.0.0.3:53"]
    assert settings.upstreams[1].hijack_threshold == 0.005


# --- limits: zero, negative or not finite is refused where 0 does not mean "off" ---

# (setting, refused value): every limit whose zero would disable the server, not a feature.
BAD_LIMITS = [
    ("max_in_flight", "0"), ("max_in_flight", "-3"), ("tcp_max_per_client", "0"),
    ("tcp_max_connections", "0"), ("tcp_idle_timeout", "0"), ("timeout", "-1"),
    ("timeout", "nan"), ("timeout", "inf"), ("hedge_delay", "-0.1"), ("hedge_delay", "nan"),
    ("cache_bytes", "0"), ("max_ttl", "0"), ("workers", "0"), ("rate_limit", "-5"),
    ("cache_size", "-1"), ("stale_ttl", "0"), ("stale_ttl", "-1"), ("max_stale", "-1"),
    ("cache_save_interval", "0"), ("cache_save_interval", "nan"),
]


def _toml_value(value: str) -> str:
    return {"nan": "nan", "inf": "inf"}.get(value, value)


@pytest.mark.parametrize(("key", "value"), BAD_LIMITS)
def test_bad_limits_are_refused_from_every_layer(tmp_path, key, value):
    option = "--" + key.replace("_", "-")
    with pytest.raises(ConfigError, match=f"command line: {key}"):
        build_settings(cli("--upstream", "127.0.0.2", option, value), {})
    with pytest.raises(ConfigError, match=f"environment: {key}"):
        build_settings({}, {"DNSPROXY_UPSTREAMS": "127.0.0.2", "DNSPROXY_" + key.upper(): value})
    path = tmp_path / "limits.toml"
    path.write_text(f'upstreams = ["127.0.0.2"]\n{key} = {_toml_value(value)}\n')
    with pytest.raises(ConfigError, match=f"{path}: {key}"):
        build_settings(cli("--config", str(path)), {})


@pytest.mark.parametrize("layer", ["command line", "environment", "toml"])
@pytest.mark.parametrize("key", ["max_in_flight", "tcp_max_per_client"])
def test_zero_limit_is_one_line_and_exit_2(tmp_path, safe_listen, layer, key):
    env = clean_env(DNSPROXY_UPSTREAMS="127.0.0.2", DNSPROXY_LISTEN=safe_listen)
    args: list[str] = []
    if layer == "command line":
        args = ["--" + key.replace("_", "-"), "0"]
    elif layer == "environment":
        env["DNSPROXY_" + key.upper()] = "0"
    else:
        path = tmp_path / "zero.toml"
        path.write_text(f"{key} = 0\n")
        args = ["--config", str(path)]
    expect_usage_error(run_dnsproxy(*args, env=env, timeout=5), key, "above zero")


def test_zero_stays_allowed_where_it_means_off():
    settings = build_settings(cli("--upstream", "127.0.0.2", "--cache-size", "0",
                                  "--rate-limit", "0", "--hedge-delay", "0"), {})
    assert (settings.cache_size, settings.rate_limit, settings.hedge_delay) == (0, 0.0, 0.0)


@pytest.mark.parametrize("spec", ["tcp://127.0.0.2", "tls://127.0.0.2#dns.test",
                                  "https://127.0.0.2/dns-query"])
@pytest.mark.parametrize("layer", ["command line", "environment", "cdns"])
def test_hijack_threshold_beyond_udp_is_one_line_and_exit_2(tmp_path, safe_listen, spec, layer):
    """No injector races a TCP, TLS or HTTPS reply: a threshold there would be silently
    ignored, so it is refused, from the config file named on the command line or in
    DNSPROXY_CONFIG, TOML or CDNS alike."""
    path = tmp_path / "conf"
    if layer == "cdns":
        path.write_text(json.dumps({"cdns": {"servers": [
            {"ip_port": spec, "hijack_threshold": 20}]}}))
    else:
        path.write_text(f'[[upstream]]\naddress = "{spec}"\nhijack_threshold = 20\n')
    env = clean_env()
    args = ["--listen", safe_listen]
    if layer == "environment":
        env["DNSPROXY_CONFIG"] = str(path)
    else:
        args += ["--config", str(path)]
    line = expect_usage_error(run_dnsproxy(*args, env=env), "hijack_threshold", spec)
    assert "UDP" in line
    # Zero is the threshold off, which is what these transports get: accepted.
    path.write_text(f'[[upstream]]\naddress = "{spec}"\nhijack_threshold = 0\n')
    assert build_settings(cli("--config", str(path)), {}).upstreams[0].hijack_threshold == 0


def test_negative_hijack_threshold_is_refused(tmp_path):
    path = tmp_path / "neg.toml"
    path.write_text('[[upstream]]\naddress = "127.0.0.2"\nhijack_threshold = -5\n')
    with pytest.raises(ConfigError, match="hijack_threshold"):
        build_settings(cli("--config", str(path)), {})


def test_cdns_file_with_a_json_error_shows_where(tmp_path, safe_listen):
    path = tmp_path / "cdns.json"
    text = cdns_text(5353, "127.0.0.2")
    # A missing comma after `"timeout": 2`, below a multi-line comment and // comments.
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if '"timeout": 2,' in line)
    lines[row] = lines[row].replace("2,", "2")
    path.write_text("/* an old\n   file */\n" + "\n".join(lines) + "\n")
    line = expect_usage_error(run_dnsproxy("--config", str(path), "--listen", safe_listen))
    # The error is the JSON parser's, pointing at the next key in the file as written.
    expected_row = row + 2 + 1 + 1  # two comment lines, 1-based, the line after the timeout
    column = lines[row + 1].index('"') + 1
    assert f"line {expected_row} column {column}" in line, line
    assert "delimiter" in line and "TOML" not in line


# --- DoH by host name: a bootstrap address, or the other upstreams; never the system ---


@pytest.mark.parametrize(("spec", "address"), [
    ("https://dns.example/dns-query#203.0.113.5", "203.0.113.5"),
    ("https://dns.example:8443/q#[2001:db8::5]", "2001:db8::5"),
    ("https://dns.example/dns-query", None),
    ("https://192.0.2.5/dns-query", None),
])
def test_doh_bootstrap_address_in_the_spec(spec, address):
    settings = build_settings(cli("--upstream", spec, "--upstream", "127.0.0.2"), {})
    doh = settings.upstreams[0]
    assert doh.bootstrap == address
    assert "#" not in doh.url and doh.name == doh.url
    assert doh.needs_bootstrap == (address is None and doh.host == "dns.example")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--upstream", "https://dns.example/dns-query"], "no other upstream can look up"),
    (["--upstream", "https://dns.example/dns-query",
      "--upstream", "https://dns2.example/dns-query"], "#IP"),
    (["--upstream", "https://dns.example/dns-query#dns.other"], "not an IP address"),
    (["--upstream", "https://192.0.2.5/dns-query#192.0.2.6"], "for a host name"),
])
def test_doh_by_name_that_cannot_be_located_is_refused(args, fragment, safe_listen):
    expect_usage_error(run_dnsproxy("--listen", safe_listen, *args), fragment)


def test_cache_settings_from_every_layer(tmp_path):
    path = tmp_path / "cache.toml"
    state = tmp_path / "state"
    path.write_text(f'upstreams = ["127.0.0.2"]\nserve_stale = false\nstale_ttl = 5\n'
                    f'state_dir = "{state}"\n')
    settings = build_settings(cli("--config", str(path), "--max-stale", "60"),
                              {"DNSPROXY_PREFETCH": "0", "DNSPROXY_CACHE_SAVE_INTERVAL": "9"})
    assert (settings.serve_stale, settings.stale_ttl, settings.max_stale, settings.prefetch,
            settings.state_dir, settings.cache_save_interval) == (False, 5, 60, False,
                                                                   str(state), 9.0)
    assert state.is_dir()  # created: a fresh volume may be empty
    defaults = build_settings(cli("--upstream", "127.0.0.2"), {})
    assert (defaults.serve_stale, defaults.stale_ttl, defaults.max_stale, defaults.prefetch,
            defaults.state_dir, defaults.cache_save_interval) == (True, 30, 86400, True,
                                                                   None, 300.0)


@pytest.mark.parametrize(("env", "fragment"), [
    ({"DNSPROXY_SERVE_STALE": "sometimes"}, "serve_stale"),
    ({"DNSPROXY_STALE_TTL": "soon"}, "stale_ttl"),
    ({"DNSPROXY_STATE_DIR": "/dev/null"}, "state_dir"),
])
def test_bad_cache_setting_is_one_line_and_exit_2(env, fragment, safe_listen):
    env = clean_env(DNSPROXY_UPSTREAMS="127.0.0.2", DNSPROXY_LISTEN=safe_listen, **env)
    expect_usage_error(run_dnsproxy(env=env, timeout=5), fragment)


def test_split_settings_from_every_layer(tmp_path):
    path = tmp_path / "split.toml"
    path.write_text('upstreams = ["127.0.0.2"]\ndomestic_upstreams = ["127.0.0.4", '
                    '{address = "127.0.0.5:5300", hijack_threshold = 5}]\n'
                    'domestic-domains = ["/lists/a.conf"]\ndomestic_trust_empty = true\n')
    settings = build_settings(cli("--config", str(path), "--foreign-domains", "/lists/gfw.txt",
                                  "--foreign-domains", "/lists/more.txt"),
                              {"DNSPROXY_DOMESTIC_IPS": "/lists/chnroute.txt,/lists/v6.txt",
                               "DNSPROXY_LEARN_FORGED_ADDRESSES": "0"})
    assert [spec.name for spec in settings.domestic_upstreams] == ["127.0.0.4:53",
                                                                   "127.0.0.5:5300"]
    assert settings.domestic_upstreams[1].hijack_threshold == 0.005
    assert settings.domestic_domains == ["/lists/a.conf"]
    assert settings.foreign_domains == ["/lists/gfw.txt", "/lists/more.txt"]
    assert settings.domestic_ips == ["/lists/chnroute.txt", "/lists/v6.txt"]
    assert (settings.domestic_trust_empty, settings.learn_forged_addresses) == (True, False)
    from_env = build_settings({}, {"DNSPROXY_UPSTREAMS": "127.0.0.2",
                                   "DNSPROXY_DOMESTIC_UPSTREAMS": "127.0.0.4, tcp://127.0.0.6",
                                   "DNSPROXY_DOMESTIC_DOMAINS": "/lists/a.conf",
                                   "DNSPROXY_FOREIGN_DOMAINS": "/lists/gfw.txt"})
    assert [spec.name for spec in from_env.domestic_upstreams] == ["127.0.0.4:53",
                                                                   "tcp://127.0.0.6:53"]
    defaults = build_settings(cli("--upstream", "127.0.0.2"), {})
    assert (defaults.domestic_upstreams, defaults.domestic_domains, defaults.domestic_trust_empty,
            defaults.learn_forged_addresses) == ([], [], False, True)


def test_bad_domestic_upstream_is_one_line_and_exit_2(safe_listen):
    env = clean_env(DNSPROXY_UPSTREAMS="127.0.0.2", DNSPROXY_LISTEN=safe_listen,
                    DNSPROXY_DOMESTIC_UPSTREAMS="not-an-address")
    expect_usage_error(run_dnsproxy(env=env, timeout=5), "not-an-address")


def test_bad_page_settings(tmp_path, safe_listen):
    """The page's settings: one line each, nothing started, no file created."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    web = f"127.0.0.1:{free_port()}"
    for args, fragment in [
        (["--web", "localhost"], "localhost"),
        (["--web", web, "--workers", "2"], "workers"),
        (["--web-password-file", str(tmp_path / "pw")], "without web"),
        (["--web", web, "--web-password-file", str(empty)], "empty"),
        (["--web", web, "--web-password-file", str(tmp_path)], "directory"),
        (["--web", web, "--web-password-file", str(tmp_path / "no" / "pw")], "no such directory"),
        (["--web", web, "--history-days", "0"], "history_days"),
    ]:
        expect_usage_error(run_dnsproxy("--listen", safe_listen, "--upstream", "127.0.0.2",
                                        *args), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_taken_page_port_is_one_line(tmp_path, safe_listen):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_dnsproxy("--listen", safe_listen, "--upstream", "127.0.0.2",
                              "--web", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("dnsproxy: error: cannot serve "
                                                             "the page")
    assert "Traceback" not in result.stderr
