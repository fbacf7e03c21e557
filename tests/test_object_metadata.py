"""Stored objects describe themselves: S3 user metadata names the job, batch, seed and model;
the API's ``results[].key`` is the object's whole key (the storage URL's prefix included)."""

from __future__ import annotations

import boto3

from tests.conftest import BUCKET


def test_s3_objects_carry_job_metadata_and_the_api_gives_whole_keys(farm, farm_settings, client):
    from dashboard import create_app

    handle = client.submit({"prompt": "a lantern", "model": "tiny", "width": 64, "height": 64,
                            "steps": 2, "seed": 41, "num_images": 2})
    record = handle.wait(timeout=120)
    assert record.state.value == "succeeded", record.error
    api = create_app({"TESTING": True, "SETTINGS": farm_settings}).test_client()
    results = api.get(f"/api/v1/jobs/{handle.id}").get_json()["results"]
    assert [r["key"] for r in results] == [
        f"farm/{record.batch_id}/{record.id}-{k}.png" for k in range(2)]
    s3 = boto3.client("s3", endpoint_url=farm_settings.s3_endpoint_url)
    for k, result in enumerate(results):
        head = s3.head_object(Bucket=BUCKET, Key=result["key"])  # the whole key names the object
        assert head["Metadata"] == {"job-id": record.id, "batch-id": record.batch_id,
                                    "seed": str(41 + k), "model": "tiny"}
    sidecar = s3.head_object(Bucket=BUCKET, Key=f"farm/{record.batch_id}/{record.id}.json")
    assert sidecar["Metadata"]["job-id"] == record.id
