"""The result objects of a 1,000-slice CT: memory and time grow with the slices that hold a region, not the series."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Run in a fresh process, after a warm-up write (lazy imports), with the peak RSS (VmHWM) reset at the start.
MEASURE = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_outputs_objects import ALL, CT, ct_series, synthetic
from test_outputs_frames import long_enhanced_ct, on_frames
from dxnode.config import Settings
from dxnode.outputs.report import write_outputs

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024

tmp, slices, regions, layout = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
step = max(1, slices // max(1, regions))
positives = {f"Finding{i}": (i * step, (200 + i, 300)) for i in range(regions)}
if layout == "enhanced":  # one multi-frame instance, a region on `regions` of its frames
    result, sources = on_frames(long_enhanced_ct(tmp / "ct", slices), positives)
else:  # 512 x 512 headers (write_outputs reads no source pixels)
    result, sources = synthetic(ct_series(tmp / "ct", slices, rows=512), positives)
warm, warm_sources = synthetic([CT], {"Warm": (0, (40, 50))})  # lazy imports and highdicom's tables load here
write_outputs(warm, warm_sources, Settings(), tmp / "warm", kinds=ALL)
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
    f.write("5")
base = status("VmRSS")
start, timings = time.perf_counter(), {}
written = write_outputs(result, sources, Settings(), tmp / "out", kinds=ALL, timings=timings)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "extra_mb": status("VmHWM") - base, "objects": len(written), **timings}))
"""


def measure(tmp: Path, slices: int, regions: int, layout: str = "series") -> dict[str, float]:
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(here), str(tmp), str(slices), str(regions), layout],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_a_1000_slice_ct_costs_what_its_regions_cost(tmp_path: Path) -> None:
    big = measure(tmp_path / "big", 1000, 3)
    small = measure(tmp_path / "small", 10, 3)
    assert big["extra_mb"] < 100, big
    assert big["objects"] == small["objects"] == 1 + 3 + 1 + 3 + 1 + 1  # SR, 3 SC, SEG, 3 maps, GSPS, KOS
    # The same regions on a 100 times longer series: about the same time (not 100 times).
    assert big["seconds"] < 3 * small["seconds"] + 1, (big, small)


def test_a_1000_frame_enhanced_ct_costs_what_its_regions_cost(tmp_path: Path) -> None:
    big = measure(tmp_path / "big", 1000, 3, "enhanced")
    small = measure(tmp_path / "small", 10, 3, "enhanced")
    assert big["extra_mb"] < 100, big
    assert big["objects"] == small["objects"] == 1 + 3 + 1 + 3 + 1 + 1  # SR, 3 SC, SEG, 3 maps, GSPS, KOS
    # The SEG and the maps of 3 frames of a 100 times longer image: about the same time; and so the whole
    # write, the source header's per-frame items included (only those of the 3 frames are copied and cleaned).
    assert big["seg"] + big["pmap"] < 3 * (small["seg"] + small["pmap"]) + 0.3, (big, small)
    assert big["seconds"] < 3 * small["seconds"] + 0.3, (big, small)
    # The step that reads and copies the headers: about 0.5 s more for 1,000 frames when every item was cleaned.
    assert big["sr"] < small["sr"] + 0.2, (big, small)
