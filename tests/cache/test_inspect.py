"""`qadpipe inspect`: the report, --json, --verify, and a bad cache as one line + exit 2."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cache import CacheReader, compact
from qadpipe.cli import cli
from qadpipe.targets import TAIL_ID, tail_mass_from_logprobs


def test_inspect_report_and_json(tmp_path):
    meta = cache_meta("topk", k=8, encoding="plain")
    rows = random_rows(meta, 5)
    write_cache(tmp_path, meta, rows)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "topk k=8, plain encoding" in result.output and "rows        5" in result.output
    assert "size ok, not hashed (--verify)" in result.output   # without --verify a same-size corruption cannot show
    unverified = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"]).output)
    assert {s["state"] for s in unverified["shards"]} == {"ok"}
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json", "--verify"]).output)
    tails = np.concatenate([tail_mass_from_logprobs(r.topk_logprobs) for r in rows])
    assert data["tokens"] == tails.size and data["rows"] == 5
    assert data["longest_row"] == max(len(r.input_ids) for r in rows)
    assert f"longest row {data['longest_row']} input tokens" in result.output
    assert data["k"] == 8 and data["num_samples"] is None   # a top-k cache has no draws
    assert data["targets"]["tail_mass_mean"] == pytest.approx(tails.mean(), rel=1e-12)
    # a plain cache's percentiles are read at the compact tail code's resolution
    assert data["targets"]["tail_mass_p50"] == pytest.approx(np.percentile(tails, 50), rel=compact.TAIL_STEP)
    assert data["bytes_per_token"] == sum(s["bytes"] for s in data["shards"]) / tails.size
    assert {s["state"] for s in data["shards"]} == {"verified"}


def test_compact_tail_statistics_are_exact_and_streamed(tmp_path):
    """Percentiles come from a histogram of the stored tail codes, shard by shard (the positions
    never all sit in memory); against numpy over every decoded tail the reader yields."""
    meta = cache_meta("topk", k=8, encoding="compact")
    write_cache(tmp_path, meta, random_rows(meta, 40, seq_len=30), rows_per_shard=7)
    tails = np.concatenate([row.tail_mass for row in CacheReader(str(tmp_path)).iter_sequences()])
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"]).output)["targets"]
    assert data["tail_mass_mean"] == pytest.approx(tails.mean(), rel=1e-12)
    assert data["tail_mass_p5"] == pytest.approx(np.percentile(tails, 5), rel=1e-12, abs=1e-15)
    assert data["tail_mass_p50"] == pytest.approx(np.percentile(tails, 50), rel=1e-12, abs=1e-15)


def test_inspect_sampled(tmp_path):
    meta = dataclasses.replace(cache_meta("sampled", sampled_from="topk+tail", draw_seed=5), k=64)   # vLLM's capture width
    rows = random_rows(meta, 3)
    write_cache(tmp_path, meta, rows)
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"]).output)
    unique = np.concatenate([np.diff(r.sample_offsets) for r in rows])
    assert data["targets"]["unique_ids_per_position"] == pytest.approx(unique.mean(), rel=1e-12)
    draws = {"tail": sum(int(r.sample_counts[r.sample_ids == TAIL_ID].sum()) for r in rows),
             "all": sum(int(r.sample_counts.sum()) for r in rows)}
    assert 0 < draws["tail"] and data["targets"]["tail_draw_fraction"] == pytest.approx(draws["tail"] / draws["all"])
    assert (data["sampled_from"], data["draw_seed"]) == ("topk+tail", 5)
    assert "sampled N=50 draws from the top-64 and a tail bucket (seed 5)," in CliRunner().invoke(
        cli, ["inspect", str(tmp_path)]).output


def _corrupt_id_column(shard):
    """Flip a byte inside the id column's page: neither a plain inspect nor its tail statistics
    read that column, only --verify's re-hash sees it."""
    id_chunk = pq.ParquetFile(shard).metadata.row_group(0).column(0)
    data = bytearray(shard.read_bytes())
    data[id_chunk.data_page_offset + id_chunk.total_compressed_size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_inspect_verify_flags_a_corrupt_shard(tmp_path):
    meta = cache_meta("topk")
    write_cache(tmp_path, meta, random_rows(meta, 4))
    _corrupt_id_column(tmp_path / "shards/task-00000-000001.parquet")
    assert CliRunner().invoke(cli, ["inspect", str(tmp_path)]).exit_code == 0   # sizes fine, not re-hashed
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--verify"])
    assert result.exit_code == 2
    assert "task-00000-000000.parquet  rows 2" in result.output and "verified" in result.output
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("qadpipe: error: ")
    assert "1 of 2 shards failed their checks; first: shards/task-00000-000001.parquet: checksum mismatch" in error[0]
    assert "rows        4, 2 of them in 1 bad shard (listed below)" in result.output
    assert "(readable shards only)" in result.output and "(as the manifests list them)" in result.output


def test_inspect_empty_cache(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "nothing: no cache here (the path does not exist)" in result.stderr


def test_inspect_flags_shards_whose_own_metadata_the_edited_manifest_contradicts(tmp_path):
    """A manifest edited to k=4 over k=8 shards: inspect --verify called every shard verified
    (its bytes match) and exited 0, while distill refused the cache."""
    meta = cache_meta("topk", k=8)
    write_cache(tmp_path, meta, random_rows(meta, 4))
    manifest = tmp_path / "manifests/task-00000.json"
    data = json.loads(manifest.read_text())
    data["meta"]["k"] = 4
    manifest.write_text(json.dumps(data))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--verify"])
    assert result.exit_code == 2
    assert "2 of 2 shards failed their checks; first: shards/task-00000-000000.parquet: shard has k=8, the cache " \
           "manifest says k=4" in result.stderr


def test_a_full_vocabulary_sampled_cache_has_no_k(tmp_path):
    """The HF backend draws from the whole vocabulary: there is no top-K, so --json says null
    (not the 0 the metadata holds) and the text names the full vocabulary."""
    meta = cache_meta("sampled", sampled_from="vocab")
    write_cache(tmp_path, meta, random_rows(meta, 2))
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"]).output)
    assert data["k"] is None and data["num_samples"] == 50 and data["sampled_from"] == "vocab"
    assert "sampled N=50 draws from the full vocabulary" in CliRunner().invoke(cli, ["inspect", str(tmp_path)]).output


def test_a_bad_shards_targets_stay_out_of_the_statistics_and_its_tokens_are_counted(tmp_path):
    """Tail statistics say "(readable shards only)": a shard that fails --verify adds nothing to
    them, even when the column they read is intact; "N of them in 1 bad shard" counts the bad
    shard's tokens on the tokens line and its rows on the rows line."""
    meta = cache_meta("topk", k=8, encoding="plain")
    rows = random_rows(meta, 4, seq_len=12)
    write_cache(tmp_path, meta, rows)   # two rows per shard
    _corrupt_id_column(tmp_path / "shards/task-00000-000001.parquet")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json", "--verify"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    good = np.concatenate([rows[0].tail_mass, rows[1].tail_mass])
    assert data["targets"]["tail_mass_mean"] == pytest.approx(good.mean(), rel=1e-12)
    positions = [len(row.input_ids) - 1 for row in rows]
    assert data["tokens"] == sum(positions)
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--verify"]).stdout
    bad = positions[2] + positions[3]
    assert f"tokens      {sum(positions)} target positions, {bad} of them in 1 bad shard" in text
    assert "rows        4, 2 of them in 1 bad shard" in text
    stats = data["targets"]
    assert (f"tail mass   mean {stats['tail_mass_mean']:.4f}, p5 {stats['tail_mass_p5']:.4f}, "
            f"p50 {stats['tail_mass_p50']:.4f} (readable shards only)") in text


def test_a_missing_shard_fails_inspect_without_verify(tmp_path):
    """No re-hash is needed to see a shard the manifest lists but the store lacks: exit 2."""
    meta = cache_meta("topk")
    write_cache(tmp_path, meta, random_rows(meta, 4))
    (tmp_path / "shards/task-00000-000001.parquet").unlink()
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("qadpipe: error: ")
    assert "1 of 2 shards failed their checks; first: shards/task-00000-000001.parquet" in error[0]


def test_the_cache_argument_wins_over_the_config(tmp_path):
    """`qadpipe inspect CACHE -c cfg.yaml` reads CACHE; cache.path is only the default."""
    meta = cache_meta("topk", k=8)
    write_cache(tmp_path / "named", meta, random_rows(meta, 3))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "named"), "--json",
                                      "--set", f"cache.path={tmp_path / 'elsewhere'}"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 3
