"""load_weights / apply_weights / build_with_weights: safety, tags through the cache, mismatch messages."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import random
import socket
import threading
from pathlib import Path

import pytest
import torch

import resnext
from resnext.errors import DownloadError, UnsafeFileError, WeightsError
from resnext.weights import (
    apply_weights,
    build_with_weights,
    get_weights,
    load_weights,
    save_weights,
    table,
)

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _Payload:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def _tiny_file(
    tmp_path: Path, name: str = "resnext_tiny", **overrides: object
) -> tuple[torch.nn.Module, Path]:
    model = resnext.create_model(name, **overrides).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_code_carrying_pth_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = resnext.create_model("resnext_tiny")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": model.state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsError) as info:
        load_weights(path)
    assert isinstance(info.value, UnsafeFileError)
    msg = str(info.value)
    assert "refused" in msg and "os" in msg and "not executed" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_weights(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="closest"):
        load_weights("resnext50_32x4d.tv3_in1k")


def test_damaged_torch_files_give_one_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    # Text starting with 'h' (pickle's BINGET opcode) made torch's unpickler raise KeyError.
    path.write_bytes(b"hello world, not a checkpoint\n")
    with pytest.raises(WeightsError, match=r"notes\.pth: not a readable PyTorch checkpoint"):
        load_weights(path)
    # Bytes of a legacy torch.save file flipped or cut at random (seeded): whatever the
    # unpickler trips on (IndexError, struct.error, KeyError ...), the caller sees a WeightsError.
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(3)}, buf, _use_new_zipfile_serialization=False)
    good = buf.getvalue()
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data[: rng.randrange(1, len(data) + 1)]))
        with contextlib.suppress(WeightsError):
            load_weights(path)


def test_state_dict_with_a_non_string_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "intkey.pth"
    torch.save({1: torch.zeros(3), "conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(
        WeightsError, match=r"intkey\.pth: state-dict key 1 \(int\) is not a string"
    ):
        load_weights(path)


def test_wrong_num_classes_message_and_fixes(tmp_path: Path) -> None:
    src, path = _tiny_file(tmp_path, num_classes=7)
    loaded = load_weights(path)
    model = resnext.create_model("resnext_tiny")  # 10 classes; features 32 * 2**2 = 128
    with pytest.raises(WeightsError) as info:
        apply_weights(model, loaded)
    msg = str(info.value)
    assert "fc.weight: weights [7, 128], model [10, 128]" in msg and "fc.bias" in msg
    assert "num_classes=7" in msg and "strict=False" in msg
    # The two fixes the message offers both work.
    report = apply_weights(model, loaded, strict=False)
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(X), src.forward_features(X))
    fitted = build_with_weights("resnext_tiny", path).eval()
    with torch.no_grad():
        assert fitted.num_classes == 7 and torch.equal(fitted(X), src(X))


def test_new_head_through_build_with_weights(tmp_path: Path) -> None:
    src, path = _tiny_file(tmp_path)
    model = build_with_weights("resnext_tiny", path, num_classes=3).eval()
    assert model.num_classes == 3 and model.class_names is None
    with torch.no_grad():
        assert torch.equal(model.forward_features(X), src.forward_features(X))


def test_new_head_still_requires_the_whole_backbone(tmp_path: Path) -> None:
    src = resnext.create_model("resnext_tiny_in").eval()
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    headless = tmp_path / "headless.pth"
    torch.save(state, headless)
    # Only the classifier is absent: the backbone loads and a new head starts.
    model = build_with_weights("resnext_tiny_in", headless).eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(X), src.forward_features(X))
    # Without layer4 the model would keep a random last stage: refused, naming the keys.
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    n_layer4 = sum(k.startswith("layer4.") for k in src.state_dict())
    for classes in (None, 5):  # a headless file; a file whose head is replaced
        with pytest.raises(WeightsError) as info:
            build_with_weights("resnext_tiny_in", partial, num_classes=classes)
        msg = str(info.value)
        assert f"in the model, not in the weights ({n_layer4})" in msg
        assert "layer4.0.conv1.weight" in msg and "fc." not in msg


def test_wrong_architecture_lists_keys_and_shapes(tmp_path: Path) -> None:
    _, path = _tiny_file(tmp_path, "resnext_tiny_in")
    model = resnext.create_model("resnext_tiny")
    with pytest.raises(WeightsError) as info:
        apply_weights(model, load_weights(path))
    msg = str(info.value)
    assert "conv1.weight: weights [16, 3, 7, 7], model [16, 3, 3, 3]" in msg
    assert "in the weights, not in the model" in msg and "layer4.0.conv1.weight" in msg
    assert "another architecture" in msg
    with pytest.raises(WeightsError):  # a backbone mismatch is an error even when not strict
        apply_weights(model, load_weights(path), strict=False)


def test_mismatch_names_only_the_architecture_the_file_records(tmp_path: Path) -> None:
    src, path = _tiny_file(tmp_path, "resnext_tiny_in")
    # A plain state dict records no architecture: the hint must not name the model just built.
    with pytest.raises(WeightsError) as info:
        build_with_weights("resnext_tiny", path)
    hint = str(info.value).splitlines()[-1]
    assert "another architecture:" in hint and "resnext_tiny" not in hint
    # A native file records the model it was saved from: that one is named.
    native = tmp_path / "tiny_in.safetensors"
    save_weights(src, native, preprocessing=None, class_names=None,
                 provenance={"source": "test"}, model_name="resnext_tiny_in")  # fmt: skip
    with pytest.raises(WeightsError, match=r"another architecture \(resnext_tiny_in\)"):
        build_with_weights("resnext_tiny", native)


def test_stride_placement_mismatch_is_reported(tmp_path: Path) -> None:
    _, path = _tiny_file(tmp_path)
    loaded = dataclasses.replace(load_weights(path), spec_overrides={"stride_in_1x1": True})
    with pytest.raises(WeightsError, match="stride_in_1x1=True"):
        apply_weights(resnext.create_model("resnext_tiny"), loaded)


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_tag_downloads_verifies_and_carries_table_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, path = _tiny_file(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (www / f"tiny-{digest[:8]}.pth").write_bytes(path.read_bytes())
    httpd, url = _serve(www)
    try:
        base = get_weights("resnext50_32x4d.pycls_in1k")
        entry = dataclasses.replace(
            base, tag="resnext_tiny.test", model="resnext_tiny", url=f"{url}/tiny-{digest[:8]}.pth",
            hash=digest[:8], hash_kind="prefix", num_classes=10, stride_in_1x1=False,
        )  # fmt: skip
        monkeypatch.setitem(table.WEIGHTS, entry.tag, entry)
        monkeypatch.setenv("RESNEXT_HOME", str(tmp_path / "cache"))
        loaded = load_weights("resnext_tiny.test")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert loaded.source == "resnext_tiny.test" and loaded.model_name == "resnext_tiny"
    assert loaded.preprocessing == base.preprocessing
    assert (tmp_path / "cache" / f"tiny-{digest[:8]}.pth").is_file()
    model = build_with_weights("resnext_tiny", loaded).eval()
    with torch.no_grad():
        assert torch.equal(model(X), src(X))


def test_tag_offline_names_url_and_cache_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = get_weights("resnext50_32x4d.tv_in1k")
    url = f"http://127.0.0.1:{port}/models/resnext50_32x4d-7cdf4587.pth"
    monkeypatch.setitem(table.WEIGHTS, base.tag, dataclasses.replace(base, url=url))
    with pytest.raises(DownloadError) as info:
        load_weights(base.tag, cache_dir=tmp_path / "c")
    msg = str(info.value)
    assert url in msg and str(tmp_path / "c" / "resnext50_32x4d-7cdf4587.pth") in msg


def test_default_weights_come_from_torch_hubs_copy_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchvision and timm keep their downloads in $TORCH_HOME/hub/checkpoints under the
    # published file name: a matching hash there is read in place, offline.
    src, path = _tiny_file(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / f"tiny-{digest[:8]}.pth").write_bytes(path.read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/tiny-{digest[:8]}.pth"
    base = get_weights("resnext50_32x4d.tv_in1k")
    entry = dataclasses.replace(
        base, tag="resnext_tiny.test", model="resnext_tiny", url=closed, hash=digest[:8],
        num_classes=10, stride_in_1x1=False,
    )  # fmt: skip
    monkeypatch.setitem(table.WEIGHTS, entry.tag, entry)
    monkeypatch.setitem(table.DEFAULT_TAGS, "resnext_tiny", entry.tag)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("RESNEXT_HOME", str(tmp_path / "cache"))
    for model in (
        resnext.create_model("resnext_tiny", pretrained=True),
        resnext.create_model("resnext_tiny", weights="DEFAULT"),
        resnext.Predictor("resnext_tiny", "DEFAULT").model,
    ):
        with torch.no_grad():
            assert torch.equal(model.eval()(X), src(X))
    assert not (tmp_path / "cache").exists()  # nothing downloaded or copied
    # Another file under that name is not taken for it: the download is tried (and fails here).
    (hub / f"tiny-{digest[:8]}.pth").write_bytes(b"not these weights")
    with pytest.raises(DownloadError, match="could not download"):
        resnext.create_model("resnext_tiny", pretrained=True)
    with pytest.raises(WeightsError, match="expected a model name"):
        load_weights("DEFAULT")
    with pytest.raises(ValueError, match="pretrained"):
        resnext.create_model("resnext_tiny", weights=path, pretrained=True)


def test_code_carrying_detectron2_pickle_is_refused_once(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": _Payload(marker)}}, f, protocol=2)
    with pytest.raises(UnsafeFileError) as info:
        load_weights(path)
    msg = str(info.value)
    assert isinstance(info.value, WeightsError) and not marker.exists()
    # One refusal, naming the file once: "detectron2 weights PATH: refused: ... os.makedirs".
    assert msg.count("refused") == 1 and msg.count(str(path)) == 1 and "makedirs" in msg


@pytest.mark.parametrize("name", ["resnext_tiny_in", "resnext50d_32x4d"])
def test_rgb_weights_fit_other_input_channels(tmp_path: Path, name: str) -> None:
    # Expected values by construction: a grey image through the summed filters is the RGB
    # network on that grey in all three channels; six channels holding the image twice, through
    # filters repeated and halved, are the RGB network on the image.
    src, path = _tiny_file(tmp_path, name, num_classes=5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grey = x[:, :1]
    mono = resnext.create_model(name, weights=path, in_chans=1).eval()
    six = resnext.create_model(name, weights=path, in_chans=6).eval()
    with torch.no_grad():
        torch.testing.assert_close(mono(grey), src(grey.expand(-1, 3, -1, -1)))
        torch.testing.assert_close(six(torch.cat([x, x], 1)), src(x))
    assert mono.preprocessing is None  # RGB normalisation does not describe one channel
    assert resnext.create_model(name, weights=path).preprocessing is not None
