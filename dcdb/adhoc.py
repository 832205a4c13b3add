"""`dcdb sql`: one ad hoc read-only statement on a pool, printed as a table or written out."""

from __future__ import annotations

from pathlib import Path

from dcdb.errors import OutputError, UsageError
from dcdb.sandbox import check_statement
from dcdb.store import Pool, open_pool

SQL_FORMATS = ("table", "csv", "json", "parquet")
# -o suffix -> format. json is newline-delimited (one object per row), hence .jsonl/.ndjson too; .txt is
# the table as printed on the terminal (first --max-rows rows), for a report; csv/json/parquet hold every row.
SQL_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet",
                ".txt": "table"}
_SUFFIX_OF = {"table": ".txt", "csv": ".csv", "json": ".json", "parquet": ".parquet"}


def sql_format(output: str | None, fmt: str | None) -> str:
    """The format of ``dcdb sql``: ``fmt`` when given, else from the ``-o`` suffix (SQL_SUFFIXES),
    else ``table``. With ``-o``, an unknown suffix without ``fmt`` and a suffix that contradicts
    ``fmt`` are refused; ``parquet`` needs ``-o``."""
    if fmt is not None and fmt not in SQL_FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(SQL_FORMATS)}")
    if output is None:
        if fmt == "parquet":
            raise UsageError("--format parquet needs -o FILE", hint="give -o FILE.parquet, or --format csv|json")
        return fmt or "table"
    suffix = Path(output).suffix.lower()
    by_suffix = SQL_SUFFIXES.get(suffix)
    if fmt is None:
        if by_suffix is None:
            raise UsageError(
                f"cannot tell the format of output {output!r} from its suffix {suffix!r}" if suffix
                else f"cannot tell the format of output {output!r}: it has no suffix",
                hint="name it *.csv, *.json (one object per line; also .jsonl/.ndjson), *.parquet or *.txt "
                "(the table as printed), or pass --format table|csv|json|parquet",
            )
        return by_suffix
    if by_suffix is not None and by_suffix != fmt:
        raise UsageError(
            f"output {output!r} ends in {suffix} (format {by_suffix}) but --format is {fmt}",
            hint=f"pass --format {by_suffix}, or name the file *{_SUFFIX_OF[fmt]}",
        )
    return fmt


def run_sql(pool, sql: str, given: dict[str, str], *, fmt: str = "table", output: str | None = None,
            max_rows: int = 40) -> str | None:
    """Run ``sql`` (one SELECT, EXPLAIN allowed) and return the text to print (or None when the
    result went to ``output``, written atomically in ``fmt``: see ``sql_format``)."""

    from dcdb.engine import connect, narrow_pool, pool_reader, statement_errors
    from dcdb.query import bind_parameters, parse_filter
    from dcdb.sandbox import apply, path_values

    if not isinstance(pool, Pool):
        pool = open_pool(pool)
    con = connect(pool)
    sql_stripped = sql.strip().rstrip(";")
    explain = sql_stripped[:7].lower() == "explain"
    used = check_statement(con, sql_stripped[7:] if explain else sql_stripped, "sql")
    filt = parse_filter("sql", sql, None)  # a header (-- @param NAME path) declares the files it may read
    params = bind_parameters(filt, used, given)
    apply(con, pool, path_values(filt, params), who="the SQL", kind="sql")
    try:
        from dcdb.filters.vectors import rewrite_sql  # knn(space, (SELECT emb ...), k): every seed row

        sql_stripped = rewrite_sql(con, sql_stripped)
        if explain:
            if output is not None and fmt != "table":
                raise UsageError("EXPLAIN gives a plan, not rows", hint="write it to FILE.txt, or leave out -o")
            with narrow_pool(con, sql_stripped[7:], params):  # the plan that would run
                rows = con.execute(sql_stripped, params or None).fetchall()
            return _text_out("\n".join(str(r[-1]) for r in rows), output)
        with pool_reader(con, sql_stripped, params, 1 << 16) as reader:
            if fmt == "table":
                return _text_out(_table(reader, max_rows), output)
            return _write(reader, fmt, output)
    except statement_errors() as exc:
        from dcdb.query import statement_error

        err = statement_error(con, exc, "sql", pool)
        if err is None:
            raise
        raise err from None


def _table(reader, max_rows: int) -> str:
    import polars as pl
    import pyarrow as pa

    batches, n, more = [], 0, False
    for b in reader:
        if n + b.num_rows > max_rows:
            batches.append(b.slice(0, max_rows - n))
            more = True
            break
        batches.append(b)
        n += b.num_rows
    tbl = pa.Table.from_batches(batches, schema=reader.schema)
    df = pl.from_arrow(tbl)
    with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=64, tbl_width_chars=160,
                   tbl_hide_dataframe_shape=True):
        text = str(df)
    if more:
        text += f"\n(first {max_rows} rows shown; --max-rows N or --format csv -o FILE for all)"
    return text


def _text_out(text: str, output: str | None) -> str | None:
    """``text`` to print, or written to ``output`` (with a final newline) when given."""
    if output is None:
        return text
    from dcdb.io import atomic_path

    with atomic_path(output) as tmp:
        tmp.write_text(text if text.endswith("\n") else text + "\n")
    return None


def _write(reader, fmt: str, output: str | None) -> str | None:
    import pyarrow as pa

    from dcdb.io import atomic_path, sweep_temps, writing

    if fmt == "parquet" and not output:
        raise OutputError("--format parquet needs -o FILE", hint="give -o FILE.parquet, or --format csv|json")
    if output is None:
        return _to_text(pa.Table.from_batches(list(reader), schema=reader.schema), fmt)
    sweep_temps(output)  # what a killed run left
    with writing(output, "output", redo="then re-run the command"), atomic_path(output) as tmp:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with pq.ParquetWriter(tmp, reader.schema) as w:
                for b in reader:
                    w.write_batch(b)
        else:
            tbl = pa.Table.from_batches(list(reader), schema=reader.schema)
            with open(tmp, "w") as f:
                f.write(_to_text(tbl, fmt))
    return None


def _to_text(tbl, fmt: str) -> str:
    import polars as pl

    df = pl.from_arrow(tbl)
    if fmt == "csv":
        nested = [n for n, t in zip(df.columns, df.dtypes) if t.is_nested()]
        if nested:
            raise OutputError(f"CSV cannot hold list/array column(s) {', '.join(nested)}",
                              hint="use --format json or parquet")
        return df.write_csv()
    return df.write_ndjson()
