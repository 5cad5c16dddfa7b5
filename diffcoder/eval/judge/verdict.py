"""How the judge and the candidate end: a status (PASS, FAILED, ERROR, OOM, TIMEOUT) and a reason."""
import sys


def flush_output():
    """Flush what the program or the tests printed (for the logs): os._exit skips interpreter shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def ended_by(exc, during):
    """(status, reason) for an exception that ended the program or the tests `during` something:
    a MemoryError is OOM, exit() a failure, anything else an error."""
    if isinstance(exc, MemoryError):
        return "OOM", "MemoryError %s" % during
    if isinstance(exc, SystemExit):
        return "FAILED", "exit(%s) called %s" % (exc.code, during)
    return "ERROR", "%s: %s" % (type(exc).__name__, exc)
