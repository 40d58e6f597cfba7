import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models" / "tiny-training"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``fedtiny`` as a user would, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "fedtiny.tools.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
