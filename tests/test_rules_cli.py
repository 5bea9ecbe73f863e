"""Rules: --validate-rules, file:line errors, SegmentedProxy rule files, Rules.parse /
from_file / decide, specificity, block answers (HTTP and CONNECT) and access log lines.

Real sockets on loopback: a segproxy CLI process or an in-process server, an HTTP origin
written here (tests/support/loopback.py), raw-socket clients.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import segproxy
from segproxy import Rules, start_proxy_server
from support import Segproxy, wait_for
from support.loopback import HttpOrigin, proxy_connect, proxy_request

pytestmark = pytest.mark.timeout(60)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segproxy", *args], capture_output=True, text=True, timeout=timeout
    )


# A rules file written for SegmentedProxy, used as it is.
SEGMENTEDPROXY_RULES = textwrap.dedent(
    """\
    # SegmentedProxy rules: HOST_GLOB=MODE[,key=value...]

    example.com=segment_upstream,strategy=fixed,chunk=512,delay=10
    *.example.com=segment_upstream,strategy=random,min=64,max=256
    ads.example.com=direct,action=block,reason=ads are blocked
    *.corp.test=direct,action=upstream,upstream=127.0.0.1:3128
    api.test=segment_upstream,strategy=fixed,chunk=100,method=POST,scheme=http,path_prefix=/upload
    *=direct
    """
)


def test_segproxy_module_is_this_checkout():
    # The tests must exercise the package of this checkout, not an installed copy.
    import pathlib

    here = pathlib.Path(__file__).resolve().parent.parent / "python" / "segproxy"
    assert pathlib.Path(segproxy.__file__).resolve().parent == here


# --------------------------------------------------------------------------------------
# --validate-rules


def test_validate_rules_lists_default_and_numbered_rules(tmp_path):
    rules_file = tmp_path / "sp.rules"
    rules_file.write_text(SEGMENTEDPROXY_RULES)
    out = run_cli(
        "--rules-file",
        str(rules_file),
        "--segment-rule",
        "blocked.test=direct,action=block,reason=nope",
        "--validate-rules",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # SegmentedProxy's format: its fields in its order, ours (source=..., policy=...) after.
    assert (
        lines[0] == "Default policy: mode=direct strategy=none chunk=1024 delay=0 direction=up"
    ), out.stdout
    assert lines[1] == "Rules:"
    numbered = lines[2:]
    assert len(numbered) == 7, out.stdout
    for i, line in enumerate(numbered, start=1):
        assert line.startswith(f"{i:02d}. host="), line
    assert numbered[0].startswith(
        "01. host=example.com action=direct mode=segment_upstream strategy=fixed chunk=512 delay=10 "
        f"source={rules_file}:3 "
    ), numbered[0]
    assert numbered[1].startswith(
        "02. host=*.example.com action=direct mode=segment_upstream strategy=random chunk=1024 delay=0 min=64 max=256 "
    ), numbered[1]
    assert numbered[2].startswith(
        "03. host=ads.example.com action=block reason=ads are blocked mode=direct strategy=none chunk=1024 delay=0 "
        f"source={rules_file}:5"
    ), numbered[2]
    assert numbered[3].startswith(
        "04. host=*.corp.test action=upstream upstream=127.0.0.1:3128 mode=direct "
    ), numbered[3]
    assert numbered[4].startswith(
        "05. host=api.test scheme=http method=POST path=/upload action=direct mode=segment_upstream strategy=fixed chunk=100 delay=0 "
    ), numbered[4]
    assert numbered[6].startswith("07. host=blocked.test action=block reason=nope mode=direct "), (
        numbered[6]
    )
    assert "source=--segment-rule#1:1" in numbered[6]
    assert out.stderr == ""
    # No rules: SegmentedProxy's "(none)".
    out = run_cli("--validate-rules")
    assert out.stdout.splitlines()[1] == "Rules: (none)", out.stdout


def test_validate_rules_default_policy_from_flags():
    out = run_cli(
        "--segmentation",
        "segment_upstream",
        "--segment-chunk-size",
        "300",
        "--segment-delay-ms",
        "5",
        "--validate-rules",
    )
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    # A chunk size without a strategy means fixed.
    assert (
        first
        == "Default policy: mode=segment_upstream strategy=fixed chunk=300 delay=5 direction=up"
    ), first
    assert "Rules: (none)" in out.stdout
    # Our reading of sizes without a strategy is said (SegmentedProxy would not segment).
    assert out.stderr.strip() == (
        "segproxy: warning: --segment-chunk-size, --segment-delay-ms without --segment-strategy: "
        "the default policy segments (SegmentedProxy does not segment without a strategy)"
    ), out.stderr
    out = run_cli(
        "--segmentation",
        "segment_upstream",
        "--segment-strategy",
        "fixed",
        "--segment-chunk-size",
        "300",
        "--validate-rules",
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--segment-strategy", "fixed", "--segment-chunk-size", "100"],
        ["--segment-chunk-size", "100"],
        ["--segment-delay-ms", "5", "--segmentation", "direct"],
    ],
)
def test_default_policy_without_segment_upstream_warns(flags):
    out = run_cli(*flags, "--validate-rules")
    assert out.returncode == 0, out.stderr
    assert "Default policy: mode=direct strategy=none" in out.stdout
    warning = out.stderr.strip()
    assert warning.startswith("segproxy: warning: --segment-"), out.stderr
    assert "without --segmentation segment_upstream" in warning and "\n" not in warning


@pytest.mark.parametrize(
    "flags",
    [
        ["--segmentation", "segment_upstream", "--segment-strategy", "random"],
        [
            "--segmentation",
            "segment_upstream",
            "--segment-strategy",
            "random",
            "--segment-min-size",
            "5",
        ],
        ["--segmentation", "segment_upstream", "--segment-max-size", "5"],
    ],
)
def test_default_random_strategy_needs_min_and_max(flags):
    out = run_cli(*flags, "--validate-rules")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "segproxy: error: random strategy requires both min and max (--segment-min-size and --segment-max-size)"
    ), out.stderr
    with pytest.raises(ValueError, match="random strategy requires both min and max"):
        Rules(strategy="random", min=5)


def test_validate_rules_warns_about_lines_segmentedproxy_accepts(tmp_path):
    """Lines SegmentedProxy accepts though they look wrong are accepted with its meaning, and
    --validate-rules warns about each, naming the line."""
    rules_file = tmp_path / "odd.rules"
    rules_file.write_text(
        "# odd but accepted by SegmentedProxy\n"
        "fast.test=fast\n"
        "=direct,action=block\n"
        "*.corp.test=direct,action=upstream,upstream=127.0.0.1:70000\n"
        "ok.test=segment_upstream,chunk=5\n"
    )
    out = run_cli("--rules-file", str(rules_file), "--validate-rules")
    assert out.returncode == 0, out.stderr
    warnings = out.stderr.strip().splitlines()
    assert len(warnings) == 4, out.stderr
    assert warnings[0].startswith(f"segproxy: warning: {rules_file}:2: unknown mode 'fast'"), (
        warnings
    )
    assert warnings[1].startswith(f"segproxy: warning: {rules_file}:3: empty host glob"), warnings
    assert warnings[2].startswith(
        f"segproxy: warning: {rules_file}:4: upstream port 70000 is out of range"
    ), warnings
    # Our one reading of a line SegmentedProxy takes differently is said too.
    assert warnings[3].startswith(
        f"segproxy: warning: {rules_file}:5: no strategy=: segmented as strategy=fixed"
    ), warnings
    numbered = out.stdout.splitlines()[2:]
    assert numbered[0].startswith("01. host=fast.test action=direct mode=fast strategy=none"), (
        numbered
    )
    assert numbered[1].startswith("02. host= action=block mode=direct"), numbered
    # Their meaning, as in SegmentedProxy: no segmentation, a rule that matches nothing.
    rules = Rules.from_file(rules_file)
    assert rules.decide("GET", "http", "fast.test", 80, "/").policy == "none"
    assert rules.decide("GET", "http", "x.test", 80, "/").rule is None
    assert len(rules.warnings()) == 4


def test_out_of_range_upstream_port_answers_502(origin):
    with Segproxy(["--segment-rule", "*=direct,action=upstream,upstream=127.0.0.1:99999"]) as proxy:
        r = proxy_request(("127.0.0.1", proxy.port), "GET", origin.url("/x"))
        assert r.status == 502, r
        assert b"127.0.0.1:0" in r.body or b"upstream" in r.body.lower(), r.body
    assert origin.requests == []


def test_validate_rules_error_names_file_and_line(tmp_path):
    rules_file = tmp_path / "bad.rules"
    rules_file.write_text(
        "# comment\nexample.com=direct\n*.x.test=segment_upstream,strategy=fixed,chunk=0\n"
    )
    out = run_cli("--rules-file", str(rules_file), "--validate-rules")
    assert out.returncode != 0
    assert f"{rules_file}:3" in out.stderr, out.stderr
    assert "chunk" in out.stderr, out.stderr  # the reason
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "line, word",
    [
        ("a.test=direct,colour=blue", "colour"),  # unknown key
        ("a.test=direct,strategy=sideways", "sideways"),  # bad strategy
        ("a.test=segment_upstream,strategy=random,min=10", "requires both min and max"),
        ("a.test=segment_upstream,strategy=random,min=10,max=5", "min"),  # min > max
        ("a.test=segment_upstream,delay=-1", "delay"),  # negative delay
        ("a.test=direct,action=upstream", "upstream"),  # upstream without address
        ("a.test=direct,action=upstream,upstream=nohostport", "nohostport"),
    ],
)
def test_validate_rules_bad_rule_lines(tmp_path, line, word):
    rules_file = tmp_path / "r.rules"
    rules_file.write_text(f"ok.test=direct\n\n{line}\n")
    out = run_cli("--rules-file", str(rules_file), "--validate-rules")
    assert out.returncode != 0, out.stdout
    assert f"{rules_file}:3" in out.stderr, out.stderr
    assert word in out.stderr, out.stderr


def test_segment_rule_error_names_the_flag():
    out = run_cli(
        "--segment-rule", "ok.test=direct", "--segment-rule", "x=direct,nope=1", "--validate-rules"
    )
    assert out.returncode != 0
    assert "--segment-rule#2:1" in out.stderr, out.stderr


def test_bad_rules_file_stops_the_server_before_listening(tmp_path):
    rules_file = tmp_path / "bad.rules"
    rules_file.write_text("a=direct\nb=direct\nc=segment_upstream,strategy=bogus\n")
    out = run_cli("--rules-file", str(rules_file), "--listen-port", "0")
    assert out.returncode != 0
    assert f"{rules_file}:3" in out.stderr
    assert "listening" not in out.stderr


def test_missing_rules_file_is_an_error(tmp_path):
    out = run_cli("--rules-file", str(tmp_path / "nope.rules"), "--validate-rules")
    assert out.returncode != 0
    assert "nope.rules" in out.stderr


# --------------------------------------------------------------------------------------
# Rules from Python


def test_rules_parse_from_file_and_decide(tmp_path):
    path = tmp_path / "sp.rules"
    path.write_text(SEGMENTEDPROXY_RULES)
    rules = Rules.from_file(path)
    assert len(rules) == 6
    assert Rules.parse(SEGMENTEDPROXY_RULES).describe().splitlines()[1:] == [
        line.replace(str(path), "<text>") for line in rules.describe().splitlines()[1:]
    ]

    d = rules.decide("GET", "http", "example.com", 80, "/")
    assert d.action == "direct"
    assert d.rule == f"{path}:3"
    assert "fixed" in d.policy and "512" in d.policy
    assert d.explanation and "\n" not in d.explanation

    d = rules.decide("GET", "https", "ads.example.com", 443, "/")
    assert d.action == "block" and d.reason == "ads are blocked"
    assert d.rule == f"{path}:5"
    assert "ads.example.com" in d.explanation

    d = rules.decide("CONNECT", "https", "www.corp.test", 443, "")
    assert d.action == "upstream" and d.upstream == "127.0.0.1:3128"

    d = rules.decide("GET", "http", "unrelated.org", 80, "/")
    assert d.rule == f"{path}:8"  # the catch-all
    assert d.action == "direct"


def test_rules_decide_without_match_uses_default_policy():
    rules = Rules.parse("only.test=direct,action=block", strategy="fixed", chunk=77)
    d = rules.decide("GET", "http", "other.test", 80, "/")
    assert d.rule is None
    assert d.action == "direct"
    assert "77" in d.policy
    assert "default" in d.explanation


def test_rules_parse_error_names_source_and_line():
    with pytest.raises(ValueError) as exc:
        Rules.parse(
            "a.test=direct\n# c\nb.test=direct,strategy=fixed,chunk=0\n", source="mine.rules"
        )
    assert "mine.rules:3" in str(exc.value)


def test_rules_add_is_all_or_nothing():
    rules = Rules.parse("a.test=direct")
    with pytest.raises(ValueError):
        rules.add("b.test=direct\nc.test=direct,strategy=oops\n")
    assert len(rules) == 1


def test_upstream_password_is_masked():
    rules = Rules.parse("*=direct,action=upstream,upstream=alice:s3cret@127.0.0.1:3128")
    assert "s3cret" not in rules.describe()
    d = rules.decide("GET", "http", "x.test", 80, "/")
    assert "s3cret" not in (d.upstream or "") + d.explanation + (d.rule_text or "")
    assert "alice" in (d.upstream or "")


# --------------------------------------------------------------------------------------
# specificity


SPECIFICITY = textwrap.dedent(
    """\
    *=direct,action=block,reason=star
    *.example.com=direct,action=block,reason=suffix
    www.example.com=direct,action=block,reason=exact
    *.a.example.com=direct,action=block,reason=longer-suffix
    api.test=direct,action=block,reason=api-any
    api.test=direct,action=block,reason=api-get,method=GET
    api.test=direct,action=block,reason=api-get-v1,method=GET,path_prefix=/v1
    api.test=direct,action=block,reason=api-get-v1-long,method=GET,path_prefix=/v1/long
    api.test=direct,action=block,reason=api-https,scheme=https
    tunnel.test=direct,action=block,reason=tunnel-any
    tunnel.test=direct,action=block,reason=tunnel-connect,method=CONNECT
    tie.test=direct
    tie.test=direct,action=block,reason=tie-block
    tie.test=direct,action=upstream,upstream=127.0.0.1:9
    """
)


@pytest.mark.parametrize(
    "method, scheme, host, path, reason",
    [
        ("GET", "http", "www.example.com", "/", "exact"),  # exact beats *.suffix
        ("GET", "http", "img.example.com", "/", "suffix"),  # *.suffix beats *
        ("GET", "http", "deep.img.example.com", "/", "suffix"),
        # *.example.com and *.a.example.com score the same (1200): the earlier wins, as in
        # SegmentedProxy.
        ("GET", "http", "x.a.example.com", "/", "suffix"),
        ("GET", "http", "example.org", "/", "star"),
        ("POST", "http", "api.test", "/v1/x", "api-any"),  # method must match
        ("GET", "http", "api.test", "/v2", "api-get"),  # method adds specificity
        ("GET", "http", "api.test", "/v1/x", "api-get-v1"),  # path prefix adds more
        ("GET", "http", "api.test", "/v1/longer", "api-get-v1-long"),  # longer prefix wins
        ("PUT", "https", "api.test", "/", "api-https"),  # scheme
        ("CONNECT", "https", "tunnel.test", "", "tunnel-connect"),  # CONNECT is a method
        ("GET", "https", "tunnel.test", "/", "tunnel-any"),
    ],
)
def test_specificity(method, scheme, host, path, reason):
    rules = Rules.parse(SPECIFICITY, source="spec")
    d = rules.decide(method, scheme, host, 443 if scheme == "https" else 80, path)
    assert d.action == "block", d
    assert d.reason == reason, d.explanation


def test_specificity_tie_goes_to_block():
    rules = Rules.parse(SPECIFICITY, source="spec")
    d = rules.decide("GET", "http", "tie.test", 80, "/")
    assert d.action == "block" and d.reason == "tie-block"
    assert d.rule == "spec:13"
    assert "block" in d.explanation
    # Order does not matter: block placed last still wins the tie.
    rules = Rules.parse(
        "t.test=direct,action=upstream,upstream=127.0.0.1:9\nt.test=direct\nt.test=direct,action=block"
    )
    assert rules.decide("GET", "http", "t.test", 80, "/").action == "block"


def test_host_match_is_case_insensitive_and_globs():
    rules = Rules.parse(
        "Www.Example.COM=direct,action=block\nh?.test=direct,action=block,reason=q\n"
    )
    assert rules.decide("GET", "http", "WWW.example.com", 80, "/").action == "block"
    assert rules.decide("GET", "http", "h1.test", 80, "/").reason == "q"
    assert rules.decide("GET", "http", "h12.test", 80, "/").action == "direct"
    # *.suffix does not match the bare suffix
    rules = Rules.parse("*.example.com=direct,action=block")
    assert rules.decide("GET", "http", "example.com", 80, "/").action == "direct"


def test_port_condition():
    rules = Rules.parse("*=direct,action=block,port=8443,reason=p")
    assert rules.decide("CONNECT", "https", "a.test", 8443, "").reason == "p"
    assert rules.decide("CONNECT", "https", "a.test", 443, "").action == "direct"


# --------------------------------------------------------------------------------------
# block through a running proxy, and the access log


@pytest.fixture
def origin():
    with HttpOrigin() as o:
        yield o


def test_block_answers_403_with_reason_http_and_connect(origin):
    rules = (
        f"127.0.0.1=direct,action=block,reason=no origin today,port={origin.port}\n"
        "*.blocked.test=direct,action=block,reason=blocked zone\n"
    )
    with Segproxy(
        ["--segment-rule", rules.splitlines()[0], "--segment-rule", rules.splitlines()[1]],
        with_access_log=True,
    ) as proxy:
        addr = ("127.0.0.1", proxy.port)
        r = proxy_request(addr, "GET", origin.url("/x"))
        assert r.status == 403
        assert b"no origin today" in r.body
        # A blocked name is never resolved: the answer is 403, not a DNS 502.
        r = proxy_request(addr, "GET", "http://www.blocked.test/y")
        assert r.status == 403 and b"blocked zone" in r.body
        s, r = proxy_connect(addr, f"127.0.0.1:{origin.port}")
        s.close()
        assert r.status == 403 and b"no origin today" in r.body
        s, r = proxy_connect(addr, "www.blocked.test:443")
        s.close()
        assert r.status == 403 and b"blocked zone" in r.body
        assert origin.requests == []
        # Other destinations still pass.
        r = proxy_request(addr, "GET", f"http://localhost:{origin.port}/ok")
        assert r.status == 200 and r.body == b"origin ok /ok\n"

        assert wait_for(lambda: proxy.access_log.read_text().count("\n") >= 5)
        lines = proxy.access_log.read_text().splitlines()
        assert all(
            line.split(" ", 3)[2:3] == ["INFO"] and " ACCESS rid=" in line for line in lines
        ), lines
        blocked = [line for line in lines if " status=403 " in line]
        assert len(blocked) == 4, lines
        for line in blocked:
            assert "action=block" in line, line
            assert "rule=--segment-rule#" in line, line
            assert "policy=" in line
        ok = [line for line in lines if " status=200 " in line]
        assert ok and "rule=default" in ok[0] and "action=direct" in ok[0], ok


async def test_access_records_name_rule_action_and_policy(origin, tmp_path):
    rules_file = tmp_path / "r.rules"
    rules_file.write_text(
        f"# first line is a comment\nlocalhost=segment_upstream,strategy=fixed,chunk=200,direction=both,port={origin.port}\n"
    )
    log = tmp_path / "access.log"
    server = await start_proxy_server(port=0, rules=Rules.from_file(rules_file), access_log=log)
    try:
        import asyncio

        r = await asyncio.to_thread(
            proxy_request,
            server.address,
            "GET",
            f"http://localhost:{origin.port}/blob?n=1000&seed=3",
        )
        assert r.status == 200 and len(r.body) == 1000
        r = await asyncio.to_thread(proxy_request, server.address, "GET", origin.url("/plain"))
        assert r.status == 200
        assert await asyncio.to_thread(wait_for, lambda: len(server.access_records()) == 2)
        records = server.access_records()
        assert len(records) == 2
        seg, plain = records
        assert seg["rule"] == f"{rules_file}:2"
        assert seg["action"] == "direct"
        assert "fixed" in seg["policy"] and "200" in seg["policy"] and "both" in seg["policy"]
        assert seg["line"].count("rule=") == 1 and f"rule={rules_file}:2" in seg["line"]
        assert plain["rule"] == "default" and plain["policy"] == "none"
        text = log.read_text()
        assert " action=direct mode=segment_upstream strategy=fixed " in text, text
        assert f'rule={rules_file}:2 policy="fixed' in text, text
    finally:
        await server.aclose()


def test_lines_segmentedproxy_accepts_validate_with_notes(tmp_path):
    """Lines SegmentedProxy's parser accepts are accepted here too, with SegmentedProxy's
    meaning; keys that do nothing are named in a note instead of failing the file."""
    rules_file = tmp_path / "sp-lenient.rules"
    rules_file.write_text(
        "a.test=direct,strategy=fixed,chunk=10\n"
        "b.test=direct,reason=foo\n"
        "c.test=direct,action=direct,upstream=h.test:1\n"
        "d.test=direct,path_prefix=api\n"
        "e.test=direct,upstream=h.test:1\n"
    )
    out = run_cli("--rules-file", str(rules_file), "--validate-rules")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()[2:]
    assert 'policy="none"' in lines[0] and "mode=direct strategy=fixed chunk=10" in lines[0]
    assert "action=direct" in lines[1] and "reason=foo" in lines[1]
    assert "action=direct" in lines[2]
    assert "path=/api" in lines[3]
    warnings = out.stderr.splitlines()
    assert any(f"{rules_file}:1: mode direct does not segment" in w for w in warnings), warnings
    assert any(f"{rules_file}:2: reason= ignored" in w for w in warnings), warnings
    assert any(f"{rules_file}:3: upstream= ignored" in w for w in warnings), warnings
    assert not any(f"{rules_file}:4" in w for w in warnings), warnings
    rules = Rules.from_file(rules_file)
    assert rules.decide("GET", "http", "e.test", 80, "/").action == "direct"
    assert rules.decide("GET", "http", "d.test", 80, "/api/v1").rule == f"{rules_file}:4"


def test_rules_from_objects():
    from segproxy import Rule

    rules = Rules.from_rules(
        [
            Rule("*.example.test", strategy="fixed", chunk=512, delay=10),
            Rule("ads.example.test", action="block", reason="no ads"),
            Rule(
                "*", action="upstream", upstream="u:p@127.0.0.1:3128", method="GET", intercept=False
            ),
            "plain.test=direct",
        ],
        source="mine",
    )
    assert len(rules) == 4
    d = rules.decide("GET", "http", "a.example.test", 80, "/")
    assert d.rule == "mine:1" and "fixed chunk=512 delay=10ms" in d.policy
    d = rules.decide("GET", "http", "ads.example.test", 80, "/")
    assert (d.action, d.reason) == ("block", "no ads")
    d = rules.decide("GET", "http", "other.test", 80, "/")
    assert d.action == "upstream" and d.intercept == "no" and "p@" not in (d.upstream or "")
    assert (
        Rule("a.test", path_prefix="/api", port=8080).text()
        == "a.test=direct,path_prefix=/api,port=8080"
    )
    rules.add(Rule("late.test", action="block"))
    assert rules.decide("GET", "http", "late.test", 80, "/").action == "block"
    with pytest.raises(ValueError, match="mine:2"):
        Rules.from_rules(
            [Rule("ok.test"), Rule("bad.test", strategy="random", min=9, max=1)], source="mine"
        )
    with pytest.raises(ValueError, match="comma"):
        Rule("x.test", action="block", reason="a, b").text()


def test_validate_rules_names_every_bad_line(tmp_path):
    first = tmp_path / "one.rules"
    first.write_text(
        "ok.test=direct\nbad.test=direct,strategy=fast\n# fine\nworse.test=direct,colour=red\n"
    )
    second = tmp_path / "two.rules"
    second.write_text("x.test=segment_upstream,strategy=random,min=9,max=1\n")
    out = run_cli(
        "--rules-file",
        str(first),
        "--rules-file",
        str(second),
        "--segment-rule",
        "y.test=direct,action=upstream",
        "--validate-rules",
    )
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert all(line.startswith("segproxy: error: ") for line in lines), out.stderr
    assert [line.split(" ", 3)[2] for line in lines] == [
        f"{first}:2:",
        f"{first}:4:",
        f"{second}:1:",
        "--segment-rule#1:1:",
    ], out.stderr


# --------------------------------------------------------------------------------------
# SegmentedProxy's log lines: the decision with its score (debug), ACCESS lines, JSON lines


def test_debug_log_shows_the_decision_and_score(origin):
    rule = "127.0.0.1=direct,method=GET,reason=x"
    with Segproxy(["--log-level", "DEBUG", "--segment-rule", rule]) as proxy:
        assert proxy_request(("127.0.0.1", proxy.port), "GET", origin.url("/dbg")).status == 200
        want = (
            "HTTP forward decision: matched host_glob=127.0.0.1 method=GET; ctx host=127.0.0.1 scheme=http "
            "method=GET path=/dbg; score=1600; action=direct; rule 1 at --segment-rule#1:1"
        )
        assert wait_for(lambda: want in proxy.output(), timeout=10), proxy.output()
        assert (
            f"HTTP forward 127.0.0.1:{origin.port} /dbg (rule=127.0.0.1 score=1600 action=direct mode=direct strategy=none rid="
            in proxy.output()
        )


def test_access_log_json_lines_have_the_record_fields(origin, tmp_path):
    with Segproxy(["--access-log-format", "json"], with_access_log=True) as proxy:
        addr = ("127.0.0.1", proxy.port)
        assert proxy_request(addr, "GET", origin.url("/j1")).status == 200
        s, _r = proxy_connect(addr, "blocked.invalid:443")
        s.close()
        assert wait_for(lambda: proxy.access_log.read_text().count("\n") >= 2)
        lines = proxy.access_log.read_text().splitlines()
    import json

    records = [json.loads(line) for line in lines]
    fields = {
        "id",
        "client",
        "method",
        "target",
        "status",
        "bytes_up",
        "bytes_down",
        "duration",
        "kind",
        "rule",
        "action",
        "policy",
        "dns",
        "error",
        "started",
        "host",
        "port",
        "scheme",
        "mode",
        "outcome",
        "line",
    }
    assert all(set(rec) == fields for rec in records), records
    get = next(rec for rec in records if rec["method"] == "GET")
    assert (
        get["target"] == origin.url("/j1") and get["status"] == 200 and get["host"] == "127.0.0.1"
    )
    assert get["port"] == origin.port and get["scheme"] == "http" and get["error"] is None
    assert get["line"].startswith(
        f"ACCESS rid={get['id']} method=GET host=127.0.0.1 port={origin.port} scheme=http "
    )


async def test_access_records_match_the_json_fields(origin):
    server = await start_proxy_server(port=0)
    try:
        import asyncio

        r = await asyncio.to_thread(proxy_request, server.address, "GET", origin.url("/rec"))
        assert r.status == 200
        assert await asyncio.to_thread(wait_for, lambda: len(server.access_records()) == 1)
        [rec] = server.access_records()
        assert (rec["host"], rec["port"], rec["scheme"], rec["mode"]) == (
            "127.0.0.1",
            origin.port,
            "http",
            "direct",
        )
        assert (
            " strategy=none dur_ms=" in rec["line"]
            and f" target={origin.url('/rec')} " in rec["line"]
        )
    finally:
        await server.aclose()


def test_intercept_rule_without_ca_dir_is_warned(tmp_path):
    rules_file = tmp_path / "i.rules"
    rules_file.write_text("a.test=direct\nbank.test=direct,intercept=yes\n")
    out = run_cli("--rules-file", str(rules_file), "--validate-rules")
    assert out.returncode == 0
    assert out.stderr.strip() == (
        f"segproxy: warning: {rules_file}:2: intercept=yes needs --ca-dir: without a CA the CONNECTs it matches are tunnelled"
    ), out.stderr
    out = run_cli(
        "--rules-file", str(rules_file), "--ca-dir", str(tmp_path / "ca"), "--validate-rules"
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr
