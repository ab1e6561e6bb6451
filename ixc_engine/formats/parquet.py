"""Parquet corpora (pyarrow, read by row group): one record per row, in any record form `records.py` knows.

Columns: ``messages`` / ``conversation`` / ``conversations`` (lists of structs, or a JSON string), ``id``, and media in
``images`` / ``image`` / ``video``: paths, or ``{"bytes", "path"}`` structs (the `datasets` Image feature) that are
decoded from the bytes in memory. Other columns are kept for `filter` and `report --group-by`, ignored by scoring.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ixc_engine.corpus import LineError

_BATCH = 256  # rows converted to Python at a time (a row group is read whole by pyarrow)
_JSON_COLUMNS = ("messages", "conversation", "conversations")


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RuntimeError("Parquet corpora need pyarrow: pip install 'ixc-engine[formats]'") from exc
    return pq


def _open(path: Path):
    pq = _pq()
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError, ...)
        raise ValueError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None


def count_rows(path: str | Path) -> int:
    return _open(Path(path)).metadata.num_rows


def _decode_row(row: dict) -> dict | LineError:
    for key in _JSON_COLUMNS:  # conversations stored as JSON text, as some datasets do
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except json.JSONDecodeError as exc:
                return LineError(f"column {key!r} holds a string that is not JSON ({exc.msg} at character "
                                 f"{exc.pos + 1})", row.get("id"))
            except RecursionError:  # json.loads on absurdly deep nesting
                return LineError(f"column {key!r} holds JSON nested too deeply to decode", row.get("id"))
    return row


def iter_rows(path: str | Path, *, start: int = 1, wanted=None, decode_json: bool = True
              ) -> Iterator[tuple[int, dict | LineError]]:
    """(1-based row index, row as a dict) from row `start` on, row group by row group; decode_json: conversation
    columns holding JSON text are decoded (a LineError when they are not JSON)."""
    pf = _open(Path(path))
    first = 1  # index of the current row group's first row
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n <= start or (wanted is not None and not any(wanted(k) for k in range(first, first + n))):
            first += n
            continue
        index = first
        for batch in pf.iter_batches(batch_size=_BATCH, row_groups=[g]):
            for row in batch.to_pylist():
                if index >= start and (wanted is None or wanted(index)):
                    yield index, _decode_row(row) if decode_json else row
                index += 1
        first += n


def write_kept(path: str | Path, keep: set[int], out: str | Path) -> int:
    """Copy the rows whose index is in `keep` into a new Parquet file with the same schema (metadata included)."""
    import pyarrow as pa

    pq = _pq()
    pf = _open(Path(path))
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    written = 0
    first = 1
    with pq.ParquetWriter(tmp, pf.schema_arrow) as writer:
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            rows = [k for k in range(n) if first + k in keep]
            if rows:
                table = pf.read_row_group(g)
                writer.write_table(table.take(pa.array(rows, type=pa.int64())))
                written += len(rows)
            first += n
    tmp.replace(out)
    return written
