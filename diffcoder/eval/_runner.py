"""In-sandbox runner: executes ONE untrusted program and its tests, then reports.

This file is executed as `python -I -S -c <this source> NONCE_FD RESULT_FD` inside the
sandbox; it must use the standard library only and never import diffcoder.

Protocol (see docs/eval.md, "Threat model"):
- stdin carries a JSON job: {"mode": "script" | "io", ...}. It is read completely before
  any untrusted code runs, then stdin is replaced by /dev/null.
- NONCE_FD is a pipe holding a random nonce. It is read only by the epilogue, after the
  tests returned, so a program that exits early (sys.exit, os._exit, a crash) never had it.
- RESULT_FD receives one line: "PASS <nonce>" after the tests passed, or
  "<STATUS> <reason>" when they did not. The harness counts a pass only when the line equals
  "PASS " + the nonce it wrote and the process then exited with status 0.
Everything the epilogue needs (os.read, os.write, os._exit, the pristine builtins, the
module snapshot) is captured in this function's locals before the untrusted code runs, so
monkeypatching os/sys/builtins from the program does not reach it.
"""


def _main():  # noqa: C901 - one linear script on purpose: no globals the program can reach
    import builtins
    import json
    import os
    import sys

    _read, _write, _exit, _close, _dup2 = os.read, os.write, os._exit, os.close, os.dup2
    _listdir, _open, _devnull = os.listdir, os.open, os.devnull
    _settrace, _setprofile = sys.settrace, sys.setprofile
    _exec, _compile, _isinstance, _type, _id, _len = exec, compile, isinstance, type, id, len
    _BaseException, _MemoryError, _AssertionError = BaseException, MemoryError, AssertionError
    _RecursionError = RecursionError
    nonce_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    _streams = (sys.stdout, sys.stderr)

    def flush_output():
        # os._exit skips interpreter shutdown: flush what the program printed (for the logs).
        for stream in _streams:
            try:
                stream.flush()
            except _BaseException:
                pass

    def report(status, reason):
        flush_output()
        line = (status + " " + " ".join(str(reason).split()))[:400]
        try:
            _write(result_fd, line.encode("utf-8", "replace") + b"\n")
        finally:
            _exit(1)

    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = _open(_devnull, os.O_RDONLY)
    _dup2(devnull, 0)
    _close(devnull)

    import resource

    limits = job.get("limits") or {}
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
    if job.get("isolation") == "unshare":
        _unshare_setup(job, report)

    # Modules tests commonly import: loaded now so the snapshot below covers them.
    import bisect, cmath, collections, copy, datetime, decimal, fractions, functools  # noqa
    import hashlib, heapq, itertools, math, operator, random, re, string, typing  # noqa

    pristine_builtins = dict(builtins.__dict__)
    module_snapshot = dict(sys.modules)
    module_dicts = {name: dict(m.__dict__) for name, m in module_snapshot.items()
                    if _isinstance(getattr(m, "__dict__", None), dict)}
    _deepcopy = copy.deepcopy
    _isclose, _isfinite = math.isclose, math.isfinite
    CANDIDATE_MODULE = "__candidate__"

    def restore_world():
        # Undo what the program did to shared modules, so tests see the real math, re, ...
        _settrace(None)
        _setprofile(None)
        for name, mod in module_snapshot.items():
            sys.modules[name] = mod
        for name, saved in module_dicts.items():
            d = module_snapshot[name].__dict__
            for key in [k for k in d if k not in saved]:
                del d[key]
            d.update(saved)

    def thread_count():
        try:
            return _len(_listdir("/proc/self/task"))
        except OSError:
            return 1

    suspicious = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__",
                  "__len__", "__hash__", "__contains__", "__sub__", "__rsub__", "__abs__",
                  "__float__", "__int__", "__index__", "__round__", "__class__")

    def check_value(value):
        # A result may not be an object whose class the program defined with comparison or
        # truth dunders: such an object could make `assert f(x) == y` pass for any y.
        stack, seen, budget = [value], set(), 100000
        while stack and budget > 0:
            budget -= 1
            v = stack.pop()
            if _id(v) in seen:
                continue
            seen.add(_id(v))
            t = _type(v)
            for klass in t.__mro__:
                if klass.__dict__.get("__module__") == CANDIDATE_MODULE:
                    for name in suspicious:
                        if name in klass.__dict__:
                            raise _AssertionError(
                                "result of type %s overrides %s" % (t.__name__, name))
            if t in (list, tuple, set, frozenset):
                stack.extend(v)
            elif t is dict:
                stack.extend(v.keys())
                stack.extend(v.values())

    def guard(fn):
        def guarded(*args, **kwargs):
            result = fn(*args, **kwargs)
            check_value(result)
            return result
        guarded.__name__ = getattr(fn, "__name__", "candidate")
        guarded.__doc__ = getattr(fn, "__doc__", None)
        guarded.__wrapped__ = fn
        return guarded

    def run_untrusted(source, namespace, filename):
        try:
            code = _compile(source, filename, "exec")
        except SyntaxError as exc:
            report("ERROR", "SyntaxError: %s (line %s)" % (exc.msg, exc.lineno))
        except (ValueError, _MemoryError) as exc:
            report("ERROR", "%s: %s" % (_type(exc).__name__, exc))
        try:
            _exec(code, namespace)
        except _MemoryError:
            report("OOM", "MemoryError while running the program")
        except _RecursionError:
            report("ERROR", "RecursionError in the program")
        except SystemExit as exc:
            report("FAILED", "program called exit(%s) before the tests ran" % (exc.code,))
        except _BaseException as exc:
            report("ERROR", "%s: %s" % (_type(exc).__name__, exc))

    def fresh_namespace(program_ns):
        # Tests see the program's names (MBPP asserts call them by name), with every
        # function the program defined wrapped by `guard`, and the builtins as they were
        # before the program ran.
        ns = {}
        for key, value in program_ns.items():
            if _type(value).__name__ == "function" and getattr(
                    value, "__module__", None) == CANDIDATE_MODULE:
                value = guard(value)
            ns[key] = value
        ns["__builtins__"] = dict(pristine_builtins)
        ns["__name__"] = "__tests__"
        return ns

    def epilogue():
        if thread_count() > 1:
            report("FAILED", "the program left background threads running")
        flush_output()
        nonce = _read(nonce_fd, 256)
        _write(result_fd, b"PASS " + nonce + b"\n")
        _exit(0)

    program_ns = {"__name__": CANDIDATE_MODULE, "__builtins__": builtins}
    if job["mode"] == "script":
        run_untrusted(job["program"], program_ns, "<program>")
        restore_world()
        if thread_count() > 1:
            report("FAILED", "the program left background threads running")
        test_ns = fresh_namespace(program_ns)
        try:
            _exec(_compile(job["test"], "<tests>", "exec"), test_ns)
            if job.get("check"):
                entry = job["check"]
                if entry not in program_ns:
                    report("ERROR", "NameError: the program does not define %r" % entry)
                test_ns["check"](guard(program_ns[entry]))
        except _AssertionError as exc:
            report("FAILED", "AssertionError: %s" % (exc,) if str(exc) else "AssertionError")
        except _MemoryError:
            report("OOM", "MemoryError in the tests")
        except SystemExit as exc:
            report("FAILED", "exit(%s) called during the tests" % (exc.code,))
        except _BaseException as exc:
            report("ERROR", "%s: %s" % (_type(exc).__name__, exc))
        epilogue()

    elif job["mode"] == "io":
        # EvalPlus-style: expected outputs come from the reference, computed BEFORE the
        # untrusted program runs, so it cannot tamper with them.
        def untag(obj):
            # Values JSON cannot express, tagged by the harness (benchmarks._mbpp_plus).
            if _len(obj) == 1:
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

        inputs = json.loads(job["inputs"], object_hook=untag)
        ref_ns = {"__name__": "__reference__", "__builtins__": builtins}
        _exec(_compile(job["reference"], "<reference>", "exec"), ref_ns)
        ref = ref_ns[job["entry_point"]]
        try:
            expected = [ref(*_deepcopy(args)) for args in inputs]
        except _BaseException as exc:
            report("ERROR", "the reference solution failed: %s: %s" % (_type(exc).__name__, exc))
        atol = float(job.get("atol") or 0)
        special = job.get("special")

        def is_floats(x):
            if _type(x) is float:
                return True
            if _type(x) in (list, tuple):
                return all(_type(i) is float for i in x)
            return False

        def close(out, exp, tol):
            if _type(exp) in (list, tuple):
                if _type(out) not in (list, tuple) or _len(out) != _len(exp):
                    return False
                return all(close(o, e, tol) for o, e in zip(out, exp, strict=True))
            if _type(out) not in (int, float, bool) or _type(exp) not in (int, float, bool):
                return False
            if not (_isfinite(out) and _isfinite(exp)):
                return out == exp
            return abs(out - exp) <= tol

        run_untrusted(job["program"], program_ns, "<program>")
        restore_world()
        entry = job["entry_point"]
        if entry not in program_ns:
            report("ERROR", "NameError: the program does not define %r" % entry)
        fn = guard(program_ns[entry])
        only_true = only_zero = original = True
        for i, args in enumerate(inputs):
            try:
                out = fn(*_deepcopy(args))
            except _MemoryError:
                report("OOM", "MemoryError on input %d" % i)
            except SystemExit as exc:
                report("FAILED", "exit(%s) called during the tests" % (exc.code,))
            except _AssertionError as exc:
                report("FAILED", "input %d: %s" % (i, exc))
            except _BaseException as exc:
                report("ERROR", "input %d: %s: %s" % (i, _type(exc).__name__, exc))
            exp = expected[i]
            try:
                ok = bool(out == exp)
            except _BaseException:
                ok = False
            if special == "always_true_or_exact":  # Mbpp/164 oracle in EvalPlus
                original = original and ok
                only_true = only_true and out is True
                ok = original or only_true
            elif special == "always_zero_or_exact":  # Mbpp/295 oracle in EvalPlus
                original = original and ok
                only_zero = only_zero and _type(out) is int and out == 0
                ok = original or only_zero
            tol = atol if atol else (1e-6 if is_floats(exp) else 0.0)
            if not ok and tol:
                ok = close(out, exp, tol)
            if not ok:
                report("FAILED", "wrong output on input %d of %d" % (i + 1, _len(inputs)))
        epilogue()
    else:
        report("ERROR", "unknown job mode")


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


_main()
