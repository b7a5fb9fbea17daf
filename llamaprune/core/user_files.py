"""Reading the files a user gives (datasets, plans, manifests, tables): a file that cannot be decoded is bad
input, reported in one line that names it and says how to fix it, never a decoder's traceback. Every JSON
document a user gives is parsed by ``parse_json`` (or ``read_json``), which also refuses one nested too deeply.

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

import json
import sys
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


def read_json(path: Path, fix: str) -> object:
    """The JSON document in the UTF-8 file ``path``; ``fix`` (how to get a good copy, e.g. the command that
    writes it again) ends the error line of a file that cannot be read (see ``parse_json``)."""
    return parse_json(read_utf8(path, fix), path, fix)


def parse_json(text: str | bytes, where: str | Path, fix: str = "") -> object:
    """``text`` parsed as JSON. Malformed JSON, or JSON nested deeper than Python's parser goes (about
    ``sys.getrecursionlimit()`` levels, where it raises RecursionError), is a UsageError naming ``where`` (a file,
    or a file and line) and ``fix``.

        >>> parse_json('{"a": [1, 2]}', "plan.json")
        {'a': [1, 2]}
        >>> try:
        ...     parse_json("[" * 100_000 + "]" * 100_000, "deep.json", "make it again")
        ... except UsageError as err:
        ...     print(err)
        deep.json is JSON nested too deeply to read (Python's parser stops near 1000 levels); make it again
    """
    then = f"; {fix}" if fix else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        one_line = isinstance(text, str) and "\n" not in text.rstrip()  # a JSON-lines record: `where` has its line
        reason = f"{err.msg}: column {err.colno}" if one_line else str(err)
        raise UsageError(f"{where} is not valid JSON ({reason}){then}") from None
    except UnicodeDecodeError as err:  # bytes given, not UTF-8
        raise UsageError(f"{where} is not valid JSON (byte 0x{err.object[err.start]:02x} at offset {err.start} is not "
                         f"UTF-8){then}") from None
    except RecursionError:
        raise UsageError(
            f"{where} is JSON nested too deeply to read (Python's parser stops near {sys.getrecursionlimit()} "
            f"levels){then}"
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
