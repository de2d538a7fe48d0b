"""Real object storage on loopback for the storage tests and benchmarks: moto's standalone S3 server and a
static-file HTTP server, each on 127.0.0.1 (a free port) in a thread of this process.

    with s3_server() as s3:          # sets AWS_* for this process and its children (restored afterwards)
        s3.bucket("shards")          # s3://shards/...
    with http_server(folder) as web: # web.url == "http://127.0.0.1:PORT"; web.gets: {path: GET count}
    with http_server(folder, tls=True) as web:  # https://127.0.0.1:PORT, a self-signed certificate curl trusts

The S3 server is moto's real HTTP implementation of the S3 API (boto3/s3fs speak to it over TCP exactly as to
AWS, through AWS_ENDPOINT_URL); nothing in the code under test is patched.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"


class S3:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str) -> str:
        """Create the bucket (if new); returns s3://name."""
        c = self.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
            c.create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_folder(self, folder: Path, url: str) -> None:
        """Every file under `folder` to the s3:// prefix `url`, by relative path."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        c = self.client()
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                key = "/".join(x for x in (prefix.strip("/"), str(p.relative_to(folder))) if x)
                c.upload_file(str(p), bucket, key)

    def objects(self, url: str) -> dict[str, bytes]:
        """{path under the prefix: bytes} of every object under the s3:// prefix `url`."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix):]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out

    def delete(self, url: str) -> None:
        bucket, _, key = url[len("s3://"):].partition("/")
        self.client().delete_object(Bucket=bucket, Key=key)


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 with the AWS_* variables of this process pointing at it (children inherit
    them); the previous values come back afterwards."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3(f"http://{host}:{port}")
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        yield s3
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, quiet, counting GETs; sends a file with sendfile (the stock handler copies in 16 KiB reads,
    which would make loopback HTTP the bottleneck of a throughput benchmark)."""

    gets: Counter

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.gets[self.path.split("?")[0].lstrip("/")] += 1
        f = self.send_head()
        if f is None:
            return
        try:
            self.wfile.flush()
            try:
                self.connection.sendfile(f)
            except (AttributeError, OSError, ValueError):
                shutil.copyfileobj(f, self.wfile, 1 << 20)
        finally:
            f.close()


class HTTP:
    def __init__(self, server: http.server.ThreadingHTTPServer, gets: Counter, tls: bool):
        self.server, self.gets = server, gets
        self.url = f"{'https' if tls else 'http'}://{LOOPBACK}:{server.server_address[1]}"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (subjectAltName IP) and its key, valid for a day: (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


@contextlib.contextmanager
def http_server(folder: Path, tls: bool = False) -> Iterator[HTTP]:
    """`folder` served read-only on http://127.0.0.1:PORT (GET and HEAD; missing files are 404). `tls`: on
    https://127.0.0.1:PORT with a self-signed certificate, which this process and its children trust through
    CURL_CA_BUNDLE (curl's own variable: webdataset's gopen fetches https with curl, certificate checks on)."""
    import ssl
    import tempfile

    gets: Counter = Counter()
    handler = type("Handler", (_Handler,), {"gets": gets})
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), functools.partial(handler, directory=str(folder)))
    saved = os.environ.get("CURL_CA_BUNDLE")
    certs = tempfile.TemporaryDirectory(prefix="s3vos-tls-") if tls else None
    if tls:
        cert, key = self_signed(Path(certs.name))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        os.environ["CURL_CA_BUNDLE"] = str(cert)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HTTP(server, gets, tls)
    finally:
        server.shutdown()
        server.server_close()
        if tls:
            if saved is None:
                os.environ.pop("CURL_CA_BUNDLE", None)
            else:
                os.environ["CURL_CA_BUNDLE"] = saved
            certs.cleanup()
