"""What crosses between the judge and the candidate: one JSON array per line, values as plain data.

Plain data is None, bool, int, float, complex, str, bytes, and lists, tuples (namedtuples
included), sets, frozensets, dicts and ranges of those; an iterator arrives materialised.
Anything else stays in the candidate and crosses as a handle tag {"__h": index, "type": name}.
"""
MAX_MESSAGE = 256 << 20  # one line between the processes (a result, or the arguments of a call)
MAX_ITERATOR = 1 << 20  # items of a returned iterator that are materialised


def dumps(message):
    import json

    return json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n"


def encode(value, other, materialize=True):
    """`value` as JSON-ready plain data; `other(obj)` names what is not plain data (a handle
    index) or raises. Subclasses of the plain types cross as their base type."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, (int, float, str)):  # json writes a subclass's int/float/str value
        return value
    if isinstance(value, list):
        return [encode(v, other, materialize) for v in list.__iter__(value)]
    if isinstance(value, tuple):
        items = [encode(v, other, materialize) for v in tuple.__iter__(value)]
        fields = getattr(type(value), "_fields", None)
        if type(fields) is tuple and len(fields) == len(items) and all(type(f) is str for f in fields):
            return {"__nt": [type(value).__name__, list(fields), items]}  # a namedtuple
        return {"__t": items}
    if isinstance(value, dict):
        return {"__d": [[encode(k, other, materialize), encode(v, other, materialize)]
                        for k, v in dict.items(value)]}
    if isinstance(value, set):
        return {"__s": [encode(v, other, materialize) for v in set.__iter__(value)]}
    if isinstance(value, frozenset):
        return {"__fs": [encode(v, other, materialize) for v in frozenset.__iter__(value)]}
    if isinstance(value, complex):
        return {"__c": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"__b" if isinstance(value, bytes) else "__ba": bytes(value).hex()}
    if type(value) is range:
        return {"__r": [value.start, value.stop, value.step]}
    kind = type(value)
    if kind.__name__ in ("dict_keys", "dict_items") and kind.__module__ == "builtins":
        return {"__fs": [encode(v, other, materialize) for v in value]}  # set-like views
    if kind.__name__ == "dict_values" and kind.__module__ == "builtins":
        return [encode(v, other, materialize) for v in value]
    if kind.__name__ == "module" and kind.__module__ == "builtins":
        return {"__m": value.__name__}
    if materialize and hasattr(kind, "__next__") and hasattr(kind, "__iter__"):
        items = []
        for item in value:
            if len(items) == MAX_ITERATOR:
                raise ValueError("an iterator of more than %d items" % MAX_ITERATOR)
            items.append(encode(item, other, materialize))
        return {"__it": items}
    return {"__h": other(value), "type": kind.__name__}


def decoder(resolve, module):
    """json object_hook for `encode`'s tags; `resolve` turns a handle tag into its object,
    `module` a module's name into the module."""
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
