"""In-sandbox runner: executes ONE untrusted program and its tests, then reports.

This file runs as two processes inside the sandbox, standard library only, never importing
diffcoder (see docs/eval.md, "Threat model"):

- The judge, `python -s -S -c <this source> NONCE_FD RESULT_FD`: reads the JSON job from
  stdin, applies the limits (and under `unshare` builds the sandbox's view), makes itself
  non-dumpable, starts the candidate process and runs the tests. No code of the program ever
  runs in the judge.
- The candidate, `python -s -S -c <this source> candidate REQUEST_FD RESPONSE_FD`: started by
  the judge without the nonce and result pipes, with no capabilities and no way to gain any,
  so neither the judge's file descriptors (/proc/<pid>/fd) nor its memory are open to it. It
  runs the program, then answers the judge's calls of the program's names.

Between the two: one JSON array per line, [kind, ...] (program, names, call, value, raise,
status). Values cross as plain data only (None, bool, int,
float, complex, str, bytes, and lists, tuples, sets, frozensets, dicts and ranges of those;
iterators arrive materialised); any other object stays in the candidate, and the judge gets
an opaque handle to it, equal only to itself, that it can call or pass back. So every
comparison the tests make (`assert f(x) == y`, MBPP+'s expected outputs) runs on objects the
judge built itself: nothing the program defined, however its `__eq__` or `__module__` reads,
takes part in deciding a pass.

Protocol with the harness: stdin carries the job {"mode": "script" | "io", ...}. NONCE_FD is
a pipe holding a random nonce that the judge reads only after the tests passed and the
candidate is gone; RESULT_FD receives one line: "PASS <nonce>", or "<STATUS> <reason>" with
STATUS one of FAILED, ERROR, OOM, TIMEOUT. The harness counts a pass only when the line is
"PASS " + the nonce it wrote and the judge then exited with status 0.

Both processes get the environment the harness gives the judge (its PYTHONHASHSEED included,
so both iterate sets of strings alike) and neither imports from its working directory.
"""
import sys

sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # a file the program writes is never imported

MAX_MESSAGE = 256 << 20  # one line between the processes (a result, or the arguments of a call)
MAX_ITERATOR = 1 << 20  # items of a returned iterator that are materialised


def _judge():  # noqa: C901 - one linear script on purpose
    import builtins
    import copy
    import json
    import math
    import os
    import signal
    import subprocess

    nonce_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    for fd in (nonce_fd, result_fd):
        os.set_inheritable(fd, False)
    candidate_env = dict(os.environ)  # the harness's minimal one, before the sandbox setup edits it

    def flush_output():
        # os._exit skips interpreter shutdown: flush what the tests printed (for the logs).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass

    def report(status, reason):
        flush_output()
        line = (status + " " + " ".join(str(reason).split()))[:400]
        try:
            os.write(result_fd, line.encode("utf-8", "replace") + b"\n")
        finally:
            os._exit(1)

    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _set_limits(job.get("limits") or {}, report)
    if job.get("isolation") == "unshare":
        _unshare_setup(job, report)
    _prctl(4, 0, report, "PR_SET_DUMPABLE")  # /proc/<judge>/{fd,mem,environ} stay closed to the candidate
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)

    class Handle:
        """An object of the program's, left in the candidate process: callable, passable, equal
        only to itself."""

        __slots__ = ("index", "kind")

        def __init__(self, index, kind):
            self.index, self.kind = index, kind

        def __call__(self, *args, **kwargs):
            return call(self.index, args, kwargs)

        def __repr__(self):
            return "<%s of the program>" % self.kind

    handles = {}

    def resolve(tag):
        index = tag["__h"]
        if index not in handles:
            handles[index] = Handle(index, str(tag.get("type", "object"))[:100])
        return handles[index]

    def encode_arg(value):
        if type(value) is Handle:
            return value.index
        raise TypeError("the tests passed a %s to the program, which only plain data or the "
                        "program's own objects can cross" % type(value).__name__)

    # -- the candidate process ------------------------------------------------------------
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    argv = sys.orig_argv
    source = argv[argv.index("-c") + 1]
    try:
        proc = subprocess.Popen([sys.executable, "-s", "-S", "-c", source, "candidate", str(req_r), str(resp_w)],
                                stdin=subprocess.DEVNULL, pass_fds=(req_r, resp_w), close_fds=True,
                                env=candidate_env)
    except OSError as exc:
        report("ERROR", "sandbox-setup: cannot start the program's process: %s" % exc)
    os.close(req_r)
    os.close(resp_w)
    to_candidate = os.fdopen(req_w, "wb")
    from_candidate = os.fdopen(resp_r, "rb")

    def gone():
        # The candidate closed its end: it exited, crashed, or was killed.
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if rc in (-signal.SIGXCPU, -signal.SIGKILL) and cpu_spent() >= cpu_limit - 0.5:
            report("TIMEOUT", "CPU time limit exceeded")
        if rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            report("ERROR", "the program's process was killed by signal %s" % name)
        report("FAILED", "the program exited before the tests finished" + (" (exit status %d)" % rc if rc else ""))

    cpu_limit = float((job.get("limits") or {}).get("cpu_s") or 1e9)

    def cpu_spent():
        try:
            with open("/proc/self/stat") as f:  # children's CPU: cutime + cstime, in clock ticks
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return cpu_limit

    def send(message):
        try:
            to_candidate.write(_dumps(message))
            to_candidate.flush()
        except (BrokenPipeError, OSError):
            gone()

    def receive(*expect):
        line = from_candidate.readline(MAX_MESSAGE)
        if not line:
            gone()
        if not line.endswith(b"\n"):
            report("ERROR", "the program's process sent a reply of more than %d bytes" % MAX_MESSAGE)
        try:
            message = json.loads(line, object_hook=_decoder(resolve, _judge_module))
            assert type(message) is list and message and message[0] in expect + ("status",)
            if message[0] == "status":
                status, reason = message[1:]
                report(status if status in ("FAILED", "ERROR", "OOM") else "ERROR", reason)
            return message
        except (ValueError, TypeError, KeyError, IndexError, ImportError, AssertionError, RecursionError,
                MemoryError):
            report("ERROR", "the program's process sent a malformed reply")

    def call(index, args, kwargs):
        send(["call", index, _encode(list(args), encode_arg), _encode(dict(kwargs), encode_arg)])
        reply = receive("value", "raise")
        if reply[0] == "value" and len(reply) == 2:
            return reply[1]
        if len(reply) != 3:
            report("ERROR", "the program's process sent a malformed reply")
        name, text = reply[1:]
        kind = getattr(builtins, str(name), None)
        if not (type(kind) is type and issubclass(kind, Exception)):
            kind = RuntimeError
        try:
            exc = kind(str(text))
        except BaseException:
            exc = RuntimeError("%s: %s" % (name, text))
        raise exc

    def epilogue():
        proc.kill()
        proc.wait()
        flush_output()
        nonce = os.read(nonce_fd, 256)
        os.write(result_fd, b"PASS " + nonce + b"\n")
        os._exit(0)

    def start():
        # The candidate runs the program and answers with the program's names.
        send(["program", job["program"]])
        names = receive("names")[1]
        if type(names) is not dict:
            report("ERROR", "the program's process sent a malformed reply")
        return names

    if job["mode"] == "script":
        names = start()
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
        except MemoryError:
            report("OOM", "MemoryError in the tests")
        except SystemExit as exc:
            report("FAILED", "exit(%s) called during the tests" % (exc.code,))
        except BaseException as exc:
            report("ERROR", "%s: %s" % (type(exc).__name__, exc))
        epilogue()

    elif job["mode"] == "io":
        # EvalPlus-style: the reference computes the expected outputs here, in the judge.
        inputs = json.loads(job["inputs"], object_hook=_untag)
        ref_ns = {"__name__": "__reference__", "__builtins__": builtins}
        try:
            exec(compile(job["reference"], "<reference>", "exec"), ref_ns)
            ref = ref_ns[job["entry_point"]]
            expected = [ref(*copy.deepcopy(args)) for args in inputs]
        except BaseException as exc:
            report("ERROR", "the reference solution failed: %s: %s" % (type(exc).__name__, exc))
        atol = float(job.get("atol") or 0)
        special = job.get("special")

        def is_floats(x):
            if type(x) is float:
                return True
            if type(x) in (list, tuple):
                return all(type(i) is float for i in x)
            return False

        def close(out, exp, tol):
            if type(exp) in (list, tuple):
                if type(out) not in (list, tuple) or len(out) != len(exp):
                    return False
                return all(close(o, e, tol) for o, e in zip(out, exp, strict=True))
            if type(out) not in (int, float, bool) or type(exp) not in (int, float, bool):
                return False
            if not (math.isfinite(out) and math.isfinite(exp)):
                return out == exp
            return abs(out - exp) <= tol

        names = start()
        entry = job["entry_point"]
        if entry not in names:
            report("ERROR", "NameError: the program does not define %r" % entry)
        fn = names[entry]
        if type(fn) is not Handle:
            report("ERROR", "TypeError: %r is not a function of the program" % entry)
        only_true = only_zero = original = True
        for i, args in enumerate(inputs):
            try:
                out = fn(*args)
            except MemoryError:
                report("OOM", "MemoryError on input %d" % i)
            except AssertionError as exc:
                report("FAILED", "input %d: %s" % (i, exc))
            except BaseException as exc:
                report("ERROR", "input %d: %s: %s" % (i, type(exc).__name__, exc))
            exp = expected[i]
            try:
                ok = bool(out == exp)
            except BaseException:
                ok = False
            if special == "always_true_or_exact":  # Mbpp/164 oracle in EvalPlus
                original = original and ok
                only_true = only_true and out is True
                ok = original or only_true
            elif special == "always_zero_or_exact":  # Mbpp/295 oracle in EvalPlus
                original = original and ok
                only_zero = only_zero and type(out) is int and out == 0
                ok = original or only_zero
            tol = atol if atol else (1e-6 if is_floats(exp) else 0.0)
            if not ok and tol:
                ok = close(out, exp, tol)
            if not ok:
                report("FAILED", "wrong output on input %d of %d" % (i + 1, len(inputs)))
        epilogue()
    else:
        report("ERROR", "unknown job mode")


def _candidate():  # noqa: C901
    import builtins
    import json
    import os

    req_fd, resp_fd = int(sys.argv[2]), int(sys.argv[3])
    from_judge = os.fdopen(req_fd, "rb")
    to_judge = os.fdopen(resp_fd, "wb")

    def send(message):
        to_judge.write(_dumps(message))
        to_judge.flush()

    def status(kind, reason):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            send(["status", kind, str(reason)[:1000]])
        finally:
            os._exit(1)

    # Before any code of the program: no capabilities, none to gain by exec.
    _prctl(38, 1, status, "PR_SET_NO_NEW_PRIVS")
    _drop_capabilities(status)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    kept, kept_ids = [], {}

    def keep(value):
        # Not plain data: the object stays here, the judge gets a handle (one per object).
        key = id(value)
        if key not in kept_ids:
            kept_ids[key] = len(kept)
            kept.append(value)
        return kept_ids[key]

    def resolve(tag):
        return kept[tag["__h"]]

    def encode(value, materialize=True):
        try:
            return _encode(value, keep, materialize)
        except RecursionError:
            raise ValueError("the value is nested too deeply to pass to the tests") from None

    def receive():
        line = from_judge.readline(MAX_MESSAGE)
        if not line:
            os._exit(0)
        return json.loads(line, object_hook=_decoder(resolve, _import_module))

    program = receive()[1]
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        code = compile(program, "<program>", "exec")
    except SyntaxError as exc:
        status("ERROR", "SyntaxError: %s (line %s)" % (exc.msg, exc.lineno))
    except (ValueError, MemoryError) as exc:
        status("ERROR", "%s: %s" % (type(exc).__name__, exc))
    try:
        exec(code, namespace)
    except MemoryError:
        status("OOM", "MemoryError while running the program")
    except RecursionError:
        status("ERROR", "RecursionError in the program")
    except SystemExit as exc:
        status("FAILED", "program called exit(%s) before the tests ran" % (exc.code,))
    except BaseException as exc:
        status("ERROR", "%s: %s" % (type(exc).__name__, exc))
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = 1
    if threads > 1:
        status("FAILED", "the program left background threads running")
    try:
        names = []
        for key, value in namespace.items():
            if type(key) is str and not key.startswith("__"):
                try:
                    names.append([key, encode(value, materialize=False)])
                except (ValueError, TypeError):  # e.g. a cyclic structure: the tests get a handle
                    names.append([key, {"__h": keep(value), "type": type(value).__name__}])
        send(["names", {"__d": names}])
    except MemoryError:
        status("OOM", "MemoryError while handing the program's names to the tests")
    except BaseException as exc:
        status("ERROR", "the program's names cannot be handed to the tests: %s: %s" % (type(exc).__name__, exc))
    while True:
        _, index, args, kwargs = receive()
        try:
            value = kept[index](*args, **kwargs)
            reply = ["value", encode(value)]
        except MemoryError:
            status("OOM", "MemoryError in the program")
        except SystemExit as exc:
            status("FAILED", "exit(%s) called during the tests" % (exc.code,))
        except BaseException as exc:
            try:
                reply = ["raise", type(exc).__name__, str(exc)[:1000]]
            except BaseException:
                reply = ["raise", "RuntimeError", "an exception that cannot be shown"]
        try:
            send(reply)
        except MemoryError:
            status("OOM", "MemoryError while handing a result to the tests")
        except (ValueError, TypeError, RecursionError) as exc:
            send(["raise", "ValueError", "the result cannot be handed to the tests: %s" % exc])


# -- shared by both processes ---------------------------------------------------------------

def _dumps(message):
    import json

    return json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n"


def _encode(value, other, materialize=True):
    """`value` as JSON-ready plain data; `other(obj)` names what is not plain data (a handle
    index) or raises. Subclasses of the plain types cross as their base type."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, (int, float, str)):  # json writes a subclass's int/float/str value
        return value
    if isinstance(value, list):
        return [_encode(v, other, materialize) for v in list.__iter__(value)]
    if isinstance(value, tuple):
        items = [_encode(v, other, materialize) for v in tuple.__iter__(value)]
        fields = getattr(type(value), "_fields", None)
        if type(fields) is tuple and len(fields) == len(items) and all(type(f) is str for f in fields):
            return {"__nt": [type(value).__name__, list(fields), items]}  # a namedtuple
        return {"__t": items}
    if isinstance(value, dict):
        return {"__d": [[_encode(k, other, materialize), _encode(v, other, materialize)]
                        for k, v in dict.items(value)]}
    if isinstance(value, set):
        return {"__s": [_encode(v, other, materialize) for v in set.__iter__(value)]}
    if isinstance(value, frozenset):
        return {"__fs": [_encode(v, other, materialize) for v in frozenset.__iter__(value)]}
    if isinstance(value, complex):
        return {"__c": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"__b" if isinstance(value, bytes) else "__ba": bytes(value).hex()}
    if type(value) is range:
        return {"__r": [value.start, value.stop, value.step]}
    kind = type(value)
    if kind.__name__ in ("dict_keys", "dict_items") and kind.__module__ == "builtins":
        return {"__fs": [_encode(v, other, materialize) for v in value]}  # set-like views
    if kind.__name__ == "dict_values" and kind.__module__ == "builtins":
        return [_encode(v, other, materialize) for v in value]
    if kind.__name__ == "module" and kind.__module__ == "builtins":
        return {"__m": value.__name__}
    if materialize and hasattr(kind, "__next__") and hasattr(kind, "__iter__"):
        items = []
        for item in value:
            if len(items) == MAX_ITERATOR:
                raise ValueError("an iterator of more than %d items" % MAX_ITERATOR)
            items.append(_encode(item, other, materialize))
        return {"__it": items}
    return {"__h": other(value), "type": kind.__name__}


def _decoder(resolve, module):
    """json object_hook for `_encode`'s tags; `resolve` turns a handle tag into its object."""
    import collections

    namedtuples = {}

    def hook(obj):
        if "__h" in obj:
            return resolve(obj)
        if len(obj) != 1:
            raise ValueError("not a tagged value")
        (tag, value), = obj.items()
        if tag == "__t":
            return tuple(value)
        if tag == "__nt":  # rebuilt here as a namedtuple of this process's own making
            name, fields, items = value
            key = (name, tuple(fields))
            if key not in namedtuples:
                namedtuples[key] = collections.namedtuple(name, fields, rename=True)
            return namedtuples[key](*items)
        if tag == "__d":
            return {k: v for k, v in value}
        if tag == "__s":
            return set(value)
        if tag == "__fs":
            return frozenset(value)
        if tag == "__c":
            return complex(*value)
        if tag == "__b":
            return bytes.fromhex(value)
        if tag == "__ba":
            return bytearray.fromhex(value)
        if tag == "__r":
            return range(*value)
        if tag == "__it":
            return iter(value)
        if tag == "__m":
            return module(value)
        raise ValueError("unknown tag %r" % tag)
    return hook


def _judge_module(name):
    # A module the program imported, for the tests' namespace: the judge's own copy, standard
    # library only.
    import importlib

    if type(name) is not str or name.split(".")[0] not in sys.stdlib_module_names:
        raise ValueError("not a standard-library module")
    return importlib.import_module(name)


def _import_module(name):
    import importlib

    return importlib.import_module(name)


def _untag(obj):
    # Values JSON cannot express in MBPP+ inputs, tagged by the harness (benchmarks._mbpp_plus).
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


def _set_limits(limits, report):
    import resource

    wanted = [(resource.RLIMIT_AS, limits.get("as_bytes")), (resource.RLIMIT_CPU, limits.get("cpu_s")),
              (resource.RLIMIT_FSIZE, limits.get("fsize_bytes")),
              (resource.RLIMIT_NOFILE, limits.get("nofile")), (resource.RLIMIT_CORE, 0),
              # Inside a fresh user namespace RLIMIT_NPROC counts this sandbox's processes
              # only (kernel >= 5.14); uid 0 ignores it, so the harness adds a pids cgroup.
              (resource.RLIMIT_NPROC, limits.get("nproc"))]
    for which, value in wanted:
        if value is None:
            continue
        _, hard = resource.getrlimit(which)
        value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        # CPU: SIGXCPU at the soft limit (reported as a timeout), SIGKILL one second later.
        top = value + 1 if which == resource.RLIMIT_CPU and (
            hard == resource.RLIM_INFINITY or value < hard) else value
        try:
            resource.setrlimit(which, (value, top))
        except (ValueError, OSError):
            report("ERROR", "sandbox-setup: cannot set resource limit %d" % which)


def _prctl(option, value, report, name):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        report("ERROR", "sandbox-setup: %s failed: errno %d" % (name, ctypes.get_errno()))


def _drop_capabilities(report):
    """Empty effective, permitted and inheritable sets (with no_new_privs, exec cannot refill them)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capset(ctypes.byref(header), data) != 0:
        report("ERROR", "sandbox-setup: dropping capabilities failed: errno %d" % ctypes.get_errno())


def _unshare_setup(job, report):
    """Fallback isolation, run as the mapped root of a fresh user+mount namespace.

    Like bubblewrap's view: every top-level directory except the system ones (/usr, /bin,
    /lib*, /sbin, /proc) is hidden behind an empty tmpfs, and only what Python needs is bound
    back (its installation, /etc/ld.so.cache, the harmless /dev nodes); then everything is
    made read-only (mount_setattr, recursive), the program gets a private /tmp, and a
    seccomp filter (libseccomp) denies the syscalls a contained program has no business
    making (namespaces, mounts, ptrace, BPF, keyrings, non-Unix sockets).
    """
    import ctypes
    import os
    import sys

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 0x4000, 1 << 18

    def mount(src, target, fstype, flags, data):
        if libc.mount(src, target.encode(), fstype, flags, data) != 0:
            report("ERROR", "sandbox-setup: mount %s: errno %d" % (target, ctypes.get_errno()))

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    mount(b"none", "/", None, MS_REC | MS_PRIVATE, None)
    prefix = os.path.realpath(sys.base_prefix)
    keep = [prefix, "/etc/ld.so.cache"] + ["/dev/" + d for d in ("null", "zero", "full", "random", "urandom")]
    # Open what is bound back before hiding it; binding from /proc/self/fd/N works afterwards.
    fds = {path: os.open(path, os.O_PATH) for path in keep if os.path.exists(path)}
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "tmp"}
    for name in sorted(os.listdir("/")):
        path = "/" + name
        if name in system or os.path.islink(path):
            continue
        if os.path.isdir(path):
            mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=755")
        elif os.path.isfile(path) and "/dev/null" in fds:  # e.g. /container_info.json
            mount(("/proc/self/fd/%d" % fds["/dev/null"]).encode(), path, None, MS_BIND, None)
    for path, fd in fds.items():
        if os.path.exists(path) and not path.startswith(("/usr/", "/lib")):
            continue  # still visible (it was not under a hidden directory)
        if os.path.isdir("/proc/self/fd/%d" % fd):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a"):
                pass
        mount(("/proc/self/fd/%d" % fd).encode(), path, None, MS_BIND | MS_REC, None)
    for fd in fds.values():
        os.close(fd)
    attr = MountAttr(1, 0, 0, 0)  # MOUNT_ATTR_RDONLY
    SYS_mount_setattr, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000
    if libc.syscall(SYS_mount_setattr, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                    ctypes.sizeof(attr)) != 0:
        report("ERROR", "sandbox-setup: read-only remount failed: errno %d" % ctypes.get_errno())
    size = ("size=%dm,mode=1777" % int(job.get("tmpfs_mb") or 64)).encode()
    mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, size)
    os.chdir("/tmp")
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"})
    _load_seccomp(report)


def _load_seccomp(report):
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        report("ERROR", "sandbox-setup: libseccomp not found (install libseccomp2)")

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
    ctx = lib.seccomp_init(ALLOW)
    denied = ("ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
              "pivot_root", "chroot", "unshare", "setns", "bpf", "perf_event_open", "keyctl",
              "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module",
              "finit_module", "delete_module", "reboot", "swapon", "swapoff", "userfaultfd",
              "io_uring_setup", "open_by_handle_at", "name_to_handle_at", "mount_setattr",
              "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick")
    for syscall in denied:
        nr = lib.seccomp_syscall_resolve_name(syscall.encode())
        if nr >= 0 and lib.seccomp_rule_add_array(ctx, EPERM, nr, 0, None) != 0:
            report("ERROR", "sandbox-setup: seccomp rule for %s failed" % syscall)
    nr = lib.seccomp_syscall_resolve_name(b"socket")
    not_unix = (ArgCmp * 1)(ArgCmp(0, 1, 1, 0))  # arg0 (domain) != AF_UNIX
    if lib.seccomp_rule_add_array(ctx, EPERM, nr, 1, not_unix) != 0 or lib.seccomp_load(ctx) != 0:
        report("ERROR", "sandbox-setup: loading the seccomp filter failed")
    lib.seccomp_release(ctx)


if len(sys.argv) > 1 and sys.argv[1] == "candidate":
    _candidate()
else:
    _judge()
