"""A DeepSpeed training script runs unchanged after `import zray as deepspeed`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "deepspeed_style" / "train.py"
CONFIG = ROOT / "examples" / "deepspeed_style" / "ds_config.json"


def test_script_is_deepspeed_code_but_for_the_import() -> None:
    text = SCRIPT.read_text()
    imports = [ln for ln in text.splitlines() if ln.startswith(("import ", "from "))]
    assert [ln for ln in imports if "zray" in ln] == ["import zray as deepspeed"]
    # The code calls zray only through the DeepSpeed name.
    code = text.split('"""', 2)[2]
    assert code.count("zray") == 1
    assert "deepspeed.initialize(" in text and "engine.backward(loss)" in text


def test_script_trains_on_two_processes(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "zray.launch",
            "--nproc",
            "2",
            str(SCRIPT),
            "--deepspeed_config",
            str(CONFIG),
            "--epochs",
            "2",
            "--save_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", out.stdout)]
    assert len(losses) >= 6, out.stdout
    assert sum(losses[-3:]) < sum(losses[:3])
    manifest = json.loads((tmp_path / "step_00000080" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == 2
    assert (tmp_path / "step_00000080" / "COMMITTED").exists()
