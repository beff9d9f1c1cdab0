"""The search service: bad input is a 4xx, answers match brute force, champion hot swap, progressive backfill."""

import io
import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from serving import NEW, OLD, make_world, procrustes_bundle, register
from test_backfill import mixed_reference
from test_search import assert_same_ranking, brute_force, xbt

from xbtcore import search


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A world, an old-space index of its eval images, two Procrustes bundles, and a private registry."""
    import pyarrow.parquet as pq

    from serve.engine import load_query_model
    from serve.gallery import index_gallery

    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("XBT_STATE_DIR", str(root / "state"))
        world = make_world(root / "world", eval_images=64)
        captions = pq.read_table(world["eval"], columns=["caption"]).column("caption").to_pylist()
        index_gallery(load_query_model(OLD), world["eval"], "image", str(root / "idx"), chunk_rows=16)
        b1 = procrustes_bundle(root / "b1" / "bundle", captions[::2])
        b2 = procrustes_bundle(root / "b2" / "bundle", captions[1::2])
        yield {"root": root, "world": world, "captions": captions, "index": root / "idx", "b1": b1, "b2": b2}


@pytest.fixture
def client(setup):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.engine import Server

    return TestClient(create_app(Server(OLD, setup["index"], poll_s=0)))


def _eval_image(setup, row: int = 0) -> bytes:
    import pyarrow.parquet as pq

    return pq.read_table(setup["world"]["eval"], columns=["image"]).column("image")[row].as_py()


def test_every_bad_input_is_a_4xx_with_one_line_detail(client, setup):
    from PIL import Image

    from serve.app import MAX_K, MAX_UPLOAD_BYTES

    png = _eval_image(setup)
    json_type = {"content-type": "application/json"}

    def png_of(size):  # a few KB however many pixels: one grey level
        buf = io.BytesIO()
        Image.new("L", size).save(buf, format="PNG")
        return buf.getvalue()

    multipart = {"content-type": "multipart/form-data; boundary=xbt"}
    part = b'--xbt\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n'
    cases = [
        ({"json": {"text": "", "k": 5}}, 422, "empty"),
        ({"json": {"text": "   "}}, 422, "empty"),
        ({"json": {"k": 5}}, 422, "missing text"),
        ({"json": {"text": 7}}, 422, "must be a string"),
        ({"json": ["a red circle"]}, 422, "JSON object"),
        ({"content": b"{not json", "headers": json_type}, 400, "not valid JSON"),
        ({"json": {"text": "a red circle", "k": 0}}, 422, f"from 1 to {MAX_K}"),
        ({"json": {"text": "a red circle", "k": MAX_K + 1}}, 422, f"from 1 to {MAX_K}"),
        ({"json": {"text": "a red circle", "k": "many"}}, 422, "integer"),
        ({"json": {"text": "a red circle", "k": "5"}}, 422, "integer"),  # a form's k is text; JSON's a number
        ({"json": {"text": "a red circle", "k": 2.5}}, 422, "integer"),
        ({"json": {"text": "a red circle", "k": True}}, 422, "integer"),
        ({"content": b'{"text": "a red circle", "k": 1e400}', "headers": json_type}, 422, "integer"),
        ({"content": b'{"text": "a red circle", "k": NaN}', "headers": json_type}, 422, "integer"),
        ({"content": b"[" * 100_000, "headers": json_type}, 400, "not valid JSON"),
        ({"content": b'{"text": "\xff"}', "headers": json_type}, 400, "not valid JSON"),
        ({"content": b'{"text": "\\ud800"}', "headers": json_type}, 422, "lone surrogate at character 0"),
        ({"content": b'{"text": "a \\udfff b", "k": 0}', "headers": json_type}, 422, "lone surrogate"),
        ({"files": {"image": ("x.png", b"not an image", "image/png")}, "data": {"k": "3"}}, 422, "does not decode"),
        ({"files": {"image": ("x.png", png[: len(png) // 2], "image/png")}}, 422, "does not decode"),
        ({"files": {"image": ("x.png", b"", "image/png")}}, 422, "empty"),
        ({"files": {"image": ("x.png", png, "image/png")}, "data": {"k": "-1"}}, 422, f"from 1 to {MAX_K}"),
        ({"files": {"image": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 1), "image/png")}}, 413, str(MAX_UPLOAD_BYTES)),
        ({"content": b"a red circle", "headers": {"content-type": "text/plain"}}, 415, "x-www-form-urlencoded"),
        ({"data": {"k": "3"}}, 422, "missing text"),
        ({"files": {"image": ("x.png", png, "image/png")}, "data": {"text": "a red circle"}}, 422, "both text and"),
        ({"files": {"k": (None, "3")}, "data": {"image": "q.png"}}, 422, "image must be a file"),
        ({"content": b"text=%FF\xff", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 400, "ASCII"),
        # chunked, so no Content-Length to refuse it by: cut off as it streams in
        ({"content": iter([b'{"text": "', b"y" * (MAX_UPLOAD_BYTES + 100_000), b'"}']), "headers": json_type}, 413,
         str(MAX_UPLOAD_BYTES)),
        ({"content": iter([b"text=", b"y" * (MAX_UPLOAD_BYTES + 100_000)]),
          "headers": {"content-type": "application/x-www-form-urlencoded"}}, 413, str(MAX_UPLOAD_BYTES)),
        ({"content": iter([part, b"y" * (MAX_UPLOAD_BYTES + 100_000)]), "headers": multipart}, 413,
         str(MAX_UPLOAD_BYTES)),
        ({"files": {"image": ("thin.png", png_of((2000, 1)), "image/png")}}, 422, "at most 50 times its short side"),
        ({"files": {"image": ("huge.png", png_of((8000, 7000)), "image/png")}}, 422, "the limit is 50,000,000"),
        ({"files": {"image": ("x.png", png, "image/png")}, "data": {"k": "1_0"}}, 422, "integer"),
        ({"files": {"image": ("x.png", png, "image/png")}, "data": {"k": "+5"}}, 422, "integer"),
        ({"files": {"image": ("x.png", png, "image/png"), "k": ("k.txt", b"5", "text/plain")}}, 422, "not a file"),
    ]  # fmt: skip
    for kwargs, status, needle in cases:
        r = client.post("/search", **kwargs)
        assert r.status_code == status, (kwargs.get("json"), r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and needle in detail, (status, detail)
    for missing in ("no-such-id", "--5", "-", "5-"):
        assert client.get(f"/items/{missing}").status_code == 404, missing


def test_answers_carry_the_version_and_match_brute_force(client, setup):
    from xbtcore.encoders import DualEncoder

    index = search.GalleryIndex(setup["index"])
    query = setup["captions"][3]
    r = client.post("/search", json={"text": query, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    form = client.post("/search", data={"text": query, "k": "7"})  # a plain HTML form
    assert form.status_code == 200 and form.json()["results"] == body["results"], form.text
    assert set(body) == {"model", "model_version", "space", "results"}
    assert body["model"] == OLD and body["space"] == index.space and body["model_version"]
    q = DualEncoder.from_pretrained(OLD).embed_texts([query])[0].numpy()
    assert_same_ranking(body["results"], brute_force(index.vectors(), index.ids, q, 7))

    png = _eval_image(setup, 5)
    r = client.post("/search", files={"image": ("q.png", png, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["id"] == index.ids[json.loads((setup["index"] / "source_rows.json").read_text()).index(5)]
    assert top["score"] == pytest.approx(1.0, abs=1e-4)  # the image itself

    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == len(index) and health["space"] == index.space
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text and "model_version" in page.text
    item = client.get(f"/items/{top['id']}")
    assert item.status_code == 200 and item.content == png and item.headers["content-type"] == "image/png"


def test_a_served_exact_index_scans_int8_codes_and_answers_as_brute_force(setup, monkeypatch):
    from serve.engine import Engine, embed_query, load_query_model
    from xbtcore.backfill import MixedGallery

    monkeypatch.setattr(search, "QUANTIZED_MIN_ROWS", 1)  # the test gallery is small
    engine = Engine(load_query_model(OLD), MixedGallery(setup["index"]))
    old = engine.gallery.old
    assert old.codes is not None  # made before the first request
    vectors = old.vectors()
    for text in setup["captions"][:6]:
        q = embed_query(engine.old_encoder, text)
        assert_same_ranking(engine.search(10, text=text)["results"], brute_force(vectors, old.ids, q, 10))


def test_concurrent_text_queries_share_batches_and_each_gets_its_own_answer(setup):
    from serve.engine import Engine, load_query_model
    from xbtcore.backfill import MixedGallery
    from xbtcore.encoders import DualEncoder

    engine = Engine(load_query_model(OLD), MixedGallery(setup["index"]))
    run = engine.text_batches.run

    def slow_run(items):  # a forward pass and scan long enough that the other callers queue behind it
        time.sleep(0.05)
        return run(items)

    engine.text_batches.run = slow_run
    queries = setup["captions"][:24]
    got: dict = {}
    start = threading.Barrier(len(queries))

    def ask(i):
        start.wait()
        got[i] = engine.search(1 + i % 9, text=queries[i])["results"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert engine.text_batches.items == len(queries) and engine.text_batches.batches < len(queries)
    index = search.GalleryIndex(setup["index"])
    alone = DualEncoder.from_pretrained(OLD).embed_texts(queries).numpy()  # (Q, D)
    for i, q in enumerate(alone):
        assert_same_ranking(got[i], brute_force(index.vectors(), index.ids, q, 1 + i % 9))


def test_a_model_of_another_space_is_refused(setup):
    from serve.engine import Server, SpaceMismatch

    index = search.GalleryIndex(setup["index"])
    with pytest.raises(SpaceMismatch, match=f"holds {index.space}"):
        Server(NEW, setup["index"], poll_s=0)
    Server(str(setup["b1"]), setup["index"], poll_s=0)  # a bundle of the gallery's model: its compatible space


def test_serve_refuses_a_batch_wait_or_poll_out_of_range_before_loading_anything(setup):
    r = xbt("serve", "--index", setup["index"], "--model", OLD, "--batch-wait-ms", "-1")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["xbt: error: --batch-wait-ms must be from 0 to 1000, got -1"]
    for poll in ("-1", "nan"):
        r = xbt("serve", "--index", setup["index"], "--model", OLD, "--poll-seconds", poll)
        assert r.returncode != 0 and r.stderr.strip().splitlines() == [
            f"xbt: error: --poll-seconds must be 0 (never) or a positive number of seconds, got {poll}"
        ], r.stderr


def test_an_item_whose_id_holds_a_slash_is_served_at_its_url(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.engine import Server, load_query_model
    from serve.gallery import index_gallery

    table = pq.read_table(setup["world"]["eval"]).slice(0, 12)
    paths = [f"imgs/{i}.png" for i in table.column("image_id").to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(paths)),
                   tmp_path / "paths.parquet")  # fmt: skip
    index_gallery(load_query_model(OLD), str(tmp_path / "paths.parquet"), "image", str(tmp_path / "idx"))
    client = TestClient(create_app(Server(OLD, tmp_path / "idx", poll_s=0)))
    hit = client.post("/search", json={"text": setup["captions"][0], "k": 1}).json()["results"][0]["id"]
    assert "/" in hit
    from urllib.parse import quote

    for url in (f"/items/{quote(hit, safe='')}", f"/items/{hit}"):  # as the page asks for it, and as typed
        r = client.get(url)
        assert r.status_code == 200 and r.content == table.column("image")[paths.index(hit)].as_py(), url


def test_serve_on_a_port_in_use_fails_in_one_line_before_loading_anything(setup):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = xbt("serve", "--index", setup["index"], "--model", OLD, "--port", str(port))
    assert r.returncode != 0 and "serving" not in r.stdout
    assert r.stderr.strip().splitlines() == [
        f"xbt: error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use): "
        "pass a free --port, or stop the server that holds it"
    ]
    for bad in ("99999", "-1", "http"):
        r = xbt("serve", "--index", setup["index"], "--model", OLD, "--port", bad)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"xbt: error: xbt serve: argument --port: {bad!r} is not a TCP port (0 to 65535) (see --help)"
        ], r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_champion_swaps_and_rolls_back_under_load_without_a_failed_request(setup, monkeypatch):
    import httpx

    from serve.app import create_app
    from serve.engine import Server
    from tasks import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{setup['root'] / 'mlflow.db'}")
    monkeypatch.setenv("XBT_STATE_DIR", str(setup["root"] / "state"))
    first = register(setup["b1"], "v1")
    name = first["name"]
    server = Server(f"models:/{name}@champion", setup["index"], poll_s=0.2)
    server.start()
    web, thread, port = _listen(create_app(server))

    answers: list[tuple[int, str]] = []  # (status, version) of every request, in order per client
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while not stop.is_set():
                r = http.post("/search", json={"text": "a red circle", "k": 5})
                answers.append((r.status_code, r.json().get("model_version")))

    clients = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in clients:
            t.start()
        assert _wait(lambda: len(answers) >= 5, 30)
        second = register(setup["b2"], "v2")  # the gate passed: champion moves to version 2
        assert second["version"] != first["version"]
        assert _wait(lambda: answers[-1][1] == second["version"], 60), answers[-3:]
        registry.rollback(registry.client(), name)  # what `xbt rollback` does
        assert _wait(lambda: answers[-1][1] == first["version"], 60), answers[-3:]
        n = len(answers)
        assert _wait(lambda: len(answers) >= n + 5, 30)
    finally:
        stop.set()
        for t in clients:
            t.join(30)
        web.should_exit = True
        thread.join(30)
        server.stop()
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    seen = [v for _, v in answers]
    assert {first["version"], second["version"]} == set(seen) and server.swaps == 2


def _listen(app):
    """uvicorn serving `app` on a free loopback port, in a thread. -> (server, thread, port)"""
    import uvicorn

    port = _free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    assert _wait(lambda: web.started, 30)
    return web, thread, port


@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium (apt-get install -y chromium)")
def test_the_page_shows_results_in_a_headless_browser(setup):
    import re
    import subprocess

    from serve.app import create_app
    from serve.engine import Server

    web, thread, port = _listen(create_app(Server(OLD, setup["index"], poll_s=0)))
    try:
        r = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"http://127.0.0.1:{port}/?q=a+red+circle&k=4",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        web.should_exit = True
        thread.join(30)
    dom = r.stdout
    shown = re.findall(
        r'<figure class="hit"><img src="items/([^"$]+)"', dom
    )  # rendered hits, not the script's template
    assert len(shown) == 4, (r.returncode, r.stderr[-500:], dom[-1500:])
    assert set(shown) <= set(search.GalleryIndex(setup["index"]).ids)
    assert f"4 results from {OLD} version" in dom  # the answering version


def _wait(predicate, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_backfill_resumes_after_a_crash_and_the_mixed_gallery_merges_both_spaces(setup, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from serve.engine import Engine, Server, SpaceMismatch, load_query_model
    from serve.gallery import backfill, backfill_status, discard_backfill, index_gallery, remove_old
    from xbtcore.backfill import MixedGallery
    from xbtcore.bundle import load_compatible
    from xbtcore.data import InputError
    from xbtcore.encoders import DualEncoder
    from xbtcore.lock import exclusive

    index = tmp_path / "idx"
    shutil.copytree(setup["index"], index)
    old = search.GalleryIndex(index)
    model = load_query_model(str(setup["b1"]))
    server = Server(str(setup["b1"]), index, poll_s=0)  # serving while the backfill runs
    assert server.engine.space == old.space and not server.refresh()
    before = backfill_status(str(index))  # none started: every item waits in the index's own space
    assert (before["items"], before["backfilled"], before["fraction"]) == (len(old.ids), 0, 0.0)
    assert before["old_space"] == old.space and before["space"] is None and not before["complete"]
    for not_an_index, why in ((tmp_path / "nowhere", "no such index folder"), (tmp_path, "not a finished index")):
        for call in (backfill_status, discard_backfill, remove_old):
            with pytest.raises(ValueError, match=why):
                call(str(not_an_index))
    assert not discard_backfill(str(index))  # nothing to discard
    backfill(str(index), model, chunk_rows=16, stop_after=2)  # a crash after 2 of 4 chunks ...
    with pytest.raises(ValueError, match="started in the order isolated-first: resume it without --order"):
        backfill(str(index), model, order="random", chunk_rows=16)  # the order is fixed when a backfill starts
    (index / "backfill" / "chunks" / "00002.npy.tmp").write_bytes(b"half a chunk")  # ... while writing the 3rd
    status = backfill_status(str(index))
    assert status["backfilled"] == 32 and not status["complete"] and status["space"] == model.own_space
    with exclusive(index, "xbt backfill", "wait"):  # another process writing the index: every writer is refused
        for call in (
            lambda: backfill(str(index), model, chunk_rows=16),
            lambda: discard_backfill(str(index)),
            lambda: remove_old(str(index)),
            lambda: index_gallery(load_query_model(OLD), setup["world"]["eval"], "image", str(index), chunk_rows=16),
        ):
            with pytest.raises(InputError, match=rf"xbt backfill \(pid {os.getpid()}\) is writing there: wait"):
                call()
    assert backfill_status(str(index)) == status

    # The mixed gallery: backfilled ids by the new model's own query, the rest by the compatible one.
    images = pq.read_table(setup["world"]["eval"], columns=["image"]).column("image").to_pylist()
    rows = json.loads((index / "source_rows.json").read_text())
    new_enc, compat = DualEncoder.from_pretrained(NEW), load_compatible(setup["b1"])[0]
    own = _embed_images(new_enc, [images[r] for r in rows])  # (N, D_new) every item in the new space
    query = setup["captions"][10]
    q_old, q_new = compat.embed_texts([query])[0].numpy(), new_enc.embed_texts([query])[0].numpy()
    engine = Engine(model, MixedGallery(index))
    moved = engine.gallery.new_ids
    assert len(set(moved)) == 32 and engine.space == f"{old.space}+{model.own_space}"
    vectors = old.vectors()
    s_old = {i: float(vectors[r] @ q_old) for r, i in enumerate(old.ids)}
    s_new = {i: float(own[r] @ q_new) for r, i in enumerate(old.ids)}
    expected = mixed_reference(s_old, s_new, moved, 10)
    assert_same_ranking(engine.search(10, text=query)["results"], expected)
    assert (
        server.refresh()
        and server.engine.search(10, text=query)["results"] == engine.search(10, text=query)["results"]
    )
    # A model whose own space is not the backfill's searches the old index whole.
    plain = Engine(load_query_model(OLD), MixedGallery(index))
    assert plain.new_encoder is None and len(plain.search(64, text=query)["results"]) == 64

    # The same command resumes: every id exactly once, in the new space.
    r = xbt("backfill", "--index", index, "--new", setup["b1"], "--chunk-rows", "16")
    assert r.returncode == 0, r.stderr
    assert "64 of 64 items" in r.stdout and "complete" in r.stdout
    assert f"`xbt backfill --index {index} --remove-old`" in r.stdout  # the command as it runs
    done = search.GalleryIndex(index / "backfill")
    assert len(done.ids) == len(set(done.ids)) == len(old) and set(done.ids) == set(old.ids)
    np.testing.assert_allclose(done.vectors(), own[[old.row_of[i] for i in done.ids]], atol=1e-5)

    # At 100% the new model's own query alone, no adapter; the old index is still there until removed.
    monkeypatch.setattr(search, "QUANTIZED_MIN_ROWS", 1)  # the new space's index scanned by its int8 codes
    engine = Engine(model, MixedGallery(index))
    assert engine.space == model.own_space and not engine.searches_old and engine.gallery.new_codes is not None
    assert server.refresh() and server.engine.space == model.own_space and not server.refresh()
    hits = engine.search(10, text=query)["results"]
    assert_same_ranking(hits, brute_force(own, old.ids, q_new, 10))
    assert search.is_complete(index) and search.GalleryIndex(index).space == old.space
    assert Engine(load_query_model(NEW), MixedGallery(index)).search(10, text=query)["results"] == hits  # no bundle
    remove_old(str(index))
    assert search.GalleryIndex(index).space == model.own_space and not (index / "backfill").exists()
    with pytest.raises(ValueError, match=f"already holds the new space {model.own_space} only: nothing to remove"):
        remove_old(str(index))
    assert Engine(model, MixedGallery(index)).search(10, text=query)["results"] == hits
    with pytest.raises(SpaceMismatch, match=f"holds {model.own_space}"):  # the old model's queries no longer fit
        Engine(load_query_model(OLD), MixedGallery(index))


def test_backfill_takes_the_learned_order_from_an_upgrades_bundle_and_isolated_first_without_one(setup, tmp_path):
    from serve.engine import load_query_model
    from serve.gallery import backfill, index_gallery
    from xbtcore.backfill import GainModel, backfill_order
    from xbtcore.bundle import GAIN_FILE
    from xbtcore.search import read_plan

    old = search.GalleryIndex(setup["index"])
    rng = np.random.default_rng(0)
    gain = GainModel(tuple(rng.standard_normal(3 + old.vectors().shape[1] + 1).tolist()), old.vectors().shape[1], {})
    bundle = tmp_path / "bundle"
    shutil.copytree(setup["b1"], bundle)
    (bundle / GAIN_FILE).write_text(json.dumps(gain.to_dict()))
    for model, order, expected in ((bundle, "learned", gain), (setup["b1"], "isolated-first", None)):
        index = tmp_path / f"idx-{order}"
        shutil.copytree(setup["index"], index)
        backfill(str(index), load_query_model(str(model)), chunk_rows=16, stop_after=1)
        assert read_plan(index / "backfill")["order"] == order
        ids = json.loads((index / "backfill" / "ids.json").read_text())
        assert ids == [old.ids[r] for r in backfill_order(old.vectors(), order, gain=expected)]
    texts = tmp_path / "texts"  # a gallery of captions: the gain model is fitted for images
    index_gallery(load_query_model(OLD), setup["world"]["eval"], "text", str(texts), chunk_rows=16)
    r = xbt("backfill", "--index", texts, "--new", bundle, "--order", "learned")
    assert r.returncode != 0 and "holds texts and the learned order is fitted for an image gallery" in r.stderr
    assert not (texts / "backfill").exists()
    r = xbt("backfill", "--index", setup["index"], "--new", NEW, "--order", "learned")
    assert r.returncode != 0 and "needs the gain model" in r.stderr


def test_the_server_searches_qdrant_and_follows_its_alias_to_a_finished_backfill(setup, tmp_path):
    pytest.importorskip("qdrant_client")
    from serve import qdrant
    from serve.engine import Server, load_query_model
    from serve.gallery import backfill
    from xbtcore.encoders import DualEncoder

    index = tmp_path / "idx"
    shutil.copytree(setup["index"], index)
    client = qdrant.connect(str(tmp_path / "qdrant"))  # embedded local mode
    with pytest.raises(ValueError, match="no alias xbt-gallery"):
        Server(str(setup["b1"]), index, poll_s=0, qdrant=client)
    qdrant.export(index, client)
    on_faiss = Server(str(setup["b1"]), index, poll_s=0)
    server = Server(str(setup["b1"]), index, poll_s=0, qdrant=client)
    for query in setup["captions"][:6:2]:
        expected = [(h["id"], h["score"]) for h in on_faiss.engine.search(7, text=query)["results"]]
        assert_same_ranking(server.engine.search(7, text=query)["results"], expected)

    model = load_query_model(str(setup["b1"]))
    backfill(str(index), model, chunk_rows=16)
    assert not server.refresh()  # a finished backfill not yet in Qdrant: the alias still answers
    qdrant.export(index / "backfill", client)  # what `xbt backfill --qdrant` does at the end: the alias moves
    assert server.refresh() and server.engine.space == model.own_space and not server.refresh()
    done = search.GalleryIndex(index / "backfill")
    query = setup["captions"][10]
    q_new = DualEncoder.from_pretrained(NEW).embed_texts([query])[0].numpy()
    assert_same_ranking(
        server.engine.search(10, text=query)["results"], brute_force(done.vectors(), done.ids, q_new, 10)
    )

    from qdrant_client import models

    client.create_collection("xbt-other-0", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    qdrant.point_alias(client, qdrant.ALIAS, "xbt-other-0")
    with pytest.raises(ValueError, match="holds neither index"):
        Server(str(setup["b1"]), index, poll_s=0, qdrant=client)


def test_xbt_search_and_serve_take_qdrant(setup, tmp_path):
    pytest.importorskip("qdrant_client")
    from serve import qdrant

    client = qdrant.connect(str(tmp_path / "qdrant"))
    qdrant.export(setup["index"], client)
    client.close()  # embedded mode: one process holds the folder at a time
    args = ["search", "--index", setup["index"], "--model", OLD, "--text", setup["captions"][4], "--k", "5"]
    plain, on_qdrant = xbt(*args), xbt(*args, "--qdrant", tmp_path / "qdrant")
    assert plain.returncode == 0 and on_qdrant.returncode == 0, on_qdrant.stderr
    expected = [(h["id"], h["score"]) for h in json.loads(plain.stdout)["results"]]
    assert_same_ranking(json.loads(on_qdrant.stdout)["results"], expected)
    assert "--qdrant" in xbt("serve", "--help").stdout
    typo = tmp_path / "qdrnat"
    r = xbt(*args, "--qdrant", typo)
    assert r.returncode == 1 and "no such folder" in r.stderr and not typo.exists()  # a search creates nothing
    holder = qdrant.connect(str(tmp_path / "qdrant"))  # as a running `xbt serve --qdrant` holds it
    try:
        r = xbt(*args, "--qdrant", tmp_path / "qdrant")
        assert r.returncode == 1 and "is held by another process" in r.stderr, r.stderr
    finally:
        holder.close()


def _embed_images(encoder, blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    return encoder.embed_images([Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]).numpy()


def test_xbt_search_refuses_a_bad_query_in_one_line_naming_the_flag(setup):
    base = ["search", "--index", setup["index"], "--model", OLD]
    cases = [
        (["--text", "   "], "--text is empty"),
        (["--text", "\udcff\udcfe"], "--text is not valid Unicode"),  # a shell's non-UTF-8 bytes
        (["--text", "a red circle", "--k", "0"], "--k must be from 1 to"),
    ]
    for extra, needle in cases:
        r = xbt(*base, *extra)
        assert r.returncode != 0 and not r.stdout, (extra, r.stdout)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)


def test_remove_old_finishes_after_a_kill_at_any_step_and_leaves_folders_beside_the_index_alone(setup, tmp_path):
    from serve.engine import Engine, load_query_model
    from serve.gallery import _exchange, _swap_paths, backfill, backfill_status, remove_old
    from xbtcore.backfill import MixedGallery

    model = load_query_model(str(setup["b1"]))
    template = tmp_path / "template"
    shutil.copytree(setup["index"], template)
    backfill(str(template), model, chunk_rows=16)
    old_space = search.GalleryIndex(template).space

    def a_backfilled_index(name):
        index = tmp_path / name / "idx"
        shutil.copytree(template, index)
        return index, *_swap_paths(index)

    def removed(index):
        assert search.GalleryIndex(index).space == model.own_space and not (index / "backfill").exists()
        assert sorted(p.name for p in index.parent.iterdir()) == sorted(["idx", *mine])

    # the user's own folders next to the index, with names a swap might have taken
    index, staged, retired = a_backfilled_index("neighbours")
    mine = ["idx.old", "idx.new", "idx.bak"]
    for name in mine:
        (index.parent / name).mkdir()
        (index.parent / name / "notes.txt").write_text("mine")
    remove_old(str(index))
    removed(index)
    assert all((index.parent / name / "notes.txt").read_text() == "mine" for name in mine)
    status = backfill_status(str(index))  # what the index holds now, not a backfill waiting to start
    assert (status["space"], status["old_space"], status["fraction"]) == (model.own_space, old_space, 1.0)
    assert status["complete"] and status["old_removed"] and status["backfilled"] == status["items"]
    assert Engine(model, MixedGallery(index)).describe()["backfilled"] == 1.0

    mine = []
    index, staged, retired = a_backfilled_index("killed-after-staging")
    os.replace(index / "backfill", staged)
    remove_old(str(index))  # the backfill goes back and the removal runs
    removed(index)

    index, staged, retired = a_backfilled_index("killed-after-the-exchange")
    os.replace(index / "backfill", staged)
    if not _exchange(staged, index):
        pytest.skip("this file system cannot exchange two folders")
    assert search.GalleryIndex(index).space == model.own_space  # the new index serves at once
    assert remove_old(str(index))["space"] == model.own_space  # finishing: the old index removed
    removed(index)

    index, staged, retired = a_backfilled_index("killed-between-two-renames")  # where exchange is missing
    os.replace(index / "backfill", staged)
    os.replace(index, retired)
    remove_old(str(index))
    removed(index)
    assert old_space != model.own_space


def test_no_index_goes_into_a_folder_of_other_files_and_a_changed_source_is_not_backfilled(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serve.engine import load_query_model
    from serve.gallery import backfill, index_gallery, source_item
    from xbtcore.data import InputError

    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"thesis is not an index and holds other files \(chapter1.txt\)"):
        index_gallery(load_query_model(OLD), setup["world"]["eval"], "image", str(folder), chunk_rows=16)
    assert [p.name for p in folder.iterdir()] == ["chapter1.txt"]  # nothing written there, not even a lock
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(InputError, match=r"notes.parquet: not a readable Parquet file .*pass"):
        index_gallery(load_query_model(OLD), str(not_parquet), "image", str(tmp_path / "x"), chunk_rows=16)

    source = tmp_path / "gallery.parquet"
    table = pq.read_table(setup["world"]["eval"])
    pq.write_table(table, source)
    index = tmp_path / "idx"
    index_gallery(load_query_model(OLD), str(source), "image", str(index), chunk_rows=16)
    first = search.GalleryIndex(index).ids[0]
    assert source_item(str(index), 0, first)[0] == _eval_image(setup, 0)  # the thumbnail the page shows
    time.sleep(0.01)  # a new modification time for the rewritten file
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), source)  # the same rows, reversed
    assert source_item(str(index), 0, first) is None  # another image sits at its row now: none is shown
    column = table.schema.get_field_index("image_id")
    pq.write_table(
        table.set_column(column, "image_id", pa.nulls(table.num_rows, table.schema.field(column).type)), source
    )
    assert source_item(str(index), 0, first) is None  # a source no longer readable: none either, not an error
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), source)
    model = load_query_model(str(setup["b1"]))
    with pytest.raises(ValueError, match=r"no longer holds ids .* where it did: restore the gallery source"):
        backfill(str(index), model, chunk_rows=16)
    source.unlink()
    with pytest.raises(ValueError, match=r"its gallery source cannot be read \(.*gallery.parquet"):
        backfill(str(index), model, chunk_rows=16)
    assert not (index / "backfill").exists()
