"""Report folders on disk: what may be replaced or removed, and how a finished report gets into place.

Standard library only, so `make clean` runs it with any python3 after the virtual environment is gone:
`python3 stream_jax/outdir.py clean reports/demo` (also `stream-jax clean FOLDER`).

Ownership. A report folder holds a marker file (`MARKER`) with the sha256 of every file stream_jax wrote
there. A folder is replaced (`--force`) or removed (`clean`) only if the marker is there, every file and
folder in it is one the marker lists, and every listed file still has its hash: a file a user added or
edited keeps the whole folder, and the refusal names it.

Placement. A report is written into a hidden temporary folder and moved into place only when complete, so a
crashed run never leaves a half-written report that looks complete:
  "swap"      the temporary folder is a sibling of --out and one rename puts it in place (an earlier report
              is renamed aside first and deleted after);
  "in place"  where --out itself cannot be renamed (a mount point, e.g. a Docker volume: rename gives EBUSY)
              or its parent is not writable or does not support renames, the temporary folder is made
              inside --out and its files are moved in.
The strategy, writability and free space are checked before any compute (`plan`). If the final move still
fails, "swap" falls back to "in place"; if that fails too, the finished report stays in its temporary
folder and the error names it: a finished report is never discarded.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import warnings
from typing import Optional

MARKER = ".stream_jax_report"
# A report (trace, figures, HTML) is a few MiB at the demo's 10k tokens; refuse to start below this.
MIN_FREE_BYTES = 64 << 20
SWAP, IN_PLACE = "swap", "in place"
_TMP = ".stream_jax-tmp-"


class ReportPathError(ValueError):
  """The output path cannot take a report without deleting or overwriting something stream_jax did not
  write (or it cannot be created)."""


class ReportWarning(UserWarning):
  """The report was written, but not the usual way (in place, not by one rename)."""


def sha256(path: os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _listing(folder: pathlib.Path, skip: Optional[pathlib.Path] = None) -> tuple[list[str], list[str]]:
  """(files, folders) under `folder`, relative, sorted; symbolic links count as files; the marker and
  `skip` (a temporary folder being written) are left out."""
  files, dirs = [], []
  for root, dnames, fnames in os.walk(folder):
    r = pathlib.Path(root)
    for d in list(dnames):
      p = r / d
      if skip is not None and p == skip:
        dnames.remove(d)
      elif p.is_symlink():
        files.append(str(p.relative_to(folder)))
      else:
        dirs.append(str(p.relative_to(folder)))
    files += [str((r / f).relative_to(folder)) for f in fnames]
  return sorted(f for f in files if f != MARKER), sorted(dirs)


def file_hashes(folder: pathlib.Path) -> dict[str, str]:
  """relative path -> sha256 of every file under `folder` (the marker's content)."""
  return {f: sha256(folder / f) for f in _listing(folder)[0]}


def write_marker(folder: pathlib.Path) -> None:
  """Writes the marker listing every file now in `folder` with its hash: call it when the rest is written."""
  (folder / MARKER).write_text(json.dumps({"written_by": "stream_jax", "files": file_hashes(folder)},
                                          indent=1))


def read_marker(folder: pathlib.Path) -> Optional[dict[str, Optional[str]]]:
  """relative path -> sha256 of the files the marker says stream_jax wrote (hash None: a marker from before
  content hashes), or None if `folder` holds no readable marker."""
  try:
    files = json.loads((folder / MARKER).read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  if isinstance(files, list):
    return {str(f): None for f in files if f != MARKER}
  if isinstance(files, dict):
    return {str(f): None if h is None else str(h) for f, h in files.items()}
  return None


def _short(names: list[str]) -> str:
  return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def check_owned(folder: pathlib.Path, name: str, skip: Optional[pathlib.Path] = None) -> dict[str, str]:
  """The marker's files if `folder` is a stream_jax report holding only files stream_jax wrote, unchanged;
  ReportPathError naming the files otherwise."""
  files, dirs = _listing(folder, skip)
  owned = read_marker(folder)
  if owned is None:
    entries = files + [d + "/" for d in dirs]
    raise ReportPathError(
        f"{name}: is an existing folder that stream_jax did not write (no readable {MARKER} marker; "
        f"{len(entries)} entries, e.g. {entries[0] if entries else MARKER!r}); it is left alone (give a new "
        "or empty folder)")
  foreign = [f for f in files if f not in owned]
  foreign += [d + "/" for d in dirs if not any(o.startswith(d + "/") for o in owned)]
  if foreign:
    raise ReportPathError(f"{name}: is a previous stream_jax report, but holds files it did not write "
                          f"({_short(foreign)}); it is left alone (move them out, or give a new folder)")
  legacy = [f for f in files if owned[f] is None]
  if legacy:
    raise ReportPathError(f"{name}: is a stream_jax report from a version that recorded no content hashes, "
                          f"so edits to its files ({_short(legacy)}) cannot be ruled out; it is left alone "
                          "(delete it yourself, or give a new folder)")
  edited = [f for f in files if sha256(folder / f) != owned[f]]
  if edited:
    raise ReportPathError(f"{name}: is a previous stream_jax report whose files were changed since it was "
                          f"written ({_short(edited)}); it is left alone (move them out, or give a new "
                          "folder)")
  return owned


def _remove_owned(folder: pathlib.Path, owned: dict[str, Optional[str]]) -> None:
  """Deletes the listed files, then the folders they leave empty, then the marker (the folder stays)."""
  for f in owned:
    try:
      (folder / f).unlink()
    except FileNotFoundError:
      pass
  for d in sorted({p for f in owned for p in pathlib.PurePath(f).parents if str(p) != "."},
                  key=lambda p: -len(p.parts)):
    try:
      (folder / d).rmdir()
    except OSError:
      pass
  (folder / MARKER).unlink()


def remove_report(folder: os.PathLike | str, name: Optional[str] = None) -> bool:
  """Removes a report folder stream_jax wrote and nobody changed since (the `clean` command); returns False
  if it does not exist. ReportPathError (naming the files) if it holds anything else."""
  name = name or os.fspath(folder)
  path = pathlib.Path(os.path.expanduser(os.fspath(folder))).absolute()
  if not path.exists() and not path.is_symlink():
    return False
  if path.is_symlink() or not path.is_dir():
    raise ReportPathError(f"{name}: is not a folder; it is left alone")
  _remove_owned(path, check_owned(path, name))
  if not os.path.ismount(path):
    path.rmdir()
  return True


# --------------------------------------------------------------------------------------------- placement


def _probe(folder: pathlib.Path, name: str) -> bool:
  """Makes, renames and removes an empty folder in `folder` (permission bits do not tell: root, read-only
  mounts, /proc). Raises ReportPathError if no folder can be made; returns whether the rename worked."""
  try:
    probe = tempfile.mkdtemp(prefix=".stream_jax-probe-", dir=folder)
  except OSError as e:
    raise ReportPathError(f"{name}: cannot create a folder in {folder} ({e.strerror})") from None
  try:
    os.rename(probe, probe + "-renamed")
    probe += "-renamed"
    return True
  except OSError:
    return False
  finally:
    try:
      os.rmdir(probe)
    except OSError:
      pass


def _writable(folder: pathlib.Path) -> bool:
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".stream_jax-probe-", dir=folder))
    return True
  except OSError:
    return False


def _check_space(folder: pathlib.Path, name: str) -> None:
  try:
    free = shutil.disk_usage(folder).free
  except OSError:
    return
  if free < MIN_FREE_BYTES:
    raise ReportPathError(f"{name}: only {free / 2**20:.0f} MiB free on the disk of {folder}; a report needs "
                          f"about {MIN_FREE_BYTES >> 20} MiB (free some space or give another folder)")


def plan(out_dir: str | os.PathLike, *, force: bool = False, option: str = "--out") -> tuple[pathlib.Path, str]:
  """(absolute folder, SWAP or IN_PLACE) after checking, before any work, that writing a report there
  deletes nothing stream_jax did not write, that it can be written and that the disk has room.

  Accepted: a path that does not exist (its parent folders are made when the report is written, so the
  nearest existing ancestor must be a writable folder), an empty folder, and with `force=True` a previous
  stream_jax report holding only the files it wrote, unchanged. Raises ReportPathError otherwise.
  """
  out = pathlib.Path(os.path.expanduser(os.fspath(out_dir))).absolute()
  name = f"{option} {os.fspath(out_dir)}"
  if out.is_symlink():
    raise ReportPathError(f"{name}: is a symbolic link; give a new folder name")
  if out.exists():
    if not out.is_dir():
      raise ReportPathError(f"{name}: is an existing file, not a report folder; it is left alone (give a new "
                            "folder name)")
    if any(out.iterdir()):
      check_owned(out, name)
      if not force:
        raise ReportPathError(f"{name}: holds a previous stream_jax report; pass --force (force=True) to "
                              "replace it, or give a new folder")
    if not os.path.ismount(out) and _writable(out.parent) and _probe(out.parent, name):
      how = SWAP
    else:  # a mount point cannot be renamed (EBUSY); a read-only parent cannot take a temporary folder
      _probe(out, name)
      how = IN_PLACE
    _check_space(out, name)
    return out, how
  parent = out.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise ReportPathError(f"{name}: {parent} is a file, so no folder can be made below it")
  how = SWAP if _probe(parent, name) else IN_PLACE
  _check_space(parent, name)
  return out, how


def new_tmp(out: pathlib.Path, how: str, name: str) -> pathlib.Path:
  """The hidden temporary folder a report is written into: beside `out` (SWAP) or inside it (IN_PLACE)."""
  try:
    if how == SWAP:
      out.parent.mkdir(parents=True, exist_ok=True)
      tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
      out.mkdir(parents=True, exist_ok=True)
      tmp = pathlib.Path(tempfile.mkdtemp(prefix=_TMP, dir=out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a report folder is an ordinary folder
  except OSError as e:
    where = out.parent if how == SWAP else out
    raise ReportPathError(f"{name}: cannot write in {where}: {e.strerror}") from e
  return tmp


def _swap(tmp: pathlib.Path, out: pathlib.Path, name: str) -> None:
  """Renames `tmp` to `out`, moving an earlier report aside first (put back if the rename fails)."""
  old = None
  if out.exists():
    if any(out.iterdir()):
      check_owned(out, name)  # again: the folder may have changed while we computed
      old = out.parent / f".{out.name}.old-{os.getpid()}"
      os.rename(out, old)
    else:
      os.rmdir(out)
  try:
    os.rename(tmp, out)
  except OSError:
    if old is not None:
      os.rename(old, out)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _in_place(tmp: pathlib.Path, out: pathlib.Path, name: str) -> None:
  """Moves the files of `tmp` into `out` (after removing an earlier, unchanged report there): the marker
  first (so a half-moved report can still be cleaned), index.html last (so it does not look complete)."""
  out.mkdir(parents=True, exist_ok=True)
  skip = tmp if tmp.parent == out else None
  if any(p != tmp for p in out.iterdir()):
    _remove_owned(out, check_owned(out, name, skip=skip))
  entries = sorted(p.name for p in tmp.iterdir())
  entries.sort(key=lambda e: (e != MARKER, e == "index.html"))
  for e in entries:
    shutil.move(str(tmp / e), str(out / e))
  tmp.rmdir()


def install(tmp: pathlib.Path, out: pathlib.Path, how: str, name: str) -> str:
  """Puts the finished report in `tmp` at `out` (writing the marker first); returns the strategy used.

  Never discards the report: SWAP falls back to IN_PLACE (with a ReportWarning naming --out) when a rename
  fails; if that fails too, ReportPathError names the folder that still holds the report.
  """
  write_marker(tmp)
  try:
    if how == SWAP:
      try:
        _swap(tmp, out, name)
        return SWAP
      except OSError as e:
        why = f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)
        warnings.warn(f"{name}: moving the finished report into place failed ({why}, e.g. a mount point); "
                      "writing it into the folder in place instead", ReportWarning, stacklevel=3)
    _in_place(tmp, out, name)
    return IN_PLACE
  except (OSError, ReportPathError) as e:
    where = (f"is kept, complete, in {tmp}" if (tmp / MARKER).exists() else
             f"is partly moved into {out}; the rest is in {tmp}")
    # the folder first: the command line shortens long messages
    raise ReportPathError(f"{name}: the finished report {where}; it could not be put in place ({e})") from e


# --------------------------------------------------------------------------------------------------- clean


def main(argv: Optional[list[str]] = None) -> int:
  """`clean FOLDER...`: removes report folders stream_jax wrote and nobody changed since; exit 1 (naming
  the files) for anything else."""
  p = argparse.ArgumentParser(prog="python3 stream_jax/outdir.py", description=main.__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("clean", help="remove report folders stream_jax wrote (only if unchanged)")
  c.add_argument("folders", nargs="+", metavar="FOLDER")
  c.add_argument("--missing-ok", action="store_true", help="a folder that does not exist is not an error")
  args = p.parse_args(argv)
  return clean(args.folders, missing_ok=args.missing_ok)


def clean(folders, missing_ok: bool = False) -> int:
  """Exit status: 0 if every folder was removed (or is missing and `missing_ok`), else 1."""
  rc = 0
  for f in folders:
    try:
      if remove_report(f):
        print(f"removed {f}")
      elif not missing_ok:
        print(f"stream-jax clean: {f} does not exist", file=sys.stderr)
        rc = 1
    except (ReportPathError, OSError) as e:
      print(f"stream-jax clean: refused: {e}", file=sys.stderr)
      rc = 1
  return rc


if __name__ == "__main__":
  # Run as a script (make clean): the folder of this file is sys.path[0]; only the standard library is used.
  sys.exit(main())
