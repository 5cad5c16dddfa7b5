"""Run one untrusted program (plus its tests) in an isolated, resource-limited process.

Isolation tiers, best first (see docs/eval.md for the threat model):
- "bwrap": bubblewrap with every namespace unshared (no network, own pids, own mounts),
  a read-only view of only the system directories and the Python installation, and a
  private size-limited tmpfs as the working directory.
- "unshare": util-linux `unshare` (user, net, pid, mount, ipc, uts namespaces); the judge
  remounts the filesystem read-only, hides /tmp, /home, /run, ... behind tmpfs, and loads a
  seccomp filter (libseccomp) before the program runs.
- "none": only rlimits and a process group; allowed only with `--unsafe-no-sandbox`.
Every tier applies the same rlimits (address space, CPU time, file size, open files,
processes), a wall-clock timeout that kills the whole process group, and an output cap, and
starts every process, the sandbox's init included, with the minimal `_SANDBOX_ENV`.
"""
from __future__ import annotations

import os
import secrets
import selectors
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace

from .judge import program_source

STATUSES = ("passed", "failed", "timeout", "error", "oom")
_JUDGE_SOURCE = program_source()  # what runs inside the sandbox (diffcoder/eval/judge/)
_MERGED_USR_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The whole environment of every process started for a job, the sandbox's own included: what
# the harness inherited (tokens, keys) stays out of /proc/*/environ inside the sandbox. One
# hash seed for the judge's two processes, so that the reference (or the tests) and the
# program iterate sets of strings in the same order.
_SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
# Not -I: PYTHONHASHSEED must reach the interpreter (the environment is _SANDBOX_ENV alone);
# the judge drops the working directory from sys.path itself.
_PYTHON_FLAGS = ("-s", "-S")


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up on this machine (says what to install)."""


class _TransientStartFailure(RuntimeError):
    """The sandbox could not start for lack of a resource right now; worth a retry."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. `cpu_s` defaults to the wall timeout rounded up plus one."""

    timeout_s: float = 10.0
    memory_mb: int = 4096
    max_procs: int = 32
    max_file_mb: int = 16
    max_output_bytes: int = 1 << 20
    tmpfs_mb: int = 64
    cpu_s: int | None = None

    def rlimits(self) -> dict:
        cpu = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 1
        return {"as_bytes": self.memory_mb << 20, "cpu_s": cpu, "fsize_bytes": self.max_file_mb << 20,
                "nproc": self.max_procs, "nofile": 256}


@dataclass
class ExecResult:
    status: str
    reason: str
    duration_s: float
    stdout_tail: str = ""
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _python_paths() -> tuple[str, str]:
    """The real interpreter (not a venv shim) and its installation prefix."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return exe, prefix


class _PidsCgroup:
    """A pids cgroup per worker slot: RLIMIT_NPROC does not bind uid 0, a pids cgroup does."""

    def __init__(self, slot: int, max_procs: int, run: int = 0):
        base = None
        for candidate in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
            if os.path.exists(os.path.join(candidate, "cgroup.procs")) and os.access(candidate, os.W_OK):
                if candidate == "/sys/fs/cgroup" and "pids" not in _read("/sys/fs/cgroup/cgroup.controllers"):
                    continue
                base = candidate
                break
        if base is None:
            raise SandboxUnavailable("no writable pids cgroup")
        self.path = os.path.join(base, f"diffcoder-eval-{os.getpid()}-{slot}-{run}")
        os.makedirs(self.path, exist_ok=True)
        try:
            with open(os.path.join(self.path, "pids.max"), "w") as f:
                f.write(str(max_procs))
        except OSError as exc:
            self.close()
            raise SandboxUnavailable(f"cannot set pids.max: {exc}") from exc

    def kill_all(self) -> None:
        kill_file = os.path.join(self.path, "cgroup.kill")
        if os.path.exists(kill_file):
            with open(kill_file, "w") as f:
                f.write("1")
            return
        for _ in range(50):  # v1 has no cgroup.kill: kill until nothing is left (forks race)
            pids = [int(p) for p in _read(os.path.join(self.path, "cgroup.procs")).split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def close(self) -> None:
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                self.kill_all()
                time.sleep(0.02)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _probe(cmd: list[str]) -> tuple[bool, str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=dict(_SANDBOX_ENV))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return r.returncode == 0 and r.stdout.strip() == "ok", (r.stderr or r.stdout).strip()[:300]


def detect_isolation(requested: str = "auto", *, allow_unsafe: bool = False) -> str:
    """Pick the isolation tier, checking that it really works here (not just installed)."""
    if requested not in ("auto", "bwrap", "unshare", "none"):
        raise ValueError(f"unknown sandbox {requested!r}: use auto, bwrap, unshare or none")
    problems = []
    order = ["bwrap", "unshare"] if requested == "auto" else [requested]
    for tier in order:
        if tier == "none":
            break
        ok, why = _probe(Sandbox(tier, Limits(timeout_s=10), probe=True)._command())
        if ok:
            return tier
        problems.append(f"{tier}: {why}")
    if requested == "none" or allow_unsafe:
        if not allow_unsafe:
            raise SandboxUnavailable("sandbox 'none' runs model code without isolation; "
                                     "pass --unsafe-no-sandbox to accept that")
        return "none"
    raise SandboxUnavailable(
        "no sandbox available (" + "; ".join(problems) + "). Install bubblewrap "
        "(`apt-get install bubblewrap`) and allow unprivileged user namespaces, or pass "
        "--unsafe-no-sandbox to run model code WITHOUT isolation")


@dataclass
class Sandbox:
    """Runs jobs under one isolation tier; one instance per concurrent worker slot."""

    tier: str
    limits: Limits = field(default_factory=Limits)
    slot: int = 0
    probe: bool = False

    def __post_init__(self) -> None:
        self._cgroup: _PidsCgroup | None = None  # the current run's, when running as root
        self._use_cgroup = False
        self._runs = 0
        if self.tier not in ("bwrap", "unshare", "none"):
            raise ValueError(f"unknown sandbox tier {self.tier!r}")
        if os.geteuid() == 0 and not self.probe:
            try:
                _PidsCgroup(self.slot, self.limits.max_procs).close()  # can we make one?
                self._use_cgroup = True
            except SandboxUnavailable as exc:
                if self.tier == "none":  # the user already accepted running without isolation
                    print(f"warning: no process limit as root ({exc})", file=sys.stderr)
                    return
                raise SandboxUnavailable(
                    f"running as root, where RLIMIT_NPROC does not apply, and {exc}: fork "
                    "bombs could not be contained. Run as a normal user, or pass "
                    "--unsafe-no-sandbox") from exc

    def close(self) -> None:
        if self._cgroup is not None:
            self._cgroup.close()
            self._cgroup = None

    # -- command lines -------------------------------------------------------------------
    def _python_argv(self, extra: list[str]) -> list[str]:
        exe, _ = _python_paths()
        if self.probe:
            return [exe, *_PYTHON_FLAGS, "-c", "print('ok')"]
        return [exe, *_PYTHON_FLAGS, "-c", _JUDGE_SOURCE, *extra]

    def _bwrap_argv(self) -> list[str]:
        _, prefix = _python_paths()
        argv = [bwrap_path() or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
                "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
                "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
        for d in _MERGED_USR_DIRS:
            if os.path.islink(d):
                argv += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                argv += ["--ro-bind", d, d]
        argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        if not prefix.startswith("/usr/"):
            argv += ["--ro-bind", prefix, prefix]
        argv += ["--proc", "/proc", "--dev", "/dev",
                 "--size", str(self.limits.tmpfs_mb << 20), "--perms", "1777", "--tmpfs", "/tmp",
                 "--chdir", "/tmp"]
        for name, value in _SANDBOX_ENV.items():
            argv += ["--setenv", name, value]
        return argv + ["--"]

    def _unshare_argv(self) -> list[str]:
        return [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child",
                "--mount", "--ipc", "--uts", "--mount-proc", "--"]

    def _command(self, extra: list[str] | None = None) -> list[str]:
        py = self._python_argv(extra or [])
        if self.tier == "bwrap":
            cmd = self._bwrap_argv() + py
        elif self.tier == "unshare":
            cmd = self._unshare_argv() + py
        else:
            cmd = py
        if self._cgroup is not None:
            # Join the cgroup before exec, so that every descendant is counted; `env -i` drops
            # the PWD that the shell exports.
            procs = os.path.join(self._cgroup.path, "cgroup.procs")
            env = " ".join(shlex.quote(f"{k}={v}") for k, v in _SANDBOX_ENV.items())
            cmd = ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec env -i {env} "$@"', "sh", *cmd]
        return cmd

    # -- running ---------------------------------------------------------------------------
    def run(self, job: dict, timeout_factor: float = 1.0) -> ExecResult:
        """Run one job (see judge/); never raises for anything the program does.

        Retries a sandbox that failed to start for lack of a resource (EAGAIN under load)."""
        for attempt in range(4):
            try:
                return self._run_once(job, timeout_factor)
            except _TransientStartFailure as exc:
                if attempt == 3:
                    raise SandboxUnavailable(f"the {self.tier} sandbox failed to start: {exc}") from None
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _run_once(self, job: dict, timeout_factor: float) -> ExecResult:
        # A fresh pids cgroup per run: bwrap with a pid namespace leaves a pids charge behind in
        # its cgroup (seen on kernel 6.18), which would add up across runs of one cgroup.
        if self._use_cgroup:
            self._runs += 1
            self._cgroup = _PidsCgroup(self.slot, self.limits.max_procs, self._runs)
        try:
            return self._run_in_cgroup(job, timeout_factor)
        finally:
            self.close()

    def _run_in_cgroup(self, job: dict, timeout_factor: float) -> ExecResult:
        limits = self.limits
        if timeout_factor != 1.0:  # slow reference solutions (MBPP+) get proportionally longer
            seconds = limits.timeout_s * timeout_factor
            limits = replace(limits, timeout_s=seconds, cpu_s=int(seconds) + 1)
        job = dict(job, limits=limits.rlimits(), isolation=self.tier, tmpfs_mb=limits.tmpfs_mb)
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        result_r, result_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        start = time.monotonic()
        # Tier "none" has no private /tmp: give it a scratch directory as its cwd.
        scratch = tempfile.mkdtemp(prefix="diffcoder-eval-") if self.tier == "none" else None
        try:
            proc = subprocess.Popen(
                self._command([str(nonce_r), str(result_w)]), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(nonce_r, result_w),
                start_new_session=True, close_fds=True, cwd=scratch, env=dict(_SANDBOX_ENV))
        except OSError as exc:
            for fd in (nonce_r, result_w, result_r):
                os.close(fd)
            raise SandboxUnavailable(f"cannot start the sandbox: {exc}") from exc
        os.close(nonce_r)
        os.close(result_w)
        payload = _json_bytes(job)
        feeder = threading.Thread(target=_feed, args=(proc.stdin, payload), daemon=True)
        feeder.start()
        outcome = self._collect(proc, result_r, start, limits)
        feeder.join(timeout=1)
        duration = time.monotonic() - start
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        return self._verdict(outcome, nonce, proc.returncode, duration, limits)

    def _kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._cgroup is not None:
            self._cgroup.kill_all()

    def _collect(self, proc: subprocess.Popen, result_r: int, start: float, limits: Limits) -> dict:
        """Drain stdout/stderr/result with caps until exit or timeout."""
        cap = limits.max_output_bytes
        bufs = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray()}
        totals = {"stdout": 0, "stderr": 0, "result": 0}
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        result_file = os.fdopen(result_r, "rb", buffering=0)
        sel.register(result_file, selectors.EVENT_READ, "result")
        deadline = start + limits.timeout_s
        timed_out = flooded = False
        exited_at = None
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # a leftover descendant holds a pipe open: stop waiting for it
            for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                name = key.data
                totals[name] += len(chunk)
                keep = 4096 if name != "result" else 1024
                if len(bufs[name]) < keep:
                    bufs[name] += chunk[: keep - len(bufs[name])]
                if totals["stdout"] + totals["stderr"] > cap:
                    flooded = True
            if flooded:
                break
        if timed_out or flooded or proc.poll() is None:
            self._kill(proc)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            proc.wait()
        self._kill(proc)  # descendants that outlived the main process (tier "none")
        sel.close()
        for f in (proc.stdout, proc.stderr, result_file):
            f.close()
        return {"timed_out": timed_out, "flooded": flooded,
                **{k: bytes(v).decode("utf-8", "replace") for k, v in bufs.items()}}

    def _verdict(self, out: dict, nonce: bytes, rc: int, duration: float, limits: Limits) -> ExecResult:
        tails = {"stdout_tail": out["stdout"][-1000:], "stderr_tail": out["stderr"][-1000:]}

        def res(status: str, reason: str) -> ExecResult:
            return ExecResult(status, reason, round(duration, 3), **tails)

        if out["timed_out"]:
            return res("timeout", f"wall-clock limit of {limits.timeout_s:g}s exceeded")
        if out["flooded"]:
            return res("error", f"output limit of {limits.max_output_bytes} bytes exceeded")
        line = out["result"].split("\n", 1)[0].strip()
        status, _, reason = line.partition(" ")
        if status == "PASS":
            if reason.encode() == nonce and rc == 0:
                return res("passed", "")
            return res("failed", "pass marker without the harness nonce (forged or truncated)")
        if status == "ERROR" and reason.startswith("sandbox-setup:"):
            raise SandboxUnavailable(f"the {self.tier} sandbox failed to start: {reason}")
        if status in ("FAILED", "ERROR", "OOM", "TIMEOUT"):
            return res({"FAILED": "failed", "ERROR": "error", "OOM": "oom", "TIMEOUT": "timeout"}[status], reason)
        self._raise_if_sandbox_broken(out["stderr"])
        signo = -rc if rc < 0 else (rc - 128 if rc > 128 else 0)
        if signo == signal.SIGXCPU:
            return res("timeout", "CPU time limit exceeded")
        if signo:
            return res("error", f"killed by signal {signal.Signals(signo).name}"
                       if signo in signal.Signals._value2member_map_ else f"killed by signal {signo}")
        if "MemoryError" in out["stderr"]:
            return res("oom", "MemoryError")
        if rc == 0:
            return res("failed", "the program exited before the tests finished")
        return res("error", f"exit status {rc}: " + " ".join(out["stderr"].split()[-20:]))

    def _raise_if_sandbox_broken(self, stderr: str) -> None:
        # A sandbox that cannot start would otherwise turn every sample into "error".
        for marker in ("bwrap:", "unshare:", "sandbox-setup:"):
            if stderr.lstrip().startswith(marker):
                first = stderr.strip().splitlines()[0][:300]
                if "Resource temporarily unavailable" in first or "Cannot allocate memory" in first:
                    raise _TransientStartFailure(first)
                raise SandboxUnavailable(f"the {self.tier} sandbox failed to start: {first}")


def _json_bytes(job: dict) -> bytes:
    import json

    return json.dumps(job).encode("utf-8")


def _feed(pipe, payload: bytes) -> None:
    try:
        pipe.write(payload)
        pipe.close()
    except (BrokenPipeError, OSError):
        pass


def describe(tier: str, limits: Limits) -> dict:
    """What the results file records about how programs were run."""
    return {"sandbox": tier, **asdict(limits)}
