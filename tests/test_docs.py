"""The manual stays true to the code: the configuration reference is generated from the
settings classes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_configuration_reference_matches_the_settings() -> None:
    check = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
