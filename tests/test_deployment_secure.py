"""A secured Flower deployment on loopback: TLS with a site CA, SuperNode authentication, a
persistent SuperLink database, and one whole Feedback run over it (issue 9).

What ``docs/deploy.md`` tells an operator to do, done here with flwr 1.41:

* A site CA and a SuperLink certificate with ``subjectAltName = IP:127.0.0.1`` (made at run time
  with the ``cryptography`` package, a Flower dependency; the doc's ``openssl`` / ``ssh-keygen``
  commands are run by :func:`test_doc_key_commands` when those binaries exist).
* ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile --enable-supernode-auth
  --database FILE``; ``flwr`` reaches it through ``root-certificates`` in ``$FLWR_HOME/config.toml``.
* One ECDSA secp384r1 key pair per site (OpenSSH format, what ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read), each public key registered
  with ``flwr supernode register``; three SuperNodes with ``--root-certificates`` and their own
  terms in ``--node-config`` (partition, state dir, ``site-epsilon=1.0``).

Refused, each checked: a SuperNode with a key the SuperLink does not know, a SuperNode with no
key at all, a plain-text (``--insecure``) SuperNode and a plain-text ``flwr`` (all of them from
the outside: Flower's exit code 305 for the SuperNodes, whose process exit status is 1), and a
plain HTTP request to the SuperLink's port.

One Feedback run (2 rounds, tiny sizes) must finish as ``finished:completed`` (``flwr run
--stream`` exits 0 even when a run fails, so ``flwr ls`` is asked), every site answering both
rounds and spending at most its own epsilon of 1. The SuperLink is then restarted on the same
``--database``: the run and the three registered SuperNodes are still there.

Every process the test starts is stopped by PID in ``finally`` blocks; afterwards no process
naming the test's tmp folder or ports may remain.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coautogen_fl.config import load_config, save_config
from simulations.launcher import app_dir, free_port, parse_status

from flower_processes import (
    BIN,
    FlowerProcess,
    ProcessWatch,
    flower_env,
    flwr,
    node_id_of,
    processes_naming,
    site_config,
    start_superlink,
    stop_all,
    tail,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"

SECURE, PLAIN = "secure", "plain"  # connection names in $FLWR_HOME/config.toml
NUM_SITES, ROUNDS, EPSILON = 3, 2, 1.0
TINY = [
    "feedback.candidates_per_label=4",
    "feedback.volume_per_label=10",
    "downstream.epochs=1",
    f"federation.num_hospitals={NUM_SITES}",
    f"privacy.epsilon={EPSILON}",
    "federation.timeout_s=150",
    f"feedback.rounds={ROUNDS}",
]
LEDGER = "privacy_ledger.json"
SUPERNODE_REJECTED = "Exit Code: 305"  # flwr_exit logs Flower's code; the process exits with status 1
RUN_TIMEOUT_S = 300.0
EXIT_GRACE_S = 15.0


# ---------------------------------------------------------------------------------- keys and certificates
def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_site_ca(folder: Path) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed site CA (secp384r1): ``ca.pem`` and ``ca.key`` in ``folder``."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coautogen site CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(folder / "ca.key", _pem_key(key), private=True)
    return _write(folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM)), key, cert


def write_server_cert(
    folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, ip: str = "127.0.0.1"
) -> tuple[Path, Path]:
    """The SuperLink's certificate, signed by the site CA, with ``subjectAltName = IP:ip, DNS:localhost``."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return (
        _write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
        _write(folder / "server.key", _pem_key(key), private=True),
    )


def write_node_key(path: Path) -> Path:
    """A SuperNode's ECDSA secp384r1 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384``
    writes): the private key at ``path``, the public key at ``path.pub``, which is returned."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        private=True,
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(path.with_name(path.name + ".pub"), public + b"\n")


def write_connections(flwr_home: Path, address: str, ca: Path) -> Path:
    """``$FLWR_HOME/config.toml``: the TLS connection (the default) and a plain-text one to the same port."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{SECURE}"\n\n'
        f'[superlink.{SECURE}]\naddress = "{address}"\nroot-certificates = "{ca}"\n\n'
        f'[superlink.{PLAIN}]\naddress = "{address}"\ninsecure = true\n'
    )
    return path


# ---------------------------------------------------------------------------------- Flower processes
def start_tls_superlink(
    port: int,
    certs: Mapping[str, Path],
    database: Path,
    env: Mapping[str, str],
    cwd: Path,
    log: Path,
    watch: ProcessWatch,
    timeout: float = 60.0,
) -> FlowerProcess:
    """``flower-superlink`` with TLS, SuperNode authentication and a database file; waits until its
    health endpoint answers over HTTPS verified against the site CA."""
    tls = [
        "--ssl-ca-certfile",
        str(certs["ca"]),
        "--ssl-certfile",
        str(certs["cert"]),
        "--ssl-keyfile",
        str(certs["key"]),
        "--enable-supernode-auth",
    ]
    verify = ssl.create_default_context(cafile=str(certs["ca"]))
    return start_superlink(port, env, cwd, log, watch, timeout, database=database, tls=tls, verify=verify)


def start_node(
    name: str,
    link_port: int,
    node_config: str,
    env: Mapping[str, str],
    cwd: Path,
    log: Path,
    watch: ProcessWatch,
    *,
    ca: Path | None = None,
    key: Path | None = None,
    extra: Sequence[str] = (),
) -> FlowerProcess:
    """``flower-supernode`` on its own Runtime API port: over TLS (``ca``) with an auth key, or plain text."""
    port = free_port()
    watch.add_marker(f"127.0.0.1:{port}")
    command = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}", "--port", str(port)]
    command += ["--root-certificates", str(ca)] if ca is not None else ["--insecure"]
    command += ["--auth-supernode-private-key", str(key)] if key is not None else []
    command += [*extra, "--node-config", node_config]
    return FlowerProcess(f"flower-supernode ({name})", command, env, cwd, log, watch)


def wait_exit(process: FlowerProcess, timeout: float) -> int:
    try:
        return process.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{process.name} still running after {timeout:.0f} s:\n{tail(process.output())}")


def json_of(text: str) -> dict:
    return json.loads(text[text.index("{") :])


# ---------------------------------------------------------------------------------- the doc's commands
def doc_block(marker: str) -> str:
    """The fenced block that follows ``<!-- tested: marker -->`` in docs/deploy.md."""
    text = DOC.read_text()
    match = re.search(rf"<!-- tested: {re.escape(marker)} -->\s*```bash\n(.*?)```", text, re.DOTALL)
    assert match, f"no block marked {marker!r} in {DOC}"
    return match.group(1)


@pytest.mark.filterwarnings("ignore:'click.utils:DeprecationWarning")  # typer, imported by flwr.cli
@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl and ssh-keygen")
def test_doc_key_commands(tmp_path):
    """docs/deploy.md's openssl and ssh-keygen commands make what Flower 1.41 reads: a server
    certificate valid for 127.0.0.1 under the site CA, and a secp384r1 key pair in OpenSSH format."""
    from cryptography.x509.verification import PolicyBuilder, Store
    from flwr.cli.supernode.register import try_load_public_key

    for marker in ("certificates", "site-key"):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", doc_block(marker)],
            check=False,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{marker}:\n{result.stdout}\n{result.stderr}"
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    verifier = (
        PolicyBuilder().store(Store([ca])).build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    verifier.verify(server, [])  # raises when the chain or the SAN does not hold
    serialization.load_pem_private_key((tmp_path / "certs" / "server.key").read_bytes(), None)
    # What flower-supernode --auth-supernode-private-key and flwr supernode register load.
    private = load_ssh_private_key((tmp_path / "keys" / "site0").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = load_ssh_public_key((tmp_path / "keys" / "site0.pub").read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert try_load_public_key(tmp_path / "keys" / "site0.pub")


# ---------------------------------------------------------------------------------- the deployment
@pytest.mark.flower
def test_secure_deployment_tls_node_auth_and_database(tmp_path):
    started = time.monotonic()
    flwr_home, cwd = tmp_path / "flwr-home", tmp_path / "cwd"
    cwd.mkdir()
    env = flower_env(flwr_home)
    ca, ca_key, ca_cert = write_site_ca(tmp_path / "certs")
    cert, key = write_server_cert(tmp_path / "certs", ca_key, ca_cert)
    certs = {"ca": ca, "cert": cert, "key": key}
    node_keys = {i: tmp_path / "keys" / f"site{i}" for i in range(NUM_SITES)}
    public_keys = {i: write_node_key(path) for i, path in node_keys.items()}
    rogue_key = tmp_path / "keys" / "rogue"
    write_node_key(rogue_key)  # a valid key pair the SuperLink was never told about
    state = {i: tmp_path / f"site{i}" for i in range(NUM_SITES)}
    database = tmp_path / "superlink" / "state.db"
    database.parent.mkdir()
    link_port = free_port()
    address = f"127.0.0.1:{link_port}"
    write_connections(flwr_home, address, ca)
    run_dir = tmp_path / "run"
    run_config = save_config(load_config(overrides=[*TINY, f"tracking.run_dir={run_dir}"]), tmp_path / "run.yaml")

    links: list[FlowerProcess] = []
    nodes: dict[int, FlowerProcess] = {}
    rejected: dict[str, FlowerProcess] = {}
    clis: list[subprocess.Popen] = []  # flwr commands run in the background
    phases: dict[str, float] = {}  # phase -> seconds since the start, for the printout

    def mark(phase: str) -> None:
        phases[phase] = round(time.monotonic() - started, 1)

    def logs() -> str:
        return "\n".join(
            f"--- {p.name} ({p.log.name})\n{tail(p.output(), 30)}"
            for p in [*links, *nodes.values(), *rejected.values()]
        )

    with ProcessWatch([str(tmp_path), address]) as watch:
        try:
            links.append(start_tls_superlink(link_port, certs, database, env, cwd, tmp_path / "superlink.log", watch))
            mark("superlink")

            # ---------------------------------------------------------- plain text and untrusted clients
            with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP on the TLS port: the server hangs up
                httpx.get(f"http://{address}/health", timeout=5.0)
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # no site CA: not trusted
                httpx.get(f"https://{address}/health", timeout=5.0)

            # ---------------------------------------------------------- register the sites' keys, while
            # a plain-text flwr and three SuperNodes that must be refused try their luck
            def popen_flwr(args: Sequence[str]) -> subprocess.Popen:
                proc = subprocess.Popen(
                    [str(BIN / "flwr"), *args],
                    env=env,
                    cwd=cwd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                clis.append(proc)
                watch.add_root(proc.pid)
                return proc

            registering = {
                i: popen_flwr(["supernode", "register", str(public_keys[i]), SECURE, "--format", "json"])
                for i in range(NUM_SITES)
            }
            plain_flwr = popen_flwr(["ls", PLAIN])
            anon = "partition-id=0 num-partitions=3"  # no terms needed: these never get a message
            rejected["unregistered key"] = start_node(
                "unregistered key", link_port, anon, env, cwd, tmp_path / "node-rogue.log", watch, ca=ca, key=rogue_key
            )
            rejected["no key"] = start_node(
                "no key", link_port, anon, env, cwd, tmp_path / "node-nokey.log", watch, ca=ca
            )
            # A plain-text SuperNode retries forever by default; --max-retries 0 makes it give up at once.
            rejected["plain text"] = start_node(
                "plain text",
                link_port,
                anon,
                env,
                cwd,
                tmp_path / "node-plain.log",
                watch,
                extra=["--max-retries", "0"],
            )

            registered: dict[int, int] = {}
            for i, proc in registering.items():
                out, _ = proc.communicate(timeout=120)
                reply = json_of(out)
                assert proc.returncode == 0 and reply.get("success") is True, f"register site {i}: {out}"
                registered[i] = int(reply["node-id"])
            out, _ = plain_flwr.communicate(timeout=120)
            assert plain_flwr.returncode != 0 and "Connection to the SuperLink is unavailable" in out, out

            # ---------------------------------------------------------- the three sites, over TLS with their keys
            for i in range(NUM_SITES):
                nodes[i] = start_node(
                    f"site {i}",
                    link_port,
                    site_config(i, NUM_SITES, state[i], EPSILON),
                    env,
                    cwd,
                    tmp_path / f"node-site{i}.log",
                    watch,
                    ca=ca,
                    key=node_keys[i],
                )
            node_ids = {i: node_id_of(nodes[i], timeout=120) for i in range(NUM_SITES)}
            assert node_ids == registered, (node_ids, registered)  # each SuperNode is the one its key registered
            mark("sites up")

            reasons = {
                "unregistered key": "Failed to activate SuperNode",
                "no key": "All SuperNodes must be registered via the CLI",
                "plain text": "Server disconnected without sending a response",
            }
            for name, process in rejected.items():
                code = wait_exit(process, 60)
                out = process.output()
                assert code == 1 and SUPERNODE_REJECTED in out and reasons[name] in out, (
                    f"{name}: exit {code}\n{tail(out)}"
                )
                assert "SuperNode ID:" not in out, name
            listing = json_of(flwr(["supernode", "ls", SECURE, "--format", "json"], env, cwd).stdout)
            statuses = {int(n["node-id"]): n["status"] for n in listing["nodes"]}
            assert statuses == {node: "online" for node in registered.values()}, statuses  # nobody else got in
            mark("refusals")

            # ---------------------------------------------------------- one Feedback run over TLS
            command = ["run", str(app_dir()), SECURE, "--stream", "--run-config", f'config-file="{run_config}"']
            try:
                result = flwr(command, env, cwd, timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`flwr run` did not finish within {RUN_TIMEOUT_S:.0f} s\n{logs()}")
            output = result.stdout + result.stderr
            match = re.search(r"run (?:ID|id)[:\s]+(\d+)|Successfully started run (\d+)", output)
            assert match, f"`flwr run` started no run (exit {result.returncode}):\n{tail(output)}\n{logs()}"
            run_id = int(match.group(1) or match.group(2))
            status = parse_status(
                flwr(["ls", SECURE, "--run-id", str(run_id), "--format", "json"], env, cwd).stdout, run_id
            )
            assert status == "finished:completed", f"run {run_id}: {status}\n{tail(output)}\n{logs()}"
            mark("run")

            summary = json.loads((run_dir / "summary.json").read_text())
            assert sorted(summary["sites"]) == [str(i) for i in range(NUM_SITES)], summary["sites"]
            assert summary["status"] == "completed" and summary["dropped_replies"] == [], summary
            # Noised evaluation (the default) is one more release after the last round.
            releases = ROUNDS + (summary["privacy_evaluation"] == "noised")
            for i in range(NUM_SITES):
                site = summary["sites"][str(i)]
                assert site["node_id"] == registered[i], (i, site)  # the SuperNode its key registered
                assert site["rounds_answered"] == ROUNDS and site["refusals"] == [] and site["failures"] == [], (
                    i,
                    site,
                )
                assert site["epsilon_budget"] == EPSILON, (i, site)  # its own term, as it reported it
                assert 0 < site["epsilon_spent"] <= EPSILON * (1 + 1e-6), (i, site)
                ledger = json.loads((state[i] / LEDGER).read_text())["entries"]
                assert [(e["round"], e["run_id"]) for e in ledger] == [
                    (r, str(run_id)) for r in range(1, releases + 1)
                ], (i, ledger)
            assert summary["epsilon_spent_max"] <= EPSILON * (1 + 1e-6)

            # ---------------------------------------------------------- restart on the same database
            links[0].stop()
            links.append(
                start_tls_superlink(link_port, certs, database, env, cwd, tmp_path / "superlink-restart.log", watch)
            )
            with ThreadPoolExecutor(max_workers=2) as pool:
                runs = pool.submit(flwr, ["ls", SECURE, "--run-id", str(run_id), "--format", "json"], env, cwd)
                supernodes = pool.submit(flwr, ["supernode", "ls", SECURE, "--format", "json"], env, cwd)
                again, listing = parse_status(runs.result().stdout, run_id), json_of(supernodes.result().stdout)
            assert again == "finished:completed", again
            assert {int(n["node-id"]) for n in listing["nodes"]} == set(registered.values()), listing
            mark("restart")
        finally:
            for proc in clis:
                if proc.poll() is None:  # still our unreaped child: its pid is still this process
                    proc.kill()
                    proc.wait(timeout=10)
            # SuperNodes (each takes seconds to wind down) in parallel, then the SuperLink(s).
            stop_all([*rejected.values(), *nodes.values()])
            stop_all(links)
            leftovers = watch.wait_all_gone(EXIT_GRACE_S)
            watch.kill_leftovers()
            mark("stopped")
        seen = " ".join(watch.seen.values())

    assert not leftovers, f"processes still running {EXIT_GRACE_S:.0f} s after they were stopped: {leftovers}"
    for binary in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp"):
        assert binary in seen, f"{binary} never seen: {sorted(set(watch.seen.values()))}"
    assert processes_naming(watch.markers) == []
    print(f"secure deployment test: {time.monotonic() - started:.1f} s; phases (s since start): {phases}")
