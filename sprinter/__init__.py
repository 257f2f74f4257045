"""sprinter: speculative decoding with trained acceptance verifiers."""

__version__ = "0.1.0"

from sprinter.decode.decoder import Decoder, GenerateOutput  # noqa: E402
from sprinter.decode.options import DecodeOptions  # noqa: E402
from sprinter.errors import SprinterError  # noqa: E402
from sprinter.pairs.load import Pair, load_pair  # noqa: E402

__all__ = ["DecodeOptions", "Decoder", "GenerateOutput", "Pair", "SprinterError", "__version__", "load_pair"]
