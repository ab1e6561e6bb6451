"""`filter`'s writers for the formats other than JSONL (JSONL lines are copied byte for byte by `cmd_filter`).

- JSON array: the kept records' original text (their exact bytes in the input), in input order, one per line of a new
  array: ``[\\n<record>,\\n<record>\\n]\\n``. Records keep their own formatting, indentation inside them included.
- Parquet: the kept rows, same schema and schema metadata (`parquet.write_kept`).
"""

from __future__ import annotations

from pathlib import Path

from ixc_engine.formats.source import CorpusSource


def write_json_array(path: str | Path, keep: set[int], out: str | Path) -> int:
    from ixc_engine.formats.jsonarray import iter_spans

    tmp = Path(out).with_name(Path(out).name + ".tmp")
    written = 0
    with open(tmp, "wb") as dst:
        dst.write(b"[")
        for span in iter_spans(path):
            if span.index in keep:
                if span.error is not None:
                    raise ValueError(f"record {span.index} of {path} was kept but is not a record ({span.error})")
                dst.write(b"\n" if written == 0 else b",\n")
                dst.write(span.data)
                written += 1
        dst.write(b"\n]\n" if written else b"]\n")
    tmp.replace(out)
    return written


def write_kept(source: CorpusSource, keep: set[int], out: str | Path) -> int:
    """Write the records of `source` whose index is in `keep` to `out` in the source's own format; returns how many."""
    if source.format == "json":
        return write_json_array(source.path, keep, out)
    if source.format == "parquet":
        from ixc_engine.formats.parquet import write_kept as write_parquet

        return write_parquet(source.path, keep, out)
    raise ValueError(f"write_kept: {source.format} is copied line by line by `filter` itself")
