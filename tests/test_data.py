import json

import numpy as np
import pytest
import torch
from PIL import Image

from freezeasguard.engine import errors
from freezeasguard.engine.model import data as D


def _folder(tmp_path, rows, n_images=3):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(n_images):
        Image.new("RGB", (20 + i, 12), color=(i * 40, 0, 0)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


GOOD = [{"file_name": "0.png", "text": "a red thing", "domain": "legal"},
        {"file_name": "1.png", "text": "another", "domain": "illegal"},
        {"file_name": "2.png", "text": "third one", "domain": "legal"}]


def test_image_folder_loads_and_preprocesses(tmp_path):
    ds = D.load_image_folder(_folder(tmp_path, GOOD), 8)
    assert ds.images.shape == (3, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.captions[1] == "another" and ds.domain_names() == ["illegal", "legal"]
    assert len(ds.select_domains(["legal"])) == 2
    x = ds.normalized()
    assert x.min() >= -1 and x.max() <= 1
    # red channel of image 2 is 80 everywhere (uniform colour survives resize + crop)
    assert int(ds.images[2, 0, 4, 4]) == 80


@pytest.mark.parametrize("bad, message", [
    ({"file_name": "9.png", "text": "x"}, r"metadata.jsonl:2: image file '9.png' not found"),
    ({"file_name": "1.png"}, r"metadata.jsonl:2: 1.png: missing or empty caption 'text'"),
    ({"file_name": "1.png", "text": "  "}, r"metadata.jsonl:2: 1.png: missing or empty caption"),
    ({"text": "no file"}, r"metadata.jsonl:2: missing 'file_name'"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad, message):
    root = _folder(tmp_path, [GOOD[0], bad, GOOD[2]])
    with pytest.raises(errors.DatasetError, match=message):
        D.load_image_folder(root, 8)
    ds = D.load_image_folder(root, 8, skip_bad=True)
    assert len(ds) == 2 and len(ds.skipped) == 1 and ds.skipped[0][1] == 2


def test_corrupt_image_and_bad_json(tmp_path):
    root = _folder(tmp_path, GOOD)
    (root / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with pytest.raises(errors.DatasetError, match=r":2: cannot decode image '1.png'"):
        D.load_image_folder(root, 8)
    (root / "metadata.jsonl").write_text(json.dumps(GOOD[0]) + "\n{not json\n")
    with pytest.raises(errors.DatasetError, match=r":2: not valid JSON"):
        D.load_image_folder(root, 8)


def test_empty_dataset_and_unknown_domain(tmp_path):
    root = _folder(tmp_path, GOOD)
    with pytest.raises(errors.DatasetError, match=r"unknown domain\(s\) \['artist'\]"):
        D.load_image_folder(root, 8, domains=["artist"])
    with pytest.raises(errors.DatasetError, match=r":2: 1.png: unknown domain 'illegal'"):
        D.load_image_folder(root, 8, known_domains=["legal"])
    (root / "metadata.jsonl").write_text("\n")
    with pytest.raises(errors.DatasetError, match="empty"):
        D.load_image_folder(root, 8)
    with pytest.raises(errors.DatasetError, match="no metadata.jsonl"):
        D.load_image_folder(tmp_path, 8)


def test_digits_dataset_is_real_and_round_trips_as_a_folder(tmp_path):
    ds = D.digits_dataset(8)
    assert len(ds) == 1797 and len(ds.domain_names()) == 10
    assert ds.captions[0] == "a photo of the digit zero"
    sub = D.digits_dataset(8, classes=[5, 7])
    assert set(sub.domain_names()) == {"five", "seven"}
    D.write_image_folder(sub, tmp_path / "d")
    back = D.load_image_folder(tmp_path / "d", 8)
    assert back.captions == sub.captions and back.domains == sub.domains
    assert torch.equal(back.images, sub.images)  # PNG is lossless and 8 px needs no resize


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_cached_and_live_encodings_agree(space):
    from freezeasguard.engine.model.components import build_components
    from freezeasguard.engine.model.encode import LiveData, encode_dataset

    c = build_components("tiny", space=space, resolution=16)
    ds = D.digits_dataset(16, classes=[3])
    cached = encode_dataset(c, ds, random_flip=True)
    live = LiveData(c, ds, flipped=True)
    idx = torch.tensor([0, 5, 7])
    flip = torch.tensor([True, False, True])
    eps = torch.randn(3, *cached.sample_shape)
    a, ca = cached.batch(idx, flip, eps, "cpu")
    b, cb = live.batch(idx, flip, eps, "cpu")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ca.tensors.keys() == cb.tensors.keys()
    for k in ca.tensors:
        torch.testing.assert_close(ca.tensors[k], cb.tensors[k])
    assert len(cached.captions) == 1  # one distinct caption encoded once


def test_cached_latents_are_contiguous():
    # torch 2.13's CPU conv backward crashed on channels-last inputs to frozen convs; the VAE
    # returns channels-last tensors on CPU, so the cache must hold contiguous ones.
    from freezeasguard.engine.model.components import build_components
    from freezeasguard.engine.model.encode import encode_dataset

    c = build_components("tiny", space="latent", resolution=16)
    enc = encode_dataset(c, D.digits_dataset(16, classes=[2]))
    assert enc.mean.is_contiguous() and enc.std.is_contiguous()


def test_long_thin_image_is_resized_within_bounds(tmp_path, monkeypatch):
    # Resizing the short side first would make a 20000x1 strip 1.28M x 64 pixels (an aspect-ratio
    # bomb); only the square kept is resampled, with the result of resize-then-crop.
    root = tmp_path / "thin"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.new("RGB", (20000, 1), (200, 0, 0)).save(root / "thin.png")
    Image.fromarray(rng.integers(0, 256, (10, 200, 3), dtype=np.uint8)).save(root / "noise.png")
    rows = [{"file_name": "thin.png", "text": "a line"}, {"file_name": "noise.png", "text": "noise"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes, resize = [], Image.Image.resize

    def spy(self, size, *a, **k):
        sizes.append(size)
        return resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    ds = D.load_image_folder(root, 64)
    assert max(w * h for w, h in sizes) <= 16 * 64 * 64
    assert ds.images.shape == (2, 3, 64, 64) and int(ds.images[0, 0, 32, 32]) == 200
    small = D.load_image_folder(root, 8).images[1]  # 160x8 resized: the box path too
    img = Image.open(root / "noise.png").resize((160, 8), Image.Resampling.BICUBIC).crop((76, 0, 84, 8))
    old = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    assert (small.int() - old.int()).abs().max() <= 1


# --- the loader's steps, one at a time -------------------------------------------------------


def test_a_metadata_line_is_decoded_then_read_field_by_field():
    from freezeasguard.engine.model import metadata as M

    assert M.decode_line(b"\xef\xbb\xbf{}", 1) == "{}" and M.decode_line(b"\xef\xbb\xbf{}", 2) == "\ufeff{}"
    assert M.decode_line(b"\xff", 3) is None
    ok = json.dumps({"file_name": "a.png", "text": " cap ", "domain": "legal"})
    assert M.row_fields(ok, 4, "m:4", "text", None) == ("a.png", " cap ", "legal")
    for line, where_file, message in [
        (None, "metadata.jsonl", "m:4: not valid UTF-8"),
        ("[1]", "metadata.jsonl", "m:4: missing 'file_name'"),
        (json.dumps({"file_name": "a.png", "text": "x", "domain": 3}), "a.png", "m:4: a.png: 'domain' must be a string"),
        (ok, "a.png", "m:4: a.png: unknown domain 'legal'; known: ['illegal']"),
    ]:
        with pytest.raises(M.LineProblem) as got:
            M.row_fields(line, 4, "m:4", "text", ["illegal"] if line == ok else None)
        assert got.value.problem == (where_file, 4, message)


def test_the_lines_are_checked_before_any_image_is_read(tmp_path):
    from freezeasguard.engine.model import metadata as M

    root = _folder(tmp_path, [*GOOD, {"file_name": "9.png", "text": "gone"}])
    (root / "0.png").write_bytes(b"not an image: the line check never opens it")
    folder = D._open_folder(root, True)
    try:
        todo, problems, digest = M.check_lines(folder, root, caption_column="text", domains=["legal"],
                                               known_domains=None, max_images=10, max_image_bytes=1 << 20,
                                               max_metadata_bytes=1 << 20, deadline=None)
    finally:
        folder.close()
    assert [rec.file_name for rec, _, _ in todo] == ["0.png", "2.png"]  # 'illegal' is filtered, not a problem
    assert problems == [] and len(digest) == 64
    with pytest.raises(errors.DatasetError, match="does not exist"):
        D._open_folder(tmp_path / "nowhere", True)
    with pytest.raises(errors.DatasetError, match="the dataset is empty after skipping bad lines"):
        D._check_selection(root, [], None, skipped=True)
