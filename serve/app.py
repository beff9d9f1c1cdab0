"""The HTTP API (CONTRACT.md "Search API") and the search page.

    GET  /health        200 with what answers (model, version, space, backfill share)
    POST /search        JSON {"text", "k"} or multipart (image, k) -> {"model", "model_version", "space", "results"}
    GET  /              the search page (/?q=TEXT&k=N runs a query on load)
    GET  /items/{id}    a gallery image's bytes, when the index keeps its image source

Bad input is a 4xx with a one-line `detail`; only a fault of the server itself is a 5xx.
"""

from __future__ import annotations

import io
import json
import re
from urllib.parse import parse_qsl

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # one query image; larger uploads are refused before they are read
MAX_IMAGE_PIXELS = 50_000_000  # a query image's pixels, and how elongated it may be: a few KB of PNG can
MAX_ASPECT = 50  # decode to more, and resizing its short side to the model's input would take gigabytes
MAX_K = 1000


def _bad(status: int, detail: str):
    raise HTTPException(status_code=status, detail=" ".join(detail.split()))


def _k(value, form: bool = False) -> int:
    """k from a JSON body (a number; absent or null: 10) or a form field (digits; absent or empty: 10)."""
    if value is None or (form and value == ""):
        return 10
    if form and not isinstance(value, str):
        _bad(422, "k must be a form field, not a file")
    # a form's k is digits (int() would also take "1_0", "+5" and other scripts' digits); JSON's a number
    digits = value.isascii() and value.strip().isdigit() if form else not isinstance(value, (bool, str))
    if not digits:
        _bad(422, f"k must be an integer from 1 to {MAX_K}, got {value!r}")
    try:
        k = int(value)
        if isinstance(value, float) and k != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's 1e400 reads as inf
        _bad(422, f"k must be an integer from 1 to {MAX_K}, got {value!r}")
    if not 1 <= k <= MAX_K:
        _bad(422, f"k must be from 1 to {MAX_K}, got {k}")
    return k


def _text(value, name: str = "text") -> str:
    """A query text: a non-blank string that is valid Unicode (JSON's "\\ud800" and a shell's non-UTF-8
    bytes arrive as lone surrogates, which no tokenizer takes)."""
    if value is None:
        _bad(422, 'missing text: send {"text": "...", "k": 10} or a multipart form with an image file')
    if not isinstance(value, str):
        _bad(422, f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        _bad(422, f"{name} is empty: send a non-blank query")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        _bad(422, f"{name} is not valid Unicode (a lone surrogate at character {e.start}): send UTF-8 text")
    return value


def _image(data: bytes):
    from PIL import Image

    from xbtcore.data import to_rgb

    if len(data) > MAX_UPLOAD_BYTES:
        _bad(413, f"image upload is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES} bytes")
    if not data:
        _bad(422, "image file is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # any decoder failure, decompression bombs included
        _bad(422, f"image does not decode ({type(e).__name__}): upload a PNG or JPEG")
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        _bad(422, f"image is {w}x{h} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels: upload a smaller image")
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        _bad(422, f"image is {w}x{h} pixels; its long side may be at most {MAX_ASPECT} times its short side: crop it")
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:  # any decoder failure
        _bad(422, f"image does not decode ({type(e).__name__}): upload a PNG or JPEG")


async def _body(request: Request) -> bytes:
    """The request body, read as it streams in: a body with no Content-Length (chunked) is cut off with a 413
    once it passes the limit, so no client makes the server hold more."""
    limit, chunks, size = MAX_UPLOAD_BYTES + 64 * 1024, [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            _bad(413, f"request body is over {limit} bytes; the limit for an upload is {MAX_UPLOAD_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _buffered(request: Request, body: bytes) -> Request:
    """The request again, its body the bytes already read."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def create_app(server) -> FastAPI:
    """server: serve.engine.Server (its `engine` is read once per request)."""
    app = FastAPI(title="xbt search", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health():
        return {"status": "ok", **server.engine.describe(), "swaps": server.swaps, "last_error": server.last_error}

    @app.post("/search")
    async def search(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_UPLOAD_BYTES + 64 * 1024:
            _bad(413, f"request body is {length} bytes; the limit for an upload is {MAX_UPLOAD_BYTES} bytes")
        text, image = None, None
        if kind == "application/json":
            try:
                body = json.loads(await _body(request))
            except (ValueError, RecursionError):  # RecursionError: nesting deeper than the decoder goes
                _bad(400, "body is not valid JSON")
            if not isinstance(body, dict):
                _bad(422, 'body must be a JSON object such as {"text": "a red circle", "k": 10}')
            text, k = _text(body.get("text")), _k(body.get("k"))
        elif kind == "multipart/form-data":
            try:  # parsed from the body read as it streams in: a chunked upload is cut off at the limit too
                form = await _buffered(request, await _body(request)).form(max_part_size=MAX_UPLOAD_BYTES + 1)
            except HTTPException:
                raise
            except Exception as e:
                _bad(413 if "size" in str(e).lower() else 400, f"form does not parse: {e}")
            k = _k(form.get("k"), form=True)
            upload = form.get("image")
            if upload is not None and form.get("text") is not None:
                _bad(422, "the form holds both text and an image: send one query, text or an image")
            if upload is not None and not isinstance(upload, str):
                image = _image(await upload.read(MAX_UPLOAD_BYTES + 1))
            elif upload is not None:
                _bad(422, "image must be a file (a multipart file part with a filename), not a text field")
            else:
                text = _text(form.get("text"))
        elif kind == "application/x-www-form-urlencoded":  # a plain HTML form: text only
            try:
                form = dict(parse_qsl((await _body(request)).decode("ascii"), keep_blank_values=True))
            except UnicodeDecodeError:
                _bad(400, "form is not URL-encoded (bytes outside ASCII)")
            text, k = _text(form.get("text")), _k(form.get("k"), form=True)
        else:
            _bad(
                415,
                f"content type {kind or 'missing'}: send application/json, multipart/form-data or "
                "application/x-www-form-urlencoded",
            )
        engine = server.engine  # this request's engine, whatever swaps meanwhile
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(engine.search, k, text, image)

    @app.get("/items/{item_id:path}")  # an id may hold slashes ("imgs/0001.jpg")
    def item(item_id: str):
        from .gallery import source_item

        engine = server.engine
        ids = engine.gallery.old.row_of
        key = item_id if item_id in ids else int(item_id) if re.fullmatch(r"-?[0-9]+", item_id) else item_id
        found = source_item(str(engine.gallery.path), ids[key], key) if key in ids else None
        if found is None:
            _bad(404, f"no image for id {item_id} in this index")
        return Response(content=found[0], media_type=found[1])

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>xbt search</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}
form{display:flex;gap:.5rem;flex-wrap:wrap;align-items:center;margin-bottom:1rem}
input[type=text]{flex:1;min-width:16rem;padding:.4rem}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(9rem,1fr));gap:.75rem}
figure{margin:0;border:1px solid #ddd;padding:.4rem;text-align:center}
figure img{width:100%;image-rendering:pixelated}
figcaption{font-size:.8rem}
#meta{color:#555;font-size:.9rem;margin-bottom:.5rem}
#error{color:#b00}
</style></head><body>
<h1>xbt search</h1>
<form id="q">
  <input type="text" id="text" name="text" placeholder="describe what you are looking for">
  <input type="file" id="image" name="image" accept="image/png,image/jpeg">
  <label>k <input type="number" id="k" name="k" value="12" min="1" max="1000" style="width:4rem"></label>
  <button type="submit">Search</button>
</form>
<div id="meta"></div><div id="error"></div><div id="results"></div>
<script>
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\\"":"&quot;"}[c]));
const form = document.getElementById("q");
form.addEventListener("submit", async ev => {
  ev.preventDefault();
  const file = document.getElementById("image").files[0];
  const k = document.getElementById("k").value;
  let resp;
  if (file) {
    const fd = new FormData(); fd.append("image", file); fd.append("k", k);
    resp = await fetch("search", {method: "POST", body: fd});
  } else {
    resp = await fetch("search", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({text: document.getElementById("text").value, k: Number(k)})});
  }
  const body = await resp.json();
  document.getElementById("error").textContent = resp.ok ? "" : body.detail;
  if (!resp.ok) { document.getElementById("results").innerHTML = ""; return; }
  document.getElementById("meta").textContent =
    `${body.results.length} results from ${body.model} version ${body.model_version} (space ${body.space})`;
  document.getElementById("results").innerHTML = body.results.map(r =>
    `<figure class="hit"><img src="items/${encodeURIComponent(r.id)}" alt="" onerror="this.remove()">` +
    `<figcaption>${esc(r.id)} &middot; ${r.score.toFixed(4)}</figcaption></figure>`).join("");
});
// A link such as /?q=a+red+circle&k=5 runs its query on load.
const params = new URLSearchParams(location.search);
if (params.get("k")) document.getElementById("k").value = params.get("k");
if (params.get("q")) { document.getElementById("text").value = params.get("q"); form.requestSubmit(); }
</script></body></html>
"""
