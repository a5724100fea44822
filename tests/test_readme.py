"""What the README tells a new user works as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from lukhas.config import Settings
from lukhas.orchestration.context.endpoints import ENVELOPE_BYTES as HANDOFF_ENVELOPE_BYTES
from lukhas.orchestration.context.endpoints import HANDOFF
from lukhas.testing import dry_run_settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:] if end == -1 else README[start:end]


def test_the_python_snippet_runs_as_shown(tmp_path: Path) -> None:
    [snippet] = re.findall(r"```python\n(.*?)```", _section("Using the slices from Python"),
                           re.DOTALL)
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "LUKHAS_OFFLINE")}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, env={**env, "LUKHAS_DRY_RUN_MODE": "true", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True null"


def test_the_documented_handoff_limits_are_the_enforced_ones() -> None:
    [row] = [line for line in README.splitlines()
             if line.startswith("| `LUKHAS_HANDOFF_MAX_BYTES` |")]
    default = Settings().handoff_max_bytes
    request_limit = default + HANDOFF_ENVELOPE_BYTES
    assert row.split("|")[2].strip() == str(default)
    assert f"over the limit of {default} bytes" in row
    assert f"{HANDOFF_ENVELOPE_BYTES} bytes over it ({request_limit} by default)" in row
    assert HANDOFF.body_limit(dry_run_settings()) == request_limit


def test_the_quick_start_commands_are_real_cli_commands() -> None:
    from workers.cli.main import build_parser

    parser = build_parser()
    block = re.search(r"Then, from another shell.*?```bash\n(.*?)```", README, re.DOTALL)
    assert block is not None
    for line in block.group(1).splitlines():
        command = line.split("#")[0].split("|")[-1].split()
        assert command[0] == "lukhas", line
        parser.parse_args([arg.strip("'") for arg in command[1:]])


def test_the_nats_cli_line_says_where_to_get_it() -> None:
    quick = _section("Two commands")
    assert "nats req lukhas.governance.consent.record" in quick
    assert "github.com/nats-io/natscli" in quick
    assert "`lukhas request`" in quick
