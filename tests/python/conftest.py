"""Fixtures: `microfaas serve` processes on 127.0.0.1 (port 0), boto3
clients signed with the credentials file the server reads."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import boto3
import botocore.config
import pytest

BIN = os.environ["MICROFAAS_BIN"]
FUNCTIONS = os.environ["MICROFAAS_FUNCTIONS_DIR"]
TMP = os.environ.get("MICROFAAS_TEST_TMP", tempfile.gettempdir())
KEY_ID = "AKIDMICROFAASTEST"
SECRET = "microfaas-test-secret-1"
OTHER_KEY_ID = "AKIDOTHERTENANT"
OTHER_SECRET = "microfaas-test-secret-2"
ROLE = "arn:aws:iam::000000000000:role/microfaas"


def artifact(name):
    with open(os.path.join(FUNCTIONS, f"{name}.so"), "rb") as f:
        return f.read()


class Server:
    """One `microfaas serve` process; stopped with SIGTERM."""

    def __init__(self, workdir, creds, registry=None, extra=(), node_name=None):
        self.stderr_path = os.path.join(workdir, f"serve-{node_name or 'node'}.log")
        self.registry = registry or os.path.join(workdir, "registry")
        args = [BIN, "serve", "--listen", "127.0.0.1:0", "--registry", self.registry, *extra]
        if creds is not None:
            args += ["--credentials", creds]
        if node_name:
            args += ["--node-name", node_name]
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening http://"):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}, see {self.stderr_path}")
        self.url = line.strip().removeprefix("listening ")
        self.port = int(self.url.rsplit(":", 1)[1])

    def log(self):
        """The access log so far, parsed."""
        self.stderr.flush()
        out = []
        with open(self.stderr_path, "rb") as f:
            for raw in f:
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    pass
        return out

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


def client(url, key_id=KEY_ID, secret=SECRET, read_timeout=120, pool=10):
    session = boto3.session.Session(
        aws_access_key_id=key_id, aws_secret_access_key=secret, region_name="us-east-1"
    )
    return session.client(
        "lambda",
        endpoint_url=url,
        config=botocore.config.Config(
            retries={"total_max_attempts": 1},
            read_timeout=read_timeout,
            connect_timeout=10,
            max_pool_connections=pool,
        ),
    )


@pytest.fixture(scope="session")
def workdir(request):
    d = tempfile.mkdtemp(prefix="serve-", dir=TMP)
    yield d
    # Kept for a look when a test failed (or MICROFAAS_KEEP_TEST_TMP=1).
    if request.session.testsfailed == 0 and os.environ.get("MICROFAAS_KEEP_TEST_TMP") != "1":
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def creds(workdir):
    path = os.path.join(workdir, "credentials")
    with open(path, "w") as f:
        f.write(f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
                f"[other]\naws_access_key_id = {OTHER_KEY_ID}\naws_secret_access_key = {OTHER_SECRET}\n")
    return path


@pytest.fixture(scope="session")
def server(workdir, creds):
    s = Server(workdir, creds, extra=["--event-queue", "1"])
    yield s
    assert s.stop() == 0, "SIGTERM ends the server with success"


@pytest.fixture(scope="session")
def lam(server):
    return client(server.url)


def create(lam, name, fn="echo", runtime="microfaas-process", **kw):
    return lam.create_function(
        FunctionName=name,
        Runtime=runtime,
        Role=ROLE,
        Handler="handle",
        Code={"ZipFile": artifact(fn)},
        **kw,
    )


def wait_until(pred, timeout=30.0, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
