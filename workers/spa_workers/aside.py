"""Moving outputs aside instead of deleting them: nothing a user made is lost to a rerun.

A folder `<parent>/<name>` that a rerun replaces (a stage's outputs, a training stage's checkpoints) moves to
`<parent>/.discarded/<stamp>/<name>` (`<stamp>`: UTC time, e.g. 20250131T120501Z), and is deleted only once what
replaces it has succeeded (its stage wrote a new manifest); until then it can be moved back. No reader looks
there: stage outputs are `iter-*/<stage>` and `shard-*`, checkpoints `checkpoint-*`.
"""

from __future__ import annotations

import time

from spa_workers import storage

DISCARDED = ".discarded"


def stamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def aside_uri(uri: str, when: str) -> str:
    """Where `uri` goes when set aside at `when` (a `stamp`)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return storage.join(parent, DISCARDED, when, name)


def origin(aside: str) -> str:
    """The inverse of `aside_uri`: where a set-aside folder came from."""
    rest, _, name = aside.rstrip("/").rpartition("/")
    parent = rest.rpartition("/")[0].rpartition("/")[0]  # drop "<stamp>" and ".discarded"
    return storage.join(parent, name)


def move_aside(uri: str, when: str | None = None) -> str | None:
    """Move the folder `uri` aside; its new URI, or None when nothing was there."""
    when = when or stamp()
    dest, n = aside_uri(uri, when), 1
    while storage.list_files(dest) or storage.exists(dest):  # a second move within the same second
        n += 1
        dest = aside_uri(uri, f"{when}-{n}")
    return dest if storage.move_tree(uri, dest) else None


def set_aside_under(parent: str) -> list[str]:
    """Every folder set aside under `parent` (`<parent>/.discarded/<stamp>/<name>`), oldest first."""
    return [d for when in storage.list_dirs(storage.join(parent, DISCARDED)) for d in storage.list_dirs(when)]


def forget_replaced(uri: str) -> None:
    """`uri` has just been replaced (its stage wrote a manifest): delete every set-aside copy of it and whatever
    was set aside inside it (e.g. checkpoints made with other settings)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    for old in set_aside_under(parent):
        if old.rstrip("/").rpartition("/")[2] == name:
            forget(old)
    storage.delete_tree(storage.join(uri, DISCARDED))


def forget(aside: str) -> None:
    """Delete a set-aside folder (its replacement succeeded), and its `<stamp>` folder once that is empty."""
    storage.delete_tree(aside)
    when = aside.rstrip("/").rpartition("/")[0]
    if not storage.list_files(when):
        storage.delete_tree(when)
        holder = when.rpartition("/")[0]
        if not storage.list_files(holder):
            storage.delete_tree(holder)
