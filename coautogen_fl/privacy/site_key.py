"""A site's secret key: it decides each private image's role (voter or site test image) through
a keyed hash, so that the role depends on that image alone and nobody without the key can
predict it (see :func:`coautogen_fl.data.assign_roles`).

The key is drawn once from the operating system's entropy and kept in the site's state dir
next to its ledger, so the roles stay the same across runs (a site-test image never becomes a
voter later).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..atomic import fsync_dir

KEY_FILE = "site_secret.key"
KEY_BYTES = 32


class SiteKeyError(RuntimeError):
    """The key file exists but is unusable; it is never replaced automatically."""


def site_secret(state_dir: str | os.PathLike) -> bytes:
    """The site's key from ``state_dir/site_secret.key``, created (mode 0600) if missing.

    Creation is race-free: the new key is written to a temporary file and hard-linked into
    place, which fails if another process (a second simulation worker of the same site) got
    there first; then everyone reads the one file that won.
    """
    folder = Path(state_dir).expanduser()
    path = folder / KEY_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{KEY_FILE}.")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            fsync_dir(folder)
        finally:
            Path(tmp).unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise SiteKeyError(
            f"site key {path} holds {len(key)} bytes, expected {KEY_BYTES}. Restore it from a backup; "
            "deleting it re-draws every image's role (voter or site test image)"
        )
    return key
