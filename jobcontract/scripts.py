"""Lua scripts are `.lua` files shipped inside the packages, read once and registered once per client.

Why files: a script kept as a Python string was glued together with `+` and its KEYS/ARGV positions
were counted by hand at every call site; a `.lua` file reads (and lints) as Lua, and the Python side
of each script is one operation in `jobcontract.protocol` that names its keys and arguments.

Shared Lua is included, not copied: a line of exactly `-- #include NAME.lua` is replaced by that file
(from the same package), expanded the same way. Each file is included at most once per script, so
two pieces that both need the clock preamble (`now.lua`) define it once. Includes are textual (Lua
`local`s of the included file are visible below the line), which keeps a script one EVAL body:
Redis functions (FUNCTION LOAD) would share code too, but need Redis 7 and a library version to
manage, and a script here must run on whatever Redis a deployment has.
"""

from __future__ import annotations

import re
import weakref
from functools import cache
from importlib.resources import files
from typing import Any

_INCLUDE = re.compile(r"^-- #include (?P<name>[\w.-]+\.lua)[ \t]*$", re.MULTILINE)

# client -> script name -> its registered Script: register_script hashes the text, so do it once.
_registered: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]] = weakref.WeakKeyDictionary()


@cache
def source(package: str, name: str) -> str:
    """The script's text with its includes expanded."""
    return _expand(package, name, set())


def _expand(package: str, name: str, seen: set[str]) -> str:
    seen.add(name)
    text = files(package).joinpath(name).read_text(encoding="utf-8")

    def include(match: re.Match[str]) -> str:
        wanted = match.group("name")
        if wanted in seen:
            return f"-- ({wanted} already included)"
        return _expand(package, wanted, seen).rstrip("\n")

    return _INCLUDE.sub(include, text)


def registered(client: Any, package: str, name: str) -> Any:
    """The client's Script object for this file (sync or async, as `client.register_script` makes)."""
    try:
        scripts = _registered.setdefault(client, {})
    except TypeError:  # a client that cannot be weakly referenced: register each time (cheap, just a hash)
        return client.register_script(source(package, name))
    script = scripts.get((package, name))
    if script is None:
        script = scripts[(package, name)] = client.register_script(source(package, name))
    return script


def script_names(package: str) -> list[str]:
    """Every `.lua` file of a package (for the test that each one loads)."""
    return sorted(p.name for p in files(package).iterdir() if p.name.endswith(".lua"))
