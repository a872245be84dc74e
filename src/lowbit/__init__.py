"""lowbit: quantize large language models and measure what the quantization cost."""

import os as _os

__version__ = "0.1.0"

# Importing torch._dynamo (transformers does, to build a model) creates TorchInductor's cache folder,
# by default ``<tmp>/torchinductor_<user>``, left behind in the temporary directory by every run.
# lowbit compiles nothing; the folder goes under lowbit's own cache instead (unless the user chose one).
if "TORCHINDUCTOR_CACHE_DIR" not in _os.environ:
    _os.environ["TORCHINDUCTOR_CACHE_DIR"] = _os.path.join(
        _os.environ.get("LOWBIT_CACHE") or _os.path.join(_os.path.expanduser("~"), ".cache", "lowbit"), "torchinductor")
