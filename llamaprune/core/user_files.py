"""Reading the files a user gives (datasets, plans, manifests, tables): a file that cannot be decoded is bad
input, reported in one line that names it and says how to fix it, never a decoder's traceback.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "latin1.txt"
    >>> _ = path.write_bytes(b"caf\\xe9")
    >>> try:
    ...     read_utf8(path)
    ... except UsageError as err:
    ...     print(str(err).replace(str(path), "latin1.txt"))
    latin1.txt is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llamaprune.core.errors import UsageError

RECODE = "save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"


def read_utf8(path: Path, fix: str = RECODE) -> str:
    """The text of ``path``; a file that is not UTF-8 is a UsageError naming the file and the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); {fix}"
        ) from None


@contextmanager
def parquet_errors(path: Path, fix: str) -> Iterator[None]:
    """Turn pyarrow's complaint about a damaged or foreign file into one line naming ``path`` and ``fix``."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        reason = str(err).splitlines()[0][:160].rstrip(".")
        raise UsageError(f"{path} is truncated or not a Parquet file ({reason}); {fix}") from None
