"""An in-process Cloud Storage emulator that answers like the real service where cptjax's clients
depend on it. `start()` points gcsfs, google-cloud-storage, tensorstore and google-cloud-cpp at it
through environment variables, so call it before any of them starts.

Run as a script, it checks the one behaviour the stock emulator gets wrong and the tests rely on:

    python tests/gcs_emulator.py     # prints a JSON summary; exit 0 when it answers like GCS
"""

import json
import logging
import os
import socket
from http import HTTPStatus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_move(request, response, storage):
    """The emulator lacks the moveTo API; answering 400 at once (not its 501, which clients retry
    with backoff for half a minute) makes gcsfs fall back to copy and delete, as it does on a
    bucket without the API."""
    response.status = HTTPStatus.BAD_REQUEST
    response.json({"error": {"code": 400, "message": "moveTo is not emulated"}})


def _with_generation_headers(download):
    """Cloud Storage sends an object's generation with its bytes (x-goog-generation); the emulator
    does not. tensorstore reads the generation from that header alone and takes a missing one as
    0, which it then refuses as the condition of its next write ("Malformed StorageGeneration"):
    an OCDBT manifest (Orbax's array data) read back once, by a new context or after its cache
    went stale, could not be written again."""

    def handler(request, response, storage, *args, **kwargs):
        from gcp_storage_emulator.exceptions import NotFound

        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            pass  # the download itself answers 404
        else:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        return download(request, response, storage, *args, **kwargs)

    return handler


def start(bucket: str = "bucket"):
    """Starts the emulator on a free local port with `bucket` made; returns the server (`.stop()`)."""
    url = f"http://127.0.0.1:{_free_port()}"
    os.environ.update({
        "STORAGE_EMULATOR_HOST": url,             # gcsfs (epath) and google-cloud-storage (Orbax, tensorboardX)
        "TENSORSTORE_GCS_HTTP_URL": url,          # tensorstore: Orbax's array data
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,   # google-cloud-cpp: ArrayRecord
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no credentials lookup
        "GOOGLE_CLOUD_PROJECT": "test",
        "NO_GCE_CHECK": "True",                   # google-auth: no metadata-server probe (seconds each)
        "EPATH_USE_TF": "false",
    })
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.handlers import objects

    # `get` (alt=media) calls the module's `download`; the /download/ route holds it directly
    original = objects.download
    objects.download = _with_generation_headers(original)
    emulator.HANDLERS = (
        (r"^/storage/v1/b/[-.\w]+/o/.*/moveTo/o/.*$", {"POST": _no_move}),
        *((pattern, {method: objects.download if fn is original else fn for method, fn in methods.items()})
          for pattern, methods in emulator.HANDLERS))
    server = emulator.create_server("127.0.0.1", int(url.rsplit(":", 1)[1]), in_memory=True,
                                    default_bucket=bucket)
    server.start()
    return server


def _check() -> dict:
    """An OCDBT database written, then opened afresh (its manifest read back) and written again: what
    a checkpoint's second writer does, and what failed against the stock emulator."""
    import tensorstore as ts

    spec = {"driver": "ocdbt", "base": "gs://bucket/db/"}
    ts.KvStore.open(spec).result().write("a", b"1").result()
    reopened = ts.KvStore.open(spec, context=ts.Context()).result()
    try:
        reopened.write("b", b"2").result()
    except ValueError as err:
        return {"error": str(err)}
    return {"keys": sorted(k.decode() for k in reopened.list().result())}


if __name__ == "__main__":
    server = start()
    summary = _check()
    print(json.dumps(summary), flush=True)
    server.stop()
    os._exit(1 if "error" in summary else 0)  # clients' background threads would keep the process alive
