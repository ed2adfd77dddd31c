"""hsstore: a chunked, compressed, random-access Zarr v3 store of target-LLM hidden states.

`import hsstore` stays light: no transformers, vllm or accelerate (those live in hsstore.generate
and hsstore.train).
"""

__version__ = "0.1.0"

from .errors import (
    CorruptStoreError,
    HSStoreError,
    IncompatibleStoreError,
    NotAStoreError,
    SampleError,
    StoreExistsError,
)
from .manifest import (
    FORMAT_VERSION,
    Geometry,
    HiddenSpec,
    Manifest,
    SourceInfo,
    TargetInfo,
    TeacherSpec,
    TokenizerInfo,
)
from .reader import StoreReader
from .writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "CorruptStoreError",
    "Geometry",
    "HSStoreError",
    "HiddenSpec",
    "IncompatibleStoreError",
    "Manifest",
    "NotAStoreError",
    "SampleError",
    "SourceInfo",
    "StoreExistsError",
    "StoreReader",
    "StoreWriter",
    "TargetInfo",
    "TeacherSpec",
    "TokenizerInfo",
]
