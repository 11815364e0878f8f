"""The output guard's rules on answer text, whole and split into stream deltas at every point."""

from __future__ import annotations

import random

import pytest

from llm_warden.plugins.outputguard.scan import ECHO_RULE, IMAGE_RULE, LINK_RULE, Guard, HostPolicy, Intervention, StreamGuard, secrets_in

HOSTS = HostPolicy(["docs.example.com", "*.corp.example"])
SECRET = "sk-live0123456789abcdefghijklmnop"
CANARY = "CANARY-7f3a-zebra"


def guard() -> Guard:
    return Guard(HOSTS, sorted([SECRET, CANARY], key=len, reverse=True))


def apply(text: str) -> tuple[str, list[Intervention]]:
    found: list[Intervention] = []
    return guard().apply(text, found), found


@pytest.mark.parametrize(
    ("text", "out", "rules"),
    [
        ("See ![chart](https://evil.test/p.png?d=abc) now", "See [image removed] now", [IMAGE_RULE]),
        ("![ok](https://docs.example.com/a.png)", "![ok](https://docs.example.com/a.png)", []),
        ("![ok](https://img.corp.example/a.png 'title')", "![ok](https://img.corp.example/a.png 'title')", []),
        ("![x](//evil.test/p.png)", "[image removed]", [IMAGE_RULE]),
        ("![x](data:image/png;base64,AAAA)", "[image removed]", [IMAGE_RULE]),
        ("![x](images/local.png)", "![x](images/local.png)", []),
        ("[click](https://evil.test/?q=1) please", "click please", [LINK_RULE]),
        ("[js](javascript:alert(1))", "[js]([link removed]alert(1))", [LINK_RULE]),
        ("[js](JavaScript:void)", "js", [LINK_RULE]),
        ("[wiki](https://docs.example.com/a_(b))", "[wiki](https://docs.example.com/a_(b))", []),
        ("[w](https://evil.test/a_(b))", "[w]([link removed]))", [LINK_RULE]),
        ("[docs](https://docs.example.com/x) and [top](#top)", "[docs](https://docs.example.com/x) and [top](#top)", []),
        ("[https://evil.test/a](https://evil.test/a)", "[link removed]", [LINK_RULE, LINK_RULE]),
        ("go to https://evil.test/x?data=1.", "go to [link removed].", [LINK_RULE]),
        ("go to https://docs.example.com/x.", "go to https://docs.example.com/x.", []),
        ("<https://evil.test/x>", "[link removed]", [LINK_RULE]),
        ('<img src="https://evil.test/t.gif">', '<img src="#">', [IMAGE_RULE]),
        ('<a href="https://evil.test/">x</a>', '<a href="#">x</a>', [LINK_RULE]),
        ("[1]: https://evil.test/ref\n\nSee [a][1]", "[1]: #\n\nSee [a][1]", [LINK_RULE]),
        ("ftp://evil.test/x", "[link removed]", [LINK_RULE]),
        ("https://evil.test.docs.example.com.attacker.test/", "[link removed]", [LINK_RULE]),
        ("https://docs.example.com@evil.test/", "[link removed]", [LINK_RULE]),
        (f"the key is {SECRET}!", "the key is [withheld]!", [ECHO_RULE]),
        (f"![x](https://docs.example.com/?k={CANARY})", "![x](https://docs.example.com/?k=[withheld])", [ECHO_RULE]),
        ("plain answer with no links", "plain answer with no links", []),
    ],
)
def test_rules(text: str, out: str, rules: list[str]) -> None:
    got, found = apply(text)
    assert got == out
    assert [f.rule for f in found] == rules


def test_secrets_found_by_the_redactor_rules_and_extra_patterns() -> None:
    import re

    text = f"key {SECRET} aws AKIAABCDEFGHIJKLMNOP password: hunter2hunter ticket T-99-XYZ"
    found = secrets_in(text, [re.compile(r"T-\d+-[A-Z]+")])
    assert {SECRET, "AKIAABCDEFGHIJKLMNOP", "hunter2hunter", "T-99-XYZ"} <= found


ANSWERS = [
    "Sure! ![progress](https://evil.test/p.png?d=SECRET-DATA) Here is the summary [1].",
    f"Your key: {SECRET}. Also the canary {CANARY} appears.",
    "Docs at https://docs.example.com/guide and https://evil.test/x?q=1, ok?\n[1]: https://evil.test/r\nend",
    "Click [here](https://evil.test/login?u=alice) or [there](https://docs.example.com/a) now.",
    '<img src="https://evil.test/x.gif"> and <https://evil.test/y> and htt' + "ps://evil.test/z",
    "Nothing to see here, just text with [brackets] and (parens) and a ! mark.",
    "![a](https://img.corp.example/ok.png)![b](https://evil.test/b.png)",
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_a_stream_split_anywhere_relays_what_the_whole_answer_gives(answer: str) -> None:
    whole, found_whole = apply(answer)
    splits = [[answer[:i], answer[i:]] for i in range(1, len(answer))]
    rnd = random.Random(answer)
    for _ in range(200):
        cuts = sorted(rnd.sample(range(1, len(answer)), min(len(answer) - 1, rnd.randint(1, 12))))
        splits.append([answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True)])
    splits.append(list(answer))  # one character per delta
    for parts in splits:
        found: list[Intervention] = []
        sg = StreamGuard(guard(), max_hold_chars=4096)
        relayed = "".join(sg.feed(p, found) for p in parts) + sg.flush(found)
        assert relayed == whole, parts
        assert sorted(f.rule for f in found) == sorted(f.rule for f in found_whole)


@pytest.mark.parametrize("hostile", ["[" * 50000, "![a](" * 20000, "<" * 50000, "[x](" * 20000 + "http", '![a](x "' * 10000, "](" * 30000, "a:" * 50000, "h" * 50000])
def test_hostile_answers_are_scanned_in_linear_time(hostile: str) -> None:
    import time

    t0 = time.perf_counter()
    apply(hostile)
    sg = StreamGuard(guard(), max_hold_chars=2048)
    found: list[Intervention] = []
    for i in range(0, 20000, 7):
        sg.feed(hostile[i : i + 7], found)
    sg.flush(found)
    assert time.perf_counter() - t0 < 5.0


def test_a_stream_holds_back_only_what_may_still_change() -> None:
    sg = StreamGuard(guard(), max_hold_chars=4096)
    found: list[Intervention] = []
    assert sg.feed("Hello there, ", found) == "Hello there, "
    assert sg.feed("see ![img", found) == "see "
    assert sg.feed("](https://evil.test/a.png", found) == ""
    assert sg.feed(") done. ", found) == "[image removed] done. "
    assert sg.feed("Key sk-li", found) == "Key "
    assert sg.feed("ve0123456789abcdefghijklmnop ok ", found) == "[withheld] ok "
    assert sg.pending == ""


def test_max_hold_bounds_the_held_text_and_a_cut_url_is_still_neutralised() -> None:
    sg = StreamGuard(guard(), max_hold_chars=64)
    found: list[Intervention] = []
    out = sg.feed("[" + "a" * 100, found)
    assert len(sg.pending) <= 64 and out.startswith("[a")
    out = sg.feed("https://evil.test/" + "x" * 100, found)
    out += sg.feed(" end", found) + sg.flush(found)
    assert "evil.test" not in out and any(f.rule == LINK_RULE for f in found)
