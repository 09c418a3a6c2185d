"""One openvino.Core per process (infer/runtime_openvino.py): a Core per model left the thread's
signal alternate stack unmapped once two CPU plugins were freed in creation order, and the next
signal handled by Python (SA_ONSTACK) killed the process with SIGSEGV (rc 139 in the test suite)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "dogbreeds"

# Two compiled models freed in the order they were made, then a child process: its SIGCHLD goes
# to a Python handler, i.e. onto the alternate stack. With a Core per call this dies with SIGSEGV.
SCRIPT = """
import gc, signal, subprocess, sys
import openvino as ov, openvino.opset13 as ops
from dogbreeds.infer.runtime_openvino import openvino_core
signal.signal(signal.SIGCHLD, lambda *args: None)
def compiled():
    p = ops.parameter([2, 2], ov.Type.f32)
    return openvino_core().compile_model(ov.Model([ops.relu(p)], [p]), "CPU")
a = compiled()
b = compiled()
del a; gc.collect()
del b; gc.collect()
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("alive", openvino_core() is openvino_core())
"""


def test_models_freed_in_any_order_leave_signal_handling_intact():
    pytest.importorskip("openvino")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["alive", "True"]


def test_product_code_makes_no_core_of_its_own():
    """Every Core comes from openvino_core(): a second one anywhere brings the crash back."""
    makers = [f"{path.relative_to(SRC)}:{n}" for path in sorted(SRC.rglob("*.py"))
              for n, line in enumerate(path.read_text().splitlines(), 1)
              if re.search(r"\b(ov|openvino)\.Core\(\)", line.split("#")[0]) and "_CORE = ov.Core()" not in line]
    assert makers == [], makers
