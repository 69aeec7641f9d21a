"""Runs ``test_fused_step.py`` in Triton's interpreter, in a fresh Python process: the
interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is imported, which in
this process it already may have been."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from learned_optim.kernels import interpreting, triton_available


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install 'learned_optim[gpu]')")
@pytest.mark.skipif(interpreting(), reason="this process is the interpreter already: test_fused_step.py runs here")
def test_the_triton_kernels_match_the_eager_step_in_the_interpreter():
    test_file = Path(__file__).with_name("test_fused_step.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", str(test_file)],
                            capture_output=True, text=True, env=env, cwd=test_file.parent.parent, timeout=1200)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    passed = re.search(r"(\d+) passed", report)
    assert passed is not None and int(passed.group(1)) >= 15, report[-3000:]
