"""The ``warden eval`` commands as a CI uses them: run → run file → compare (exit codes) → JUnit and HTML."""

from __future__ import annotations

import asyncio
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import orjson
import yaml

from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.eval.conftest import DEV_SECRET_ENV, dev_config

CASES = [
    {"id": "window", "tags": ["golden"], "principal": {"tenant": "acme", "user": "alice"}, "messages": [{"role": "user", "content": "refund window?"}],
     "expect": {"answer": {"contains": ["30 days"]}}},
    {"id": "greeting", "principal": {"tenant": "acme", "user": "alice"}, "messages": [{"role": "user", "content": "hi"}], "expect": {"answer": {"contains": ["hello"]}}},
]


def _config(fake: FakeProvider, tmp: Path) -> Path:
    return dev_config(fake, tmp, "[audit]\nenabled = false\n")


async def warden(*args: str, cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, DEV_SECRET_ENV: "s" * 32}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_warden.proxy", *args, cwd=cwd, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_run_compare_report_exit_codes(fake: FakeProvider, tmp_path: Path) -> None:
    cfg = _config(fake, tmp_path)
    (tmp_path / "cases.yaml").write_text(yaml.safe_dump(CASES))
    fake.push(Reply(content="Within 30 days."), Reply(content="hello there"))
    rc, out, err = await warden("eval", "run", "cases.yaml", "--config", str(cfg), "-o", "a.json", "--concurrency", "1", "--price", "1,2", cwd=tmp_path)
    assert rc == 0, (out, err)
    assert "2/2 cases passed" in out and "\r[" not in err  # no progress bar when stderr is not a terminal
    a = orjson.loads((tmp_path / "a.json").read_bytes())
    assert a["format"] == "warden-eval-run/1" and a["summary"]["passed"] == 2 and a["summary"]["cost"] > 0
    assert a["target"]["mode"] == "in-process" and a["results"][0]["outcome"]["audit"] is True  # audit disabled in the config: the run records to a temp log

    fake.push(Reply(content="I do not know."), Reply(content="hello"))
    rc, out, _ = await warden("eval", "run", "cases.yaml", "--config", str(cfg), "-o", "b.json", "--concurrency", "1", "--price", "1,2",
                              "--baseline", "a.json", "--junit", "b.xml", "--html", "b.html", cwd=tmp_path)
    assert rc == 1 and "FAIL window" in out and "REGRESSION" in out

    rc, out, _ = await warden("eval", "compare", "a.json", "b.json", cwd=tmp_path)
    assert rc == 1 and "newly failing     1  window" in out
    rc, out, _ = await warden("eval", "compare", "b.json", "a.json", "--json", cwd=tmp_path)
    doc = orjson.loads(out)
    assert rc == 0 and doc["newly_passing"] == ["window"] and doc["regression"] is False and "cost" in doc["deltas"]
    rc, _, _ = await warden("eval", "compare", "a.json", "a.json", cwd=tmp_path)
    assert rc == 0

    suite = ET.parse(tmp_path / "b.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "2" and suite.get("failures") == "1"
    failing = [tc for tc in suite if tc.find("failure") is not None]
    assert [tc.get("name") for tc in failing] == ["window"] and "answer.contains[0]" in (failing[0].find("failure").text or "")  # type: ignore[union-attr]
    page = (tmp_path / "b.html").read_text()
    assert "newly failing" in page and "window" in page and "REGRESSION" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page  # self-contained


async def test_bad_inputs_exit_2_with_a_message(fake: FakeProvider, tmp_path: Path) -> None:
    cfg = _config(fake, tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump([{"id": "x", "principal": {"tenant": "acme"}, "messages": [{"role": "user", "content": "hi"}]}]))
    rc, _, err = await warden("eval", "run", "bad.yaml", "--config", str(cfg), "-o", "r.json", cwd=tmp_path)
    assert rc == 2 and "principal.user" in err and "Traceback" not in err
    (tmp_path / "junk.json").write_text("{}")
    rc, _, err = await warden("eval", "compare", "junk.json", "missing.json", cwd=tmp_path)
    assert rc == 2 and "not a warden-eval-run/1 run file" in err and "Traceback" not in err
