"""The README's quick tour runs as written, in order, against `pushsvc serve --dev`.

Every ```sh and ```python block of the "Quick tour" section is taken from
README.md and run in one bash process, in order (python blocks through
``python -`` with a here-document), so a README change that breaks a block fails
here. The only additions are what a human does by eye: after a block that starts
something in the background (the server, the subscriber), wait until it printed
that it is ready. The environment is a user's: no ``PUSHSVC_*`` from the test
process, the virtual environment's ``pushsvc`` and ``python`` on ``PATH``, and
``PUSHSVC_PORT``/``PUSHSVC_URL``/``PUSHSVC_NATS_URL`` set the way the tour says
to when the default ports are not free (a free port, a private nats-server).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pushsvc.server.embedded import free_port

README = Path(__file__).resolve().parent.parent / "README.md"

#: what a backgrounded block prints once it is ready (a human waits for it too)
READY = {
    "pushsvc serve": "Dev token",
    "pushsvc subscribe": "pushsvc subscribe: subscribed to",
}


def tour_blocks() -> list[tuple[str, str]]:
    """(language, code) of every sh/python block of the Quick tour, in order."""
    text = README.read_text()
    section = text.split("\n## Quick tour\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(sh|python)\n(.*?)^```$", section, flags=re.S | re.M)


def tour_script(out: Path) -> str:
    lines = ["set -e", f'exec >"{out}" 2>&1']
    for lang, code in tour_blocks():
        if lang == "python":
            lines.append(f"python - <<'README_PYTHON'\n{code}README_PYTHON")
            continue
        lines.append(code)
        for command, ready in READY.items():
            if re.search(rf"^{command}\b.*&\s*(#.*)?$", code, flags=re.M):
                lines.append(f'until grep -q "{ready}" "{out}"; do sleep 0.1; done')
    return "\n".join(lines) + "\n"


def test_tour_blocks_are_found():
    blocks = tour_blocks()
    assert [lang for lang, _ in blocks].count("python") >= 2
    commands = "\n".join(code for _, code in blocks)
    for command in ("pushsvc serve --dev", "pushsvc token", "pushsvc subscribe", "curl"):
        assert command in commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="the tour uses curl")
def test_quick_tour_runs_as_written(own_nats, tmp_path):
    port = free_port()
    out = tmp_path / "tour.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSVC_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PUSHSVC_PORT=str(port),
        PUSHSVC_URL=f"http://127.0.0.1:{port}",
        PUSHSVC_NATS_URL=own_nats.url,
    )
    env.pop("TOKEN", None)
    script = tour_script(out)
    proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=tmp_path, start_new_session=True)
    try:
        assert proc.wait(timeout=90) == 0, out.read_text()
        # the background subscriber printed every message of the tour
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            printed = _messages(out)
            if len(printed) >= 3:
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the subscriber (kill %2 %1)
        proc.wait(timeout=10)
    text = out.read_text()
    assert "Traceback" not in text and "command not found" not in text, text
    assert [(m["seq"], m["data"]) for m in printed] == [
        (1, {"text": "hello"}),
        (2, {"text": "hi from Python"}),
        (3, {"text": "hello again"}),
    ], text
    assert "stored as seq 2" in text  # the Publisher block
    assert '{"channel":"chat.room1","seq":3}' in text  # the curl emit
    # the websockets client block replayed the three from history
    assert "1 {'text': 'hello'}\n2 {'text': 'hi from Python'}\n3 {'text': 'hello again'}" in text
    # the pushsvc.client block: the pattern's history, then its own publish
    assert (
        "chat.room1 1 {'text': 'hello'}\nchat.room1 2 {'text': 'hi from Python'}\n"
        "chat.room1 3 {'text': 'hello again'}\nchat.room2 4 {'text': 'from pushsvc.client'}\n"
    ) in text


def _messages(path: Path) -> list[dict]:
    """The subscriber's message lines (another process may have left a line unfinished)."""
    text = path.read_text() if path.exists() else ""
    decoder = json.JSONDecoder()
    return [
        decoder.raw_decode(text, m.start())[0] for m in re.finditer(r'\{"type":"message"', text)
    ]
