"""`dcdb sql`: one ad hoc read-only statement on a pool, printed as a table or written out."""

from __future__ import annotations

from dcdb.errors import OutputError, QueryError
from dcdb.query import FilterFile, check_statement


def run_sql(pool, sql: str, given: dict[str, str], *, fmt: str = "table", output: str | None = None,
            max_rows: int = 40) -> str | None:
    """Run ``sql`` (one SELECT, EXPLAIN allowed) and return the text to print (or None when the
    result went to ``output``)."""
    import duckdb

    from dcdb.engine import connect, pool_reader
    from dcdb.query import bind_parameters

    con = connect(pool)
    sql_stripped = sql.strip().rstrip(";")
    explain = sql_stripped[:7].lower() == "explain"
    used = check_statement(con, sql_stripped[7:] if explain else sql_stripped, "sql")
    params = bind_parameters(FilterFile(name="sql", text=sql), used, given)
    try:
        from dcdb.filters.vectors import rewrite_sql  # knn(space, (SELECT emb ...), k): every seed row

        sql_stripped = rewrite_sql(con, sql_stripped)
        if explain:
            rows = con.execute(sql_stripped, params or None).fetchall()
            return "\n".join(str(r[-1]) for r in rows)
        with pool_reader(con, sql_stripped, params, 1 << 16) as reader:
            if fmt == "table":
                return _table(reader, max_rows)
            return _write(reader, fmt, output)
    except duckdb.Error as exc:
        from dcdb.engine import scan_error
        from dcdb.filters import take_error

        err = take_error(con) or scan_error(con)
        if err is not None:
            raise err from None
        raise QueryError(f"sql: {str(exc).strip()}") from None
    except (OSError, ValueError) as exc:  # pyarrow's, while streaming: it wraps a scan's error
        from dcdb.query import _reraise_streamed

        _reraise_streamed(con, exc)


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


def _write(reader, fmt: str, output: str | None) -> str | None:
    import pyarrow as pa

    from dcdb.io import atomic_path, sweep_temps, writing

    if fmt == "parquet" and not output:
        raise OutputError("--format parquet needs -o FILE")
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
