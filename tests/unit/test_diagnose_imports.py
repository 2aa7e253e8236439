"""The diagnose and queue flows import no heavy client: those load only inside the runtime that needs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_diagnose_and_queue_flows_import_no_heavy_clients() -> None:
    code = (
        "import sys, flows.diagnose, flows.queues;"
        "heavy = [m for m in ('kubernetes', 'boto3', 'botocore', 'docker') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
