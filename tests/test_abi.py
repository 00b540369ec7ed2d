"""The kernel ABI has one source, csrc/common/fastmerge_params.h: fastmerge/abi.py is generated
from it (scripts/gen_abi.py) and every Python / Triton user reads fastmerge.abi."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from fastmerge import abi
from fastmerge.methods import COMBINES
from fastmerge.methods.kernel_params import COMBINE_IDS

ROOT = Path(__file__).resolve().parent.parent


def test_abi_py_is_what_the_header_generates():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_abi.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_generator_reads_every_constant_of_the_header():
    header = (ROOT / "csrc" / "common" / "fastmerge_params.h").read_text()
    names = re.findall(r"constexpr\s+int\s+(\w+)\s*=", header)
    assert names and all(hasattr(abi, n) for n in names)
    assert abi.NUM_BINS == 1 << abi.RADIX_BITS and abi.MAX_MODELS >= 1


def test_combine_ids_follow_the_method_registry():
    """COMBINE_IDS (name -> index in COMBINES) names the same ids as the header's COMBINE_*."""
    assert len(COMBINES) == abi.NUM_COMBINES
    for name, i in COMBINE_IDS.items():
        assert getattr(abi, f"COMBINE_{name.upper()}") == i


# Python files that may spell an ABI number: the generated module and its generator.
_ALLOWED = {"fastmerge/abi.py"}
# ABI values written as literals next to ABI names ("ip + i * 3", "fp + i * 6 + 2", "65536",
# "COMBINE == 5", "mode == 1", "DTYPE_CODES = {"F32": 0}") are what this test hunts.
_PATTERNS = [r"\b(?:fp|ip)\s*\+\s*i\s*\*\s*\d", r"\b65536\b",
             r"\b(?:COMBINE|NORMALIZE|ELECT|ELECT_ON|SCORE|mode)\s*[!=]=\s*\d",
             r"\bDTYPE_CODES\s*=\s*\{[^}]*:\s*\d"]


def test_no_abi_literal_outside_the_abi_module():
    found = []
    for p in sorted((ROOT / "fastmerge").rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        if rel in _ALLOWED:
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(re.search(pat, code) for pat in _PATTERNS):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "ABI numbers outside fastmerge/abi.py:\n" + "\n".join(found)
