"""The `xbt` command line (CONTRACT.md): demo, upgrade, embed, index, search, serve, backfill, promote,
rollback, catalog.

Exit 0 on success; otherwise non-zero with one line on stderr saying what was
wrong and how to fix it. Prefect and MLflow state default to the state folder
(`XBT_STATE_DIR`, else `.state/` of the working directory); the defaults are
set before prefect is imported, which reads them at import.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from xbtcore.backfill import BACKFILL_ORDER, BACKFILL_ORDERS
from xbtcore.config import parse_settings
from xbtcore.ddp import NPROC_HELP
from xbtcore.encoders import COMPILE_HELP, DEVICE_HELP, PRECISION_HELP, PRECISIONS
from xbtcore.search import BATCH_WAIT_S

STARTED = time.time()  # the report's total time counts from here


def _set_env_defaults() -> None:
    state = Path(os.environ.get("XBT_STATE_DIR") or Path.cwd() / ".state").expanduser().absolute()
    defaults = {
        "XBT_STATE_DIR": str(state),
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
        # Run logs go to stdout: stderr carries progress bars and, on failure, the one-line reason.
        "PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM": "ext://sys.stdout",
        "TOKENIZERS_PARALLELISM": "false",
        # A bundle is a handful of small files: MLflow's download bar only clutters `xbt search` and the log
        # of a server whose champion moves.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # MLflow sets its loggers' level from this when imported (INFO otherwise: it announces each new store)
        "MLFLOW_LOGGING_LEVEL": "WARNING",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    # Prefect makes its home with a plain mkdir: a state folder that does not exist yet gets its parents here.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


class _Terminated(BaseException):
    """SIGTERM as an exception in the main thread: a run ends as on Ctrl-C (Prefect records it as
    crashed, the private API stops) instead of dying mid-write."""


def _on_sigterm(signum, frame):
    raise _Terminated()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        where = "" if self.prog == "xbt" else f"{self.prog}: "  # _fail's prefix names xbt already
        raise SystemExit(_fail(f"{where}{message} (see --help)", 2))


def _fail(message: str, code: int = 1) -> int:
    print("xbt: error: " + " ".join(str(message).split()), file=sys.stderr)
    return code


def _disk_full(e: BaseException) -> str | None:
    """The file a write ran out of disk space on ("" where unnamed), where `e` or what it came from says so;
    else None. A folder copy (shutil.Error) lists each file's failure as text."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e.filename or "")
        if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list):  # (src, dst, why) per file
            for *_, dst, why in (f for f in e.args[0] if isinstance(f, tuple) and len(f) >= 2):
                if "[Errno 28]" in str(why):
                    return str(dst)
        e = e.__cause__ or e.__context__
    return None


def _print_result(report: dict) -> None:
    from tasks.report import format_candidates
    from xbtcore.evaluate import format_table
    from xbtcore.gate import describe_failures
    from xbtcore.margins import format_margins

    if "candidates" in report:
        print(format_candidates(report["candidates"], report["chosen"]))
    print(format_table(report["recall"]))
    promo = report["promotion"]
    verdict = "PASSED" if report["gate"]["passed"] else "FAILED"
    print(
        f"gate (Eqn. 2): {verdict}"
        + "".join(f"\n  failing: {line}" for line in describe_failures(report["gate"]["failures"]))
    )
    regress = report.get("no_regression")
    if regress:  # a chain link: also no worse than the champion link it would replace
        print(
            f"no regression (new/old >= prev/old): {'PASSED' if regress['passed'] else 'FAILED'}"
            + "".join(f"\n  failing: {line}" for line in describe_failures(regress["failures"], "no-regression"))
        )
    if "gate_margins" in report:
        print(format_margins(report["gate_margins"]))
    print(
        f"{promo['model']} version {promo['version']}: {promo['reason']} [registry {report['mlflow']['tracking_uri']}]"
    )
    if report.get("next_steps"):
        print("next steps:" + "".join(f"\n  - {line}" for line in report["next_steps"]))
    out = Path(report["bundle"]).parent
    print(f"report: {out / 'report.json'} and {out / 'report.html'}")


def _run_upgrade(**fields) -> int:
    from tasks.servers import check_servers, prefect_api
    from xbtcore.lock import refuse_if_busy

    from .upgrade import OUT_BUSY_FIX, UpgradeParams, upgrade

    refuse_if_busy(Path(fields["out"]).expanduser().absolute(), OUT_BUSY_FIX)  # a run at work there: at once
    params = UpgradeParams(**fields, started_at=STARTED)  # every path and setting checked before Prefect starts
    check_servers()
    with prefect_api():
        report = upgrade(params)
    _print_result(report)
    return 0


def _unread_settings(method: str, settings: dict[str, dict]) -> None:
    """Warn of `--set SCOPE.KEY` that an explicitly named method never reads (procrustes has no pretraining):
    it would change nothing, and the report records only the settings its method reads."""
    if method == "auto":
        return  # each candidate reads the scopes it has; the report records the chosen one's
    from xbtcore.methods import get_method

    scopes = get_method(method).scopes
    for scope, values in settings.items():
        if values and scope not in scopes:
            keys = ", ".join(f"{scope}.{k}" for k in values)
            print(
                f"xbt: warning: --set {keys}: {method} reads no {scope} settings "
                f"({'its scopes: ' + ', '.join(sorted(scopes)) if scopes else 'it has none'}); ignored",
                file=sys.stderr,
            )


def _choice(a) -> dict:
    """The flags every upgrade takes: which method, how it is chosen and validated."""
    settings = parse_settings(a.set)
    _unread_settings(a.method, settings)
    return dict(
        method=a.method,
        seed=a.seed,
        val_fraction=a.val_fraction,
        allow_old_encoder=a.allow_old_encoder,
        device=a.device,
        precision=a.precision,
        compile=a.compile,
        nproc=a.nproc,
        **settings,
    )


def cmd_demo(a) -> int:
    return _run_upgrade(old=a.old, new=a.new, out=a.out, **_choice(a))


def cmd_upgrade(a) -> int:
    return _run_upgrade(
        old=a.old,
        new=a.new,
        corpus=a.corpus,
        pairs=a.pairs,
        eval=a.eval,
        out=a.out,
        gallery=a.gallery,
        eval_in_gallery=a.eval_in_gallery,
        dask=a.dask,
        text_column=a.text_column,
        min_chars=a.min_chars,
        max_chars=a.max_chars,
        sample=a.sample,
        progress=not a.no_progress,
        **_choice(a),
    )


def cmd_embed(a) -> int:
    from catalog import Catalog
    from tasks.common import absolute_ref, state_dir
    from tasks.registry import pinned_ref, resolve_ref, space_of
    from xbtcore.bundle import is_bundle, load_compatible
    from xbtcore.data import LazyImages, check_output, write_embeddings_parquet
    from xbtcore.embed_input import read_ids, read_images, read_texts
    from xbtcore.encoders import DualEncoder, resolve_compile, resolve_device, resolve_precision

    check_output(a.out, folder=False)
    resolved = resolve_ref(a.model)
    ref = absolute_ref(resolved)
    if a.modality == "text":
        items = read_texts(a.input, a.text_column)
    else:
        items = read_images(a.input)
    device = resolve_device(a.device)
    on = {"device": device, "dtype": PRECISIONS[resolve_precision(a.precision, device)]}
    if is_bundle(ref):
        encoder, meta = load_compatible(ref, **on)
        root = meta.root_model
    else:
        encoder, root = DualEncoder.from_pretrained(ref, **on), ref
    encoder.compile_after = resolve_compile(a.compile, device)  # a bundle's sets its encoders' own
    if a.modality == "text":
        emb = encoder.embed_texts(items, batch_size=a.batch_size, progress=not a.no_progress)
    else:
        emb = encoder.embed_images(LazyImages(items), batch_size=a.batch_size, progress=not a.no_progress)
    model = pinned_ref(str(Path(a.model).absolute()) if Path(a.model).is_dir() else a.model, resolved)
    stamp = {"model": model, "space": space_of(root), "modality": a.modality}
    out = write_embeddings_parquet(a.out, emb, ids=read_ids(a.input), stamp=stamp)  # `id`: what galleries match on
    Catalog(state_dir() / "catalog.duckdb").record_gallery(
        str(Path(out).absolute()), model, stamp["space"], a.modality, int(emb.shape[0]), int(emb.shape[1])
    )
    print(f"{emb.shape[0]} {a.modality} embeddings (dim {emb.shape[1]}, space {space_of(root)}) -> {out}")
    return 0


def _query_model(ref: str, device: str = "cpu", precision: str = "auto", compile: str = "off"):
    """The model at `ref` on `device` at `precision`, its bulk passes compiled or not, as --device,
    --precision and --compile settle them."""
    from serve.engine import load_query_model
    from xbtcore.encoders import resolve_compile, resolve_device, resolve_precision

    device = resolve_device(device)
    return load_query_model(ref, device, resolve_precision(precision, device), resolve_compile(compile, device))


def cmd_index(a) -> int:
    from serve.gallery import index_gallery
    from xbtcore.data import check_output

    check_output(a.out, folder=True)
    r = index_gallery(
        _query_model(a.model, a.device, a.precision, a.compile),
        a.input,
        a.modality,
        a.out,
        text_column=a.text_column,
        images=a.images,
        chunk_rows=a.chunk_rows,
        kind=a.kind,
    )
    print(f"{r['items']} {a.modality} items indexed (space {r['space']}) -> {r['out']}")
    if a.qdrant:
        from serve.qdrant import ALIAS, connect, export

        name = export(a.out, connect(a.qdrant))
        print(f"Qdrant {a.qdrant}: collection {name}, alias {ALIAS}")
    return 0


def cmd_search(a) -> int:
    from serve.app import MAX_K, _image, _text
    from serve.engine import Engine
    from xbtcore.backfill import MixedGallery

    if not 1 <= a.k <= MAX_K:
        raise ValueError(f"--k must be from 1 to {MAX_K}, got {a.k}")
    if a.text is not None:
        try:
            _text(a.text, "--text")
        except Exception as e:
            raise ValueError(getattr(e, "detail", str(e))) from e
    image = None
    if a.image is not None:
        try:
            image = _image(Path(a.image).read_bytes())
        except Exception as e:
            raise ValueError(f"{a.image}: {getattr(e, 'detail', e)}") from e
    if a.qdrant:
        from serve.qdrant import QdrantGallery, connect

        gallery = QdrantGallery(a.index, connect(a.qdrant, existing=True))
    else:
        gallery = MixedGallery(a.index)
    engine = Engine(_query_model(a.model), gallery)
    print(json.dumps(engine.search(a.k, a.text, image), default=str))
    return 0


def _free_port(host: str, port: int) -> int:
    """Checks that the server can listen on host:port before anything loads, so a port in use fails at once in
    one line; -> the port (a free one for 0). uvicorn binds it again itself: a server handed a bound socket
    (uvicorn.Server.run(sockets=...)) batched concurrent queries half as well in bench/serving.py load."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror}): pass a free --port, "
                "or stop the server that holds it"
            ) from e
        return sock.getsockname()[1]


def cmd_serve(a) -> int:
    import uvicorn

    from serve.app import create_app
    from serve.engine import Server, one_thread_per_request

    if not 0 <= a.batch_wait_ms <= 1000:
        raise ValueError(f"--batch-wait-ms must be from 0 to 1000, got {a.batch_wait_ms:g}")
    if not 0 <= a.poll_seconds < float("inf"):
        raise ValueError(f"--poll-seconds must be 0 (never) or a positive number of seconds, got {a.poll_seconds:g}")
    port = _free_port(a.host, a.port)
    one_thread_per_request()
    qdrant = None
    if a.qdrant:
        from serve.qdrant import connect

        qdrant = connect(a.qdrant, existing=True)
    server = Server(a.model, a.index, poll_s=a.poll_seconds, qdrant=qdrant, batch_wait_s=a.batch_wait_ms / 1000)
    server.start()
    e = server.engine.describe()
    print(
        f"serving {e['index']} ({e['items']} items, space {e['space']}) with {e['model']} version "
        f"{e['model_version']} on http://{a.host}:{port}/",
        flush=True,
    )
    try:
        uvicorn.run(create_app(server), host=a.host, port=port, log_level="warning")
    except _Terminated:  # uvicorn hands SIGTERM on once the requests under way have finished (Ctrl-C it keeps)
        pass
    finally:
        server.stop()
    print("stopped", flush=True)
    return 0


def _at_least_one(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _port(text: str) -> int:
    """--port's value: a TCP port number (argparse names the flag when this raises)."""
    port = int(text) if text.strip().lstrip("-").isdigit() else None
    if port is None or not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0 to 65535)")
    return port


def cmd_backfill(a) -> int:
    from serve.gallery import backfill, backfill_status, discard_backfill, remove_old

    if a.remove_old:
        r = remove_old(a.index)
        print(f"{r['index']} now holds the new space {r['space']} only; the old vectors are removed")
        return 0
    if a.discard:
        found = discard_backfill(a.index)
        print(f"{a.index}: {'backfill discarded; the old index is untouched' if found else 'no backfill to discard'}")
        return 0
    if a.status:
        print(json.dumps(backfill_status(a.index)))
        return 0
    if not a.new:
        raise ValueError("pass --new REF (the model whose own space to backfill into), or --status/--remove-old")
    r = backfill(
        a.index,
        _query_model(a.new, a.device, a.precision, a.compile),
        order=a.order,
        chunk_rows=a.chunk_rows,
        seed=a.seed,
    )
    if a.qdrant and r["complete"]:  # the new space's collection, then Qdrant's alias swap
        from serve.qdrant import ALIAS, connect, export

        name = export(str(Path(a.index) / "backfill"), connect(a.qdrant))
        print(f"Qdrant {a.qdrant}: alias {ALIAS} now on {name}")
    state = (
        f"complete: serving moves to it; `xbt backfill --index {a.index} --remove-old` drops the old vectors"
        if r["complete"]
        else "partial: the same command again continues"
    )
    print(f"{r['backfilled']} of {r['items']} items in the new space {r['space']} ({state})")
    return 0


@contextlib.contextmanager
def _naming_registry():
    """A refused promote or rollback names the registry it read, as its other lines do."""
    from tasks.registry import tracking_uri

    try:
        yield
    except ValueError as e:
        uri = tracking_uri()
        if uri in str(e):
            raise
        raise ValueError(f"{e} [registry {uri}]") from e


def cmd_promote(a) -> int:
    from tasks.registry import CANDIDATE, client, pick_model, promote_reviewed, tracking_uri

    c = client()
    with _naming_registry():
        name = pick_model(c, a.model)
        version = (
            str(a.version) if a.version is not None else str(c.get_model_version_by_alias(name, CANDIDATE).version)
        )
        r = promote_reviewed(c, name, version, force=a.force)
    for line in r["failures"]:
        print(f"forced past a failing check: {line}")
    if r["report_missing"]:
        print(
            f"note: version {r['version']}'s MLflow run has no report.json: the xbt upgrade that made it stopped "
            "before attaching it (or is still running); the same xbt upgrade again attaches it"
        )
    print(
        f"{name} version {r['version']} is champion"
        + (f" (was {r['previous'] or 'unset'})" if r["changed"] else " (already)")
        + f" [registry {tracking_uri()}]"
    )
    return 0


def cmd_rollback(a) -> int:
    from tasks.registry import client, pick_model, rollback, tracking_uri

    c = client()
    with _naming_registry():
        r = rollback(c, pick_model(c, a.model))
    print(
        f"{r['name']} champion rolled back from version {r['rolled_back_from']} to {r['version']} "
        f"[registry {tracking_uri()}]"
    )
    return 0


def cmd_methods(a) -> int:
    from xbtcore.methods import COST_CLASSES, by_cost

    rows = [
        {
            "method": m.name,
            "cost": m.cost,
            "old encoder at query": "yes" if m.old_encoder_at_query else "no",
            "trains": m.trains,
            "bundle": m.bundle,
            "summary": m.summary,
        }
        for m in by_cost()
    ]
    if a.json:
        print(json.dumps({"methods": rows, "cost_classes": COST_CLASSES}, indent=2))
        return 0
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in ("method", "cost", "old encoder at query")}
    print("  ".join(k.ljust(w) for k, w in widths.items()) + "  what it is")
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in widths.items()) + f"  {r['summary']}")
        print(" " * (sum(widths.values()) + 2 * len(widths)) + f"trains: {r['trains']}; bundle: {r['bundle']}")
    print("cost classes: " + "; ".join(f"{k} = {v}" for k, v in COST_CLASSES.items()))
    return 0


def cmd_catalog(a) -> int:
    from catalog.store import TABLES
    from tasks.registry import tracking_uri
    from tasks.report import catalog

    cat = catalog()
    tables = {t: cat.rows(t) for t in (a.table or TABLES)}
    if a.json:
        print(json.dumps(tables, default=str, indent=2))
        return 0
    print(f"catalog {cat.path}; registry now {tracking_uri()} (each run names the registry it was registered in)")
    for t, rows in tables.items():
        print(f"== {t} ({len(rows)})")
        for r in rows:
            print("  " + "  ".join(f"{k}={v}" for k, v in r.items() if k != "recorded_at"))
    return 0


EPILOG = (
    "The inputs, the recall protocol, report.json and these commands are specified in docs/contract.md; "
    "docs/method.md explains the methods. Exit status 0 on success, else one line on stderr."
)
MODEL_REF = (
    "a Hugging Face model id or local directory (config, weights, tokenizer, image processor), an upgrade "
    "bundle (OUT/bundle), or a registry URI such as models:/NAME@champion"
)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each flag's help with its default where it has one; descriptions kept as written."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.required or action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from xbtcore.methods import by_cost

    methods = [m.name for m in by_cost()]
    p = _Parser(
        prog="xbt",
        description="Backfill-free upgrades of vision-language retrieval models: train a small "
        "adapter so that a new model's queries search the gallery the old model embedded.",
        epilog=EPILOG,
        formatter_class=_Help,
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG, formatter_class=_Help)

    def runtime(sp):
        sp.add_argument("--device", default="auto", help="where the encoders and training run: " + DEVICE_HELP)
        sp.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help=PRECISION_HELP)
        sp.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help=COMPILE_HELP)

    def common(sp):
        runtime(sp)
        sp.add_argument("--nproc", default="auto", help=NPROC_HELP)
        sp.add_argument(
            "--method",
            default="auto",
            choices=["auto", *methods],
            help="the upgrade method (`xbt methods` lists them); auto tries the registered candidates "
            "cheapest first and keeps the first that passes the gate on the validation pairs",
        )
        sp.add_argument(
            "--seed", type=int, default=0, help="seed of training, the validation split and sampling (default: 0)"
        )
        sp.add_argument(
            "--val-fraction",
            type=float,
            default=0.1,
            help="share of the pairs' images held out of training to choose and check the method on "
            "(at least 500 images, at most half); 0: none (then --method must name one)",
        )
        sp.add_argument(
            "--allow-old-encoder",
            action="store_true",
            help="let auto choose a method whose queries also run the old encoder (slerp-bc, xbt-gallery-blend)",
        )
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SCOPE.FIELD=VALUE",
            help="a setting of the method, repeatable: pretrain.FIELD (φ's pretraining, e.g. "
            "pretrain.pair_weight=1) or finetune.FIELD (training on the pairs, e.g. finetune.lora.rank=8)",
        )

    d = command("demo", "the whole upgrade on the built-in world: zoo/old -> zoo/new, recall table, gate verdict")
    d.add_argument("--out", default="out/demo", help="run folder: report.json, report.html, bundle/, work/")
    d.add_argument("--old", default="zoo/old", help="the gallery's model: " + MODEL_REF)
    d.add_argument("--new", default="zoo/new", help="the new model: " + MODEL_REF)
    common(d)
    d.set_defaults(func=cmd_demo)

    u = command("upgrade", "upgrade --old to --new on your Parquet data, gate it, register it")
    u.add_argument("--old", required=True, help="the model the gallery was embedded with: " + MODEL_REF)
    u.add_argument("--new", required=True, help="the new model: " + MODEL_REF)
    u.add_argument(
        "--corpus",
        required=True,
        help="text corpus Parquet (a file, a folder or a glob) with a caption column (--text-column)",
    )
    u.add_argument(
        "--pairs",
        required=True,
        help="image-text pairs Parquet: image (PNG/JPEG bytes) or image_path, caption, optional image_id",
    )
    u.add_argument("--eval", required=True, help="eval set Parquet, as --pairs; read only for the final report")
    u.add_argument("--out", required=True, help="run folder: report.json, report.html, bundle/, work/")
    common(u)
    u.add_argument(
        "--gallery",
        help="the stored old gallery (`xbt embed --modality image` of the old model, with "
        "id = the pairs' image_id): its embeddings stand in for the old image tower",
    )
    u.add_argument(
        "--eval-in-gallery",
        action="store_true",
        help="the eval set's image_id name --gallery items too: the eval images' old embeddings are read from "
        "it, so with every image there the old image tower embeds none (off: it embeds the eval set)",
    )
    u.add_argument(
        "--dask",
        metavar="local:N|tcp://HOST:PORT",
        help="embed the corpus across Dask workers: N worker processes on this machine, or a running cluster's "
        "scheduler whose workers see the state folder; each shard is cached, so a killed run resumes",
    )
    u.add_argument("--text-column", default="caption", help="the corpus's text column")
    u.add_argument("--min-chars", type=int, help="drop corpus texts shorter than this (default: none dropped)")
    u.add_argument("--max-chars", type=int, help="drop corpus texts longer than this (default: none dropped)")
    u.add_argument("--sample", type=int, help="keep at most this many corpus texts (seeded; default: all)")
    u.add_argument("--no-progress", action="store_true", help="no progress bars (shown on a terminal only)")
    u.set_defaults(func=cmd_upgrade)

    e = command("embed", "embed texts or images with a model; a bundle embeds into the old space")
    e.add_argument("--model", required=True, help=MODEL_REF)
    e.add_argument(
        "--input",
        required=True,
        help="Parquet with the texts (--text-column) or images (image or "
        "image_path); its id or image_id column becomes the output's id",
    )
    e.add_argument("--modality", required=True, choices=["text", "image"], help="what to embed")
    e.add_argument("--out", required=True, help="output Parquet: row, embedding (L2-normalised), id")
    e.add_argument("--text-column", default="caption", help="the input's text column")
    e.add_argument("--batch-size", type=_at_least_one, default=256, help="items per forward pass")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal only)")
    runtime(e)
    e.set_defaults(func=cmd_embed)

    ix = command("index", "build a search index of a gallery, stamped with its embedding space")
    ix.add_argument(
        "--model", required=True, help="the gallery's model (a bundle: its compatible, old space): " + MODEL_REF
    )
    ix.add_argument(
        "--input",
        required=True,
        help="image or text Parquet (image/image_path, or --text-column), "
        "or an embedding Parquet written by `xbt embed`; ids from id, else image_id, else the row",
    )
    ix.add_argument("--modality", required=True, choices=["image", "text"], help="what the gallery holds")
    ix.add_argument("--out", required=True, help="index folder; the same command again resumes an unfinished one")
    ix.add_argument(
        "--images",
        help="with an embedding --input: the image/text Parquet it was embedded from "
        "(same ids), kept for backfills and the search page's thumbnails",
    )
    ix.add_argument("--text-column", default="caption", help="the input's text column")
    ix.add_argument("--chunk-rows", type=_at_least_one, default=4096, help="items per resumable chunk")
    ix.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "flat", "ivf"],
        help="exact (flat) or approximate (ivf) search; auto: exact under 1,000,000 items",
    )
    ix.add_argument(
        "--qdrant",
        metavar="PATH|URL",
        help="also export the index to Qdrant (a local folder: "
        "embedded mode; a URL: a server), as a collection of its space behind the alias xbt-gallery",
    )
    runtime(ix)
    ix.set_defaults(func=cmd_index)

    se = command("search", "one query against an index, printed as JSON (as POST /search answers)")
    se.add_argument("--index", required=True, help="index folder written by `xbt index`")
    se.add_argument("--model", required=True, help="the query model, of the index's space: " + MODEL_REF)
    q = se.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="a text query")
    q.add_argument("--image", help="an image file (PNG or JPEG) as the query")
    se.add_argument("--k", type=int, default=10, help="how many results (1 to 1000)")
    se.add_argument(
        "--qdrant",
        metavar="PATH|URL",
        help="search the Qdrant collection behind the alias "
        "xbt-gallery (--index's own or its finished backfill's) instead of --index's faiss index",
    )
    se.set_defaults(func=cmd_search)

    sv = command("serve", "the search API and page over an index; follows the registry alias as it moves")
    sv.add_argument("--index", required=True, help="index folder written by `xbt index`")
    sv.add_argument("--model", required=True, help="the query model, of the index's space: " + MODEL_REF)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    sv.add_argument("--port", type=_port, default=8000, help="TCP port, 0 to 65535 (0: any free one)")
    sv.add_argument(
        "--poll-seconds",
        type=float,
        default=5.0,
        help="how often to re-resolve a models:/NAME@ALIAS and re-read the backfill; 0: never",
    )
    sv.add_argument(
        "--qdrant",
        metavar="PATH|URL",
        help="search the Qdrant collection behind the alias xbt-gallery (--index's own or its finished "
        "backfill's; the server follows the alias when it moves) instead of the faiss index",
    )
    sv.add_argument(
        "--batch-wait-ms",
        type=float,
        default=BATCH_WAIT_S * 1000,
        help="how long a batch of concurrent text queries waits for the callers the last batch answered "
        "(they share one forward pass and one scan); a lone query after a lone query never waits",
    )
    sv.set_defaults(func=cmd_serve)

    bf = command("backfill", "re-embed an index's gallery into a new model's own space, resumably, beside the old")
    bf.add_argument("--index", required=True, help="index folder written by `xbt index` (it keeps its source)")
    bf.add_argument(
        "--new", help="the model whose own space to backfill into (a bundle: its base new model): " + MODEL_REF
    )
    bf.add_argument(
        "--order",
        choices=BACKFILL_ORDERS,
        help="which items first (default: learned where --new is an upgrade's bundle and the index holds "
        f"images, else {BACKFILL_ORDER}): learned by the gain model the upgrade fitted on its validation pairs "
        "with isolation; isolated-first the items farthest from their nearest neighbour in the old space; "
        "cluster-ends and dense-clusters whole old-space neighbourhoods, the loosest and the tightest "
        "alternately or the tightest first (docs/serving.md measures each against random)",
    )
    bf.add_argument("--chunk-rows", type=_at_least_one, default=1024, help="items per resumable chunk")
    bf.add_argument("--seed", type=int, default=0, help="seed of the random order (default: 0)")
    act = bf.add_mutually_exclusive_group()
    act.add_argument("--status", action="store_true", help="print the backfill's progress as JSON and exit")
    act.add_argument(
        "--remove-old",
        action="store_true",
        help="after a finished backfill: the new-space index replaces the old one (no rollback after)",
    )
    act.add_argument("--discard", action="store_true", help="drop the backfill; the old index is untouched")
    bf.add_argument(
        "--qdrant",
        metavar="PATH|URL",
        help="when the backfill finishes, export the new space to Qdrant and move the alias xbt-gallery to it",
    )
    runtime(bf)
    bf.set_defaults(func=cmd_backfill)

    pr = command("promote", "move the alias champion to a version (a passing upgrade moves it by itself)")
    pr.add_argument("--model", help="registered model name (default: the only xbt one)")
    pr.add_argument("--version", type=int, help="version number (default: the alias candidate, the latest registered)")
    pr.add_argument("--force", action="store_true", help="promote a version whose gate failed; recorded on it")
    pr.set_defaults(func=cmd_promote)

    rb = command("rollback", "move the alias champion back to the version it replaced")
    rb.add_argument("--model", help="registered model name (default: the only xbt one)")
    rb.set_defaults(func=cmd_rollback)

    m = command("methods", "the registered upgrade methods: what each trains, its bundle and its cost")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_methods)

    c = command("catalog", "list datasets, gallery spaces, galleries, runs and lineage from the catalog")
    c.add_argument(
        "--table",
        action="append",
        choices=["datasets", "spaces", "galleries", "runs", "lineage"],
        help="only these tables (repeatable)",
    )
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_catalog)
    return p


def _quiet_weight_loading() -> None:
    """No bars from transformers itself ("Loading weights", "Writing model shards") on stderr: they are noise
    beside the one-line error a failed command prints there (CONTRACT.md), and ours cover the long steps.
    Download bars (huggingface_hub's own) stay."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": True})

    hf_logging.set_tqdm_hook(hook)


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task's traceback to the run log (stdout here); for an input the user can fix,
    the one-line message says everything, so its record keeps the message and drops the traceback."""

    def __init__(self, kinds: tuple[type, ...]):
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.kinds):
            record.exc_info, record.exc_text = None, None
        return True


def _not_bookkeeping(record: logging.LogRecord) -> bool:
    """Drops Prefect's two lines per step about the hook that records the step's state (tasks.common)."""
    return "'_record_state'" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    _set_env_defaults()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    _quiet_weight_loading()
    from pydantic import ValidationError

    from tasks.servers import ServerUnreachable
    from xbtcore.data import InputError
    from xbtcore.encoders import ModelLoadError
    from xbtcore.losses import DivergedError

    quiet = _UserErrorsWithoutTraceback((InputError, ModelLoadError, DivergedError))
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(quiet)
        logging.getLogger(name).addFilter(_not_bookkeeping)

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, _on_sigterm)  # during a flow Prefect's handler hands the signal on to this one
    try:
        return args.func(args)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if len(loc) == 1 and hasattr(args, loc[0]):  # a flag's own value: named as the flag, with what was given
            given = "" if str(err["input"]) in msg else f", got {err['input']!r}"
            return _fail(f"--{loc[0].replace('_', '-')}: {msg}{given}")
        where = ".".join(loc)
        return _fail(f"{where + ': ' if where else ''}{msg}")
    except (ValueError, ModelLoadError, ServerUnreachable, DivergedError, FileNotFoundError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; the same command again resumes from the last finished step", 130)
    except _Terminated:
        return _fail("terminated (SIGTERM); the same command again resumes from the last finished step", 143)
    except Exception as e:
        if os.environ.get("XBT_DEBUG"):
            raise
        full = _disk_full(e)
        if full is not None:
            return _fail(
                f"no space left on the disk of {full or 'an output'}: free space there (or write to another disk) "
                "and run the same command again; finished steps are kept"
            )
        return _fail(f"{type(e).__name__}: {e} (set XBT_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
