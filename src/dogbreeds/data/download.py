"""`dogbreeds data download`: fetch, verify and safely unpack the official Stanford Dogs release.

Each of the three tar files is downloaded to `<name>.part` (resumed with an HTTP Range request
when a previous attempt was cut off; restarted when the server ignores Range), checked
against its published size and sha256, unpacked without letting any member escape the
destination, and recorded in a marker file. A second run finds the marker and does nothing.

Standard library only (urllib), so the command needs no extra dependency.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import posixpath
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import DogbreedsError


@dataclass(frozen=True)
class Archive:
    name: str
    size: int     # bytes
    sha256: str


# The official release (sizes and checksums as recorded by TensorFlow Datasets).
OFFICIAL_BASE_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
ARCHIVES = (
    Archive("images.tar", 793_579_520, "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58"),
    Archive("annotation.tar", 21_852_160, "662ed36f707be6b195c2fda392d8e153e83af28cedc8e2134a649f198def30fd"),
    Archive("lists.tar", 481_280, "34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c"),
)
MARKER_NAME = ".dogbreeds-download.json"
CHUNK_BYTES = 1 << 20
USER_AGENT = "dogbreeds-download (python urllib)"
ALTERNATIVES = ("use --mirror URL (a server holding the same three files) or download images.tar, "
                "annotation.tar and lists.tar by other means and pass --from-dir DIR")


class _Interrupted(Exception):
    """The connection broke mid-file; the .part file keeps what arrived."""


def download_stanford_dogs(dest: str | Path, mirror: str | None = None, from_dir: str | Path | None = None,
                           keep_archives: bool = False, retries: int = 3, timeout: float = 60.0,
                           progress: bool = True) -> Path:
    """Make `dest` hold Images/, Annotation/ and the .mat lists of the official release.

    mirror: base URL replacing the official one (the three file names are appended).
    from_dir: a directory already holding the three tar files; nothing is downloaded.
    keep_archives: keep downloaded tar files after unpacking (they are deleted by default).
    retries: extra attempts, each resuming where the last stopped, when a transfer breaks.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base_url = (mirror.rstrip("/") + "/") if mirror else OFFICIAL_BASE_URL
    for archive in ARCHIVES:
        if _already_extracted(dest, archive):
            continue
        if from_dir is not None:
            path = Path(from_dir) / archive.name
            if not path.is_file():
                raise DogbreedsError(f"--from-dir {from_dir}: {archive.name} is not there; put the official "
                                     f"{archive.name} ({archive.size:,} bytes) in that directory")
            verify_archive(path, archive, delete_if_bad=False)  # never delete the user's own copy
        else:
            path = dest / archive.name
            if not (path.is_file() and _matches(path, archive)):
                fetch_archive(base_url + archive.name, path, archive, retries, timeout, progress)
        top_level = safe_extract(path, dest)
        _record_extracted(dest, archive, top_level)
        if from_dir is None and not keep_archives:
            path.unlink()
    return dest


def fetch_archive(url: str, target: Path, archive: Archive, retries: int = 3, timeout: float = 60.0,
                  progress: bool = True) -> Path:
    """Download `url` to `target` through `target.part`, resuming; verify size and sha256."""
    part = target.with_name(target.name + ".part")
    for attempt in range(retries + 1):
        try:
            _download_to_part(url, part, archive, timeout, progress)
            break
        except _Interrupted as exc:
            if attempt == retries:
                have = part.stat().st_size if part.exists() else 0
                raise DogbreedsError(
                    f"downloading {url} was interrupted ({exc}) at {have:,} of {archive.size:,} bytes; "
                    f"run the same command again to resume from {part}") from exc
    verify_archive(part, archive, delete_if_bad=True, source=url)
    os.replace(part, target)
    return target


def _download_to_part(url: str, part: Path, archive: Archive, timeout: float, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > archive.size:  # not a prefix of the file we want
        part.unlink()
        have = 0
    if have == archive.size:
        return  # complete from an earlier run; the checksum decides if it is good
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # The server does not think our partial file is a prefix: start over.
            part.unlink()
            raise _Interrupted("server refused to resume (HTTP 416); restarting from zero") from exc
        if exc.code in (401, 403):
            raise DogbreedsError(f"{url} answered HTTP {exc.code} {exc.reason}: the host refuses this client; "
                                 f"{ALTERNATIVES}") from exc
        raise DogbreedsError(f"{url} answered HTTP {exc.code} {exc.reason}; {ALTERNATIVES}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (ConnectionResetError, ConnectionAbortedError, TimeoutError)):
            raise _Interrupted(f"{type(exc.reason).__name__}: {exc.reason}") from exc
        raise DogbreedsError(f"cannot reach {url} ({exc.reason}); check the network connection, or {ALTERNATIVES}") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise _Interrupted(f"{type(exc).__name__}: {exc}") from exc

    with response:
        resumed = bool(have) and response.status == 206 and _content_range_start(response) == have
        if response.status == 206 and not resumed:
            part.unlink(missing_ok=True)  # a range we did not ask for: cannot be appended
            raise _Interrupted(f"the server sent an unexpected range ({response.headers.get('Content-Range')}); "
                               "restarting from zero")
        if not resumed:
            have = 0  # a plain 200 means the server ignored Range: the body is the whole file
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=archive.size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=archive.name, disable=not progress,
        ) as bar:
            while have <= archive.size:  # a longer body is wrong anyway; stop and let the size check say so
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
                    raise _Interrupted(f"{type(exc).__name__}: {exc}") from exc
                if not chunk:
                    break
                out.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
    if have < archive.size:
        raise _Interrupted(f"the server closed the connection at {have:,} of {archive.size:,} bytes")


def _content_range_start(response) -> int | None:
    # "bytes 1000-4999/5000" -> 1000
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches(path: Path, archive: Archive) -> bool:
    return path.stat().st_size == archive.size and sha256_of(path) == archive.sha256


def verify_archive(path: Path, archive: Archive, delete_if_bad: bool, source: str | None = None) -> None:
    """Raise a DogbreedsError unless `path` has the archive's size and sha256."""
    size = path.stat().st_size
    if size == archive.size:
        actual = sha256_of(path)
        if actual == archive.sha256:
            return
        problem = f"sha256 is {actual}, expected {archive.sha256}"
    else:
        problem = f"size is {size:,} bytes, expected {archive.size:,}"
    origin = f" (from {source})" if source else ""
    if delete_if_bad:
        path.unlink()
        raise DogbreedsError(f"{path}{origin} is corrupt: {problem}. The file was deleted; run the command "
                             f"again to download it anew, or {ALTERNATIVES}")
    raise DogbreedsError(f"{path}{origin} is not the official {archive.name}: {problem}. "
                         f"Replace it with a good copy (or delete it and download without --from-dir)")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Escapes(Exception):
    """A path inside the archive resolves outside the destination."""


MAX_LINK_HOPS = 40  # as the kernel's limit on symlinks followed in one path (ELOOP)


def _resolve(parts: list[str], symlinks: dict[str, str], follow_last: bool = True, hops: int = 0) -> list[str]:
    """The archive path `parts` (relative to the destination) with every '..' and every symlink
    seen so far in the archive resolved, as the file system will resolve them once unpacked.
    Raises _Escapes when it climbs above the destination."""
    resolved: list[str] = []
    for i, part in enumerate(parts):
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise _Escapes
            resolved.pop()
            continue
        resolved.append(part)
        key = "/".join(resolved)
        if key in symlinks and (follow_last or i < len(parts) - 1):
            if hops >= MAX_LINK_HOPS:
                raise _Escapes("loop")  # refusing a loop is the safe answer
            target = symlinks[key]
            if target.startswith("/"):
                raise _Escapes
            resolved = _resolve(resolved[:-1] + target.split("/"), symlinks, True, hops + 1)
    return resolved


def _check_member(member: tarfile.TarInfo, dest: str, archive_path: Path, symlinks: dict[str, str] | None = None) -> None:
    """Refuse any member that could write outside `dest` (our own check, before tarfile's filter).

    `symlinks` holds the symlinks of the earlier members (resolved location -> target); a path
    is resolved through them as it will be on disk once they are unpacked, so a chain such as
    `x/y -> ..` then `x/y/z -> ..` is caught (each link alone stays inside). This member's own
    symlink is added to it."""
    symlinks = {} if symlinks is None else symlinks
    name = member.name.replace("\\", "/")

    def refuse(why: str):
        raise DogbreedsError(f"refusing to unpack {archive_path}: member {member.name!r} {why}. This is not a "
                             f"clean copy of the release; delete it and download it again")

    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        refuse("has an absolute path")
    if ".." in name.split("/"):
        refuse("climbs out of the destination with '..'")
    target = os.path.realpath(os.path.join(dest, name))
    if not _within(target, dest):
        refuse("resolves outside the destination (through a symlink on disk)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    try:  # through the archive's own earlier symlinks (a symlink member itself is not followed)
        where = _resolve(parts, symlinks, follow_last=not member.issym())
    except _Escapes as exc:
        refuse("is written through a loop of the archive's own symlinks" if exc.args == ("loop",) else
               "is written through the archive's own symlinks to a place outside the destination")
    if member.issym() or member.islnk():
        link = member.linkname.replace("\\", "/")
        if link.startswith("/") or (len(link) > 1 and link[1] == ":"):
            refuse(f"links to the absolute path {member.linkname!r}")
        # Symlinks resolve from their own folder; hard links from the archive's root.
        base = posixpath.dirname(name) if member.issym() else ""
        if not _within(os.path.realpath(os.path.join(dest, base, link)), dest):
            refuse(f"links to {member.linkname!r}, outside the destination")
        try:
            start = where[:-1] if member.issym() else []
            _resolve(start + link.split("/"), symlinks)
        except _Escapes as exc:
            refuse(f"links to {member.linkname!r}, which " + ("is a loop of the archive's symlinks" if exc.args == ("loop",)
                   else "leads outside the destination through the archive's earlier symlinks"))
        if member.issym():
            symlinks["/".join(where)] = link
    elif not (member.isfile() or member.isdir()):
        refuse("is a device or pipe, which no image archive needs")


UNPACK_PREFIX = ".dogbreeds-unpacking-"


def safe_extract(archive_path: Path, dest: Path) -> list[str]:
    """Unpack a tar into `dest` after checking every member; returns its top-level names.

    The members are unpacked into a temporary folder inside `dest` and moved into place only
    when all of them are out, so a refused or broken archive leaves nothing behind."""
    import shutil
    import tempfile

    dest_str = os.path.realpath(dest)
    try:
        tar = tarfile.open(archive_path)
    except (tarfile.TarError, OSError) as exc:
        raise DogbreedsError(f"cannot read {archive_path} as a tar file ({exc}); delete it and download it again") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DogbreedsError(f"{archive_path} is damaged ({exc}); delete it and download it again") from exc
        symlinks: dict[str, str] = {}
        for member in members:  # check all first: a bad archive writes nothing
            _check_member(member, dest_str, archive_path, symlinks)
        staging = tempfile.mkdtemp(prefix=UNPACK_PREFIX, dir=dest_str)
        try:
            try:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: tarfile's own safety net too
                    tar.extractall(staging, members=members, filter="data")
                else:
                    tar.extractall(staging, members=members)
            except tarfile.FilterError as exc:
                member = getattr(exc, "tarinfo", None)
                raise DogbreedsError(
                    f"refusing to unpack {archive_path}: member {getattr(member, 'name', '?')!r} was stopped by "
                    f"tarfile's safety filter ({exc}); nothing was unpacked. This is not a clean copy of the "
                    "release; delete it and download it again") from None
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DogbreedsError(f"unpacking {archive_path} failed ({exc}); nothing was unpacked. Free disk "
                                     "space or delete the file and download it again") from exc
            for entry in sorted(os.listdir(staging)):
                _move_into(os.path.join(staging, entry), os.path.join(dest_str, entry))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted({posixpath.normpath(m.name.replace("\\", "/")).split("/")[0] for m in members} - {".", ""})


def _move_into(source: str, target: str) -> None:
    """Move `source` to `target`, merging folders into existing ones (as unpacking in place would)."""
    if os.path.isdir(source) and not os.path.islink(source) and os.path.isdir(target):
        for entry in sorted(os.listdir(source)):
            _move_into(os.path.join(source, entry), os.path.join(target, entry))
        return
    if os.path.isdir(target) and not os.path.islink(target):
        import shutil

        shutil.rmtree(target)  # a file of the archive replaces a folder of the same name, as tar does
    os.replace(source, target)


def _read_marker(dest: Path) -> dict:
    path = dest / MARKER_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("archives", {})
    except (json.JSONDecodeError, AttributeError):
        raise DogbreedsError(f"{path} is not a valid download marker; delete it to check and unpack again") from None


def _already_extracted(dest: Path, archive: Archive) -> bool:
    entry = _read_marker(dest).get(archive.name)
    if not entry or entry.get("sha256") != archive.sha256:
        return False
    # Someone may have deleted the unpacked folders since: then unpack again.
    return all((dest / name).exists() for name in entry.get("top_level", []))


def _record_extracted(dest: Path, archive: Archive, top_level: list[str]) -> None:
    archives = _read_marker(dest)
    archives[archive.name] = {"sha256": archive.sha256, "size": archive.size, "top_level": top_level}
    temporary = dest / (MARKER_NAME + ".tmp")
    temporary.write_text(json.dumps({"format": "dogbreeds-download", "archives": archives}, indent=2) + "\n")
    os.replace(temporary, dest / MARKER_NAME)


def register_cli(data_subparsers) -> None:
    parser = data_subparsers.add_parser(
        "download",
        help="download, verify and unpack the official Stanford Dogs release",
        description="Download images.tar, annotation.tar and lists.tar (about 816 MB), resume broken "
                    "transfers, check their sha256 and unpack them safely into DEST. Does nothing when "
                    "DEST already holds the verified data.",
    )
    parser.add_argument("--dest", required=True, metavar="DIR", help="where Images/, Annotation/ and the lists go")
    parser.add_argument("--mirror", metavar="URL", help="base URL of a mirror holding the same three files")
    parser.add_argument("--from-dir", metavar="DIR", help="unpack tar files already on disk instead of downloading")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded .tar files")
    parser.add_argument("--retries", type=int, default=3, help="resume attempts per file when a transfer breaks")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    dest = download_stanford_dogs(args.dest, mirror=args.mirror, from_dir=args.from_dir,
                                  keep_archives=args.keep_archives, retries=args.retries)
    print(f"Stanford Dogs is ready in {dest} (Images/, Annotation/, lists); "
          f"next: dogbreeds data prepare {dest} --size 256")
    return 0
