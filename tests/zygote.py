"""A fork server for the tests that need a real process: a "zygote" that has imported fmaml (Lightning,
torch and the rest: 10+ s of imports on a slow CPU) once, and forks a child per request, which then runs a
Python command line (`-c CODE`, `-m MODULE` or `SCRIPT`, with arguments) as a fresh interpreter would. The
child is a real process of its own (its pid can be sent SIGKILL, it exits with its own status), that starts
in milliseconds.

The zygote never runs a torch operation (forking after OpenMP work can hang the child), and is
single-threaded: it imports, then only waits on its socket and forks. A child sets its environment, working
directory, argv, standard streams and torch's thread count (OMP_NUM_THREADS, as a fresh interpreter reads
it) from the request before running anything.

Three clients:
- in a test, `Zygote.popen(argv, env=..., cwd=..., stdout=...)`: a Popen-like object (pid, poll, wait,
  send_signal, kill, returncode);
- in a shell script, `python tests/zygote.py --run SOCKET ARGS...` (e.g. as benchmarks/run_gpu.sh's PY): a
  tiny interpreter (no imports beyond the standard library) that hands its own standard streams to the
  child, forwards SIGTERM and SIGINT to it, and exits as the child did;
- where a program starts `python` itself: `Zygote.python`, an executable that is that tiny interpreter with
  its socket, e.g. torchrun's PYTHON_EXEC for its workers. A child whose environment has ZYGOTE_PYTHON set
  to it has it as its `sys.executable`, so that the Python processes it starts (Lightning's DDP processes,
  benchmarks/memory.py's cases) are forked from the zygote too.
Not for a test of what a fresh interpreter does at start-up (imports, the hash seed: a child inherits the
zygote's), nor of a process whose own import time is the point.
"""

from __future__ import annotations

import array
import json
import os
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time

PRELOAD = ["fmaml.cli", "fmaml.sweep", "higher", "tensorboard.backend.event_processing.event_file_loader"]
PYTHON_VARIABLE = "ZYGOTE_PYTHON"  # in a child's environment: the `sys.executable` it gets


# ------------------------------------------------------------------------------------------------ protocol


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    data = struct.pack("!I", len(data)) + data
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def _recv_exactly(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    data = b""
    while len(data) < n:
        chunk, ancdata, _, _ = sock.recvmsg(n - len(data), socket.CMSG_SPACE(16 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        if not chunk:
            raise EOFError("zygote connection closed")
        data += chunk
    return data


def _recv(sock: socket.socket) -> tuple[dict, list[int]]:
    fds: list[int] = []
    (n,) = struct.unpack("!I", _recv_exactly(sock, 4, fds))
    return json.loads(_recv_exactly(sock, n, fds)), fds


# -------------------------------------------------------------------------------------------------- server


def _run_child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the requested interpreter, run its command line; returns the status."""
    import runpy
    import warnings

    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    if request.get("start_new_session"):
        os.setsid()
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.stdin = open(0, closefd=False)  # noqa: SIM115  (the zygote's was closed)
    # A preloaded module run as __main__ is no error (a fresh interpreter has no copy of it yet).
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import", category=RuntimeWarning)
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads and threads.isdigit() else TORCH_THREADS)
    argv = request["argv"]
    if argv[0] == "-u":  # as torchrun starts its workers: unbuffered standard streams
        argv = argv[1:]
        sys.stdout, sys.stderr = (_unbuffered(stream) for stream in (sys.stdout, sys.stderr))
    if os.environ.get(PYTHON_VARIABLE):
        sys.executable = os.environ[PYTHON_VARIABLE]
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in sys.argv[0]
            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(argv[1], alter_argv=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    return code


def _unbuffered(stream):
    """What `python -u` makes of a standard stream: every write reaches its file descriptor at once."""
    import io

    raw = io.FileIO(stream.fileno(), "w", closefd=False)
    return io.TextIOWrapper(raw, encoding=stream.encoding, errors=stream.errors, write_through=True)


def _child_main(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        code = _run_child(request, fds)
        import atexit

        atexit._run_exitfuncs()  # noqa: SLF001  (what interpreter shutdown runs: loggers' final flushes)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def serve(path: str) -> None:
    """Import PRELOAD, then fork a child per request on the unix socket `path`, until stdin closes (the
    test process ended) or the parent dies."""
    for module in PRELOAD:
        __import__(module)
    global TORCH_THREADS
    import torch

    # A fresh interpreter's thread count (this one's environment is the test process's): a query, no pool.
    TORCH_THREADS = torch.get_num_threads()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    children: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
    while True:
        for key, _ in selector.select(timeout=0.02):
            if key.data == "stdin":
                if not sys.stdin.readline():  # the test process is gone: so is the zygote
                    for pid in children:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    os._exit(0)  # nothing to clean up: skip the seconds of torch's interpreter teardown
            elif isinstance(key.data, int):  # a `--run` client was killed: its child goes with it, as its
                selector.unregister(key.fileobj)  # own process would have
                os.kill(key.data, signal.SIGKILL)
            elif key.data == "accept":
                connection, _ = listener.accept()
                try:
                    request, fds = _recv(connection)
                except (EOFError, OSError, ValueError):
                    connection.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    selector.close()
                    for other in children.values():
                        other.close()
                    connection.close()
                    sys.stdin.close()
                    _child_main(request, fds)
                for fd in fds:
                    os.close(fd)
                children[pid] = connection
                if request.get("die_with_client"):
                    selector.register(connection, selectors.EVENT_READ, pid)
                try:
                    _send(connection, {"pid": pid})
                except OSError:
                    pass
        while children:  # reap: each child's status goes to the connection that started it
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            connection = children.pop(pid, None)
            if connection is not None:
                try:
                    selector.unregister(connection)  # a `--run` client's
                except KeyError:
                    pass
                try:
                    _send(connection, {"returncode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                connection.close()


TORCH_THREADS = 1


# -------------------------------------------------------------------------------------------------- client


class ForkedProcess:
    """A zygote's child, as far as the tests use subprocess.Popen: pid, poll, wait, communicate (stdout=PIPE
    only), send_signal, kill, terminate, returncode."""

    def __init__(self, connection: socket.socket, args: list[str], stdout: int | None, text: bool):
        self.args = args
        self._connection = connection
        self._stdout, self._text = stdout, text
        self.pid = _recv(connection)[0]["pid"]
        self.returncode: int | None = None

    def communicate(self, timeout: float | None = None) -> tuple[str | bytes | None, None]:
        """Reads the output to its end (stdout=PIPE), then waits for the exit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks, piped = [], self._stdout is not None
        if piped:
            with selectors.DefaultSelector() as selector:
                selector.register(self._stdout, selectors.EVENT_READ)
                while True:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise subprocess.TimeoutExpired(self.args, timeout)
                    if not selector.select(remaining):
                        continue
                    chunk = os.read(self._stdout, 1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
            os.close(self._stdout)
            self._stdout = None
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not piped:
            return None, None
        output = b"".join(chunks)
        return (output.decode(errors="replace") if self._text else output), None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._connection.setblocking(False)
            try:
                message, _ = _recv(self._connection)
            except BlockingIOError:
                return None
            finally:
                if self.returncode is None and self._connection.fileno() >= 0:
                    self._connection.setblocking(True)
            self._finish(message)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._connection.settimeout(timeout)
            try:
                message, _ = _recv(self._connection)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._finish(message)
        return self.returncode

    def _finish(self, message: dict) -> None:
        self.returncode = message["returncode"]
        self._connection.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _connect(path: str, request: dict, fds: list[int]) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(path)
    _send(connection, request, fds)
    return connection


class Zygote:
    """The server process and its socket; `popen` forks a child of it."""

    def __init__(self, folder: str):
        self.path = os.path.join(str(folder), "zygote.sock")
        if len(self.path) > 100:  # a unix socket's path has at most 107 bytes
            import tempfile

            self.path = os.path.join(tempfile.mkdtemp(prefix="fmaml-zygote-", dir="/tmp"), "zygote.sock")
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the zygote did not start (exit {self._process.wait()})")
        self.python = os.path.join(os.path.dirname(self.path), "python")
        with open(self.python, "w") as script:
            script.write(f'#!/bin/sh\nexec {shlex.join(self.run_command())} "$@"\n')
        os.chmod(self.python, 0o755)

    def popen(
        self, argv, env=None, cwd=None, stdin=None, stdout=None, stderr=None, text=False,
        start_new_session=False,
    ) -> ForkedProcess:  # fmt: skip
        """Like subprocess.Popen([sys.executable, *argv], ...), with files (or file descriptors, DEVNULL,
        or None: this process's own) for the streams, stdout=PIPE, stderr=STDOUT; stdin defaults to
        /dev/null."""
        devnull = os.open(os.devnull, os.O_RDWR)
        read_end = write_end = None
        if stdout == subprocess.PIPE:
            read_end, write_end = os.pipe()

        def fd(stream, default: int) -> int:
            if stream is None:
                return default
            if stream == subprocess.DEVNULL:
                return devnull
            if stream == subprocess.PIPE:
                return write_end
            return stream if isinstance(stream, int) else stream.fileno()

        try:
            out = fd(stdout, 1)
            fds = [fd(stdin, devnull), out, out if stderr == subprocess.STDOUT else fd(stderr, 2)]
            request = {"argv": list(argv), "env": dict(os.environ if env is None else env)}
            request |= {"cwd": str(cwd or os.getcwd()), "start_new_session": start_new_session}
            connection = _connect(self.path, request, fds)
        finally:
            os.close(devnull)
            if write_end is not None:
                os.close(write_end)
        return ForkedProcess(connection, [sys.executable, *argv], read_end, text)

    def run_command(self) -> list[str]:
        """A command line that runs Python through this zygote: `[*run_command(), ARGS...]`."""
        return [sys.executable, os.path.abspath(__file__), "--run", self.path]

    def close(self) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def run(path: str, argv: list[str]) -> None:
    """`python zygote.py --run SOCKET ARGS...`: `python ARGS...` through the zygote, with this process's
    streams, environment and working directory; SIGTERM and SIGINT are passed on; exits as the child did."""
    request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "die_with_client": True}
    connection = _connect(path, request, [0, 1, 2])
    pid = _recv(connection)[0]["pid"]

    def forward(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            message, _ = _recv(connection)
            break
        except InterruptedError:
            continue
    code = message["returncode"]
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        serve(sys.argv[2])
    elif sys.argv[1] == "--run":
        run(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(f"usage: {sys.argv[0]} --serve SOCKET | --run SOCKET ARGS...")
