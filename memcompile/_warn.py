"""``warn``: a memtrain warning shown at the user's line, not at the library line that raised it.

memtrain's warnings come from inside a compile (Dynamo, AOTAutograd, Inductor and memtrain's passes
stand between the user's ``model(...)`` and them) or from a trainer's callback, so no fixed
``stacklevel`` reaches the caller. ``warn`` walks the stack to the first frame outside the libraries
in between and the standard library, and warns there, as ``warnings.warn`` would from that line: its
filters and its once-per-line registry apply to the user's line.
"""
from __future__ import annotations

import os
import sys
import sysconfig
import warnings

# Packages whose frames stand between the user's code and a memtrain warning.
_LIBRARIES = ("memcompile", "torch", "transformers", "peft", "accelerate", "trl", "triton", "functorch")


def _library_dirs() -> tuple[str, ...]:
    dirs = []
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(dirs)


def _stdlib_dir() -> str:
    return os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


def _site_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.abspath(paths[k]) + os.sep for k in ("purelib", "platlib"))


def _is_user(filename: str, libraries: tuple[str, ...], stdlib: str, site: tuple[str, ...]) -> bool:
    if filename.startswith("<"):  # <frozen ...>, <string>: generated, never the user's line
        return False
    path = os.path.abspath(filename)
    if path.startswith(libraries):
        return False
    return not path.startswith(stdlib) or path.startswith(site)


def user_frame():
    """The innermost frame outside the libraries and the standard library; the outermost frame if all are."""
    libraries, stdlib, site = _library_dirs(), _stdlib_dir(), _site_dirs()
    frame = sys._getframe(1)
    outermost = frame
    while frame is not None:
        if _is_user(frame.f_code.co_filename, libraries, stdlib, site):
            return frame
        outermost = frame
        frame = frame.f_back
    return outermost


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` from the user's line (``user_frame``)."""
    frame = user_frame()
    module_globals = frame.f_globals
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                           module=module_globals.get("__name__"),
                           registry=module_globals.setdefault("__warningregistry__", {}),
                           module_globals=module_globals)
