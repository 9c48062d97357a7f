"""The ROBER demo (examples/rober.py) runs end to end and learns the rate constants.

Runs ``--quick`` in a subprocess, the way a user runs it from the repository
root, and checks the exit status, the figure, and the lines the script prints:
the conservation check of the data, the explicit-method comparison, and the
RESULT line (loss fell, rates moved toward the truth).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "rober.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rober_quick_learns(tmp_path):
    png = tmp_path / "r.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]

    assert png.is_file(), out[-2000:]
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000

    # The data-generating solve conserves y1 + y2 + y3 = 1 to rounding.
    match = re.search(r"max \|y1\+y2\+y3-1\| = (\S+)", out)
    assert match and float(match.group(1)) < 1e-10, out[-2000:]

    # dopri5 cannot cross the stiff run within its cap; the implicit method can.
    assert re.search(r"explicit dopri5 \(pnode\): \d+ f evals, hit the cap", out), out[-2000:]
    assert re.search(r"implicit arkimex-3: one forward solve = \d+ f evals", out), out[-2000:]

    for name in ("k1", "k2", "k3"):
        assert re.search(rf"^{name}: initial \S+ -> recovered \S+ \(true \S+\), relative error", out, re.M)

    match = re.search(r"RESULT initial_loss=(\S+) final_loss=(\S+) max_rel_err=(\S+) "
                      r"log10_dist=(\S+)->(\S+)", out)
    assert match, out[-2000:]
    initial, final, _, dist0, dist1 = map(float, match.groups())
    assert final < initial / 5, f"loss went from {initial} to {final}"
    assert dist1 < dist0, f"log10 k distance to the truth went from {dist0} to {dist1}"
    assert "OK:" in out
