"""Hostile completions: each must be reported as a failed problem while the harness carries on.

Runs under every isolation tier that works on this machine (bubblewrap; unshare+seccomp).
Limits are small (a 3 s timeout, 256 MiB, 16 processes) so the bombs cannot hurt the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from diffcoder.eval.harness import EvalSpec, execute
from diffcoder.eval.problems import Problem
from diffcoder.eval.sandbox import Limits, Sandbox, SandboxUnavailable, detect_isolation

pytestmark = pytest.mark.slow  # the slow tier: `make test-fast` skips it

PROMPT = "def add(a, b):\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
GOOD = "    return a + b\n"


def _tier_or_skip(tier: str) -> str:
    try:
        return detect_isolation(tier)
    except SandboxUnavailable as exc:
        pytest.skip(f"{tier} sandbox unavailable here: {exc}")


@pytest.fixture(scope="module", params=["bwrap", "unshare"])
def tier(request: pytest.FixtureRequest) -> str:
    return _tier_or_skip(request.param)


@pytest.fixture(scope="module")
def loopback_listener():
    """A TCP listener on the host's loopback that records every connection it accepts."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    accepted: list = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                accepted.append(conn.recv(100))
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    t.join(timeout=2)
    srv.close()


# Reads the environment of every process it can see inside the sandbox: PID 1 (the sandbox's
# init, started by the harness), itself, its parent, every other /proc entry, and os.environ.
ENVIRON_PROBE = (
    "import os\n"
    "def _environs():\n"
    "    paths = ['/proc/1/environ', '/proc/self/environ', '/proc/%d/environ' % os.getppid()]\n"
    "    paths += ['/proc/%s/environ' % p for p in os.listdir('/proc') if p.isdigit()]\n"
    "    got = {}\n"
    "    for p in paths:\n"
    "        try:\n"
    "            with open(p, 'rb') as f:\n"
    "                got[p] = [e.decode('utf-8', 'replace') for e in f.read().split(b'\\0') if e]\n"
    "        except OSError:\n"
    "            pass\n"
    "    got['os.environ'] = ['%s=%s' % kv for kv in os.environ.items()]\n"
    "    return got\n")


def hostile_programs(port: int, canary: Path, outside: Path, victim: Path) -> dict[str, str]:
    """name -> completion (the body after PROMPT, or whole top-level code after `pass`)."""
    top = "    pass\n"  # closes the prompt's function; top-level code follows
    return {
        "socket_loopback": top + (
            "import socket\ns = socket.create_connection(('127.0.0.1', %d), timeout=2)\n"
            "s.sendall(b'escaped')\n" % port) + "def add(a, b):\n    return a + b\n",
        "write_outside": top + (
            "import os\nos.makedirs(%r, exist_ok=True)\nopen(%r, 'w').write('escaped')\n"
            % (str(outside.parent), str(outside))),
        "read_environ": top + ENVIRON_PROBE + (
            "raise ValueError(' '.join(e for v in _environs().values() for e in v if 'TOKEN' in e))\n"),
        "read_canary": top + (
            "data = open(%r).read()\nprint(data)\nraise RuntimeError(data)\n" % str(canary)),
        "delete_files": top + (
            "import os, shutil\ntry:\n    os.remove(%r)\nexcept OSError as e:\n    print(e)\n"
            "shutil.rmtree('/usr', ignore_errors=True)\n" % str(victim)),
        "fork_bomb": top + (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
        "memory_bomb": top + "x = [bytearray(1 << 26) for _ in range(10000)]\n",
        "infinite_loop": top + "while True:\n    pass\n",
        "sleep_past_timeout": top + "import time\ntime.sleep(60)\n",
        "stdout_flood": top + "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n",
        "kill_parent": top + "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(1)\n",
        "kill_everything": top + "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
        "sys_exit_0": top + "import sys\nsys.exit(0)\n",
        "os_exit_0": top + "import os\nos._exit(0)\n",
        "redefine_check": "    return 0\ndef check(candidate):\n    pass\n",
        "always_equal_object": "    class Any:\n        def __eq__(self, other):\n            return True\n"
                                "    return Any()\n",
        "patch_builtins_and_modules": "    return 0\nimport builtins, math, sys\n"
                                      "builtins.AssertionError = type('Fake', (Exception,), {})\n"
                                      "math.isclose = lambda *a, **k: True\nsys.settrace(None)\n",
        "exit_from_candidate": "    import os\n    os._exit(0)\n",
        "atexit_forgery": top + "import atexit, os\natexit.register(lambda: os.write(1, b'PASS'))\n"
                                "def add(a, b):\n    return 0\n",
        "forge_pass_marker": top + (
            "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'PASS 0123456789abcdef\\n')\n"
            "    except OSError:\n        pass\nos._exit(0)\n"),
        "read_nonce_and_forge_pass": top + (
            "import os\nfound = []\n"
            "for fd in range(3, 256):\n    try:\n        os.set_blocking(fd, False)\n"
            "        found.append(os.read(fd, 256))\n    except OSError:\n        pass\n"
            "targets = list(range(3, 256))\n"
            "for pid in {1, os.getppid()}:\n    for fd in range(64):\n        for mode in (os.O_RDONLY, os.O_WRONLY):\n"
            "            try:\n                targets.append(os.open('/proc/%d/fd/%d' % (pid, fd), mode | os.O_NONBLOCK))\n"
            "            except OSError:\n                pass\n"
            "            else:\n                try:\n                    found.append(os.read(targets[-1], 256))\n"
            "                except OSError:\n                    pass\n"
            "for data in [d.strip() for d in found if d.strip()]:\n    for fd in targets:\n        try:\n"
            "            os.write(fd, b'PASS ' + data + b'\\n')\n        except OSError:\n            pass\n"
            "os._exit(0)\n"),
        "always_equal_claims_builtins": "    class Any:\n        __module__ = 'builtins'\n"
                                        "        def __eq__(self, other):\n            return True\n"
                                        "    return Any()\n",
        "always_equal_from_the_stdlib": "    from unittest import mock\n    return mock.ANY\n",
        "patch_a_preloaded_class": "    import collections\n    collections.UserList.__eq__ = lambda s, o: True\n"
                                   "    return collections.UserList()\n",
        "background_thread": "    return a + b\nimport threading, time\n"
                             "threading.Thread(target=lambda: time.sleep(30), daemon=True).start()\n",
    }


def test_hostile_completions_fail_and_harness_carries_on(tier: str, tmp_path: Path, loopback_listener,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    port, accepted = loopback_listener
    secret = secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", secret)  # in the harness's environment, as in a real eval run
    canary = tmp_path / "canary.txt"
    canary.write_text(secret)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    # Outside the sandbox's /tmp and outside /tmp entirely: a path in the repository.
    outside_dir = Path(__file__).resolve().parent / f".sandbox-escape-{secrets.token_hex(4)}"
    outside = outside_dir / "escaped.txt"
    programs = hostile_programs(port, canary, outside, victim)
    problems, samples = [], {}
    for name, completion in [("control_before", GOOD), *programs.items(), ("control_after", GOOD)]:
        problems.append(Problem(name, "humaneval", PROMPT, GOOD, TEST, "add"))
        samples[name] = [{"task_id": name, "completion": completion}]
    limits = Limits(timeout_s=3, memory_mb=256, max_procs=16, max_output_bytes=1 << 20)
    spec = EvalSpec("adversarial", tier, limits, workers=2)
    out = tmp_path / "out"
    start = time.monotonic()
    try:
        results = execute(problems, samples, out, spec)
    finally:
        if outside_dir.exists():
            import shutil
            shutil.rmtree(outside_dir)
            pytest.fail("a sandboxed program created a directory outside the sandbox")
    elapsed = time.monotonic() - start
    rows = {r["task_id"]: r for r in map(json.loads, (out / "per_problem.jsonl").read_text().splitlines())}

    assert rows["control_before"]["passed"] and rows["control_after"]["passed"]
    for name in programs:
        assert not rows[name]["passed"], (name, rows[name])
    assert results["n_problems"] == len(programs) + 2
    assert results["pass@1"] == pytest.approx(2 / (len(programs) + 2), abs=1e-6)  # rounded to 6 places
    # Containment, checked from outside.
    assert accepted == [], "a sandboxed program reached a loopback listener on the host"
    assert not outside.exists()
    assert victim.read_text() == "keep me"
    assert Path("/usr/bin").is_dir()
    assert secret not in (out / "per_problem.jsonl").read_text()
    assert secret not in (out / "results.json").read_text()
    # Statuses that say what happened.
    assert rows["infinite_loop"]["status"] == "timeout"
    assert rows["sleep_past_timeout"]["status"] == "timeout"
    assert rows["memory_bomb"]["status"] == "oom"
    assert rows["stdout_flood"]["status"] == "error"
    assert rows["fork_bomb"]["status"] in ("timeout", "failed", "error")
    assert "nonce" in rows["forge_pass_marker"]["reason"] or rows["forge_pass_marker"]["status"] != "passed"
    assert elapsed < 120


def test_canary_not_visible_to_sandbox(tier: str, tmp_path: Path) -> None:
    """The program cannot even see the canaries (not only: its output is filtered), wherever
    they are: under /tmp, in the repository, in the home directory."""
    in_repo = Path(__file__).resolve().parent / f".canary-{secrets.token_hex(4)}"
    in_home = Path.home() / f".diffcoder-canary-{secrets.token_hex(4)}"
    canaries = [tmp_path / "canary.txt", in_repo, in_home]
    try:
        for c in canaries:
            c.write_text("secret")
        sb = Sandbox(tier, Limits(timeout_s=5, memory_mb=256, max_procs=16))
        try:
            prog = f"import os\nseen = [p for p in {[str(c) for c in canaries]!r} if os.path.exists(p)]\n"
            res = sb.run({"mode": "script", "program": prog, "test": "assert seen == [], seen\n", "check": None})
        finally:
            sb.close()
    finally:
        for c in canaries:
            c.unlink(missing_ok=True)
    assert res.passed, res


def test_fork_bomb_is_capped(tier: str) -> None:
    """The process limit holds: a bounded fork loop sees fork fail well before 200 children."""
    sb = Sandbox(tier, Limits(timeout_s=10, memory_mb=256, max_procs=16))
    prog = ("import os, time\ndef forks():\n    n = 0\n    for _ in range(200):\n        try:\n"
            "            if os.fork() == 0:\n                time.sleep(5)\n                os._exit(0)\n"
            "            n += 1\n        except OSError:\n            break\n    return n\n")
    try:
        res = sb.run({"mode": "script", "program": prog, "test": "assert forks() < 20\n", "check": None})
    finally:
        sb.close()
    assert res.passed, res


def test_no_sandbox_requires_explicit_consent() -> None:
    with pytest.raises(SandboxUnavailable, match="--unsafe-no-sandbox"):
        detect_isolation("none")
    assert detect_isolation("none", allow_unsafe=True) == "none"


def test_unsafe_tier_still_enforces_limits(tmp_path: Path) -> None:
    sb = Sandbox("none", Limits(timeout_s=2, memory_mb=256, max_procs=16))
    try:
        loop = sb.run({"mode": "script", "program": "while True: pass\n", "test": "", "check": None})
        mem = sb.run({"mode": "script", "program": "x = bytearray(1 << 30)\n", "test": "", "check": None})
        ok = sb.run({"mode": "script", "program": "x = 1\n", "test": "assert x == 1\n", "check": None})
    finally:
        sb.close()
    assert loop.status == "timeout" and mem.status == "oom" and ok.passed


def test_program_finds_no_diffcoder_or_site_packages(tier: str) -> None:
    # -I -S: the program sees only the standard library (no torch, no diffcoder).
    sb = Sandbox(tier, Limits(timeout_s=5, memory_mb=512))
    try:
        res = sb.run({"mode": "script", "program": "import importlib.util as u\n"
                      "found = [m for m in ('diffcoder', 'torch') if u.find_spec(m)]\n",
                      "test": "assert found == [], found\n", "check": None})
    finally:
        sb.close()
    assert res.passed, res


def test_judge_wire_crosses_plain_data_and_keeps_the_rest() -> None:
    # The judge program's parts are a normal package too: its value encoding is checked here, in-process.
    from diffcoder.eval.judge.wire import decoder, encode

    kept: list = []
    value = {"t": (1, 2.5, "x"), "s": {3}, "b": b"\x00", "r": range(3), "it": iter([1, 2]), "o": object()}
    wire = json.loads(json.dumps(encode(value, lambda obj: kept.append(obj) or len(kept) - 1)),
                      object_hook=decoder(lambda tag: kept[tag["__h"]], __import__))
    assert wire["t"] == (1, 2.5, "x") and wire["s"] == {3} and wire["b"] == b"\x00" and wire["r"] == range(3)
    assert list(wire["it"]) == [1, 2] and wire["o"] is value["o"] and kept == [value["o"]]


def test_environment_is_scrubbed(tier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFCODER_TEST_SECRET", "do-not-leak")
    sb = Sandbox(tier, Limits(timeout_s=5, memory_mb=256))
    try:
        res = sb.run({"mode": "script", "program": "import os\nleak = os.environ.get('DIFFCODER_TEST_SECRET')\n",
                      "test": "assert leak is None\n", "check": None})
    finally:
        sb.close()
    assert res.passed, res
    assert os.environ["DIFFCODER_TEST_SECRET"] == "do-not-leak"


def test_host_environment_is_unreadable(tier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No process inside the sandbox, its init included, carries the harness's environment:
    neither /proc/<pid>/environ (which keeps what a process was started with) nor os.environ."""
    secret = secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", secret)
    sb = Sandbox(tier, Limits(timeout_s=5, memory_mb=256))
    # The judge (PID 1 under unshare) is not dumpable, so its environ may be unreadable too.
    test = ("assert '/proc/self/environ' in seen, sorted(seen)\n"
            "names = {e.split('=', 1)[0] for v in seen.values() for e in v}\n"
            "assert names <= {'PATH', 'HOME', 'LANG', 'PYTHONHASHSEED', 'PWD'}, seen\n"
            # bwrap sets PWD to the directory it starts the program in: a sandbox path, not the host's.
            "assert {e for v in seen.values() for e in v if e.startswith('PWD=')} <= {'PWD=/tmp'}, seen\n")
    try:
        res = sb.run({"mode": "script", "program": ENVIRON_PROBE + "seen = _environs()\n", "test": test,
                      "check": None})
    finally:
        sb.close()
    assert secret not in res.reason + res.stdout_tail + res.stderr_tail
    assert res.passed, res


def test_program_cannot_reach_the_judge(tier: str) -> None:
    """The process that runs the program holds neither the nonce nor the result pipe, and the
    judge's descriptors and memory under /proc are closed to it (no capabilities, judge not
    dumpable). Under bwrap, PID 1 is bwrap's own init, not the judge: it holds no secret (its
    environment is checked above), so only the judge is probed there."""
    sb = Sandbox(tier, Limits(timeout_s=5, memory_mb=256))
    prog = ("import os\nopened = []\n"
            "for pid in [os.getppid()]:\n"
            "    for name in ['mem', 'environ'] + ['fd/%d' % fd for fd in range(64)]:\n"
            "        try:\n            os.close(os.open('/proc/%d/%s' % (pid, name), os.O_RDONLY | os.O_NONBLOCK))\n"
            "            opened.append((pid, name))\n        except OSError:\n            pass\n"
            "mine = sorted(int(fd) for fd in os.listdir('/proc/self/fd'))\n"
            "def report():\n    return opened, mine\n")
    test = "opened, mine = report()\nassert opened == [], opened\nassert len(mine) <= 6, mine\n"
    try:
        res = sb.run({"mode": "script", "program": prog, "test": test, "check": None})
    finally:
        sb.close()
    assert res.passed, res


def test_io_mode_expected_outputs_are_out_of_reach(tier: str) -> None:
    """MBPP+ style: the expected outputs live in the judge; a program that looks for them in its
    callers' frames or in memory finds nothing, and a wrong program fails."""
    reference = "def add(a, b):\n    return a + b\n"
    peek = ("import gc, sys\ndef add(a, b):\n    f = sys._getframe(1)\n    while f is not None:\n"
            "        if 'expected' in f.f_locals:\n            return f.f_locals['expected'][f.f_locals['i']]\n"
            "        f = f.f_back\n"
            "    for o in gc.get_objects():\n"
            "        if isinstance(o, list) and len(o) == 3 and o[:1] == [5]:\n            return o[0]\n"
            "    return None\n")
    job = {"mode": "io", "entry_point": "add", "reference": reference, "atol": 0, "special": None,
           "inputs": json.dumps([[2, 3], [1, 1], [-4, 4]])}
    sb = Sandbox(tier, Limits(timeout_s=5, memory_mb=256))
    try:
        honest = sb.run({**job, "program": reference})
        cheat = sb.run({**job, "program": peek})
    finally:
        sb.close()
    assert honest.passed, honest
    assert not cheat.passed and cheat.status == "failed", cheat


def test_results_cross_as_plain_data(tier: str) -> None:
    """What honest programs return still compares as before: subclasses of the plain types,
    namedtuples (fields included), dict views, generators, nested containers, big ints,
    NaN and infinities; the program's own objects can be passed back to it."""
    prog = ("import collections, enum\nP = collections.namedtuple('P', 'x y')\n"
            "class Color(enum.IntEnum):\n    RED = 1\n"
            "class Box:\n    def __init__(self, v):\n        self.v = v\n"
            "def unbox(b):\n    return b.v\n"
            "def values():\n"
            "    return (P(1, 2), Color.RED, collections.OrderedDict(a=1), collections.Counter('aab'),\n"
            "            {'a': 1}.keys(), (i * i for i in range(3)), {(1, 2): {3, 4}}, 10 ** 5000,\n"
            "            float('nan'), float('-inf'), b'\\x00\\xff', 2 + 3j, frozenset([1]), range(3))\n")
    test = ("import math\n"
            "p, red, od, cnt, keys, gen, nested, big, nan, inf, raw, z, fs, r = values()\n"
            "assert p == (1, 2) and p.x == 1 and p.y == 2\n"
            "assert red == 1 and od == {'a': 1} and cnt == {'a': 2, 'b': 1}\n"
            "assert keys == {'a'} and list(gen) == [0, 1, 4] and nested == {(1, 2): {3, 4}}\n"
            "assert big == 10 ** 5000 and math.isnan(nan) and inf == -math.inf\n"
            "assert raw == b'\\x00\\xff' and z == 2 + 3j and fs == {1} and r == range(3)\n"
            "box = Box(7)\nassert unbox(box) == 7 and box != 7 and box == box\n")
    sb = Sandbox(tier, Limits(timeout_s=5, memory_mb=512))
    try:
        res = sb.run({"mode": "script", "program": prog, "test": test, "check": None})
    finally:
        sb.close()
    assert res.passed, res


def test_many_runs_do_not_exhaust_the_process_limit(tier: str) -> None:
    """bwrap's pid namespace can leave a pids-cgroup charge behind per run (kernel 6.18): each run
    gets a fresh cgroup, so many more runs than max_procs all start."""
    sb = Sandbox(tier, Limits(timeout_s=5, memory_mb=256, max_procs=6))
    try:
        statuses = [sb.run({"mode": "script", "program": "x = 1\n", "test": "assert x == 1\n", "check": None}).status
                    for _ in range(20)]
    finally:
        sb.close()
    assert statuses == ["passed"] * 20
