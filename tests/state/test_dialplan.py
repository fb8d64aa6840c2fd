"""The dialplan reader provision uses to check transfer targets (sans-IO)."""

from __future__ import annotations

import pytest

from bridge.state import dialplan

CONF = r"""
[general]
static=yes
[operators](+)
exten => 100,1,Dial(PJSIP/operator,30) ; the desk
 same => n,Hangup()
exten = 200/5551234,1,NoOp(only from that caller id)
include => desks
#include more.conf
[desks]
exten => _1[2-4]X,1,Dial(PJSIP/desk${EXTEN})
exten => _9!,1,NoOp()
[semi]
exten => a\;b,1,NoOp()
"""


@pytest.mark.parametrize(("context", "exten", "found"), [
    ("operators", "100", True), ("operators", "200", True), ("operators", "101", False),
    ("operators", "125", True), ("operators", "155", False), ("desks", "9", True), ("desks", "9123", True),
    ("operators", "777", False), ("extra", "777", True), ("nowhere", "100", False), ("semi", r"a\;b", True),
    ("general", "x", False),
])
def test_find(context: str, exten: str, found: bool) -> None:
    # more.conf's [extra] is a context of its own: [operators] does not include it
    contexts = dialplan.parse(CONF, {"more.conf": "[extra]\nexten => 777,1,NoOp()\n"}.get)
    assert dialplan.find(contexts, context, exten) is found


@pytest.mark.parametrize(("pattern", "exten", "match"), [
    ("_X.", "1", False), ("_X.", "12", True), ("_NXX", "200", True), ("_NXX", "100", False),
    ("_Z!", "1", True), ("_[a-c]X", "b5", True), ("_[a-c]X", "d5", False), ("100", "100", True),
])
def test_patterns(pattern: str, exten: str, match: bool) -> None:
    assert dialplan.extension_matches(pattern, exten) is match


def test_include_loops_end() -> None:
    text = "[a]\ninclude => b\n[b]\ninclude => a\n#include self.conf\n"
    contexts = dialplan.parse(text, {"self.conf": text}.get)
    assert not dialplan.find(contexts, "a", "1")


def test_syntax_errors_and_sections() -> None:
    text = "[ok]\ntype=endpoint\n[tmpl](!\nkey=1\n[bad\njust words\n; comment\n#include x.conf\n"
    assert dialplan.syntax_errors(text, "f.conf") == [
        "f.conf line 3: no closing ')' after the category", "f.conf line 5: no closing ']'",
        "f.conf line 6: no '=' (Asterisk skips the line)"]
    assert dialplan.syntax_errors(CONF, "extensions.conf") == []
    assert dialplan.sections_of_type("[a]\ntype = endpoint\n[a]\ntype=aor\n[b]\ntype=endpoint\n",
                                     "endpoint") == ["a", "b"]
