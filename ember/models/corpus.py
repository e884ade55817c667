"""Real English sentences nobody wrote for ember: the first sentences of Python standard-library docstrings.

Read from the stdlib's source files with ``ast`` (no imports), in sorted file order, so the same Python gives
the same sentences on every machine.
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig


def stdlib_sentences(n: int = 64, min_words: int = 5, max_words: int = 60) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages",
                                                              "__pycache__", "lib2to3", "turtledemo"))
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fname), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            nodes = [tree] + [x for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.ClassDef))]
            for node in nodes:
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                first = re.split(r"(?<=[.!?])\s", " ".join(doc.split()), maxsplit=1)[0].strip()
                words = first.split()
                if min_words <= len(words) <= max_words and first not in seen and first[0].isupper():
                    seen.add(first)
                    out.append(first)
                    if len(out) >= n:
                        return out
    return out
