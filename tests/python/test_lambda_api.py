"""The Lambda API of `microfaas serve` through unmodified boto3 and the AWS
CLI: create from a built artifact, invoke with binary payloads, get / list /
update / delete, each error as the client's usual exception, SigV4 refusals
with nothing run, 64 concurrent clients, graceful SIGTERM."""

import base64
import concurrent.futures
import hashlib
import io
import json
import os
import subprocess
import threading
import time
import zipfile

import botocore.auth
import botocore.exceptions
import datetime
import signal
import sys
import urllib.error
import urllib.request
import pytest

from conftest import OTHER_KEY_ID, OTHER_SECRET, ROLE, Server, artifact, client, create, wait_until


def test_create_from_zip_and_invoke_binary_payload_round_trip(lam, server):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("echo.so", artifact("echo"))
    conf = lam.create_function(
        FunctionName="echo", Runtime="microfaas-process", Role=ROLE, Handler="h",
        Code={"ZipFile": buf.getvalue()}, Timeout=5, MemorySize=128,
    )
    assert conf["FunctionName"] == "echo"
    assert conf["Timeout"] == 5 and conf["MemorySize"] == 128
    assert conf["CodeSha256"] == base64.b64encode(hashlib.sha256(artifact("echo")).digest()).decode()
    payload = bytes(range(256)) * 64 + b"\x00\xff"
    r = lam.invoke(FunctionName="echo", Payload=payload)
    assert r["StatusCode"] == 200
    assert "FunctionError" not in r
    assert r["Payload"].read() == payload
    h = r["ResponseMetadata"]["HTTPHeaders"]
    assert h["x-microfaas-backend"] == "process"
    assert h["x-microfaas-start"] in ("warm", "cold")
    assert "total_ns=" in h["x-microfaas-timings"]
    r = lam.invoke(FunctionName="echo", Payload=b"")
    assert r["Payload"].read() == b""


def test_get_list_update_delete(lam):
    create(lam, "lifecycle", fn="echo")
    got = lam.get_function(FunctionName="lifecycle")
    assert got["Configuration"]["Runtime"] == "microfaas-process"
    assert got["Configuration"]["State"] == "Active"
    names = [f["FunctionName"] for f in lam.list_functions()["Functions"]]
    assert "lifecycle" in names
    pages = lam.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 1})
    paged = [f["FunctionName"] for p in pages for f in p["Functions"]]
    assert paged == sorted(names)
    assert lam.invoke(FunctionName="lifecycle", Payload=b"abc")["Payload"].read() == b"abc"
    upd = lam.update_function_code(FunctionName="lifecycle", ZipFile=artifact("sha512"))
    assert upd["RevisionId"] != got["Configuration"]["RevisionId"]
    out = lam.invoke(FunctionName="lifecycle", Payload=b"1")["Payload"].read()
    assert len(out) == 64, "the updated code (sha512) answers"
    lam.delete_function(FunctionName="lifecycle")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="lifecycle", Payload=b"abc")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="lifecycle")
    assert "lifecycle" not in [f["FunctionName"] for f in lam.list_functions()["Functions"]]


def test_every_backend_by_runtime(lam):
    for runtime in ("microfaas-language", "microfaas-vm"):
        name = "echo-" + runtime.split("-")[1]
        create(lam, name, runtime=runtime)
        r = lam.invoke(FunctionName=name, Payload=b"\x01\x02 across backends")
        assert r["Payload"].read() == b"\x01\x02 across backends"
        assert r["ResponseMetadata"]["HTTPHeaders"]["x-microfaas-backend"] == runtime.split("-")[1]


def test_errors_are_the_clients_usual_exceptions(lam):
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="missing")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.delete_function(FunctionName="missing")
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        create(lam, "badruntime", runtime="python3.12")
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.create_function(FunctionName="notelf", Runtime="microfaas-process", Role=ROLE,
                            Handler="h", Code={"ZipFile": b"\x7fELF but not an artifact"})
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        create(lam, "badtimeout", Timeout=901)
    create(lam, "dup")
    with pytest.raises(lam.exceptions.ResourceConflictException):
        create(lam, "dup")
    with pytest.raises(lam.exceptions.RequestTooLargeException):
        lam.invoke(FunctionName="dup", Payload=b"x" * (6 * 1024 * 1024 + 1))
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.invoke(FunctionName="dup", InvocationType="Bogus", Payload=b"")
    # Nothing was stored for the refused uploads.
    assert {"badruntime", "notelf", "badtimeout"}.isdisjoint(
        f["FunctionName"] for f in lam.list_functions()["Functions"])


def test_function_failure_is_unhandled_with_our_error_kind(lam):
    create(lam, "panics", fn="panics")
    r = lam.invoke(FunctionName="panics", Payload=b"")
    assert r["StatusCode"] == 200
    assert r["FunctionError"] == "Unhandled"
    body = json.loads(r["Payload"].read())
    assert body["errorType"] == "Panicked", body
    create(lam, "spin1", fn="spin", Timeout=1)
    r = lam.invoke(FunctionName="spin1", Payload=b"")
    assert r["FunctionError"] == "Unhandled"
    assert json.loads(r["Payload"].read())["errorType"] == "BudgetExceeded"


def test_event_is_queued_and_run_and_a_full_queue_is_429(lam, server):
    create(lam, "spin-ev", fn="spin", Timeout=1)
    create(lam, "echo-ev", fn="echo")
    r = lam.invoke(FunctionName="echo-ev", InvocationType="Event", Payload=b"queued")
    assert r["StatusCode"] == 202
    assert wait_until(lambda: any(l.get("event") == "async_invoke" and l.get("fn") == "echo-ev"
                                  and str(l.get("outcome", "")).startswith("ok") for l in server.log()))
    # The server under test has --event-queue 1 and two consumers: spins of
    # 1 s each fill it within a few requests.
    statuses = []
    with pytest.raises(lam.exceptions.TooManyRequestsException):
        for _ in range(20):
            statuses.append(lam.invoke(FunctionName="spin-ev", InvocationType="Event", Payload=b"")["StatusCode"])
    assert statuses and all(s == 202 for s in statuses)
    r = lam.invoke(FunctionName="echo-ev", InvocationType="DryRun", Payload=b"")
    assert r["StatusCode"] == 204
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="missing", InvocationType="Event", Payload=b"")


def ran(server, fn):
    """Access-log lines of invocations of `fn` that reached a backend."""
    return [l for l in server.log() if l.get("fn") == fn and l.get("backend")]


def test_wrong_secret_unknown_key_expired_and_unsigned_get_403_and_nothing_runs(lam, server, creds):
    create(lam, "guarded")
    before = len(ran(server, "guarded"))
    bad = client(server.url, secret="not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        bad.invoke(FunctionName="guarded", Payload=b"x")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert e.value.response["Error"]["Code"] == "InvalidSignatureException"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        client(server.url, key_id="AKIDUNKNOWN").invoke(FunctionName="guarded", Payload=b"x")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert e.value.response["Error"]["Code"] == "UnrecognizedClientException"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        bad.create_function(FunctionName="sneaky", Runtime="microfaas-process", Role=ROLE,
                            Handler="h", Code={"ZipFile": artifact("echo")})
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # A signature made 10 minutes ago: botocore signs with the clock it reads.
    real = botocore.auth.datetime.datetime

    class Past(real):
        @classmethod
        def utcnow(cls):
            return real.utcnow() - datetime.timedelta(minutes=10)

        @classmethod
        def now(cls, tz=None):
            return real.now(tz) - datetime.timedelta(minutes=10)

    botocore.auth.datetime.datetime = Past
    try:
        with pytest.raises(botocore.exceptions.ClientError) as e:
            client(server.url).invoke(FunctionName="guarded", Payload=b"x")
    finally:
        botocore.auth.datetime.datetime = real
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert "expired" in e.value.response["Error"]["Message"].lower()
    # Unsigned (no Authorization at all).
    req = urllib.request.Request(server.url + "/2015-03-31/functions/guarded/invocations", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403
    assert e.value.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
    assert len(ran(server, "guarded")) == before, "nothing ran for a refused request"
    assert "sneaky" not in [f["FunctionName"] for f in lam.list_functions()["Functions"]]
    refused = [l for l in server.log() if l.get("fn") == "guarded" and l.get("status") == 403]
    assert len(refused) >= 4 and all(l["backend"] is None for l in refused)


def test_64_concurrent_clients_all_answered_correctly(lam, server):
    create(lam, "echo64")
    clients = [client(server.url) for _ in range(64)]
    barrier = threading.Barrier(64)

    def one(i):
        c = clients[i]
        barrier.wait(30)
        out = []
        for j in range(4):
            payload = f"client {i} request {j} ".encode() + os.urandom(32)
            got = c.invoke(FunctionName="echo64", Payload=payload)["Payload"].read()
            out.append(got == payload)
        return out

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert all(all(r) for r in results)
    assert len(ran(server, "echo64")) == 256


def test_aws_cli(server, creds, workdir, lam):
    create(lam, "cli-echo")
    env = dict(os.environ, AWS_SHARED_CREDENTIALS_FILE=creds, AWS_CONFIG_FILE=os.devnull,
               AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1")
    aws = [os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "aws")]
    if not os.path.exists(aws[0]):
        aws = [sys.executable, "-m", "awscli"]
    base = [*aws, "--endpoint-url", server.url, "lambda"]
    inp = os.path.join(workdir, "cli-in.bin")
    out = os.path.join(workdir, "cli-out.bin")
    payload = bytes(range(255, -1, -1))
    with open(inp, "wb") as f:
        f.write(payload)
    meta = subprocess.run([*base, "invoke", "--function-name", "cli-echo", "--payload", f"fileb://{inp}", out],
                          env=env, capture_output=True, timeout=60, check=True)
    assert json.loads(meta.stdout)["StatusCode"] == 200
    with open(out, "rb") as f:
        assert f.read() == payload
    listed = subprocess.run([*base, "list-functions"], env=env, capture_output=True, timeout=60, check=True)
    assert "cli-echo" in [f["FunctionName"] for f in json.loads(listed.stdout)["Functions"]]
    missing = subprocess.run([*base, "get-function", "--function-name", "nope"], env=env,
                             capture_output=True, timeout=60)
    assert missing.returncode != 0 and b"ResourceNotFoundException" in missing.stderr


def test_sigterm_finishes_in_flight_then_refuses(workdir, creds):
    s = Server(workdir, creds, registry=os.path.join(workdir, "registry-sigterm"), node_name="drain")
    c = client(s.url)
    create(c, "slow", fn="spin", Timeout=2)
    create(c, "fast")
    assert c.invoke(FunctionName="fast", Payload=b"up")["Payload"].read() == b"up"
    result = {}

    def in_flight():
        result["r"] = c.invoke(FunctionName="slow", Payload=b"")

    create(c, "queued", fn="spin", Timeout=1)
    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(0.5)
    # Accepted before SIGTERM: runs before the server exits.
    assert c.invoke(FunctionName="queued", InvocationType="Event", Payload=b"")["StatusCode"] == 202
    s.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: any(l.get("event") == "draining" for l in s.log()), 10)
    # A new request while the in-flight one finishes: 503, nothing run.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        client(s.url).invoke(FunctionName="fast", Payload=b"during")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert e.value.response["Error"]["Code"] == "ServiceException"
    t.join(60)
    r = result["r"]
    assert r["StatusCode"] == 200 and r["FunctionError"] == "Unhandled"
    assert json.loads(r["Payload"].read())["errorType"] == "BudgetExceeded", "the in-flight invocation finished"
    assert s.proc.wait(60) == 0
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client(s.url).invoke(FunctionName="fast", Payload=b"after")
    log = s.log()
    assert any(l.get("event") == "stopped" and l.get("drained") for l in log)
    ran_queued = [i for i, l in enumerate(log) if l.get("event") == "async_invoke" and l.get("fn") == "queued"]
    stopped = [i for i, l in enumerate(log) if l.get("event") == "stopped"]
    assert ran_queued and "BudgetExceeded" in log[ran_queued[0]]["outcome"] and ran_queued[0] < stopped[0]
    s.stderr.close()


def test_each_profile_is_a_tenant_that_sees_only_its_functions(lam, server):
    create(lam, "mine")
    other = client(server.url, key_id=OTHER_KEY_ID, secret=OTHER_SECRET)
    before = len(ran(server, "mine"))
    with pytest.raises(other.exceptions.ResourceNotFoundException):
        other.invoke(FunctionName="mine", Payload=b"x")
    with pytest.raises(other.exceptions.ResourceNotFoundException):
        other.get_function(FunctionName="mine")
    with pytest.raises(other.exceptions.ResourceNotFoundException):
        other.update_function_code(FunctionName="mine", ZipFile=artifact("panics"))
    with pytest.raises(other.exceptions.ResourceNotFoundException):
        other.delete_function(FunctionName="mine")
    with pytest.raises(other.exceptions.ResourceNotFoundException):
        other.invoke(FunctionName="mine", InvocationType="Event", Payload=b"x")
    assert "mine" not in [f["FunctionName"] for f in other.list_functions()["Functions"]]
    with pytest.raises(other.exceptions.ResourceConflictException):
        create(other, "mine")
    assert len(ran(server, "mine")) == before
    assert lam.invoke(FunctionName="mine", Payload=b"still mine")["Payload"].read() == b"still mine"
    create(other, "theirs", runtime="microfaas-language")
    assert other.invoke(FunctionName="theirs", Payload=b"t")["Payload"].read() == b"t"
    line = [l for l in server.log() if l.get("fn") == "theirs" and l.get("op") == "Invoke"][-1]
    assert line["key"] == OTHER_KEY_ID
