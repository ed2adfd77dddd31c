"""Errors a user can act on: each message names the store, sample or file, and the fix."""


class HSStoreError(Exception):
    """Base class for every error hsstore raises on purpose."""


class NotAStoreError(HSStoreError):
    """The path does not exist or holds no hsstore manifest."""


class IncompatibleStoreError(HSStoreError):
    """The store's format version or configuration does not match what the caller needs."""


class CorruptStoreError(HSStoreError):
    """Bytes on disk disagree with their checksum, index or commit record."""


class SampleError(HSStoreError, ValueError):
    """A sample handed to the writer is malformed; nothing already committed is touched."""


class StoreExistsError(HSStoreError):
    """Writing into a store that already holds data without asking to resume or overwrite."""
