"""Migration URIs and the TLS policy (plain TCP only on loopback or when told)."""

import pytest

from vmmd.migration import transport as t


def test_parse_uri():
    assert t.parse_uri("unix:/run/x.sock") == t.Uri("unix", path="/run/x.sock")
    assert t.parse_uri("tcp:127.0.0.1:4444") == t.Uri("tcp", host="127.0.0.1", port=4444)
    assert t.parse_uri("tcp:[::1]:4444") == t.Uri("tcp", host="::1", port=4444)
    for bad in ("", "unix:", "tcp:host", "tcp:host:0", "tcp:host:70000", "tcp::1x", "http://x", None,
                "unix:" + "x" * 200):
        with pytest.raises(t.TransportError):
            t.parse_uri(bad)


def test_security_policy():
    tls = t.Tls("c", "k", "ca")
    t.check_security(t.parse_uri("unix:/x"), None, False)
    t.check_security(t.parse_uri("tcp:127.0.0.1:1"), None, False)
    t.check_security(t.parse_uri("tcp:localhost:1"), None, False)
    t.check_security(t.parse_uri("tcp:[::1]:1"), None, False)
    with pytest.raises(t.TransportError, match="needs TLS"):
        t.check_security(t.parse_uri("tcp:10.0.0.2:1"), None, False)
    t.check_security(t.parse_uri("tcp:10.0.0.2:1"), None, True)
    t.check_security(t.parse_uri("tcp:10.0.0.2:1"), tls, False)
