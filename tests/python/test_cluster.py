"""Three `microfaas serve` nodes sharing one registry directory behind nginx
(consistent hashing by function name), all on 127.0.0.1: a node is killed;
its functions answer from other nodes; the others do not move; nothing is
answered twice."""

import collections
import os
import signal
import socket
import subprocess
import time

from conftest import Server, client, create, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
NGINX = os.path.join(HERE, "..", "..", "scripts", "cluster", "nginx.sh")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_nodes_behind_nginx_survive_a_node_kill(workdir, creds):
    registry = os.path.join(workdir, "cluster-registry")
    nodes = [Server(workdir, creds, registry=registry, node_name=f"n{i}") for i in (1, 2, 3)]
    prefix = os.path.join(workdir, "nginx")
    port = free_port()
    nginx_log = open(os.path.join(workdir, "nginx.out"), "wb")
    nginx = subprocess.Popen([NGINX, prefix, str(port), *(str(n.port) for n in nodes)],
                             stdout=nginx_log, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return True
            except OSError:
                return False

        assert wait_until(up, 120), "nginx did not come up (see nginx.out)"
        lam = client(f"http://127.0.0.1:{port}")
        names = [f"fn-{i}" for i in range(12)]
        for n in names:
            create(lam, n)
        answered = collections.Counter()

        def call(n, tag):
            payload = f"{n} {tag}".encode()
            r = lam.invoke(FunctionName=n, Payload=payload)
            assert r["Payload"].read() == payload
            answered[r["ResponseMetadata"]["RequestId"]] += 1
            return r["ResponseMetadata"]["HTTPHeaders"]["x-microfaas-node"]

        owner = {}
        for n in names:
            seen = {call(n, f"before {k}") for k in range(3)}
            assert len(seen) == 1, f"{n} stays on one node: {seen}"
            owner[n] = seen.pop()
        assert len(set(owner.values())) >= 2, f"functions spread over nodes: {owner}"

        victim_name = collections.Counter(owner.values()).most_common(1)[0][0]
        victim = next(s for s in nodes if s.url.endswith(f":{s.port}") and
                      any(l.get("node") == victim_name for l in s.log()))
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(30)

        after = {}
        for n in names:
            after[n] = call(n, "after")
        for n in names:
            if owner[n] == victim_name:
                assert after[n] != victim_name, f"{n} answered by a live node"
            else:
                assert after[n] == owner[n], f"{n} did not move: {owner[n]} -> {after[n]}"
        # Each invocation the client saw answered once, by exactly one node.
        assert all(c == 1 for c in answered.values())
        served = collections.Counter()
        for s in nodes:
            for l in s.log():
                if l.get("op") == "Invoke" and l.get("status") == 200:
                    served[l["invocation_id"]] += 1
        assert served and all(c == 1 for c in served.values()), "no invocation served twice"
        assert sum(served.values()) == len(names) * 4
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(30)
        except subprocess.TimeoutExpired:
            nginx.kill()
        nginx_log.close()
        for s in nodes:
            s.stop()
