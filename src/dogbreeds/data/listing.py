"""Which files are images: the one list of extensions, and folder listings that say what they leave out.

Every place that looks for photos in a folder (the dataset readers in `folders.py` and
`stanford_dogs.py`, and `dogbreeds predict FOLDER` through `infer.predictor.collect_images`)
asks this module, so they agree on what counts as an image and none of them drops a file
without saying so. A listing is two lists:

    files     the image files to use (by extension, case-insensitive; sorted by name)
    left_out  every other entry, each with the reason (`LeftOut`)

Left out, and why:
- a name that holds a control character (a newline, a tab...) or is not valid UTF-8: it
  would break logs, CSVs and the run's file lists; rename it;
- a dangling symlink (its target is gone), or an entry that cannot be read;
- something that is not a regular file: a FIFO (reading it would block forever), a socket, a device;
- a hidden file (".DS_Store", "._photo.jpg" from macOS): tooling, not photos;
- a file of an image format this Pillow cannot decode (HEIC, JPEG XL, AVIF without Pillow's
  AVIF support), or a file whose extension is not an image's (notes.txt);
- in a breed folder, a sub-folder (images must be directly inside it).

AVIF: Pillow 11.3+ wheels decode it; then `.avif` is an image extension like the others,
otherwise such files are left out and reported with what to install.
"""
from __future__ import annotations

import functools
import os
import stat
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

# Always decoded by Pillow (JPEG, PNG, BMP, GIF, WebP and TIFF support is in every wheel).
BASE_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Decoded only when this Pillow has the codec: extension -> (format name, what to do otherwise).
OPTIONAL_IMAGE_EXTENSIONS = {".avif": ("AVIF", "install Pillow >= 11.3 (its wheels decode AVIF) or convert it to JPEG")}
# Photo formats people have but Pillow does not read: said by name instead of "not an image".
KNOWN_UNSUPPORTED = {".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL", ".raw": "camera RAW", ".cr2": "camera RAW",
                     ".nef": "camera RAW", ".dng": "camera RAW", ".psd": "Photoshop"}
# How many left-out or skipped files a report or a JSON file lists by name (the count is always whole).
LIST_LIMIT = 20
# How many files that could not be decoded metrics.jsonl and eval/<split>.json list by name.
SKIPPED_LIST_LIMIT = 100


@dataclass(frozen=True)
class LeftOut:
    path: str
    reason: str     # why, and what to do
    kind: str = ""  # one of the kinds below (BAD_NAME, DANGLING, ...)

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Listing:
    files: list[Path] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)


def _pillow_decodes(format_name: str) -> bool:
    from PIL import Image, features

    module = format_name.lower()
    if module in getattr(features, "modules", {}):
        try:
            if not features.check_module(module):
                return False
        except Exception:  # an old Pillow that names the feature but cannot check it
            return False
    Image.init()
    return format_name in Image.OPEN


@functools.cache
def image_extensions() -> frozenset[str]:
    """The extensions (lower case, with the dot) every folder listing takes as images."""
    found = set(BASE_IMAGE_EXTENSIONS)
    found.update(ext for ext, (fmt, _) in OPTIONAL_IMAGE_EXTENSIONS.items() if _pillow_decodes(fmt))
    return frozenset(found)


def describe_extensions() -> str:
    return " ".join(sorted(image_extensions()))


def display(path: str | Path) -> str:
    """A path as it can be printed on one line: control characters and bytes that are not
    UTF-8 are shown escaped (repr-style)."""
    text = str(path)
    return repr(text) if bad_name_reason(Path(text).name) or _not_utf8(text) else text


def shown_path(path: str | Path) -> str:
    """A path for a message: an absolute one (a resolved data root, a cache folder) relative to
    the working directory, so messages say `../shared/data/...` as the user typed it rather
    than where this machine keeps it; escaped like `display`."""
    text = str(path)
    if os.path.isabs(text):
        try:
            text = os.path.relpath(text)
        except ValueError:  # another drive (Windows)
            pass
    return display(text)


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def bad_name_reason(name: str) -> str | None:
    if _not_utf8(name):
        return "its name is not valid UTF-8, which breaks logs and the run's file lists; rename the file"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return ("its name holds a control character (e.g. a newline), which breaks logs and the run's file "
                "lists; rename the file")
    return None


# Kinds of left-out entries (LeftOut.kind).
BAD_NAME, DANGLING, UNREADABLE, SUBFOLDER, SPECIAL, HIDDEN, UNSUPPORTED, NOT_IMAGE = (
    "bad_name", "dangling_symlink", "unreadable", "subfolder", "not_regular_file", "hidden", "unsupported_format",
    "not_an_image_extension")


def classify(path: Path, in_breed_folder: bool = False) -> tuple[str, str] | None:
    """None when `path` is an image file to use, else (kind, why it is left out and what to do).
    A folder gives None outside a breed folder (the caller decides whether to walk into it)."""
    name = path.name
    reason = bad_name_reason(name)
    if reason:
        return BAD_NAME, reason
    try:
        info = path.stat()  # follows symlinks
    except FileNotFoundError:
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return DANGLING, f"a dangling symlink (its target {display(target)} does not exist); fix or delete the link"
        return UNREADABLE, "vanished while the folder was read"
    except OSError as exc:
        return UNREADABLE, f"cannot be read ({exc.strerror or exc}); fix its permissions or delete it"
    if stat.S_ISDIR(info.st_mode):
        if in_breed_folder:
            return SUBFOLDER, ("a folder inside a breed folder (images must be directly in the breed folder); "
                               "move its photos up")
        return None
    if not stat.S_ISREG(info.st_mode):
        return SPECIAL, "not a regular file (a FIFO, socket or device), which no photo is; delete it"
    if name.startswith("."):
        return HIDDEN, "a hidden file (e.g. .DS_Store or a macOS ._ copy), not a photo"
    suffix = path.suffix.lower()
    if suffix in image_extensions():
        return None
    if suffix in OPTIONAL_IMAGE_EXTENSIONS:
        fmt, todo = OPTIONAL_IMAGE_EXTENSIONS[suffix]
        return UNSUPPORTED, f"a {fmt} image, which this Pillow cannot decode; {todo}"
    if suffix in KNOWN_UNSUPPORTED:
        return UNSUPPORTED, f"a {KNOWN_UNSUPPORTED[suffix]} image, which Pillow cannot decode; convert it to JPEG or PNG"
    return NOT_IMAGE, (f"not an image extension ({suffix or 'none'}; images are {describe_extensions()}); "
                       "rename or remove it")


def list_images(folder: str | Path, recursive: bool = False, in_breed_folder: bool = False) -> Listing:
    """The image files in `folder` (sorted by path) and everything left out, with why.

    recursive: walk into sub-folders (symlinked and hidden folders are not followed, so a link
    loop cannot hang the walk; they are listed as left out)."""
    listing = Listing()
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError as exc:
        listing.left_out.append(LeftOut(str(folder), f"cannot be listed ({exc.strerror or exc})", UNREADABLE))
        return listing
    for entry in entries:
        verdict = classify(entry, in_breed_folder=in_breed_folder)
        if verdict is not None:
            listing.left_out.append(LeftOut(str(entry), verdict[1], verdict[0]))
        elif entry.is_dir():
            if not recursive:
                continue
            if entry.name.startswith("."):
                listing.left_out.append(LeftOut(str(entry), "a hidden folder (.git, .thumbnails...), not searched; "
                                                            "pass it by name to search it", HIDDEN))
                continue
            if entry.is_symlink():
                listing.left_out.append(LeftOut(str(entry), "a symlink to a folder, not followed (a link loop would "
                                                            "never end); pass the folder itself", SUBFOLDER))
                continue
            inner = list_images(entry, recursive=True)
            listing.files += inner.files
            listing.left_out += inner.left_out
        else:
            listing.files.append(entry)
    return listing


def left_out_report(left_out: list[LeftOut], where: str = "", limit: int = LIST_LIMIT) -> str:
    """'left out N file(s) [under WHERE]:' then one line per file (at most `limit`) with why."""
    if not left_out:
        return ""
    lines = [f"left out {len(left_out)} file(s){' under ' + where if where else ''} "
             "(not used; each line says why and what to do):"]
    lines += [f"  {display(item.path)}: {item.reason}" for item in left_out[:limit]]
    if len(left_out) > limit:
        lines.append(f"  ... and {len(left_out) - limit} more")
    return "\n".join(lines)


def left_out_summary(left_out: list[LeftOut], limit: int = LIST_LIMIT) -> dict:
    """JSON-able: the whole count and the first `limit` files with their reasons."""
    return {"count": len(left_out), "files": [item.to_dict() for item in left_out[:limit]]}


def warn_left_out(left_out: list[LeftOut], where: str = "", stream=None) -> None:
    """Print the report on stderr ("warning: left out N file(s) ..."), when there is anything to say."""
    if left_out:
        print("warning: " + left_out_report(left_out, where), file=stream or sys.stderr, flush=True)
