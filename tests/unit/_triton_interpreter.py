"""Run a check script in a fresh Python with TRITON_INTERPRET=1 (Triton reads it when a kernel
is defined, so it cannot be switched on inside the test process). The script prints one line
"RESULT" + JSON; that object is returned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


def run_interpreted(code: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])
