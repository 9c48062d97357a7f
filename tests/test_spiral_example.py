"""The spiral demo (examples/spiral.py) runs end to end and learns.

Runs ``--quick`` in a subprocess, the way a user runs it, and checks the exit
status, the figure, and the metric line the script prints.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "spiral.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_spiral_quick_learns(tmp_path):
    png = tmp_path / "s.png"
    # cwd=tmp_path: anything the run writes next to itself stays out of the repository.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(png)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    assert png.is_file(), output[-2000:]
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000

    match = re.search(r"RESULT initial_mae=(\S+) final_mae=(\S+)", proc.stdout)
    assert match, output[-2000:]
    initial, final = float(match.group(1)), float(match.group(2))
    assert final < 0.5 * initial, f"full-trajectory MAE went from {initial} to {final}"
    assert "dopri5:" in proc.stdout  # pnode's Stats of the last call are reported
