"""A Postgres-backed Prefect server on this machine, from Debian's PostgreSQL packages.

    python -m prefect_batch_llm.testing.postgres_server             # start; Ctrl-C stops both
    python -m prefect_batch_llm.testing.postgres_server start --detach
    python -m prefect_batch_llm.testing.postgres_server status
    python -m prefect_batch_llm.testing.postgres_server stop

`start` finds the PostgreSQL server binaries (/usr/lib/postgresql/*/bin or PATH), creates a
cluster in the data directory on first use (`initdb`, a generated password, loopback only),
starts it, creates the `prefect` database, then runs `prefect server start` with
`PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...` and prints the
`PREFECT_API_URL` to use. Ctrl-C, SIGTERM or `stop` stops the Prefect server, then Postgres.
The server gets `INGEST_SETTINGS` (the task run recorder's batch and the connection pool,
sized for batches) unless the environment sets them; the environment passes through, so any
other server setting applies as usual.

PostgreSQL refuses to run as root: as root, `initdb` and `pg_ctl` run as Debian's `postgres`
user (`runuser -u postgres`), the default data directory is in that user's home and a
`--data-dir` must be reachable by it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MODULE = "prefect_batch_llm.testing.postgres_server"
CLUSTER_USER = "postgres"  # Debian's postgresql package creates it; used only when run as root
DB_USER = "prefect"
DB_NAME = "prefect"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
#: Server settings for batch ingest, applied unless the environment sets them: the task run
#: recorder writes up to 500 rows per transaction (Prefect's default, 1, recorded ~22 task
#: runs a second here and fell behind a batch; these ~150, benchmarks/server_ingest.py) and a
#: larger connection pool for many workers. See docs/guides/scale-out.md.
INGEST_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20",
}
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
    "/usr/lib/postgresql/*/bin or on PATH. Install them: apt-get install -y postgresql "
    "(as root; sudo otherwise), or pass --pg-bin DIR."
)


class SetupError(Exception):
    """Something the user has to fix; the message says what."""


def is_root() -> bool:
    return os.geteuid() == 0


def default_data_dir() -> Path:
    """~/.prefect-batch-llm/postgres; as root, under the postgres user's home (root's is 700)."""
    if is_root():
        with contextlib.suppress(KeyError):
            return Path(pwd.getpwnam(CLUSTER_USER).pw_dir) / "prefect-batch-llm"
    return Path.home() / ".prefect-batch-llm" / "postgres"


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path)) or (0,)


def find_postgres_bin(explicit: Path | None = None) -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: newest Debian version first."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates += [Path(d) for d in debian]
    for name in REQUIRED_BINARIES:
        found = shutil.which(name)
        if found:
            candidates.append(Path(found).resolve().parent)
    candidates.append(Path("/usr/local/pgsql/bin"))
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in REQUIRED_BINARIES):
            return directory
        if explicit is not None and directory == explicit:
            raise SetupError(f"--pg-bin {explicit} lacks one of {', '.join(REQUIRED_BINARIES)}")
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ensure_driver() -> None:
    """asyncpg is a Prefect dependency; install it into this interpreter if it is missing."""
    if importlib.util.find_spec("asyncpg") is not None:
        return
    print("asyncpg (the Postgres driver) is missing: installing it with pip", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "asyncpg"], check=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Cluster:
    """One PostgreSQL cluster in `<data_dir>/pgdata`, run as this user (or postgres if root)."""

    data_dir: Path
    bin_dir: Path
    port: int = 5432
    host: str = "127.0.0.1"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def database_url(self, *, hide_password: bool = False) -> str:
        password = "***" if hide_password else self.password
        return f"postgresql+asyncpg://{DB_USER}:{password}@{self.host}:{self.port}/{DB_NAME}"

    def _command(self, name: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / name), *args]
        if is_root():
            if shutil.which("runuser") is None:
                raise SetupError("running as root needs runuser (util-linux) to run PostgreSQL")
            return ["runuser", "-u", CLUSTER_USER, "--", *command]
        return command

    def _run(self, name: str, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            self._command(name, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,  # a Ctrl-C at the terminal reaches us, not Postgres
        )
        if done.returncode != 0:
            raise SetupError(f"{name} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def _give_to_cluster_user(self, path: Path) -> None:
        if is_root():
            entry = pwd.getpwnam(CLUSTER_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    @property
    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def init(self) -> bool:
        """initdb on first use (returns True); a later start reuses the cluster and its data."""
        if is_root():
            try:
                pwd.getpwnam(CLUSTER_USER)
            except KeyError:
                raise SetupError(
                    "PostgreSQL refuses to run as root and there is no 'postgres' user to run "
                    "it as: apt-get install -y postgresql creates it (or run as a non-root user)"
                ) from None
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self.initialized:
            return False
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        self._give_to_cluster_user(self.pgdata)
        if is_root():
            reach = subprocess.run(
                ["runuser", "-u", CLUSTER_USER, "--", "test", "-w", str(self.pgdata)],
                check=False,
            )
            if reach.returncode != 0:
                raise SetupError(
                    f"as root, PostgreSQL runs as the '{CLUSTER_USER}' user, which cannot reach "
                    f"{self.pgdata} (a parent directory is not searchable by it, e.g. /root or "
                    f"a mode-700 temporary directory). Pass a --data-dir it can reach, e.g. "
                    f"{default_data_dir()}"
                )
        if not self.password_file.exists():
            self.password_file.touch(mode=0o600)
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
        pwfile = self.pgdata.parent / ".initdb-pwfile"
        pwfile.touch(mode=0o600)
        try:
            pwfile.write_text(self.password + "\n")
            self._give_to_cluster_user(pwfile)
            self._run(
                "initdb",
                "--pgdata",
                str(self.pgdata),
                "--username",
                DB_USER,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# prefect-batch-llm: loopback TCP only, no Unix socket (its default directory"
                "\n# /var/run/postgresql is not writable by every user)\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
            )
        return True

    def running_pid(self) -> int | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def start(self) -> None:
        if not port_is_free(self.host, self.port):
            raise SetupError(
                f"port {self.port} on {self.host} is in use (Debian's own cluster listens on "
                "5432 once apt-get installed postgresql: see pg_lsclusters); pass --port"
            )
        self.log_file.touch()
        self._give_to_cluster_user(self.log_file)
        self._run(
            "pg_ctl",
            "start",
            "--pgdata",
            str(self.pgdata),
            "--log",
            str(self.log_file),
            "--wait",
            "--timeout",
            "60",
            "-o",
            f"-p {self.port}",
        )

    def stop(self) -> None:
        if self.running_pid() is None:
            return
        self._run("pg_ctl", "stop", "--pgdata", str(self.pgdata), "--mode", "fast", "--wait")

    async def _create_database(self) -> bool:
        import asyncpg  # type: ignore[import-untyped]

        connection = await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=DB_USER,
            password=self.password,
            database="postgres",
        )
        try:
            exists = await connection.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME
            )
            if not exists:
                await connection.execute(f'CREATE DATABASE "{DB_NAME}"')
            return not exists
        finally:
            await connection.close()

    def create_database(self) -> bool:
        return asyncio.run(self._create_database())


def state_file(data_dir: Path) -> Path:
    return data_dir / "state.json"


def read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(state_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return state


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = state_file(data_dir)
    path.touch(mode=0o600)
    path.write_text(json.dumps(state, indent=2) + "\n")


def api_healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop_process_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def serve(args: argparse.Namespace) -> int:
    """Start Postgres and the Prefect server, wait for Ctrl-C/SIGTERM, stop both."""
    data_dir: Path = args.data_dir
    previous = read_state(data_dir)
    if previous and _pid_alive(int(previous["pid"])) and MODULE in _cmdline(int(previous["pid"])):
        raise SetupError(f"already running (pid {previous['pid']}) at {previous['api_url']}")
    bin_dir = find_postgres_bin(args.pg_bin)
    if bin_dir is None:
        raise SetupError(INSTALL_HINT)
    ensure_driver()
    port = args.port or free_port()
    api_port = args.api_port or free_port(args.host)
    if not port_is_free(args.host, api_port):
        raise SetupError(f"port {api_port} on {args.host} is in use; pass --api-port")
    cluster = Cluster(data_dir=data_dir.resolve(), bin_dir=bin_dir, port=port)
    if cluster.running_pid() is not None:  # left over by a killed supervisor
        print(f"stopping the Postgres left running in {cluster.pgdata}", flush=True)
        cluster.stop()

    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    created = cluster.init()
    print(
        f"{'created' if created else 'reusing'} the cluster in {cluster.pgdata} "
        f"(PostgreSQL binaries: {bin_dir})",
        flush=True,
    )
    cluster.start()
    prefect: subprocess.Popen[bytes] | None = None
    code = 0
    try:
        if cluster.create_database():
            print(f"created database {DB_NAME!r}", flush=True)
        url = cluster.database_url()
        api_url = f"http://{args.host}:{api_port}/api"
        env = {
            **INGEST_SETTINGS,
            **os.environ,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": url,
            "PREFECT_API_DATABASE_CONNECTION_URL": url,
        }
        command = [sys.executable, "-m", "prefect", "server", "start"]
        command += ["--host", args.host, "--port", str(api_port)]
        print(f"postgres on {cluster.host}:{port}; starting: {' '.join(command[1:])}", flush=True)
        prefect = subprocess.Popen(command, env=env, start_new_session=True)
        _write_state(
            data_dir,
            {
                "pid": os.getpid(),
                "prefect_pid": prefect.pid,
                "postgres_port": port,
                "api_url": api_url,
                "database_url": cluster.database_url(hide_password=True),
                "password_file": str(cluster.password_file),
                "pgdata": str(cluster.pgdata),
                "bin_dir": str(bin_dir),
            },
        )
        deadline = time.monotonic() + args.timeout
        while not api_healthy(api_url):
            if stop_requested:
                return 0
            if prefect.poll() is not None:
                raise SetupError(f"prefect server start exited with {prefect.returncode}")
            if time.monotonic() > deadline:
                raise SetupError(f"the Prefect server was not healthy within {args.timeout} s")
            time.sleep(0.5)
        print(
            "\nPrefect server on Postgres is ready. Point clients at it:\n"
            f"  export PREFECT_API_URL={api_url}\n"
            f"  database: {cluster.database_url(hide_password=True)} "
            f"(password in {cluster.password_file})\n"
            f"Stop: Ctrl-C, or python -m {MODULE} stop --data-dir {data_dir}\n"
            f"PREFECT_API_URL={api_url}",
            flush=True,
        )
        while not stop_requested:
            if prefect.poll() is not None:
                print(f"prefect server exited with {prefect.returncode}", flush=True)
                code = prefect.returncode or 1
                break
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if prefect is not None:
            print("stopping the Prefect server", flush=True)
            _stop_process_group(prefect)
        print("stopping Postgres", flush=True)
        cluster.stop()
        state_file(data_dir).unlink(missing_ok=True)
        print("stopped", flush=True)
    return code


def start_detached(args: argparse.Namespace) -> int:
    """Run `start` in the background (log: <data-dir>/server.log); return once it is ready."""
    data_dir: Path = args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    log_path = data_dir / "server.log"
    command = [sys.executable, "-m", MODULE, "start", "--data-dir", str(data_dir)]
    command += ["--port", str(args.port), "--api-port", str(args.api_port)]
    command += ["--host", args.host, "--timeout", str(args.timeout)]
    if args.pg_bin:
        command += ["--pg-bin", str(args.pg_bin)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + args.timeout + 90
    while True:
        state = read_state(data_dir)
        if state and state.get("pid") == process.pid and api_healthy(state["api_url"]):
            print(f"PREFECT_API_URL={state['api_url']}  (pid {process.pid}, log {log_path})")
            return 0
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(60)
            print(log_path.read_text()[-3000:], file=sys.stderr)
            return 1
        time.sleep(0.5)


def stop(args: argparse.Namespace) -> int:
    """Stop a server started here: signal its supervisor, or clean up after a killed one."""
    data_dir: Path = args.data_dir
    state = read_state(data_dir)
    if state:
        pid = int(state["pid"])
        if _pid_alive(pid) and MODULE in _cmdline(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + args.timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                print(f"the supervisor (pid {pid}) did not stop in {args.timeout} s")
                return 1
        prefect_pid = int(state["prefect_pid"])
        if _pid_alive(prefect_pid) and "prefect" in _cmdline(prefect_pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(prefect_pid, signal.SIGTERM)
        state_file(data_dir).unlink(missing_ok=True)
    bin_dir = find_postgres_bin(args.pg_bin)
    if bin_dir is not None:
        Cluster(data_dir=data_dir.resolve(), bin_dir=bin_dir).stop()
    print("stopped")
    return 0


def status(args: argparse.Namespace) -> int:
    """Print what runs; exit 0 only if both Postgres and the Prefect API answer."""
    data_dir: Path = args.data_dir
    state = read_state(data_dir)
    bin_dir = find_postgres_bin(args.pg_bin)
    pg_pid = Cluster(data_dir=data_dir, bin_dir=bin_dir).running_pid() if bin_dir else None
    print(f"data directory: {data_dir}")
    print(f"postgres: {'running, pid ' + str(pg_pid) if pg_pid else 'not running'}")
    healthy = state is not None and api_healthy(str(state["api_url"]))
    if state:
        print(f"prefect server: {'healthy' if healthy else 'not answering'} at {state['api_url']}")
        print(f"PREFECT_API_URL={state['api_url']}")
        print(
            f"PREFECT_API_DATABASE_CONNECTION_URL={state['database_url']} "
            f"(password in {state.get('password_file', 'the data directory')})"
        )
    else:
        print("prefect server: not started by this script")
    return 0 if pg_pid and healthy else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="A Postgres-backed Prefect server: start (default), status, stop.",
    )
    parser.add_argument("command", nargs="?", default="start", choices=["start", "stop", "status"])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="cluster, password, logs and state (default: %(default)s)",
    )
    parser.add_argument("--port", type=int, default=5432, help="Postgres port; 0 picks a free one")
    parser.add_argument(
        "--api-port", type=int, default=4200, help="Prefect API port; 0 picks a free one"
    )
    parser.add_argument("--host", default="127.0.0.1", help="Prefect API host")
    parser.add_argument("--pg-bin", type=Path, help="directory of initdb, pg_ctl, postgres")
    parser.add_argument("--detach", action="store_true", help="start in the background")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for start/stop")
    args = parser.parse_args(argv)
    try:
        if args.command == "stop":
            return stop(args)
        if args.command == "status":
            return status(args)
        if args.detach:
            return start_detached(args)
        return serve(args)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
