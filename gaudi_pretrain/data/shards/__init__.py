"""Webdataset tar shards in the img2dataset layout (docs/data.md): specs → shard lists (`urls`), reading
and counting samples (`reader`), inputs for building (`sources`) and building shards (`writer`)."""

from gaudi_pretrain.data.shards.reader import (
    IMAGE_EXTS,
    ReadReport,
    caption_of,
    count_samples_by_scan,
    inspect_shards,
    is_safe_key,
    iter_samples,
    shard_sample_counts,
    split_member_name,
)
from gaudi_pretrain.data.shards.sources import (
    Inputs,
    Record,
    dedupe,
    records_from_coco,
    records_from_csv,
    records_from_img2dataset,
    records_from_jsonl,
)
from gaudi_pretrain.data.shards.urls import MANIFEST, is_url, read_manifest, resolve_shards, url_scheme
from gaudi_pretrain.data.shards.writer import build_shards

__all__ = [
    "IMAGE_EXTS",
    "MANIFEST",
    "Inputs",
    "ReadReport",
    "Record",
    "build_shards",
    "caption_of",
    "count_samples_by_scan",
    "dedupe",
    "inspect_shards",
    "is_safe_key",
    "is_url",
    "iter_samples",
    "read_manifest",
    "records_from_coco",
    "records_from_csv",
    "records_from_img2dataset",
    "records_from_jsonl",
    "resolve_shards",
    "shard_sample_counts",
    "split_member_name",
    "url_scheme",
]
