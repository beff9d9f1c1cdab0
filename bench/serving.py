"""Serving benches, one JSON object on stdout (progress on stderr).

    python -m bench.serving backfill [--bundle DIR] [--eval-images 1000]   mixed-gallery recall vs fraction backfilled
                                     [--val-images 1000]                  (learned order fitted on the pairs)
    python -m bench.serving ivf [--items 200000]                            approximate vs exact index
    python -m bench.serving load [--items 1000000] [--concurrency 8]        HTTP throughput and latency on loopback,
                                                                            champion rolled back mid-load
    python -m bench.serving crash [--trials 3]                              `xbt backfill` SIGKILLed, then resumed
    python -m bench.serving scan [--items 1000000] [--seconds 2]            one exact scan: batch, threads, kernel
    python -m bench.serving order [--items 1000000]                         seconds each backfill order takes to choose

backfill: t2i recall (CONTRACT.md's protocol, ties within 1e-5) of the mixed gallery when a fraction of
it has been re-embedded by the new model's own encoder, each order of xbt backfill against random order (mean
of --random-seeds permutations), scored as the server scores it (xbtcore.backfill.MixedGallery). The
queries are the eval captions: the bundle's compatible encoder for the old space, the new model for the
new one. The learned order's gain model is fitted on the world's pairs (--val-images), as an upgrade
fits it on its validation pairs. Without --bundle the upgrade is a Procrustes map fitted on a world
corpus (the `procrustes` method's closed form).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, emit, git_commit, machine, progress  # noqa: E402
from xbtcore.search import BATCH_WAIT_S  # noqa: E402

KS = (1, 5, 10)
FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def _recall(scores: np.ndarray, own: np.ndarray) -> dict:
    """(Q, N) scores, (Q,) own item per query -> {K: recall %}, CONTRACT.md's tie rule."""
    from xbtcore.recall import percent_within, ranks_above_own

    return percent_within(ranks_above_own(scores, own), KS)


def _procrustes_bundle(out: Path, corpus: str, old: str, new: str) -> Path:
    import pyarrow.parquet as pq

    from xbtcore.bundle import BundleMeta, save_bundle
    from xbtcore.encoders import DualEncoder
    from xbtcore.methods.maps import fit_linear_map
    from xbtcore.phi import LinearMap

    texts = pq.read_table(corpus, columns=["caption"]).column("caption").to_pylist()
    new_enc, old_enc = DualEncoder.from_pretrained(new), DualEncoder.from_pretrained(old)
    w = fit_linear_map(new_enc.embed_texts(texts, batch_size=512), old_enc.embed_texts(texts, batch_size=512))
    meta = BundleMeta(new, old, old, "procrustes", {"in_dim": w.shape[0], "out_dim": w.shape[1]}, head="linear")
    return save_bundle(out, new_enc, LinearMap.of(w), meta)


def backfill_world(args) -> tuple:
    """The backfill bench's world, upgrade and embeddings: -> (meta, bundle, embedded), embedded(part) the
    (v_old, v_new, w_old, w_compat, w_new, own) of the world's `part` ("pairs" or "eval") Parquet, cached
    in --work."""
    import pyarrow.parquet as pq
    from PIL import Image

    from worlds import shapes
    from xbtcore.bundle import load_compatible, original_encoder, read_meta
    from xbtcore.encoders import DualEncoder

    work = Path(args.work)
    spec = shapes.WorldSpec(
        seed=args.world_seed, corpus_captions=args.corpus, pair_images=args.val_images, eval_images=args.eval_images
    )
    world = shapes.write_world(work / "world", spec)
    bundle = (
        Path(args.bundle) if args.bundle else _procrustes_bundle(work / "bundle", world["corpus"], args.old, args.new)
    )
    meta = read_meta(bundle)
    compat, _ = load_compatible(bundle)
    old, new = DualEncoder.from_pretrained(meta.root_model), original_encoder(bundle, meta)

    def embedded(part: str) -> tuple:
        cached = work / f"embeddings-{part}.npz"  # a rerun on the same --work skips the encoders
        if cached.exists():
            return tuple(np.load(cached)[k] for k in ("v_old", "v_new", "w_old", "w_compat", "w_new", "own"))
        table = pq.read_table(world[part], columns=["image", "caption", "image_id"])
        ids = table.column("image_id").to_pylist()
        first = {i: r for r, i in reversed(list(enumerate(ids)))}
        distinct = sorted(first)
        row_of = {i: r for r, i in enumerate(distinct)}
        own = np.array([row_of[i] for i in ids])  # (Q,) each caption's image
        blobs = table.column("image").to_pylist()
        images = [Image.open(io.BytesIO(blobs[first[i]])).convert("RGB") for i in distinct]
        captions = table.column("caption").to_pylist()
        progress(f"embedding {len(images)} {part} images and {len(captions)} captions")
        v_old, v_new = old.embed_images(images).numpy(), new.embed_images(images).numpy()  # (N, D_old), (N, D_new)
        w_old, w_compat, w_new = (e.embed_texts(captions).numpy() for e in (old, compat, new))  # (Q, D) each
        np.savez(cached, v_old=v_old, v_new=v_new, w_old=w_old, w_compat=w_compat, w_new=w_new, own=own)
        return v_old, v_new, w_old, w_compat, w_new, own

    return meta, bundle, embedded


def bench_backfill(args) -> dict:
    from xbtcore.backfill import BACKFILL_ORDERS, GainModel, backfill_curve, backfill_order

    meta, bundle, embedded = backfill_world(args)
    val_old, val_new, _, val_compat, val_w_new, val_own = embedded("pairs")  # validation pairs: the gain model
    gain = GainModel.fit(val_compat, val_old, val_w_new, val_new, val_own)
    v_old, v_new, w_old, w_compat, w_new, own = embedded("eval")
    orders = {o: [backfill_order(v_old, o, gain=gain)] for o in BACKFILL_ORDERS if o != "random"}
    orders["random"] = [backfill_order(v_old, "random", seed=s) for s in range(args.random_seeds)]
    runs = backfill_curve(w_compat, v_old, w_new, v_new, own, orders, FRACTIONS, KS, scoring=args.scoring)
    curve = []
    for i, f in enumerate(FRACTIONS):
        r_rand = [run[i] for run in runs["random"]]
        mean = {k: round(statistics.mean(r[k] for r in r_rand), 2) for k in r_rand[0]}
        curve.append(
            {
                "fraction": f,
                **{o: runs[o][0][i] for o in orders if o != "random"},
                "random": mean,
                "random_min_max": {k: [min(r[k] for r in r_rand), max(r[k] for r in r_rand)] for k in mean},
            }
        )
    s_old, s_new = w_compat @ v_old.T, w_new @ v_new.T  # (Q, N) compatible vs old gallery; new vs new
    return {
        "bench": "serving.backfill",
        "machine": machine(),
        "commit": git_commit(),
        "world_seed": args.world_seed,
        "bundle": str(bundle),
        "method": meta.method,
        "images": len(v_old),
        "captions": len(own),
        "recall_t2i": {
            "old/old": _recall(w_old @ v_old.T, own),
            "new/old": _recall(s_old, own),
            "orig-new/new": _recall(s_new, own),
        },
        "scoring": args.scoring,
        "order": "learned",
        "validation": {"images": len(val_old), "captions": len(val_own)},
        "curve": curve,
        "random_seeds": args.random_seeds,
    }


def bench_ivf(args) -> dict:
    from xbtcore.search import make_faiss, normalise, top_rows

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim)).astype(np.float32)
    vectors = normalise(centres[rng.integers(0, 1000, args.items)] + 0.5 * rng.standard_normal((args.items, args.dim)))
    queries = normalise(vectors[rng.integers(0, args.items, 500)] + 0.3 * rng.standard_normal((500, args.dim)))
    out = {"bench": "serving.ivf", "machine": machine(), "commit": git_commit(), "items": args.items, "dim": args.dim}
    results = {}
    for kind in ("flat", "ivf"):
        t0 = time.perf_counter()
        index = make_faiss(vectors, kind)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        results[kind] = [{r for r, _ in hits} for hits in (top_rows(index, q[None], 10)[0] for q in queries)]
        per_query = (time.perf_counter() - t0) / len(queries)
        out[kind] = {"build_s": round(build, 2), "ms_per_query": round(1000 * per_query, 3)}
        if kind == "ivf":
            out[kind].update(nlist=index.nlist, nprobe=index.nprobe)
    out["ivf_recall@10_vs_exact"] = round(
        float(np.mean([len(a & b) / 10 for a, b in zip(results["ivf"], results["flat"])])), 4
    )
    return out


def bench_order(args) -> dict:
    """Seconds each backfill order takes to choose on --items synthetic clustered vectors (no model pass; the
    learned order with a gain model of random weights: its cost does not depend on them)."""
    from xbtcore.backfill import BACKFILL_ORDERS, GAIN_NEIGHBOURS, GainModel, backfill_order
    from xbtcore.search import normalise

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(1, args.items // 100), args.dim)).astype(np.float32)
    vectors = normalise(
        np.repeat(centres, 100, axis=0)[: args.items] + 0.2 * rng.standard_normal((args.items, args.dim))
    )
    gain = GainModel(tuple(rng.standard_normal(len(GAIN_NEIGHBOURS) + args.dim + 1).tolist()), args.dim, {})
    seconds = {}
    for how in BACKFILL_ORDERS:
        t0 = time.perf_counter()
        backfill_order(vectors, how, gain=gain)
        seconds[how] = round(time.perf_counter() - t0, 2)
    return {
        "bench": "serving.order",
        "machine": machine(),
        "commit": git_commit(),
        "items": args.items,
        "dim": args.dim,
        "seconds": seconds,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _register_two_versions(work: Path, old: str, new: str) -> str:
    """Two Procrustes bundles of --new onto --old (fitted on two worlds' corpora) registered as versions 1
    and 2 of the old space's model, champion on 2. -> the registered model's name."""
    from tasks import registry
    from worlds import shapes

    name = ""
    for v in (1, 2):
        spec = shapes.WorldSpec(seed=100 + v, corpus_captions=2000, pair_images=10, eval_images=10)
        world = shapes.write_world(work / f"world{v}", spec)
        bundle = _procrustes_bundle(work / f"bundle{v}", world["corpus"], old, new)
        report = {"method": "procrustes", "old": old, "new": new, "counts": {}, "timings_s": {}}
        recall = {"t2i": {c: {"1": 0.0} for c in ("old/old", "new/old")}}
        verdict = {"eqn2": {"passed": True, "criterion": "eqn2", "ks": [1], "failures": []}, "passed": True}
        name = registry.register_and_promote.fn(report, recall, str(bundle), old, verdict, {}, [])["name"]
    return name


def bench_scan(args) -> dict:
    """One exact scan of --items synthetic vectors, ms per call: faiss's flat kernel (1 and 2 threads, its
    default path and its BLAS path; batches of 1 and 8 queries) and, for batches of 1 to 64,
    xbtcore.search.exact_scan (numpy's matrix product on every core) and xbtcore.search.quantized_scan
    (int8 codes, the same answer), the two scans `xbt serve` runs per batch. Each kernel runs in its own
    phase (a BLAS library's threads spin a while after a call, which would tax the next kernel)."""
    import faiss

    from xbtcore.search import ScanCodes, exact_scan, make_faiss, normalise, quantized_scan

    rng = np.random.default_rng(0)
    vectors = normalise(rng.standard_normal((args.items, args.dim)))
    index = make_faiss(vectors, "flat")
    queries = normalise(rng.standard_normal((64, args.dim)))
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    rows = []
    for kernel, threshold in (("default", default_threshold), ("blas", 1)):
        faiss.cvar.distance_compute_blas_threshold = threshold
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            for batch in (1, 8):
                index.search(queries[:batch], 26)
                t0, calls = time.perf_counter(), 0
                while time.perf_counter() - t0 < args.seconds:
                    index.search(queries[:batch], 26)
                    calls += 1
                ms = 1000 * (time.perf_counter() - t0) / calls
                rows.append(
                    {
                        "kernel": kernel,
                        "threads": threads,
                        "batch": batch,
                        "ms_per_call": round(ms, 1),
                        "cpu_ms_per_query": round(ms * threads / batch, 1),
                    }
                )
                progress(str(rows[-1]))
    faiss.cvar.distance_compute_blas_threshold = default_threshold
    codes = ScanCodes.of(vectors)
    scans = {
        "exact_scan": lambda q: exact_scan(vectors, q, 26),
        "quantized_scan": lambda q: quantized_scan(vectors, codes, q, 26),
    }
    for kernel, scan in scans.items():
        for batch in (1, 8, 16, 32, 64):
            scan(queries[:batch])
            t0, cpu0, calls = time.perf_counter(), time.process_time(), 0
            while time.perf_counter() - t0 < args.seconds:
                scan(queries[:batch])
                calls += 1
            ms, cpu_ms = 1000 * (time.perf_counter() - t0) / calls, 1000 * (time.process_time() - cpu0) / calls
            row = {"kernel": kernel, "threads": "all", "batch": batch, "ms_per_call": round(ms, 1)}
            rows.append({**row, "cpu_ms_per_query": round(cpu_ms / batch, 1)})
            progress(str(rows[-1]))
    same = all(
        [r for r, _ in a] == [r for r, _ in b]
        for a, b in zip(exact_scan(vectors, queries, 26), quantized_scan(vectors, codes, queries, 26))
    )
    return {
        "bench": "serving.scan",
        "machine": machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "commit": git_commit(),
        "items": args.items,
        "dim": args.dim,
        "k": 26,
        "quantized_same_rows": same,
        "rows": rows,
    }


def bench_load(args) -> dict:
    """A synthetic gallery in --old's space, served by `xbt serve` in its own process on loopback; text
    queries from client threads here (the clients never share the server's interpreter). With --swap (the
    default) the server answers with models:/NAME@champion and champion is rolled back (`xbt rollback`)
    from version 2 to version 1 a third of the way through the load."""
    import subprocess

    import httpx

    from serve.engine import load_query_model
    from xbtcore.search import build_index

    work = Path(args.work)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",  # a private registry for the swap
        "XBT_STATE_DIR": str(work / "state"),
    }
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "XBT_STATE_DIR")})
    model_ref, name = args.old, ""
    if args.swap:
        progress("registering two versions to swap between")
        name = _register_two_versions(work, args.old, args.new)
        model_ref = f"models:/{name}@champion"
    model = load_query_model(args.old)
    dim = model.compat.embed_dim
    rng = np.random.default_rng(0)
    index = work / "index"
    progress(f"building a {args.items}-item {args.kind} index")

    def embed(pos):
        return rng.standard_normal((len(pos), dim)).astype(np.float32)

    build_index(index, list(range(args.items)), embed, model.compat_space, {"modality": "image"}, 65536, args.kind)
    if args.backfilled:  # a backfill under way into --new's own space: the server searches the mixed gallery
        new_model = load_query_model(model_ref if args.swap else args.new)
        new_dim = new_model.own().embed_dim
        order = [int(i) for i in rng.permutation(args.items)]
        chunks = round(args.backfilled * args.items / 65536)
        progress(f"backfilling {chunks} chunks of 65536 of the gallery into {new_model.own_space}")
        build_index(
            index / "backfill",
            order,
            lambda pos: rng.standard_normal((len(pos), new_dim)).astype(np.float32),
            new_model.own_space,
            chunk_rows=65536,
            stop_after=chunks,
        )
    port = args.port
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--index", str(index), "--model", model_ref]
    cmd += ["--port", str(port), "--poll-seconds", "1", "--batch-wait-ms", str(args.batch_wait_ms)]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"xbt serve did not come up: {server.stderr.read().decode()[-500:]}")
            time.sleep(0.5)
        texts = ["a red circle", "two blue squares", "a small green triangle left of a star", "a yellow hexagon"]
        answers: list[tuple[float, float, int, str]] = []  # (sent at s, latency s, status, model_version)
        with httpx.Client(base_url=base, timeout=60) as http:  # warm-up
            for t in texts:
                http.post("/search", json={"text": t, "k": 10})
        t_start = time.monotonic()
        end = t_start + args.seconds

        def client(n: int):
            """One keep-alive connection; the standard library's client, which costs the 2 cores less
            per request than httpx (the clients share the machine with the server)."""
            import http.client
            import json

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {"Content-Type": "application/json"}
            i = n
            while time.monotonic() < end:
                body = json.dumps({"text": texts[i % len(texts)], "k": 10})
                sent, t0 = time.monotonic() - t_start, time.perf_counter()
                conn.request("POST", "/search", body, headers)
                r = conn.getresponse()
                data = r.read()
                version = json.loads(data).get("model_version", "") if r.status == 200 else ""
                answers.append((sent, time.perf_counter() - t0, r.status, version))
                i += 1
            conn.close()

        swap: dict = {}

        def rollback():  # what `xbt rollback` does, from this process so the moment is exact
            from tasks import registry

            time.sleep(args.seconds / 3)
            swap["at_s"] = round(time.monotonic() - t_start, 2)
            swap["rollback"] = registry.rollback(registry.client(), name)

        cpu0, own0 = _cpu_seconds(server.pid), time.process_time()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.concurrency)]
        if args.swap:
            threads.append(threading.Thread(target=rollback))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server_cpu, client_cpu = _cpu_seconds(server.pid) - cpu0, time.process_time() - own0
        health = httpx.get(f"{base}/health", timeout=30).json()  # the engine answering now: since the swap
    finally:
        server.terminate()
        server.wait(30)
    ms = np.array([a[1] for a in answers]) * 1000
    failed = sum(a[2] != 200 for a in answers)
    out = {
        "bench": "serving.load",
        "machine": machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "commit": git_commit(),
        "items": args.items,
        "dim": dim,
        "index": args.kind,
        "backfilled": args.backfilled,
        "model": model_ref if not args.swap else "models:/NAME@champion",
        "concurrency": args.concurrency,
        "batch_wait_ms": args.batch_wait_ms,
        "seconds": round(wall, 1),
        "requests": len(ms),
        "failed": failed,
        "throughput_rps": round(len(ms) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, len(ms)), 2),
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(1, len(ms)), 2),
        "mean_batch": round(health["text_queries_batched"] / max(1, health["text_batches"]), 2),
    }
    if args.swap:
        by_version = {v: sum(a[3] == v for a in answers) for v in sorted({a[3] for a in answers})}
        after = [a for a in answers if a[3] == "1"]
        if after:  # the latency outside the swap: from the rollback to a second after version 1 first answered
            lo, hi = swap["at_s"], min(a[0] for a in after) + 1.0
            steady = np.array([a[1] for a in answers if not lo <= a[0] <= hi]) * 1000
            out["p99_ms_outside_swap"] = round(float(np.percentile(steady, 99)), 1)
            out["p50_ms_outside_swap"] = round(float(np.percentile(steady, 50)), 1)
        out["swap"] = {
            **swap,
            "from_version": "2",
            "to_version": "1",
            "answers_by_version": by_version,
            "first_answer_by_new_version_s": round(min(a[0] for a in after), 2) if after else None,
            "answers_by_old_version_after_first_new": sum(
                a[3] == "2" and a[0] > min(b[0] for b in after) for a in answers
            )
            if after
            else None,
            "failed_across_swap": failed,
        }
    return out


def bench_crash(args) -> dict:
    """`xbt backfill` killed (SIGKILL) at a random chunk, then run again to the end, --trials times on one
    index: every id ends in the backfill exactly once, and its vectors equal an uninterrupted backfill's."""
    import json
    import signal
    import subprocess

    from serve.engine import load_query_model
    from serve.gallery import index_gallery
    from worlds import shapes
    from xbtcore.search import IDS, GalleryIndex, chunks_done, load_vectors, remove_index

    work = Path(args.work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XBT_STATE_DIR": str(work / "state")}
    spec = shapes.WorldSpec(seed=args.world_seed, corpus_captions=10, pair_images=10, eval_images=args.eval_images)
    world = shapes.write_world(work / "world", spec)
    index = work / "index"
    index_gallery(load_query_model(args.old), world["eval"], "image", str(index))
    ids = GalleryIndex(index).ids
    cmd = [sys.executable, "-m", "flows.cli", "backfill", "--index", str(index), "--new", args.new]
    cmd += ["--chunk-rows", str(args.chunk_rows)]
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)  # the uninterrupted reference
    full_s = time.perf_counter() - t0
    bf = index / "backfill"
    reference = load_vectors(bf, None)
    n_chunks = len(chunks_done(bf))
    trials = []
    for trial in range(args.trials):
        remove_index(bf)
        target = int(rng.integers(1, n_chunks))  # the kill lands once this many chunks are written
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and (not bf.exists() or len(chunks_done(bf)) < target):
            time.sleep(0.002)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        chunks_at_kill = len(chunks_done(bf)) if bf.exists() else 0
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        order = json.loads((bf / IDS).read_text())
        vectors = load_vectors(bf, None)
        trials.append(
            {
                "trial": trial,
                "kill_at_chunk": target,
                "killed": killed,
                "chunks_at_kill": chunks_at_kill,
                "chunks": len(chunks_done(bf)),
                "ids": len(order),
                "every_id_once": len(order) == len(set(order)) == len(ids) and set(order) == set(ids),
                "vectors": len(vectors),
                "same_vectors_as_uninterrupted": bool(
                    vectors.shape == reference.shape and np.allclose(vectors, reference, atol=1e-6)
                ),
            }
        )
        progress(f"trial {trial}: {trials[-1]}")
    return {
        "bench": "serving.crash",
        "machine": machine(),
        "commit": git_commit(),
        "items": len(ids),
        "chunk_rows": args.chunk_rows,
        "uninterrupted_s": round(full_s, 1),
        "trials": trials,
        "all_every_id_once": all(t["every_id_once"] and t["same_vectors_as_uninterrupted"] for t in trials),
        "killed_mid_backfill": sum(t["killed"] and 0 < t["chunks_at_kill"] < t["chunks"] for t in trials),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["backfill", "ivf", "load", "crash", "scan", "order"])
    ap.add_argument("--old", default=str(ROOT / "zoo" / "old"), help="the gallery's model")
    ap.add_argument("--new", default=str(ROOT / "zoo" / "new"), help="the new model")
    ap.add_argument("--bundle", help="an upgrade bundle to serve (default: a Procrustes map of --new onto --old)")
    ap.add_argument("--eval-images", type=int, default=1000, help="backfill: gallery images (5 captions each)")
    ap.add_argument(
        "--val-images", type=int, default=1000, help="backfill: validation pair images the learned order is fitted on"
    )
    ap.add_argument("--corpus", type=int, default=20000, help="backfill: corpus captions the map is fitted on")
    ap.add_argument("--world-seed", type=int, default=7, help="backfill: the world's seed")
    ap.add_argument("--random-seeds", type=int, default=5, help="backfill: random orders averaged")
    ap.add_argument(
        "--scoring",
        default="blend",
        choices=["blend", "raw"],
        help="backfill: a backfilled item's score; blend: the server's (MixedGallery), raw: its new cosine",
    )
    ap.add_argument("--items", type=int, default=None, help="ivf/load/order: gallery size (default 200000 / 1000000)")
    ap.add_argument("--dim", type=int, default=64, help="ivf/order: vector size")
    ap.add_argument("--kind", default="flat", choices=["flat", "ivf"], help="load: exact or approximate index")
    ap.add_argument(
        "--backfilled",
        type=float,
        default=0.0,
        help="load: share of the gallery re-embedded by --new (a mixed gallery)",
    )
    ap.add_argument("--concurrency", type=int, default=8, help="load: concurrent clients")
    ap.add_argument(
        "--batch-wait-ms",
        type=float,
        default=BATCH_WAIT_S * 1000,
        help="load: the server's --batch-wait-ms (how long a text batch waits for returning callers)",
    )
    ap.add_argument("--seconds", type=float, default=20.0, help="load: how long the clients send; scan: per row")
    ap.add_argument("--port", type=int, default=8765, help="load: loopback port")
    ap.add_argument(
        "--swap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load: serve models:/NAME@champion of a private registry and roll champion back mid-load",
    )
    ap.add_argument("--trials", type=int, default=3, help="crash: kills, each followed by a resume")
    ap.add_argument("--chunk-rows", type=int, default=32, help="crash: items per backfill chunk")
    ap.add_argument("--seed", type=int, default=0, help="crash: seeds the moments of the kills")
    ap.add_argument("--work", help="scratch folder, kept (default: a new temp folder, removed at the end)")
    ap.add_argument("--json-out", default="", help="also write the JSON here")
    return ap


def run(args) -> dict:
    """One part of the bench on parsed flags -> its JSON."""
    if args.items is None:
        args.items = 200_000 if args.part == "ivf" else 1_000_000
    part = {
        "backfill": bench_backfill,
        "ivf": bench_ivf,
        "load": bench_load,
        "crash": bench_crash,
        "scan": bench_scan,
        "order": bench_order,
    }[args.part]
    if args.work or args.part not in ("backfill", "load", "crash"):
        return part(args)
    scratch = tempfile.mkdtemp(prefix=f"xbt-bench-{args.part}-")  # a 1M-item index is 0.5 GB: removed after
    try:
        return part(argparse.Namespace(**{**vars(args), "work": scratch}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    return emit(run(args), args.json_out)


if __name__ == "__main__":
    main()
