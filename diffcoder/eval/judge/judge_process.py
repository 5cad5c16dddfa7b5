"""The judge process: applies the limits, starts the candidate process, runs the tests and reports.

No code of the program ever runs here: each call of one of the program's names is a message
to the candidate, and only plain data comes back, so every comparison the tests make runs on
objects the judge built itself.
"""
import sys

from .confine import prctl, set_limits, unshare_setup
from .verdict import ended_by, flush_output
from .wire import MAX_MESSAGE, decoder, dumps, encode


def judge():
    """`python -s -S -c <source> NONCE_FD RESULT_FD`, the job on stdin: see the package docstring."""
    import json
    import os

    nonce_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    for fd in (nonce_fd, result_fd):
        os.set_inheritable(fd, False)
    candidate_env = dict(os.environ)  # the harness's minimal one, before the sandbox setup edits it
    report = reporter(result_fd)
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    set_limits(job.get("limits") or {}, report)
    if job.get("isolation") == "unshare":
        unshare_setup(job, report)
    prctl(4, 0, report, "PR_SET_DUMPABLE")  # /proc/<judge>/{fd,mem,environ} stay closed to the candidate
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    candidate = Candidate(job, candidate_env, report)
    if job["mode"] == "script":
        script_tests(job, candidate, report)
    elif job["mode"] == "io":
        io_tests(job, candidate, report)
    else:
        report("ERROR", "unknown job mode")
    candidate.stop()
    flush_output()
    nonce = os.read(nonce_fd, 256)  # only now: the tests passed and the candidate is gone
    os.write(result_fd, b"PASS " + nonce + b"\n")
    os._exit(0)


def reporter(result_fd):
    """`report(status, reason)`: writes the result line and ends the judge (exit status 1)."""
    import os

    def report(status, reason):
        flush_output()
        line = (status + " " + " ".join(str(reason).split()))[:400]
        try:
            os.write(result_fd, line.encode("utf-8", "replace") + b"\n")
        finally:
            os._exit(1)
    return report


class Handle:
    """An object of the program's, left in the candidate process: callable, passable, equal
    only to itself."""

    __slots__ = ("index", "kind", "candidate")

    def __init__(self, index, kind, candidate):
        self.index, self.kind, self.candidate = index, kind, candidate

    def __call__(self, *args, **kwargs):
        return self.candidate.call(self.index, args, kwargs)

    def __repr__(self):
        return "<%s of the program>" % self.kind


class Candidate:
    """The candidate process as the judge sees it: started without the nonce and result pipes;
    runs the program when sent it, then answers calls of the program's names."""

    def __init__(self, job, env, report):
        import os
        import subprocess

        self.report = report
        self.cpu_limit = float((job.get("limits") or {}).get("cpu_s") or 1e9)
        self.handles = {}
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        argv = sys.orig_argv
        source = argv[argv.index("-c") + 1]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-s", "-S", "-c", source, "candidate", str(req_r), str(resp_w)],
                stdin=subprocess.DEVNULL, pass_fds=(req_r, resp_w), close_fds=True, env=env)
        except OSError as exc:
            report("ERROR", "sandbox-setup: cannot start the program's process: %s" % exc)
        os.close(req_r)
        os.close(resp_w)
        self.to_candidate = os.fdopen(req_w, "wb")
        self.from_candidate = os.fdopen(resp_r, "rb")

    def start(self, program):
        """Run the program in the candidate; returns the program's names (plain data or handles)."""
        self.send(["program", program])
        names = self.receive("names")[1]
        if type(names) is not dict:
            self.report("ERROR", "the program's process sent a malformed reply")
        return names

    def call(self, index, args, kwargs):
        """Call the program's object `index`; its exception is raised here as a builtin one."""
        import builtins

        self.send(["call", index, encode(list(args), self._handle_index), encode(dict(kwargs), self._handle_index)])
        reply = self.receive("value", "raise")
        if reply[0] == "value" and len(reply) == 2:
            return reply[1]
        if len(reply) != 3:
            self.report("ERROR", "the program's process sent a malformed reply")
        name, text = reply[1:]
        kind = getattr(builtins, str(name), None)
        if not (type(kind) is type and issubclass(kind, Exception)):
            kind = RuntimeError
        try:
            exc = kind(str(text))
        except BaseException:
            exc = RuntimeError("%s: %s" % (name, text))
        raise exc

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def send(self, message):
        try:
            self.to_candidate.write(dumps(message))
            self.to_candidate.flush()
        except (BrokenPipeError, OSError):
            self.gone()

    def receive(self, *expect):
        import json

        line = self.from_candidate.readline(MAX_MESSAGE)
        if not line:
            self.gone()
        if not line.endswith(b"\n"):
            self.report("ERROR", "the program's process sent a reply of more than %d bytes" % MAX_MESSAGE)
        try:
            message = json.loads(line, object_hook=decoder(self._handle, stdlib_module))
            assert type(message) is list and message and message[0] in expect + ("status",)
            if message[0] == "status":
                status, reason = message[1:]
                self.report(status if status in ("FAILED", "ERROR", "OOM") else "ERROR", reason)
            return message
        except (ValueError, TypeError, KeyError, IndexError, ImportError, AssertionError, RecursionError,
                MemoryError):
            self.report("ERROR", "the program's process sent a malformed reply")

    def gone(self):
        """The candidate closed its end: it exited, crashed, or was killed. Reports why."""
        import signal
        import subprocess

        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if rc in (-signal.SIGXCPU, -signal.SIGKILL) and self.cpu_spent() >= self.cpu_limit - 0.5:
            self.report("TIMEOUT", "CPU time limit exceeded")
        if rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            self.report("ERROR", "the program's process was killed by signal %s" % name)
        self.report("FAILED", "the program exited before the tests finished" + (" (exit status %d)" % rc if rc else ""))

    def cpu_spent(self):
        """CPU seconds of the judge's children (cutime + cstime)."""
        import os

        try:
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return self.cpu_limit

    def _handle(self, tag):
        index = tag["__h"]
        if index not in self.handles:
            self.handles[index] = Handle(index, str(tag.get("type", "object"))[:100], self)
        return self.handles[index]

    @staticmethod
    def _handle_index(value):
        if type(value) is Handle:
            return value.index
        raise TypeError("the tests passed a %s to the program, which only plain data or the "
                        "program's own objects can cross" % type(value).__name__)


def stdlib_module(name):
    """A module the program imported, for the tests' namespace: the judge's own copy, standard
    library only."""
    import importlib

    if type(name) is not str or name.split(".")[0] not in sys.stdlib_module_names:
        raise ValueError("not a standard-library module")
    return importlib.import_module(name)


# -- the two kinds of job ---------------------------------------------------------------------

def script_tests(job, candidate, report):
    """Mode "script": the tests' source runs here against the program's names; `check(entry)` when named."""
    import builtins

    names = candidate.start(job["program"])
    test_ns = dict(names)
    test_ns["__builtins__"] = builtins
    test_ns["__name__"] = "__tests__"
    try:
        exec(compile(job["test"], "<tests>", "exec"), test_ns)
        if job.get("check"):
            entry = job["check"]
            if entry not in names:
                report("ERROR", "NameError: the program does not define %r" % entry)
            test_ns["check"](names[entry])
    except AssertionError as exc:
        report("FAILED", "AssertionError: %s" % (exc,) if str(exc) else "AssertionError")
    except BaseException as exc:
        report(*ended_by(exc, "during the tests"))


def io_tests(job, candidate, report):
    """Mode "io" (EvalPlus style): the reference computes the expected outputs here, in the judge,
    and the program's entry point must match them on every input."""
    import json

    inputs = json.loads(job["inputs"], object_hook=untag)
    expected = reference_outputs(job, inputs, report)
    oracle = OutputOracle(float(job.get("atol") or 0), job.get("special"))
    names = candidate.start(job["program"])
    entry = job["entry_point"]
    if entry not in names:
        report("ERROR", "NameError: the program does not define %r" % entry)
    fn = names[entry]
    if type(fn) is not Handle:
        report("ERROR", "TypeError: %r is not a function of the program" % entry)
    for i, args in enumerate(inputs):
        try:
            out = fn(*args)
        except MemoryError:
            report("OOM", "MemoryError on input %d" % i)
        except AssertionError as exc:
            report("FAILED", "input %d: %s" % (i, exc))
        except BaseException as exc:
            report("ERROR", "input %d: %s: %s" % (i, type(exc).__name__, exc))
        if not oracle.matches(out, expected[i]):
            report("FAILED", "wrong output on input %d of %d" % (i + 1, len(inputs)))


def reference_outputs(job, inputs, report):
    import builtins
    import copy

    ref_ns = {"__name__": "__reference__", "__builtins__": builtins}
    try:
        exec(compile(job["reference"], "<reference>", "exec"), ref_ns)
        ref = ref_ns[job["entry_point"]]
        return [ref(*copy.deepcopy(args)) for args in inputs]
    except BaseException as exc:
        report("ERROR", "the reference solution failed: %s: %s" % (type(exc).__name__, exc))


def untag(obj):
    # Values JSON cannot express in MBPP+ inputs, tagged by the harness (problems._mbpp_plus).
    if len(obj) == 1:
        (key, value), = obj.items()
        if key == "__t":
            return tuple(value)
        if key == "__s":
            return set(value)
        if key == "__c":
            return complex(value)
        if key == "__f":
            return float(value)
    return obj


class OutputOracle:
    """Whether an output matches the expected one: equal, or within the tolerance for floats;
    EvalPlus's special oracles look at all outputs so far."""

    def __init__(self, atol, special):
        self.atol, self.special = atol, special
        self.original = self.only_true = self.only_zero = True

    def matches(self, out, exp):
        try:
            ok = bool(out == exp)
        except BaseException:
            ok = False
        if self.special == "always_true_or_exact":  # Mbpp/164 oracle in EvalPlus
            self.original = self.original and ok
            self.only_true = self.only_true and out is True
            ok = self.original or self.only_true
        elif self.special == "always_zero_or_exact":  # Mbpp/295 oracle in EvalPlus
            self.original = self.original and ok
            self.only_zero = self.only_zero and type(out) is int and out == 0
            ok = self.original or self.only_zero
        tol = self.atol if self.atol else (1e-6 if all_floats(exp) else 0.0)
        if not ok and tol:
            ok = close_enough(out, exp, tol)
        return ok


def all_floats(x):
    if type(x) is float:
        return True
    if type(x) in (list, tuple):
        return all(type(i) is float for i in x)
    return False


def close_enough(out, exp, tol):
    import math

    if type(exp) in (list, tuple):
        if type(out) not in (list, tuple) or len(out) != len(exp):
            return False
        return all(close_enough(o, e, tol) for o, e in zip(out, exp, strict=True))
    if type(out) not in (int, float, bool) or type(exp) not in (int, float, bool):
        return False
    if not (math.isfinite(out) and math.isfinite(exp)):
        return out == exp
    return abs(out - exp) <= tol
