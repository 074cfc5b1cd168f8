"""A real deployment on loopback: a TLS SuperLink with SuperNode authentication, three registered
SuperNodes and one unregistered; two rounds of a defended federation; every process stopped."""

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-defense test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what flower-supernode and flwr expect)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


class Processes:
    """Every process the test starts, each in its own session, stopped at the end."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env, self.procs = folder, env, {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop_all(self) -> None:
        # Flower starts helpers (flower-superexec) detached, each told its parent's pid: stop those too.
        helpers = []
        for proc in self.procs.values():
            found = subprocess.run(["pgrep", "-f", f"parent-pid {proc.pid}( |$)"], capture_output=True, text=True)
            helpers += [int(p) for p in found.stdout.split()]
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for pid in helpers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_tls_deployment_with_supernode_authentication(tmp_path):
    ca, cert, key = make_tls(tmp_path)
    flwr_home = tmp_path / "flwr_home"
    port = _free_port()
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n')
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    procs = Processes(tmp_path, env)
    try:
        procs.start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile",
                                  str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
                                  "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1",
                                  "--port", str(port)])
        _wait_for(lambda: _listening(port), 60, "the SuperLink to listen")
        keys = [make_node_key(tmp_path, f"node{i}") for i in range(4)]
        for priv, pub in keys[:3]:  # node3 is never registered
            out = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pub), "deploy"], env=env,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
        for i, (priv, _) in enumerate(keys):
            procs.start(f"supernode{i}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(ca),
                "--auth-supernode-private-key", str(priv), "--port", str(_free_port()),
                "--node-config", f"partition-id={i % 3} num-partitions=3", "--max-retries", "3"])
        results = tmp_path / "results"
        run = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "deploy", "--stream", "--run-config",
             f"num-server-rounds=2 defense='rlr' rlr-theta=2 min-available-clients=3 min-fit-clients=3 "
             f"malicious-fraction=0.34 results-dir='{results}' run-name='deploy'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert "[fl-defense] round   2" in out, out[-4000:]
        rows = [json.loads(line) for line in (results / "deploy" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2] and all(r["num_clients"] == 3 for r in rows[1:])
        # the unregistered node never joined: it was refused and gave up
        _wait_for(lambda: procs.procs["supernode3"].poll() is not None, 120, "the unregistered SuperNode to exit")
        assert procs.procs["supernode3"].returncode != 0
        assert "Failed to activate SuperNode" in procs.log("supernode3")
        link = procs.log("superlink")
        assert "No SuperNode found with the given public key" in link
        assert link.count("[Fleet.ActivateNode] Activated node_id") == 3  # only the registered three
    finally:
        procs.stop_all()
    assert all(p.poll() is not None for p in procs.procs.values())
    time.sleep(1)
    leftovers = [pid for p in procs.procs.values()
                 for pid in subprocess.run(["pgrep", "-f", f"parent-pid {p.pid}( |$)"], capture_output=True,
                                           text=True).stdout.split()]
    assert not leftovers, f"processes left running: {leftovers}"
