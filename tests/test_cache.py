"""The embedding cache: computed once, reused, resumable after a crash."""

import json

import pytest
import torch

from xbtcore.cache import CacheStats, EmbeddingCache, fingerprint_texts


def _embed_factory(calls):
    def embed(a, b):
        calls.append((a, b))
        return torch.arange(a, b, dtype=torch.float32)[:, None].repeat(1, 3)

    return embed


def test_second_call_computes_nothing(tmp_path):
    cache, calls = EmbeddingCache(tmp_path), []
    first = cache.get_or_compute("m", "d", "text", 10, _embed_factory(calls), shard_rows=4)
    assert calls == [(0, 4), (4, 8), (8, 10)]
    stats = CacheStats()
    again = cache.get_or_compute("m", "d", "text", 10, _embed_factory(calls), shard_rows=4, stats=stats)
    assert len(calls) == 3 and stats.computed_rows == 0 and stats.reused_rows == 10
    assert torch.equal(first, again) and first[:, 0].tolist() == list(range(10))
    assert cache.is_complete("m", "d", "text")


def test_crash_mid_way_resumes_missing_shards_only(tmp_path):
    cache, calls = EmbeddingCache(tmp_path), []

    def flaky(a, b):
        if a == 8:
            raise RuntimeError("killed")
        return _embed_factory(calls)(a, b)

    with pytest.raises(RuntimeError):
        cache.get_or_compute("m", "d", "text", 10, flaky, shard_rows=4)
    assert not cache.is_complete("m", "d", "text")
    calls.clear()
    out = cache.get_or_compute("m", "d", "text", 10, _embed_factory(calls), shard_rows=4)
    assert calls == [(8, 10)]
    assert out[:, 0].tolist() == list(range(10))


def test_keys_separate_models_and_data(tmp_path):
    cache = EmbeddingCache(tmp_path)
    assert fingerprint_texts(["a", "b"]) != fingerprint_texts(["ab"])
    cache.get_or_compute("m1", "d", "text", 2, _embed_factory([]))
    assert not cache.is_complete("m2", "d", "text")
    manifest = json.loads((cache.entry_dir("m1", "d", "text") / "manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["dim"] == 3


def test_model_fingerprint_sees_an_edit_inside_a_large_weights_file(tmp_path):
    import os

    from xbtcore.cache import fingerprint_model

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(5 << 20))  # 5 MiB: the first and last MiB are hashed, the middle is not
    (tmp_path / "config.json").write_text("{}")
    before, space = fingerprint_model(str(tmp_path), with_mtime=True), fingerprint_model(str(tmp_path))
    st = weights.stat()
    with weights.open("r+b") as fh:  # same size, same head and tail
        fh.seek(2 << 20)
        fh.write(b"\x01" * 64)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a later write, on any clock granularity
    assert weights.stat().st_size == st.st_size
    assert fingerprint_model(str(tmp_path), with_mtime=True) != before  # the embedding cache's key
    edited = fingerprint_model(str(tmp_path))
    assert edited != space  # a gallery space's id: another checkpoint is another space
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))  # touched again, same bytes
    assert fingerprint_model(str(tmp_path)) == edited  # ... and is about content, not mtimes


def test_a_file_digest_is_remembered_across_processes_by_path_size_and_mtime(tmp_path, monkeypatch):
    import os

    from xbtcore import cache

    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = cache.file_digest(weights)
    assert len(list((tmp_path / "state" / "digests").iterdir())) == 1
    monkeypatch.setattr(cache, "_DIGESTS", {})  # a new process: only the state folder remembers
    st = weights.stat()
    with weights.open("r+b") as fh:  # the same bytes' memo is read, not the file
        fh.write(b"b")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.file_digest(weights) == first
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a write the stat sees
    assert cache.file_digest(weights) != first


def test_a_model_folder_is_one_space_however_its_path_is_spelled(tmp_path, monkeypatch):
    import os
    import shutil

    from tasks.common import absolute_ref
    from tasks.registry import space_of

    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    model = tmp_path / "models" / "clip-old"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "link").symlink_to(model)
    shutil.copytree(model, tmp_path / "elsewhere" / "clip-old")
    monkeypatch.chdir(tmp_path / "models")
    spellings = ["clip-old", "./clip-old/", str(model), "../models/clip-old", f"{tmp_path}/link", "../link"]
    spaces = {space_of(absolute_ref(s)) for s in spellings} | {space_of(str(tmp_path / "elsewhere" / "clip-old"))}
    assert len(spaces) == 1 and spaces.pop().startswith("clip-old-")
    weights = model / "model.safetensors"
    st = weights.stat()
    with weights.open("r+b") as fh:  # another checkpoint in the same folder
        fh.seek(100)
        fh.write(b"\xff")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a later write, on any clock granularity
    assert space_of(absolute_ref("clip-old")) != space_of(str(tmp_path / "elsewhere" / "clip-old"))
