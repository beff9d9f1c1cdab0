"""The text corpus for φ pretraining (Eqn. 3), extracted from Parquet with DuckDB."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from xbtcore.data import InputError, is_text_type, parquet_files

from .common import CACHED, fingerprint_content, log

_FIX_COLUMN = "name the text column with --text-column NAME"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _literal_path(path: Path) -> str:
    """A file name as DuckDB's read_parquet matches it literally: it reads any path as a glob, so
    `corpus[1].parquet` would read `corpus1.parquet`; each of [, * and ? goes in a class of its own."""
    return "".join(f"[{c}]" if c in "[*?" else c for c in str(path))


def check_text_column(files: list[Path], column: str) -> None:
    """Every file readable and holding `column` as strings; else an InputError naming both."""
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowException, OSError) as e:
            raise InputError(
                f,
                f"not a readable Parquet file ({type(e).__name__})",
                "pass Parquet files (e.g. written by pyarrow or pandas.to_parquet)",
            ) from e
        if column not in schema.names:
            raise InputError(f, f"missing column '{column}'; the file has columns {schema.names}", _FIX_COLUMN)
        kind = schema.field(column).type
        if not is_text_type(kind):
            raise InputError(f, f"has type {kind}, not string", _FIX_COLUMN, column=column)


def corpus_query(
    files: list[Path],
    column: str,
    min_chars: int | None,
    max_chars: int | None,
    sample: int | None,
    seed: int,
    count: bool = False,
) -> str:
    """SQL giving the distinct non-blank texts in order of first appearance (file, then row).

    A sample keeps a seeded pseudo-random subset (md5 of seed and text: the same
    on every machine and DuckDB version), still in order of first appearance.
    count: how many distinct texts there are instead (no sample).
    """
    # A row's place in the corpus: the rows of the files before its own, plus its row in its file. The
    # narrowest integer that holds it: first appearance is what the distinct texts are sorted by.
    rows = [pq.read_metadata(p).num_rows for p in files]
    place = "INTEGER" if sum(rows) < 2**31 else "BIGINT"
    sources = " UNION ALL ".join(
        f"SELECT ({before} + file_row_number)::{place} AS place, {_quote_ident(column)} AS text "
        f"FROM read_parquet({_quote_str(_literal_path(p))}, file_row_number = true)"
        for before, p in zip(itertools.accumulate(rows, initial=0), files)
    )
    # Blank: white space only, as Python's str.isspace (the pairs' and eval set's readers) counts it: \t-\r,
    # \x1c-\x1f, NEL and \p{Z} (the space, U+3000, no-break space). A text whose first byte is printable
    # ASCII other than the space is not, which two byte comparisons tell: only the others run the regex.
    blank = r"regexp_full_match(text, '[\t-\r\x1c-\x20\x85\p{Z}]*')"
    keep = ["text IS NOT NULL", f"((text >= '!' AND text < chr(127)) OR NOT {blank})"]
    if min_chars is not None:
        keep.append(f"length(text) >= {int(min_chars)}")
    if max_chars is not None:
        keep.append(f"length(text) <= {int(max_chars)}")
    query = (
        f"WITH src AS ({sources}), "
        f"firsts AS (SELECT text, min(place) AS first FROM src WHERE {' AND '.join(keep)} GROUP BY text)"
    )
    if count:
        query += " SELECT count(*) FROM firsts"
    elif sample is not None:
        query += (
            f", kept AS (SELECT * FROM firsts ORDER BY md5({int(seed)}::VARCHAR || ':' || text), first "
            f"LIMIT {int(sample)}) SELECT text AS caption FROM kept ORDER BY first"
        )
    else:
        query += " SELECT text AS caption FROM firsts ORDER BY first"
    return query


def _empty_corpus(source, column: str, min_chars: int | None, max_chars: int | None) -> InputError:
    filters = [f for f, v in (("--min-chars", min_chars), ("--max-chars", max_chars)) if v is not None]
    fix = f"relax {' and '.join(filters)}" if filters else "pass a corpus with text in that column"
    return InputError(
        source,
        "no text left after dropping nulls and blanks"
        + (f" and the length filter ({', '.join(filters)})" if filters else ""),
        fix,
        column=column,
    )


def check_corpus(
    source: str, column: str = "caption", min_chars: int | None = None, max_chars: int | None = None
) -> int:
    """Before any work: the corpus is readable, has `column` as strings and keeps some text after the
    filters; -> how many distinct texts pass them. Reads one column, counts in DuckDB."""
    files = parquet_files(source)
    check_text_column(files, column)
    query = corpus_query(files, column, min_chars, max_chars, None, 0, count=True)
    try:
        rows = duckdb.connect().execute(query).fetchone()[0]
    except duckdb.Error as e:
        raise InputError(
            source, f"cannot be read ({str(e).splitlines()[0]})", "pass valid Parquet files", column=column
        ) from e
    if rows == 0:
        raise _empty_corpus(source, column, min_chars, max_chars)
    return rows


@task(name="extract-corpus", **CACHED)
def extract_corpus(
    source: str,
    out: str,
    text_column: str = "caption",
    min_chars: int | None = None,
    max_chars: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    fingerprint: str = "",
) -> dict:
    """Parquet file/folder/glob -> out (one `caption` column); -> {"path", "rows", "fingerprint"}.

    Nulls and blank strings are dropped and exact duplicates removed, keeping
    each text's first appearance. `fingerprint` (of the source files) is part
    of the cache key only.
    """
    files = parquet_files(source)
    check_text_column(files, text_column)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    # DuckDB writes the Parquet itself (COPY keeps the query's order), in parallel with the sort: no
    # Arrow copy of the corpus in Python
    query = corpus_query(files, text_column, min_chars, max_chars, sample, seed)
    try:
        # every text is distinct: a dictionary page never pays, and building one to drop it costs time
        copy = f"COPY ({query}) TO {_quote_str(str(tmp))} (FORMAT parquet, DICTIONARY_SIZE_LIMIT 1)"
        rows = duckdb.connect().execute(copy).fetchone()[0]
    except duckdb.Error as e:
        tmp.unlink(missing_ok=True)
        raise InputError(
            source, f"cannot be read ({str(e).splitlines()[0]})", "pass valid Parquet files", column=text_column
        ) from e
    if rows == 0:
        tmp.unlink(missing_ok=True)
        raise _empty_corpus(source, text_column, min_chars, max_chars)
    os.replace(tmp, out)  # atomic: no half-written corpus looks finished
    log().info("corpus: %d distinct texts from %d file(s) -> %s", rows, len(files), out)
    # Its content's fingerprint keys the steps that read it: an edited corpus with as many rows is new input.
    return {"path": str(out), "rows": rows, "fingerprint": fingerprint_content(out)}


@task(name="ensure-world", **CACHED)
def ensure_world(spec: dict, out: str) -> dict:
    """The built-in world (worlds.shapes) with WorldSpec fields `spec`, written once into the folder `out`;
    -> the paths of its corpus, pairs and eval Parquet files."""
    from worlds import shapes

    paths = {k: str(Path(out) / f"{k}.parquet") for k in ("corpus", "pairs", "eval")}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    return shapes.write_world(out, shapes.WorldSpec(**spec))
