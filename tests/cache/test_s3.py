"""The cache on an object store: moto's S3 server, started here on loopback only; GCS's start-up probe."""

from __future__ import annotations

import numpy as np
import pytest

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cache import CacheReader
from qadpipe.errors import CacheError

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{server._server.server_port}"
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="qad")
    yield endpoint, client
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    for key, value in FAKE_KEYS.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


def test_write_via_uri_query_read_via_env_endpoint(s3, monkeypatch):
    endpoint, client = s3
    meta = cache_meta("topk", encoding="compact", k=8)
    rows = random_rows(meta, 5)
    write_cache(f"s3://qad/run1?endpoint_override={endpoint}&scheme=http", meta, rows)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="qad", Prefix="run1/")["Contents"])
    assert keys == ["run1/manifests/task-00000.json"] + [f"run1/shards/task-00000-00000{i}.parquet" for i in range(3)]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{endpoint}")
    reader = CacheReader("s3://qad/run1")
    reader.verify_all()
    read = list(reader.iter_sequences(1, 2))
    assert [r.id for r in read] == [r.id for r in rows[2:]]
    np.testing.assert_array_equal(read[0].input_ids, rows[2].input_ids)


def test_corrupt_object_named_by_its_uri(s3, monkeypatch):
    endpoint, client = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{endpoint}")
    meta = cache_meta("sampled", encoding="plain")
    write_cache("s3://qad/run2", meta, random_rows(meta, 2))
    key = "run2/shards/task-00000-000000.parquet"
    data = bytearray(client.get_object(Bucket="qad", Key=key)["Body"].read())
    data[len(data) // 3] ^= 1
    client.put_object(Bucket="qad", Key=key, Body=bytes(data))
    with pytest.raises(CacheError, match=rf"^s3://qad/{key}: checksum mismatch"):
        CacheReader("s3://qad/run2").verify_all()


def test_a_uri_with_no_cache_says_so_rather_than_empty(s3, monkeypatch):
    endpoint, _ = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{endpoint}")
    with pytest.raises(CacheError, match=r"^s3://qad/typo/manifests: no task manifest found \(no cache at this URI"):
        CacheReader("s3://qad/typo")


def test_an_unreachable_gcs_cache_fails_in_seconds_not_minutes(monkeypatch):
    """The GCS client retries for 15 minutes by default; the start-up probe gives up after
    GCS_PROBE_SECONDS (2 here) and says why.  The endpoint is a closed local port, so this holds
    with or without network and credentials."""
    import time

    from qadpipe.cache import store

    monkeypatch.setattr(store, "GCS_PROBE_SECONDS", 2.0)
    uri = "gs://bucket/run?endpoint_override=127.0.0.1:9&scheme=http"
    start = time.monotonic()
    with pytest.raises(CacheError, match=r"^gs://bucket/run\?endpoint_override=127.0.0.1:9&scheme=http: cannot "
                                         r"reach Google Cloud Storage within 2 s \(.*\); expected network access") as error:
        store.Store(uri)
    assert time.monotonic() - start < 30
    assert len(str(error.value)) < 600, "the client's kilobyte status is cut to its gist"
    store.Store(uri + "&retry_limit_seconds=1")   # the user's own limit: no probe, nothing fetched yet


def test_a_uri_with_a_trailing_slash_and_a_query_names_the_same_objects_and_no_query(s3):
    """``s3://qad/run3/`` and ``s3://qad/run3`` are one cache: a doubled slash is another object
    key on S3, whose cache no reader of the other spelling would find.  A message names the object
    by its URI, not the endpoint query pasted in before its key."""
    endpoint, client = s3
    meta = cache_meta("sampled", encoding="plain")
    write_cache(f"s3://qad/run3/?endpoint_override={endpoint}&scheme=http", meta, random_rows(meta, 2))
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="qad", Prefix="run3/")["Contents"])
    assert keys == ["run3/manifests/task-00000.json", "run3/shards/task-00000-000000.parquet"]
    key = keys[1]
    data = bytearray(client.get_object(Bucket="qad", Key=key)["Body"].read())
    data[len(data) // 3] ^= 1
    client.put_object(Bucket="qad", Key=key, Body=bytes(data))
    with pytest.raises(CacheError, match=rf"^s3://qad/{key}: checksum mismatch"):
        CacheReader(f"s3://qad/run3?endpoint_override={endpoint}&scheme=http").verify_all()
