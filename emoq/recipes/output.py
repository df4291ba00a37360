"""Where `emoq finetune` writes, and the one rule it follows: only ever remove what emoq created.

Every output directory emoq writes holds a marker file, ``.emoq-output.json``, that lists the
entries emoq put there. ``overwrite: true`` replaces an existing output directory only if it
holds that marker and nothing but the entries it lists (or if it is empty). The current
directory, the home directory, the filesystem root and any ancestor of the current directory
are refused outright, as are files and symbolic links, whatever ``overwrite`` says. All of it
is checked before a model is loaded.

A run writes into a sibling ``.NAME.partial-HOST-PID-XXXX`` directory and moves it into place at
the end. A run killed with SIGKILL cannot clean up after itself: the next run removes such
partial directories of processes that no longer exist on this host (emptiness or the marker
shows they are emoq's).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from emoq.recipes.config import RecipeError

MARKER = ".emoq-output.json"
ENTRIES = ("adapter", "metrics.json", "loss_pulse.png")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


def _protected() -> list[tuple[Path, str]]:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    return [(cwd, "the current directory"), (home, "the home directory"), (Path(cwd.anchor), "the filesystem root")]


def check_output_dir(path: str, overwrite: bool) -> Path:
    """The output directory as an absolute path, after refusing every unsafe case (module doc)."""
    key = "recipe key 'output_dir'"
    out = Path(os.path.abspath(os.path.expanduser(path)))
    real = out.resolve()
    for protected, what in _protected():
        if real == protected:
            raise RecipeError(f"{key}: {str(out)!r} is {what}; emoq never writes over it (choose a new directory)")
    if Path.cwd().resolve().is_relative_to(real):
        raise RecipeError(f"{key}: {str(out)!r} contains the current directory; emoq never replaces it")
    if out.is_symlink():
        raise RecipeError(f"{key}: {str(out)!r} is a symbolic link; emoq does not write through or replace links")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{key}: {str(out)!r} exists and is not a directory; emoq never replaces files")
    if out.exists():
        if not overwrite:
            raise RecipeError(f"{key}: {str(out)!r} exists (set overwrite=true to replace an earlier emoq output)")
        problem = _not_ours(out)
        if problem:
            raise RecipeError(f"{key}: {str(out)!r} {problem}; emoq only replaces what it wrote (remove it yourself "
                              "or choose another output_dir)")
    for parent in out.parents:  # the nearest existing ancestor must be a writable directory
        if parent.exists():
            if not parent.is_dir():
                raise RecipeError(f"{key}: cannot create {str(out)!r}: {str(parent)!r} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise RecipeError(f"{key}: cannot create {str(out)!r}: no permission to write in {str(parent)!r}")
            break
    return out


def _not_ours(out: Path) -> str | None:
    """Why the existing directory ``out`` may not be replaced; ``None`` if emoq wrote all of it."""
    names = {p.name for p in out.iterdir()}
    if not names:
        return None
    try:
        listed = json.loads((out / MARKER).read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"was not written by emoq (no valid {MARKER})"
    foreign = sorted(names - set(listed) - {MARKER})
    if foreign:
        return f"holds entries emoq did not write ({', '.join(foreign[:5])})"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, AttributeError):
        return True  # exists (another user's), or cannot tell: keep it
    return True


def partial_name(prefix: str) -> str:
    """A unique name ``PREFIX.partial-HOST-PID-XXXXXXXX`` for a directory being written."""
    return f"{prefix}.partial-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_partials(folder: Path, prefix: str) -> list[Path]:
    """Remove ``PREFIX.partial-HOST-PID-XXXXXXXX`` directories in ``folder`` whose process (on this
    host) no longer exists: runs killed before they could clean up. The name (host, process id,
    random suffix) is one only emoq gives. Returns what was removed.
    """
    pattern = re.compile(re.escape(prefix) + r"\.partial-" + re.escape(_host()) + r"-(\d+)-[0-9a-f]{8}$")
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or _pid_alive(int(match[1])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


class OutputDir:
    """The output of one run: a partial directory beside ``out`` while it runs, ``out`` at the end.

    ``OutputDir(out)`` creates the missing parents and the partial directory right away, so an
    output path that cannot be created fails before anything is loaded. ``publish()`` moves the
    result into place (replacing an earlier emoq output); ``discard()`` removes the partial
    directory and the parents it created.
    """

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out, self.overwrite, self.keep = out, overwrite, False
        self.created_parents: list[Path] = []
        for parent in reversed(out.parents):
            if not parent.exists():
                try:
                    parent.mkdir()
                except OSError as err:
                    self._remove_parents()
                    raise RecipeError(f"recipe key 'output_dir': cannot create {str(parent)!r}: "
                                      f"{err.strerror or err}") from None
                self.created_parents.append(parent)
        remove_stale_partials(out.parent, "." + out.name)
        self.work = out.parent / partial_name("." + out.name)
        try:
            self.work.mkdir()  # mode 0o777 minus the umask, like any directory the user makes
            self._write_marker(self.work)
        except OSError as err:
            self.discard()
            raise RecipeError(f"recipe key 'output_dir': cannot write in {str(out.parent)!r}: "
                              f"{err.strerror or err}") from None

    @staticmethod
    def _write_marker(folder: Path) -> None:
        (folder / MARKER).write_text(json.dumps({"written_by": "emoq finetune", "entries": list(ENTRIES)}) + "\n",
                                     encoding="utf-8")

    def publish(self) -> None:
        """Move the finished run to ``out``; an earlier emoq output there is replaced, nothing else."""
        out = self.out
        extra = sorted({p.name for p in self.work.iterdir()} - set(ENTRIES) - {MARKER})
        if extra:
            raise RuntimeError(f"emoq bug: unlisted output entries {extra}")  # the marker must list all
        old = None
        if out.exists() or out.is_symlink():
            problem = None if out.is_dir() and not out.is_symlink() else "is no longer a directory"
            problem = problem or _not_ours(out)
            if problem or not self.overwrite:
                self.keep = True
                raise RecipeError(f"recipe key 'output_dir': {str(out)!r} {problem or 'appeared during the run'}; "
                                  f"the result is kept in {str(self.work)!r}")
            old = out.parent / partial_name("." + out.name)
            out.rename(old)
        try:
            self.work.rename(out)
        except OSError:
            if old is not None:
                old.rename(out)
            raise
        self.created_parents = []  # they hold the output now
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # checked above: an emoq output, nothing else

    def discard(self) -> None:
        """Remove the partial directory and the parents this run created (if still empty)."""
        if self.keep:
            return
        if self.work.exists() and not self.work.is_symlink():
            shutil.rmtree(self.work, ignore_errors=True)
        self._remove_parents()

    def _remove_parents(self) -> None:
        for parent in reversed(self.created_parents):
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break
        self.created_parents = []
