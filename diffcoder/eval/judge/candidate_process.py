"""The candidate process: drops every capability, runs the program, then answers the judge's calls.

It holds neither the nonce nor the result pipe; the program's objects stay here, and the
judge gets plain data or a handle for each.
"""
import sys

from .confine import drop_capabilities, prctl
from .verdict import ended_by, flush_output
from .wire import MAX_MESSAGE, decoder, dumps, encode


def candidate():
    """`python -s -S -c <source> candidate REQUEST_FD RESPONSE_FD`, started by the judge."""
    link = JudgeLink(int(sys.argv[2]), int(sys.argv[3]))
    # Before any code of the program: no capabilities, none to gain by exec.
    prctl(38, 1, link.status, "PR_SET_NO_NEW_PRIVS")
    drop_capabilities(link.status)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    kept = Kept()
    namespace = run_program(link.receive(kept)[1], link.status)
    refuse_background_threads(link.status)
    send_names(namespace, kept, link)
    while True:
        answer_call(link.receive(kept), kept, link)


class JudgeLink:
    """The candidate's two pipes to the judge."""

    def __init__(self, req_fd, resp_fd):
        import os

        self.from_judge = os.fdopen(req_fd, "rb")
        self.to_judge = os.fdopen(resp_fd, "wb")

    def send(self, message):
        self.to_judge.write(dumps(message))
        self.to_judge.flush()

    def receive(self, kept):
        """The judge's next message; the judge closing its end ends this process."""
        import json
        import os

        line = self.from_judge.readline(MAX_MESSAGE)
        if not line:
            os._exit(0)
        return json.loads(line, object_hook=decoder(kept.resolve, import_module))

    def status(self, kind, reason):
        """Tell the judge how the program ended, and end this process."""
        import os

        flush_output()
        try:
            self.send(["status", kind, str(reason)[:1000]])
        finally:
            os._exit(1)


class Kept:
    """The program's objects the judge holds handles to (one handle per object)."""

    def __init__(self):
        self.objects, self.ids = [], {}

    def keep(self, value):
        key = id(value)
        if key not in self.ids:
            self.ids[key] = len(self.objects)
            self.objects.append(value)
        return self.ids[key]

    def resolve(self, tag):
        return self.objects[tag["__h"]]

    def encode(self, value, materialize=True):
        """`value` as plain data, with a handle for each object that is not."""
        try:
            return encode(value, self.keep, materialize)
        except RecursionError:
            raise ValueError("the value is nested too deeply to pass to the tests") from None


def import_module(name):
    import importlib

    return importlib.import_module(name)


def run_program(program, status):
    """The program's namespace after running it; any failure ends the process with its status."""
    import builtins

    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        code = compile(program, "<program>", "exec")
    except SyntaxError as exc:
        status("ERROR", "SyntaxError: %s (line %s)" % (exc.msg, exc.lineno))
    except (ValueError, MemoryError) as exc:
        status("ERROR", "%s: %s" % (type(exc).__name__, exc))
    try:
        exec(code, namespace)
    except RecursionError:
        status("ERROR", "RecursionError in the program")
    except BaseException as exc:
        status(*ended_by(exc, "while running the program"))
    return namespace


def refuse_background_threads(status):
    """Threads the program left running could race the tests' calls."""
    import os

    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = 1
    if threads > 1:
        status("FAILED", "the program left background threads running")


def send_names(namespace, kept, link):
    """The program's names, for the tests' namespace: plain data, or a handle (e.g. a cyclic structure)."""
    try:
        names = []
        for key, value in namespace.items():
            if type(key) is str and not key.startswith("__"):
                try:
                    names.append([key, kept.encode(value, materialize=False)])
                except (ValueError, TypeError):
                    names.append([key, {"__h": kept.keep(value), "type": type(value).__name__}])
        link.send(["names", {"__d": names}])
    except MemoryError:
        link.status("OOM", "MemoryError while handing the program's names to the tests")
    except BaseException as exc:
        link.status("ERROR", "the program's names cannot be handed to the tests: %s: %s" % (type(exc).__name__, exc))


def answer_call(message, kept, link):
    """Run one call the tests made and send back its value, or the exception it raised."""
    _, index, args, kwargs = message
    try:
        reply = ["value", kept.encode(kept.objects[index](*args, **kwargs))]
    except (MemoryError, SystemExit) as exc:
        link.status(*ended_by(exc, "during the tests"))
    except BaseException as exc:
        try:
            reply = ["raise", type(exc).__name__, str(exc)[:1000]]
        except BaseException:
            reply = ["raise", "RuntimeError", "an exception that cannot be shown"]
    try:
        link.send(reply)
    except MemoryError:
        link.status("OOM", "MemoryError while handing a result to the tests")
    except (ValueError, TypeError, RecursionError) as exc:
        link.send(["raise", "ValueError", "the result cannot be handed to the tests: %s" % exc])
