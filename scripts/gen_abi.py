"""Generate fastmerge/abi.py from csrc/common/fastmerge_params.h (and FM_MAX_MODELS of
fastmerge_config.h): the header is the one definition of the kernel ABI, Python and Triton read
the generated module. ``python scripts/gen_abi.py`` rewrites it; ``--check`` fails on drift
(tests/test_abi.py runs that)."""
from __future__ import annotations

import ast
import operator
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "common" / "fastmerge_params.h"
CONFIG = ROOT / "csrc" / "common" / "fastmerge_config.h"
TARGET = ROOT / "fastmerge" / "abi.py"

CONSTEXPR = re.compile(r"^\s*constexpr\s+int\s+(\w+)\s*=\s*([^;]+);\s*(?://\s*(.*))?$")
COMMENT = re.compile(r"^\s*//\s*(.*)$")
MAX_MODELS = re.compile(r"^\s*#define\s+FM_MAX_MODELS\s+(\d+)\s*$", re.M)
_OPS = {ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.Add: operator.add,
        ast.Sub: operator.sub, ast.Mult: operator.mul, ast.BitOr: operator.or_}


def _value(expr: str, known: dict) -> int:
    """An integer constant expression of the header (literals, earlier names, << + - * |)."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in known:
            return known[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"{HEADER.name}: cannot evaluate {expr!r}")
    return ev(ast.parse(expr.strip(), mode="eval").body)


def render(header: str, config: str) -> str:
    known: dict[str, int] = {}
    out = ['"""The kernel ABI: parameter rows, enumerations, dtype codes and limits.',
           "",
           "Generated from csrc/common/fastmerge_params.h by scripts/gen_abi.py -- do not edit;",
           'tests/test_abi.py fails when it drifts from the header."""', ""]
    section = None
    for line in header.splitlines():
        m = CONSTEXPR.match(line)
        if m:
            name, expr, note = m.groups()
            known[name] = _value(expr, known)
            if section:
                out += ["", f"# {section}"]
                section = None
            shown = expr.strip() if re.fullmatch(r"0x[0-9A-Fa-f]+", expr.strip()) else known[name]
            out.append(f"{name} = {shown}" + (f"  # {note.strip()}" if note else ""))
            continue
        c = COMMENT.match(line)
        if c and not known.get("_done"):
            section = c.group(1).strip()
        elif line.strip().startswith("struct"):
            break    # the rest of the header is code, not constants
    m = MAX_MODELS.search(config)
    if not m:
        raise ValueError(f"{CONFIG.name}: no #define FM_MAX_MODELS")
    out += ["", "# models one fused pass takes (FM_MAX_MODELS of csrc/common/fastmerge_config.h)",
            f"MAX_MODELS = {int(m.group(1))}"]
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render(HEADER.read_text(), CONFIG.read_text())
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python scripts/gen_abi.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
