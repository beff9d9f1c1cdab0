"""extract_corpus (DuckDB) against an independent pandas reference."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.extract import extract_corpus
from xbtcore.data import InputError

FILE_A = ["a red circle", None, "  ", "a blue square", "a red circle", "\t\n", "two stars", "x", "\u3000", "\xa0 "]
# Blank is what Python's str.isspace says of every character: ASCII controls \v and \x1c-\x1f and NEL too.
# A text starting with a byte that is not printable ASCII (é, DEL, a tab) is told blank or not by the regex.
FILE_B = ["two stars", "a green hexagon", "", "a blue square ", "a long caption with many many words"]
FILE_B += ["\x0b", "\x1c\x1f", "\x85 ", "\u2028", "\xe9t\xe9", "\x7f", "~", "!", "\tx", "\u3000y"]


def _reference(frames: list[list], min_chars=None, max_chars=None) -> list[str]:
    """Nulls and blanks dropped, exact duplicates removed, order of first appearance (pandas)."""
    s = pd.concat([pd.Series(f, dtype="object") for f in frames], ignore_index=True).dropna()
    s = s[s.str.strip() != ""]
    if min_chars is not None:
        s = s[s.str.len() >= min_chars]
    if max_chars is not None:
        s = s[s.str.len() <= max_chars]
    return s.drop_duplicates(keep="first").tolist()


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    pq.write_table(
        pa.table({"caption": pa.array(FILE_A, pa.string()), "n": list(range(len(FILE_A)))}), d / "a.parquet"
    )
    pq.write_table(
        pa.table({"caption": pa.array(FILE_B, pa.string()), "n": list(range(len(FILE_B)))}), d / "b.parquet"
    )
    return d


def _run(source, tmp_path, **kw):
    out = extract_corpus.fn(str(source), str(tmp_path / "out" / "corpus.parquet"), **kw)
    return out, pq.read_table(out["path"]).column("caption").to_pylist()


def test_folder_matches_pandas_reference(corpus_dir, tmp_path):
    out, texts = _run(corpus_dir, tmp_path)
    assert texts == _reference([FILE_A, FILE_B])
    assert out["rows"] == len(texts)
    assert "a blue square " in texts and "a blue square" in texts  # exact duplicates only


def test_glob_and_single_file(corpus_dir, tmp_path):
    assert _run(corpus_dir / "*.parquet", tmp_path)[1] == _reference([FILE_A, FILE_B])
    assert _run(corpus_dir / "b.parquet", tmp_path)[1] == _reference([FILE_B])


def test_file_names_with_glob_characters_are_read_as_they_are(tmp_path):
    # DuckDB reads any path as a glob: `c[1].parquet` matched `c1.parquet`, `c?.parquet` also `cA.parquet`.
    d = tmp_path / "odd names"
    d.mkdir()
    for name, texts in (
        ("c[1].parquet", FILE_A),
        ("c1.parquet", ["decoy"]),
        ("c?.parquet", FILE_B),
        ("cA.parquet", ["b"]),
    ):
        pq.write_table(pa.table({"caption": pa.array(texts, pa.string())}), d / name)
    assert _run(d / "c[1].parquet", tmp_path)[1] == _reference([FILE_A])
    assert _run(d / "c?.parquet", tmp_path)[1] == _reference([FILE_B])


def test_length_filter(corpus_dir, tmp_path):
    assert _run(corpus_dir, tmp_path, min_chars=2, max_chars=20)[1] == _reference([FILE_A, FILE_B], 2, 20)


def test_sample_is_a_deterministic_subset_in_corpus_order(corpus_dir, tmp_path):
    full = _reference([FILE_A, FILE_B])
    a = _run(corpus_dir, tmp_path, sample=3, seed=7)[1]
    assert a == _run(corpus_dir, tmp_path, sample=3, seed=7)[1]
    assert len(a) == 3 and a == [t for t in full if t in a]
    assert _run(corpus_dir, tmp_path, sample=3, seed=8)[1] != a or len(full) == 3


def test_text_column(tmp_path):
    pq.write_table(pa.table({"text": ["b", "a", "b"]}), tmp_path / "t.parquet")
    assert _run(tmp_path / "t.parquet", tmp_path, text_column="text")[1] == ["b", "a"]


def test_pandas_category_column_reads_as_text(tmp_path):
    # pandas writes a `category` column dictionary-encoded; it holds strings all the same.
    pd.DataFrame({"caption": pd.Series(FILE_A, dtype="category")}).to_parquet(tmp_path / "c.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "c.parquet").field("caption").type)
    assert _run(tmp_path / "c.parquet", tmp_path)[1] == _reference([FILE_A])


def test_missing_column_names_file_and_column(corpus_dir, tmp_path):
    with pytest.raises(InputError, match=r"a\.parquet: missing column 'text'.*--text-column"):
        _run(corpus_dir, tmp_path, text_column="text")


def test_non_string_column(corpus_dir, tmp_path):
    with pytest.raises(InputError, match=r"column 'n': has type int64"):
        _run(corpus_dir, tmp_path, text_column="n")


def test_unreadable_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet file"):
        _run(tmp_path / "bad.parquet", tmp_path)


def test_empty_result(tmp_path):
    pq.write_table(pa.table({"caption": pa.array([None, " ", ""], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(InputError, match=r"e\.parquet: column 'caption': no text left"):
        _run(tmp_path / "e.parquet", tmp_path)
    assert not (tmp_path / "out" / "corpus.parquet").exists()


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        _run(tmp_path / "nope.parquet", tmp_path)
