"""ember's CPU (LLVM) schedule rules, one module per kernel kind.

Order matters: ``rules()`` lists the most specific rule first; the first rule that returns a schedule wins.
"""

from .elementwise import Elementwise
from .fallback import Fallback
from .matmul import Matmul
from .reduction import RowReduction
from .winograd import WinogradTransform


def rules():
    return [WinogradTransform(), Matmul(), Elementwise(), RowReduction(), Fallback()]


__all__ = ["WinogradTransform", "Matmul", "Elementwise", "RowReduction", "Fallback", "rules"]
