"""launch/device_check.sh on this CPU with time limits of seconds: every part leaves its log and a
summary row, a part stopped by its limit is marked so, and the device tests exit cleanly (they skip
without an accelerator). What the parts measure on a GPU is in docs/performance.md once run."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_writes_each_part_and_survives_its_time_limits(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, WHEELS="none", PYTHON=sys.executable, TESTS_SECONDS="120", KERNELS_SECONDS="2",
               STEP_SECONDS="2")
    proc = subprocess.run(["bash", str(REPO / "launch" / "device_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| part") and not line.startswith("| ---")]
    parts = {r[0].strip(): r[1].strip() for r in rows}
    assert list(parts) == ["device_kernels", "bench_kernels", "bench_stylegan2_xla", "bench_stylegan2_pallas"]
    assert parts["device_kernels"] == "0"  # skipped on CPU, not failed
    assert parts["bench_kernels"] == "124 (time limit)"  # 2 s is not enough on CPU: marked, not lost
    assert all((out / f"{p}.log").is_file() for p in parts)
    assert "skipped" in (out / "device_kernels.log").read_text()
