"""Confinement each process of the judge program applies to itself: resource limits, process
flags, dropped capabilities and, under the `unshare` tier, the sandbox's filesystem view and a
seccomp filter. Every failure is reported through `report` as a sandbox-setup error."""


def set_limits(limits, report):
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


def prctl(option, value, report, name):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        report("ERROR", "sandbox-setup: %s failed: errno %d" % (name, ctypes.get_errno()))


def drop_capabilities(report):
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


def unshare_setup(job, report):
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
    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 0x4000, 1 << 18

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
    load_seccomp(report)


def load_seccomp(report):
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
