"""``memcompile.ops``: one catalogue registers every ``memtrain::`` op, each named as its Python function."""
import pathlib
import re
import subprocess
import sys

from memcompile import ops

PACKAGE = pathlib.Path(ops.__file__).parent
OP_NAMES = sorted(n for n in ops.__all__ if n != "memtrain")


def _defined_in_sources() -> dict[str, str]:
    """``{op name: Python name}`` of every ``torch.library.custom_op("memtrain::...")`` in the package, and of
    every op bound as ``<name> = define_op("<op>(...")``."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r'custom_op\("memtrain::(\w+)".*\n(?:@.*\n)*def (\w+)\(', text):
            found[m.group(1)] = m.group(2)
        for m in re.finditer(r'^(\w+) = define_op\(\s*"(\w+)\(', text, re.MULTILINE):
            found[m.group(2)] = m.group(1)
    return found


def test_catalogue_lists_every_op_and_names_match_functions():
    defined = _defined_in_sources()
    assert sorted(defined) == OP_NAMES
    assert all(op == fn for op, fn in defined.items()), defined
    for name in OP_NAMES:
        op = getattr(ops, name)
        assert (getattr(op, "_qualname", None) or op._schema.name) == f"memtrain::{name}"
        assert hasattr(ops.memtrain, name)


def test_no_side_effect_imports_left():
    assert not [p for p in PACKAGE.rglob("*.py") if "# registers memtrain" in p.read_text()]


def test_importing_the_catalogue_alone_registers_every_op():
    code = ("import torch, memcompile.ops as ops; "
            "print(sorted(n for n in ops.__all__ if n != 'memtrain' and hasattr(torch.ops.memtrain, n)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(OP_NAMES)
