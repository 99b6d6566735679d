"""Shard builder: JSONL, CSV, COCO and img2dataset inputs; skipped inputs counted; re-runs reuse shards."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gaudi_pretrain.data import shards
from gaudi_pretrain.data.shards import writer as shard_writer
from gaudi_pretrain.errors import DataError

pytestmark = pytest.mark.timeout(120)


def _save_jpeg(path: Path, seed: int, size=(64, 48)) -> None:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)


def _images(folder: Path, n: int) -> list[str]:
    """n good JPEGs, one corrupt file ("bad.jpg") and a png with alpha; returns names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        _save_jpeg(folder / f"img{i}.jpg", i)
        names.append(f"img{i}.jpg")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.new("RGBA", (40, 80), (255, 0, 0, 128)).save(folder / "alpha.png")
    return names + ["alpha.png"]


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def _check_output(out: Path, manifest: dict, expected_total: int, size: int) -> None:
    from PIL import Image

    assert (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["total"] == expected_total == sum(s["samples"] for s in manifest["shards"])
    seen = 0
    for entry in manifest["shards"]:
        samples = _read_tar(out / entry["name"])
        assert len(samples) == entry["samples"] and (out / entry["name"]).stat().st_size == entry["bytes"]
        for key, parts in samples.items():
            assert len(key) == 9 and key.isdigit() and set(parts) == {"jpg", "txt", "json"}
            meta = json.loads(parts["json"])
            assert meta["key"] == key and meta["caption"] == parts["txt"].decode()
            img = Image.open(io.BytesIO(parts["jpg"]))
            assert img.format == "JPEG" and min(img.size) == size == min(meta["width"], meta["height"])
            assert {"original_width", "original_height", "source"} <= set(meta)
            seen += 1
    assert seen == expected_total
    assert not list(out.glob(".*.tmp"))


def test_jsonl_with_corrupt_image_missing_caption_and_duplicates(tmp_path):
    names = _images(tmp_path / "in" / "imgs", 7)
    rows = [{"image": f"imgs/{n}", "caption": f"caption {i}"} for i, n in enumerate(names)]
    rows += [
        {"image": "imgs/bad.jpg", "caption": "corrupt"},
        {"image": "imgs/img0.jpg", "caption": ""},  # missing caption
        {"image": "imgs/img1.jpg"},  # missing caption
        {"image": "imgs/nowhere.jpg", "caption": "missing file"},
        {"image": "imgs/img2.jpg", "caption": "caption 2"},  # duplicate pair
        {"image": "imgs/img2.jpg", "caption": "another caption for img2"},  # new pair: kept
    ]
    jsonl = tmp_path / "in" / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = tmp_path / "out"
    manifest = shards.build_shards(
        shards.records_from_jsonl(jsonl), out, image_size=24, samples_per_shard=3, workers=2, progress=False
    )
    _check_output(out, manifest, 9, 24)
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 2, 1]  # bad.jpg in shard 2, the missing file in shard 3
    assert manifest["skipped"]["by_reason"] == {
        "missing caption": 2,
        "invalid record": 1,
        "duplicate": 1,
        "unreadable image": 1,
        "missing image": 1,
    }
    assert manifest["skipped"]["count"] == 6

    # Re-run: every shard is reused (same bytes); a changed input rebuilds only its shard.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = shards.build_shards(
        shards.records_from_jsonl(jsonl), out, image_size=24, samples_per_shard=3, progress=False
    )
    assert again["reused_shards"] == 4 and again["shards"] == manifest["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    rows[4]["caption"] = "changed"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    third = shards.build_shards(
        shards.records_from_jsonl(jsonl), out, image_size=24, samples_per_shard=3, progress=False
    )
    assert third["reused_shards"] == 3
    assert {p.name for p in out.glob("*.tar") if p.stat().st_mtime_ns != before[p.name]} == {"00001.tar"}


def test_interrupted_build_leaves_no_complete_looking_shard(tmp_path, monkeypatch):
    names = _images(tmp_path / "imgs", 4)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": f"imgs/{n}", "caption": n}) for n in names))
    calls = {"n": 0}
    real = shard_writer._encode_sample

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(shard_writer, "_encode_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        shards.build_shards(
            shards.records_from_jsonl(jsonl), tmp_path / "out", image_size=16, samples_per_shard=2, progress=False
        )
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar"]
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(shard_writer, "_encode_sample", real)
    manifest = shards.build_shards(
        shards.records_from_jsonl(jsonl), tmp_path / "out", image_size=16, samples_per_shard=2, progress=False
    )
    assert manifest["reused_shards"] == 1 and manifest["total"] == 5


def test_csv_input(tmp_path):
    names = _images(tmp_path / "imgs", 4)
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for n in names:
            w.writerow([f"imgs/{n}", f"a caption, with comma, for {n}"])
        w.writerow(["imgs/bad.jpg", "corrupt"])
        w.writerow(["imgs/img0.jpg", "   "])
    manifest = shards.build_shards(
        shards.records_from_csv(path), tmp_path / "out", image_size=32, samples_per_shard=10, progress=False
    )
    _check_output(tmp_path / "out", manifest, 5, 32)
    assert manifest["skipped"]["by_reason"] == {"missing caption": 1, "unreadable image": 1}
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\nx,y\n")
    with pytest.raises(DataError, match="'image' and 'caption'"):
        shards.records_from_csv(bad)


def test_coco_input(tmp_path):
    names = _images(tmp_path / "val2017", 3)
    images = [{"id": i, "file_name": n} for i, n in enumerate(names + ["bad.jpg"])]
    anns = [{"image_id": i, "caption": f"caption {k} of {i}"} for i in range(len(names)) for k in range(2)]
    anns += [
        {"image_id": 4, "caption": "bad image"},
        {"image_id": 0, "caption": None},
        {"image_id": 99, "caption": "unknown image id"},
    ]
    cj = tmp_path / "captions.json"
    cj.write_text(json.dumps({"images": images, "annotations": anns}))
    manifest = shards.build_shards(
        shards.records_from_coco(cj, tmp_path / "val2017"),
        tmp_path / "out",
        image_size=20,
        samples_per_shard=5,
        progress=False,
    )
    _check_output(tmp_path / "out", manifest, 8, 20)
    assert manifest["skipped"]["by_reason"] == {"missing caption": 1, "missing image": 1, "unreadable image": 1}


def test_img2dataset_inputs_tar_and_files_layouts(tmp_path):
    from PIL import Image

    files = tmp_path / "i2d_files" / "00000"
    files.mkdir(parents=True)
    for i in range(4):
        _save_jpeg(files / f"{i:09d}.jpg", i, size=(300, 200))
        (files / f"{i:09d}.txt").write_text(f"caption {i}")
        (files / f"{i:09d}.json").write_text(json.dumps({"url": f"http://x/{i}.jpg", "key": f"{i:09d}"}))
    (files / "000000004.jpg").write_bytes(b"broken")
    (files / "000000004.txt").write_text("broken image")
    _save_jpeg(files / "000000005.jpg", 5)  # no caption
    manifest = shards.build_shards(
        shards.records_from_img2dataset(tmp_path / "i2d_files"), tmp_path / "o1", image_size=100, progress=False
    )
    _check_output(tmp_path / "o1", manifest, 4, 100)
    assert manifest["skipped"]["by_reason"] == {"missing caption": 1, "unreadable image": 1}
    meta = json.loads(_read_tar(tmp_path / "o1" / "00000.tar")["000000000"]["json"])
    assert (meta["original_width"], meta["original_height"], meta["width"], meta["height"]) == (300, 200, 150, 100)
    assert meta["source"] == "http://x/0.jpg"

    # tar layout: build from our own output (img2dataset-compatible) plus a broken sample
    tar_dir = tmp_path / "i2d_tar"
    tar_dir.mkdir()
    src = _read_tar(tmp_path / "o1" / "00000.tar")
    with tarfile.open(tar_dir / "00000.tar", "w") as tf:
        for key, parts in list(src.items()) + [
            ("000000009", {"jpg": b"xx", "txt": b"bad"}),
            ("000000010", {"jpg": src["000000001"]["jpg"]}),
        ]:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    manifest = shards.build_shards(
        shards.records_from_img2dataset(tar_dir), tmp_path / "o2", image_size=50, progress=False
    )
    _check_output(tmp_path / "o2", manifest, 4, 50)
    assert manifest["skipped"]["by_reason"] == {"missing caption": 1, "unreadable image": 1}
    assert Image.open(io.BytesIO(_read_tar(tmp_path / "o2" / "00000.tar")["000000002"]["jpg"])).size == (75, 50)


def test_inspect_reports_counts_and_captions(tmp_path):
    names = _images(tmp_path / "imgs", 3)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": f"imgs/{n}", "caption": f"cap {n}"}) for n in names))
    shards.build_shards(
        shards.records_from_jsonl(jsonl), tmp_path / "out", image_size=16, samples_per_shard=2, progress=False
    )
    report = shards.inspect_shards(str(tmp_path / "out"), examples=2)
    assert report["total_samples"] == 4 and [s["samples"] for s in report["shards"]] == [2, 2]
    assert report["members_by_extension"] == {"jpg": 4, "txt": 4, "json": 4}
    assert report["example_captions"] == ["000000000: cap img0.jpg", "000000001: cap img1.jpg"]


def test_key_prefix_keeps_two_sources_apart(tmp_path):
    """Two builds trained together: with a prefix each, their keys never collide; the prefix is part of
    the shard's identity (changing it rebuilds), and one that webdataset would split is refused."""
    from conftest import run_cli

    names = _images(tmp_path / "imgs", 3)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"image": f"imgs/{n}", "caption": f"caption {n}"}) + "\n" for n in names))
    keys = {}
    for prefix in ("cc3m-", "coco_"):
        manifest = shards.build_shards(
            shards.records_from_jsonl(path),
            tmp_path / prefix,
            image_size=32,
            samples_per_shard=2,
            progress=False,
            key_prefix=prefix,
        )
        assert manifest["key_prefix"] == prefix and manifest["total"] == 4
        found = [key for tar in sorted((tmp_path / prefix).glob("*.tar")) for key in _read_tar(tar)]
        assert all(k.startswith(prefix) and k[len(prefix) :].isdigit() for k in found), found
        metas = [json.loads(p["json"]) for tar in (tmp_path / prefix).glob("*.tar") for p in _read_tar(tar).values()]
        assert sorted(m["key"] for m in metas) == sorted(found)
        keys[prefix] = found
    assert len(keys["cc3m-"]) == 4 and not set(keys["cc3m-"]) & set(keys["coco_"])

    rebuilt = shards.build_shards(
        shards.records_from_jsonl(path),
        tmp_path / "cc3m-",
        image_size=32,
        samples_per_shard=2,
        progress=False,
        key_prefix="cc3m-",
    )
    assert rebuilt["reused_shards"] == 2
    renamed = shards.build_shards(
        shards.records_from_jsonl(path),
        tmp_path / "cc3m-",
        image_size=32,
        samples_per_shard=2,
        progress=False,
        key_prefix="sbu-",
    )
    assert renamed["reused_shards"] == 0

    out = tmp_path / "refused"
    result = run_cli(
        ["shards", "build", "--jsonl", str(path), "--out", str(out), "--key-prefix", "cc3m.v2", "--no-progress"]
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cc3m.v2" in result.stderr and not out.exists()
