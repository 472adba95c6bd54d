"""bpfdumpfs: BPF iterator dumpers as files, and the Python API behind them."""
__version__ = "0.1.0"

from .dumpers import Dumper, DumperInfo, Params
from .errors import DumperError
from .state import StateDir
from .stream import Stream

__all__ = ["Dumper", "DumperError", "DumperInfo", "Params", "StateDir", "Stream"]
