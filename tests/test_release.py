"""Published checkpoints (attnlib.release) through a local HTTP server, the results layout and
the one-command publish (attnlib.experiments, attnlib.publish)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml

from attnlib import experiments, models, publish, release, train
from conftest import requires_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None  # keep the test output clean
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()


def publish_file(www: Path, name: str, content: bytes) -> dict:
    (www / name).write_bytes(content)
    return {name: {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}}


def test_the_release_address_belongs_to_the_configured_repository():
    repository = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert release.RELEASE_URL.startswith(repository + "/releases/download/")
    assert isinstance(release.MANIFEST, dict)


def test_fetch_downloads_and_checks_the_sha256(server, tmp_path):
    url, www = server
    manifest = publish_file(www, "fcn-full-seed0.pt", b"weights" * 1000)
    target = tmp_path / "cache" / "fcn-full-seed0.pt"
    assert release.fetch("fcn-full-seed0.pt", target, url=url, manifest=manifest) == target
    assert target.read_bytes() == b"weights" * 1000


def test_a_corrupt_file_is_refused_and_leaves_nothing_behind(server, tmp_path):
    url, www = server
    manifest = publish_file(www, "fcn-full-seed0.pt", b"good")
    (www / "fcn-full-seed0.pt").write_bytes(b"tampered")
    target = tmp_path / "cache" / "fcn-full-seed0.pt"
    with pytest.warns(RuntimeWarning, match="expected SHA-256 .*training the model instead"):
        assert release.fetch("fcn-full-seed0.pt", target, url=url, manifest=manifest) is None
    assert not target.exists() and not list(target.parent.glob("*.tmp"))


def test_a_missing_file_falls_back_with_a_message(server, tmp_path):
    url, _ = server
    manifest = {"fcn-full-seed0.pt": {"sha256": "0" * 64, "bytes": 1}}
    with pytest.warns(RuntimeWarning, match="404"):
        assert release.fetch("fcn-full-seed0.pt", tmp_path / "x.pt", url=url, manifest=manifest) is None


def test_an_unpublished_file_is_not_fetched(tmp_path):
    assert release.fetch("fcn-quick-seed0.pt", tmp_path / "x.pt", manifest={}) is None


def test_load_trained_fetches_a_published_checkpoint_before_training(server, tmp_path, monkeypatch):
    url, www = server
    manifest = publish_file(www, "fcn-quick-seed0.pt", b"published checkpoint")
    monkeypatch.setattr(release, "RELEASE_URL", url)
    monkeypatch.setattr(release, "MANIFEST", manifest)
    seen = {}

    def fake_fit(model, schedule, *, checkpoint, **kwargs):  # fit loads a finished checkpoint from this path
        seen["bytes"] = Path(checkpoint).read_bytes()
        return {"history": {}, "metrics": {}, "run": {}}

    monkeypatch.setattr(train, "fit", fake_fit)
    models.load_trained("fcn", "quick", checkpoint_dir=tmp_path)
    assert seen["bytes"] == b"published checkpoint"


def test_export_halves_the_weights_and_drops_the_optimiser(tmp_path):
    model = models.build("fcn")
    state = {"complete": True, "model": model.state_dict(), "optimizer": {"state": {}}, "metrics": {"miou": 0.5}}
    torch.save(state, tmp_path / "fcn-full-seed0.pt")
    torch.save(dict(state, complete=False), tmp_path / "gcnet-full-seed0.pt")  # unfinished: not exported
    entries = release.export("full", tmp_path, tmp_path / "release")
    assert list(entries) == ["fcn-full-seed0.pt"]
    exported = torch.load(tmp_path / "release" / "fcn-full-seed0.pt", weights_only=True)
    assert "optimizer" not in exported and exported["metrics"] == {"miou": 0.5}
    assert all(v.dtype == torch.float16 for v in exported["model"].values() if v.is_floating_point())
    assert entries["fcn-full-seed0.pt"]["sha256"] == release.sha256(tmp_path / "release" / "fcn-full-seed0.pt")
    with pytest.raises(ValueError, match="found none"):
        release.export("quick", tmp_path, tmp_path / "release")


def test_results_live_in_one_folder_per_profile(tmp_path):
    assert experiments.record_path(tmp_path, "full", "fcn", 2) == tmp_path / "full" / "fcn-seed2.json"
    for seed in (1, 0, 10):
        path = experiments.record_path(tmp_path, "quick", "gcnet", seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seed": seed}))
    assert [r["seed"] for r in experiments.load_results("quick", tmp_path)["gcnet"]] == [0, 1, 10]
    assert experiments.load_results("full", tmp_path) == {}
    with pytest.raises(ValueError, match="unknown profile"):
        experiments.record_path(tmp_path, "medium", "fcn", 0)


def test_committed_results_are_sorted_by_profile():
    assert not list((ROOT / "results").glob("*.json")), "results/<profile>/<head>-seed<k>.json only"
    for path in (ROOT / "results").glob("*/*.json"):
        assert json.loads(path.read_text())["profile"] == path.parent.name


@requires_data
def test_publish_trains_records_and_resumes(tmp_path, capsys):
    """The one command, end to end, on the quick profile: one head, no chapter executed."""
    assert publish.main(["--profile", "quick", "--heads", "fcn", "--out", str(tmp_path), "--notebooks"]) == 0
    record = json.loads((tmp_path / "quick" / "fcn-seed0.json").read_text())
    assert record["profile"] == "quick" and record["test"]["images"] == train.PROFILES["quick"].eval_limit
    assert {"device", "torch", "git_commit", "wall_seconds", "train_images_per_s"} <= set(record)
    assert publish.main(["--profile", "quick", "--heads", "fcn", "--out", str(tmp_path), "--notebooks"]) == 0
    assert "fcn       test mIoU" in capsys.readouterr().out
