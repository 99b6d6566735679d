"""Shard specs → shard lists: globs, brace patterns, directories (and their manifest.json), URLs."""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gaudi_pretrain.errors import DataError
from gaudi_pretrain.paths import is_inside

MANIFEST = "manifest.json"
_GLOB_CHARS = set("*?[")

# ---------------------------------------------------------------------------------- shard specs


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
# Schemes webdataset's gopen opens: `pipe:` through a shell (refused unless data.allow_pipe_urls), the
# others by running curl / gsutil / ais / huggingface_hub with the URL as one argument (no shell).
REMOTE_SCHEMES = ("http", "https", "sftp", "ftps", "scp", "gs", "ais", "htgs", "hf")


def url_scheme(spec: str) -> str | None:
    """The URL scheme of a shard spec, lower-cased (as urllib and gopen see it); None for a local path."""
    m = _SCHEME.match(spec)
    return m.group(1).lower() if m else None


def is_url(spec: str) -> bool:
    return url_scheme(spec) not in (None, "file")


def _check_scheme(url: str, spec: str, allow_pipe_urls: bool) -> None:
    scheme = url_scheme(url)
    if scheme == "pipe" and not allow_pipe_urls:
        raise DataError(
            f"shard spec '{spec}' is a pipe: URL, which runs a shell command; "
            "set data.allow_pipe_urls=true only for trusted configs"
        )
    if scheme not in (None, "file", "pipe") and scheme not in REMOTE_SCHEMES:
        raise DataError(
            f"shard spec '{spec}' has the unsupported URL scheme '{scheme}:' "
            f"(local paths, file://, pipe: or {', '.join(REMOTE_SCHEMES)})"
        )


def resolve_shards(specs: str | Sequence[str], allow_pipe_urls: bool = False) -> list[str]:
    """Expand shard specs (globs, brace patterns, directories, paths, URLs) into a list of shards.

    A directory holding `manifest.json` means exactly the shards that manifest lists; any other
    directory means its `*.tar` files. Missing paths and empty globs are errors naming the spec.
    URL schemes are checked before and after expansion (webdataset substitutes `${WDS_*}` variables and
    lower-cases schemes), so no spelling of a `pipe:` URL gets through without data.allow_pipe_urls.
    """
    from webdataset.shardlists import expand_urls

    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        spec = str(spec).strip()
        _check_scheme(spec, spec, allow_pipe_urls)
        if is_url(spec):
            urls = expand_urls(spec)
            for url in urls:
                _check_scheme(url, spec, allow_pipe_urls)
            out.extend(urls)
            continue
        spec = spec.removeprefix("file://")
        for item in expand_urls(spec):
            _check_scheme(item, spec, allow_pipe_urls)
            item = os.path.expanduser(item)
            if any(c in item for c in _GLOB_CHARS):
                found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
                if not found:
                    raise DataError(f"no shards match '{spec}'")
                out.extend(found)
            elif os.path.isdir(item):
                out.extend(_shards_in_dir(item, spec))
            elif os.path.isfile(item):
                out.append(item)
            else:
                raise DataError(f"shard path not found: '{item}' (from '{spec}')")
    if not out:
        raise DataError(f"no shards in {list(specs)}")
    return out


def _shards_in_dir(path: str, spec: str) -> list[str]:
    manifest = read_manifest(path)
    if manifest is not None:
        for entry in manifest["shards"]:
            name = str(entry.get("name", ""))
            if not name or os.path.isabs(name) or not is_inside(path, name) or url_scheme(name):
                raise DataError(f"{path}/{MANIFEST} lists the shard '{name}', which is not a file in {path}")
        listed = [os.path.join(path, s["name"]) for s in manifest["shards"]]
        missing = [p for p in listed if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{missing[0]} is listed in {path}/{MANIFEST} but missing ({len(missing)} missing)")
        return listed
    found = sorted(str(p) for p in Path(path).glob("*.tar"))
    if not found:
        raise DataError(f"directory '{path}' (from '{spec}') holds no .tar shards")
    return found


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"{path} is not a valid shard manifest")
    return manifest
