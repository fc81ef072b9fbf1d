"""Reading a site's tables (CSV or Parquet) and turning their cells into typed values.

Every table a site holds goes through :func:`read_table`. CSV cells are read as text, so
codes such as ``"01"`` survive and a stray ``"abc"`` in a numeric column can be reported
rather than silently turning the whole column into strings; Parquet columns keep their
stored types. A CSV row with fewer (or more) fields than the header is refused, never
padded with missing cells, and so is a CSV separated by something else than commas. The
patient-id column is always text. The converters below turn a column
into floats or canonical text the same way for both formats, and tell which cells did
not convert.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedcare.common.errors import DataError

__all__ = [
    "TABLE_SUFFIXES",
    "TableLayoutError",
    "read_table",
    "ends_with_newline",
    "cell_text",
    "as_text",
    "to_numbers",
    "columns_to_numbers",
    "binary_label",
]

_Reader = Callable[[Path], pd.DataFrame]


class TableLayoutError(DataError):
    """A CSV whose rows do not line up with its header: a torn copy, or another separator.

    pandas pads a short row with missing cells; fedcare refuses it instead, so a file cut
    mid-row is never silently imputed.

    Attributes
    ----------
    problem:
        What is wrong, with the line number and the fields found vs expected.
    fix:
        How to fix it.
    rule:
        ``"torn_row"`` or ``"separator"`` (validation's rule keys).
    line:
        The first offending line of the file (1-based; line 1 is the header), if any.
    """

    def __init__(
        self, path: Path, problem: str, fix: str, *, rule: str, line: int | None = None
    ) -> None:
        super().__init__(f"{path}: {problem}; {fix}")
        self.problem = problem
        self.fix = fix
        self.rule = rule
        self.line = line


# (separator, its name in "looks X-separated", the plural of what it is)
_OTHER_SEPARATORS: tuple[tuple[str, str, str], ...] = (
    (";", "';'", "semicolons"),
    ("\t", "tab", "tabs"),
    ("|", "'|'", "pipes"),
)
_LINES_SHOWN = 5


def _check_separator(path: Path, header_line: str) -> None:
    """Refuse a header split by ``;``, tabs or ``|`` rather than commas."""
    commas = header_line.count(",")
    for separator, name, plural in _OTHER_SEPARATORS:
        found = header_line.count(separator)
        if found > commas:
            raise TableLayoutError(
                path,
                f"the header line has more {plural} ({found}) than commas ({commas}): the "
                f"file looks {name}-separated",
                "fedcare reads comma-separated CSV: re-export it with commas between cells "
                "(and '.' as the decimal point)",
                rule="separator",
                line=1,
            )


def _check_rows(path: Path, text: str) -> None:
    """Refuse rows whose number of fields differs from the header's (blank lines aside)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        expected = len(header)
        uneven: list[tuple[int, int]] = []
        last = 1
        for record in reader:
            if not record:
                continue
            last = reader.line_num
            if len(record) != expected:
                uneven.append((reader.line_num, len(record)))
    except csv.Error as e:
        raise TableLayoutError(
            path,
            f"line {reader.line_num} cannot be parsed as CSV ({e})",
            "check the quoting around that line, or export the file again",
            rule="torn_row",
            line=reader.line_num,
        ) from e
    if not uneven:
        return
    line, found = uneven[0]
    if len(uneven) == 1 and line == last and found < expected:
        raise TableLayoutError(
            path,
            f"the last row (line {line}) has {found} of the header's {expected} fields: the "
            "file looks cut off mid-row",
            "copy or export the complete file again (an interrupted copy or a full disk cuts "
            "a file short)",
            rule="torn_row",
            line=line,
        )
    shown = ", ".join(f"line {n} has {k}" for n, k in uneven[:_LINES_SHOWN])
    if len(uneven) > _LINES_SHOWN:
        shown += f" and {len(uneven) - _LINES_SHOWN} more lines"
    raise TableLayoutError(
        path,
        f"{len(uneven)} row(s) do not have the header's {expected} fields: {shown}",
        f"give every row {expected} comma-separated fields (an empty cell is fine), quote "
        "cells that contain a comma, and copy the complete file if it was cut short",
        rule="torn_row",
        line=line,
    )


def _read_csv(path: Path) -> pd.DataFrame:
    # utf-8-sig: spreadsheets often prepend a byte-order mark to the header.
    text = path.read_bytes().decode("utf-8-sig")
    _check_separator(path, text.split("\n", 1)[0])
    _check_rows(path, text)
    return pd.read_csv(io.StringIO(text), dtype=str)


def ends_with_newline(path: str | Path) -> bool:
    """Whether a (non-empty) text file's last byte is a newline.

    A CSV whose last row is complete but lacks its newline may still have been cut
    inside its last cell; validation warns about it.
    """
    with Path(path).open("rb") as f:
        if f.seek(0, 2) == 0:
            return True
        f.seek(-1, 2)
        return f.read(1) in (b"\n", b"\r")


def _read_parquet(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


_READERS: dict[str, tuple[str, _Reader]] = {
    ".csv": ("CSV", _read_csv),
    ".parquet": ("Parquet", _read_parquet),
    ".pq": ("Parquet", _read_parquet),
}
TABLE_SUFFIXES: tuple[str, ...] = tuple(_READERS)


def read_table(path: str | Path, *, id_column: str = "patient_id") -> pd.DataFrame:
    """Read a CSV or Parquet table, chosen by the file's extension.

    Parameters
    ----------
    path:
        The file; ``.csv``, ``.parquet`` or ``.pq``.
    id_column:
        The patient-id column. When present it is returned as canonical text (see
        :func:`cell_text`), whatever type it was stored as.

    Returns
    -------
    pandas.DataFrame
        Column names as ``str``. CSV cells are text (missing cells are NaN); Parquet
        columns keep their stored types.

    Raises
    ------
    DataError
        When the extension is not supported or the file cannot be parsed; the message
        names the file and says how to fix it. A CSV whose rows do not all have the
        header's number of fields (a file cut mid-row), or that is separated by ``;``,
        tabs or ``|``, raises :class:`TableLayoutError` naming the line and the counts.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = p.write_text("patient_id,age\\n007,41\\n")
    >>> read_table(p)["patient_id"].tolist()
    ['007']
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise DataError(
            f"{path}: unsupported table format {suffix or '(no extension)'!r}; save it as "
            "CSV (.csv) or Parquet (.parquet, .pq) and point site.toml at the new file"
        )
    kind, reader = _READERS[suffix]
    if not path.is_file():
        raise DataError(f"{path}: no such file; create it or fix the path in site.toml")
    try:
        frame = reader(path)
    except pd.errors.EmptyDataError as e:
        raise DataError(
            f"{path}: the file is empty; a {kind} table needs at least a header row"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-save the CSV as UTF-8") from e
    except (ValueError, OSError, pd.errors.ParserError) as e:
        # pyarrow's ArrowInvalid derives from ValueError.
        raise DataError(
            f"{path}: cannot be read as {kind} ({e}); check that it is a valid {kind} "
            "file with one header row"
        ) from e
    if id_column not in frame.columns and frame.index.name == id_column:
        frame = frame.reset_index()
    frame.columns = [str(c) for c in frame.columns]
    frame = frame.reset_index(drop=True)
    if id_column in frame.columns:
        frame[id_column] = as_text(frame[id_column])
    return frame


def cell_text(value: object) -> str | None:
    """Canonical text of one cell: ``None`` when missing, else stripped text.

    Integral floats lose their ``.0`` (Parquet and pandas turn integer columns with gaps
    into floats), so ``1``, ``1.0`` and ``"1"`` all read ``"1"``; booleans read
    ``"1"``/``"0"``.

    Examples
    --------
    >>> [cell_text(v) for v in (1, 1.0, " 1 ", True, float("nan"), None, 2.5, "yes")]
    ['1', '1', '1', '1', None, None, '2.5', 'yes']
    """
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return str(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip()
    return text if text else None


def as_text(column: pd.Series) -> pd.Series:
    """The column as canonical text (``object`` dtype; NaN where missing).

    Examples
    --------
    >>> as_text(pd.Series([1.0, None, " F "])).tolist()
    ['1', nan, 'F']
    """
    if pd.api.types.infer_dtype(column, skipna=True) in ("string", "empty"):
        # Fast path (CSV columns are all text): strip, and blank cells are missing.
        is_text_dtype = isinstance(column.dtype, pd.StringDtype)  # pyarrow-backed: fast
        stripped = (column if is_text_dtype else column.astype(object)).str.strip()
        keep = stripped.notna() & stripped.ne("")
        return pd.Series(
            np.where(keep.to_numpy(dtype=bool), stripped.to_numpy(dtype=object), np.nan),
            index=column.index,
            dtype=object,
        )
    values = [cell_text(v) for v in column.tolist()]
    return pd.Series([np.nan if v is None else v for v in values], index=column.index, dtype=object)


def to_numbers(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Convert a column to float64.

    Returns
    -------
    values:
        float64 array; NaN where the cell is missing or not a number.
    invalid:
        bool array; True where a cell is present but is not a number.

    Examples
    --------
    >>> v, bad = to_numbers(pd.Series(["1", " 2 ", "abc", None, "inf"]))
    >>> v.tolist(), bad.tolist()
    ([1.0, 2.0, nan, nan, inf], [False, False, True, False, False])
    """
    if pd.api.types.is_bool_dtype(column.dtype) or pd.api.types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, np.zeros(len(values), dtype=bool)
    text = as_text(column)
    present = text.notna().to_numpy()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    # A present cell that became NaN did not parse, unless it spelled "nan" itself.
    spelled_nan = text.str.lower().eq("nan").to_numpy(dtype=bool, na_value=False)
    invalid = present & np.isnan(values) & ~spelled_nan
    return values, invalid


def columns_to_numbers(
    table: pd.DataFrame, names: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`to_numbers` of each column in ``names``, in one pass over all their cells.

    The same conversion cell by cell (a cell's text and number do not depend on its
    column), done once over the columns stacked end to end instead of once per column: a
    genomics matrix has hundreds of columns, and per-column pandas calls cost ~1 ms each.

    Examples
    --------
    >>> t = pd.DataFrame({"a": ["1", " 2"], "b": ["x", None]})
    >>> {k: (v.tolist(), bad.tolist()) for k, (v, bad) in columns_to_numbers(t, ["a", "b"]).items()}
    {'a': ([1.0, 2.0], [False, False]), 'b': ([nan, nan], [True, False])}
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    text: list[str] = []
    for name in names:
        column = table[name]
        if pd.api.types.is_bool_dtype(column.dtype) or pd.api.types.is_numeric_dtype(column.dtype):
            out[name] = to_numbers(column)  # typed columns (Parquet): no text to parse
        else:
            text.append(name)
    if text:
        n = len(table)
        stacked = pd.Series(
            np.concatenate([table[name].to_numpy(dtype=object) for name in text]), dtype=object
        )
        values, invalid = to_numbers(stacked)
        for i, name in enumerate(text):
            out[name] = (values[i * n : (i + 1) * n], invalid[i * n : (i + 1) * n])
    return {name: out[name] for name in names}


def binary_label(column: pd.Series, positive: int | str) -> np.ndarray:
    """A label column as 1.0 (equals ``positive``), 0.0 (any other value) or NaN (missing).

    Cells and ``positive`` are compared as canonical text, case-insensitively, or as
    numbers when both are numbers: ``positive = 1`` matches ``1``, ``1.0``, ``"1"`` and
    ``"1.0"``; ``positive = "yes"`` matches ``"Yes"``.

    Examples
    --------
    >>> binary_label(pd.Series(["1", "0", None, "2"]), 1).tolist()
    [1.0, 0.0, nan, 0.0]
    >>> binary_label(pd.Series(["Yes", "no"]), "yes").tolist()
    [1.0, 0.0]
    """
    wanted = (cell_text(positive) or "").casefold()
    wanted_number = _as_float(wanted)
    text = as_text(column)
    present = text.notna().to_numpy()
    same = text.str.casefold().eq(wanted).to_numpy(dtype=bool, na_value=False)
    if wanted_number is not None:
        numbers, _ = to_numbers(text)
        same = same | (numbers == wanted_number)
    return np.where(present, same.astype(np.float64), np.nan)


def _as_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return None if math.isnan(number) else number
