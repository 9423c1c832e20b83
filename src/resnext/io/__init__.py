"""Safe readers for untrusted files: a restricted unpickler and a checked tar extractor."""

from resnext.io.safe_pickle import safe_load
from resnext.io.safe_tar import safe_extract

__all__ = ["safe_extract", "safe_load"]
