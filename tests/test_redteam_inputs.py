"""A user's dataset written by an attacker who read the source. Each input is refused with its named
problem by the engine's loader and by the service's planning, and nothing is written.

Expected messages are spelled out in full: a refusal must not depend on what exists outside the
dataset folder, and must never be a traceback, a warning or a hang.
"""
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import struct
import time
import warnings
import zlib

import pytest
from PIL import Image, ImageFile
from test_service_run import publish

from freezeasguard.engine.errors import DatasetError, PolicyViolation
from freezeasguard.engine.model import data as D
from freezeasguard.engine.model import folder_io as FIO
from freezeasguard.engine.service.run import submit


@pytest.fixture(scope="module")
def pub(tmp_path_factory):
    return publish(tmp_path_factory.mktemp("publisher"))


@pytest.fixture(autouse=True)
def no_hang():
    """Opening a FIFO blocks for ever: a test that opens one fails instead of hanging."""
    def blocked(*_):
        raise TimeoutError("blocked: something was opened that must not be")

    old = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def decoded(monkeypatch):
    """Sizes of the images PIL decodes (every format's decoding goes through ImageFile.load)."""
    sizes, load = [], ImageFile.ImageFile.load

    def spy(self):
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


def _png(size, mode="1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def _claiming(png: bytes, w: int, h: int) -> bytes:
    """``png`` with an IHDR (the first chunk) that claims w x h, CRC fixed: a header that lies."""
    ihdr = struct.pack(">II", w, h) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def _data(pub, tmp_path, *rows, name="data"):
    """A copy of the publisher's 8-image folder with ``rows`` appended to its metadata (lines 9...)."""
    data = tmp_path / name
    shutil.copytree(pub.data, data)
    with open(data / "metadata.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return data


def _names(data):
    return [json.loads(line)["file_name"] for line in (data / "metadata.jsonl").read_text().splitlines()[:8]]


def _row(name, text="a photo of the digit zero"):
    return {"file_name": name, "text": text}


def _loader(data, **kw) -> str:
    with pytest.raises(DatasetError) as err:
        D.load_image_folder(data, 16, **kw)
    return str(err.value)


def _service(pub, tmp_path, data, **policy) -> list[str]:
    """The dataset problems the service names when it refuses a job on ``data``; nothing is written."""
    spec = pub.spec(tmp_path / "job.yaml", data={"path": str(data)})
    with pytest.raises(PolicyViolation) as err:
        submit(spec, pub.write_policy(tmp_path / "policy.yaml", **policy), manifest=pub.manifest_path,
               base=pub.base, out=tmp_path / "out", log_path=tmp_path / "jobs.jsonl")
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.jsonl").exists()
    return [p for p in err.value.violations if p.startswith("dataset: ")]


@pytest.fixture(scope="module")
def bombs():
    """1-bit PNGs made with PIL: 20000 x 20000 (over twice PIL's limit: DecompressionBombError) and
    12000 x 12000 (between once and twice: PIL only warns). A few KB each."""
    return {n: _png((n, n)) for n in (20000, 12000)}


def test_decompression_bomb_is_a_named_refusal(pub, tmp_path, bombs, decoded, monkeypatch):
    for side, png in bombs.items():
        assert len(png) < 64 << 10
        data = _data(pub, tmp_path, _row("bomb.png"), name=f"d{side}")
        (data / "bomb.png").write_bytes(png)
        refused = f"{data / 'metadata.jsonl'}:9: image 'bomb.png' refused as a decompression bomb"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL's warning is a refusal too, never a warning
            assert _loader(data, max_pixels=10**9) == refused
        assert _service(pub, tmp_path, data) == [f"dataset: {refused}"]
    # With PIL's own check turned off, the cap still refuses it from the header, undecoded.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    over = f"{data / 'metadata.jsonl'}:9: image 'bomb.png' is 12000x12000 pixels, over the cap of"
    assert _loader(data) == f"{over} {D.DEFAULT_MAX_PIXELS}"
    assert _service(pub, tmp_path, data) == [f"dataset: {over} {4096 * 4096}"]
    assert decoded and max(w * h for w, h in decoded) == 16 * 16


def test_huge_image_is_refused_from_its_header(pub, tmp_path, decoded):
    png16 = _png((16, 16), "RGB")
    cases = {"big.png": _png((4097, 4096)),  # 1-bit, a few KB
             "liar.png": _claiming(png16, 5000, 5000),  # header says 5000x5000, data is 16x16
             "wide.png": _png((16385, 1024))}
    for name, png in cases.items():
        data = _data(pub, tmp_path, _row(name), name=name)
        (data / name).write_bytes(png)
        w, h = Image.open(io.BytesIO(png)).size
        refused = f"{data / 'metadata.jsonl'}:9: image {name!r} is {w}x{h} pixels, over the cap of {4096 * 4096}"
        assert _loader(data, max_pixels=4096 * 4096) == refused
        assert _service(pub, tmp_path, data) == [f"dataset: {refused}"]
        assert max(a * b for a, b in decoded) == 16 * 16  # never decoded
    # What the header claims bounds the decoding: the liar decoded under a larger cap is truncated.
    assert _loader(data.parent / "liar.png", max_pixels=10**8).startswith(
        f"{data.parent / 'liar.png' / 'metadata.jsonl'}:9: cannot decode image 'liar.png': ")
    # A file named .png that is another format (EPS runs Ghostscript when decoded) is not opened as one.
    data = _data(pub, tmp_path, _row("eps.png"), name="eps")
    (data / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    refused = f"{data / 'metadata.jsonl'}:9: cannot decode image 'eps.png': not a PNG, JPEG, WEBP, BMP, GIF, TIFF image"
    assert _loader(data) == refused
    assert _service(pub, tmp_path, data) == [f"dataset: {refused}"]
    # An image file over the byte cap is refused from its size, unopened.
    (data / "eps.png").write_bytes(png16 + b"\0" * 2048)
    refused = (f"{data / 'metadata.jsonl'}:9: image file 'eps.png' is {len(png16) + 2048} bytes, "
               f"over the cap of 2048 bytes")
    assert _loader(data, max_image_bytes=2048) == refused
    assert _service(pub, tmp_path, data, max_image_bytes=2048) == [f"dataset: {refused}"]


def test_metadata_is_read_within_bounds(pub, tmp_path, decoded):
    # 101 small distinct images over a cap of 100: refused at line 101, before any image is decoded.
    data = tmp_path / "many"
    data.mkdir()
    for i in range(101):
        (data / f"t{i:03d}.png").write_bytes(_png((4, 4), "RGB"))
    (data / "metadata.jsonl").write_text("".join(json.dumps(_row(f"t{i:03d}.png")) + "\n" for i in range(101)))
    meta = data / "metadata.jsonl"
    assert _loader(data, max_images=100) == f"{meta}: lists more than 100 images (the cap)"
    assert _service(pub, tmp_path, data, max_images=100) == [f"dataset: {meta}: lists more than 100 images (the cap)"]
    assert not decoded
    # A metadata.jsonl over its byte cap is refused from its size; so is one huge line.
    data = _data(pub, tmp_path, name="bytes")
    meta = data / "metadata.jsonl"
    with open(meta, "a") as f:
        f.write("\n" * 1000)
    size = meta.stat().st_size
    assert _loader(data, max_metadata_bytes=1000) == f"{meta}: {size} bytes, over the cap of 1000 bytes"
    assert _service(pub, tmp_path, data, max_metadata_bytes=1000) == [
        f"dataset: {meta}: {size} bytes, over the cap of 1000 bytes"]
    data = _data(pub, tmp_path, _row(_names(pub.data)[0], "x" * 100_000), name="line")
    refused = f"{data / 'metadata.jsonl'}:9: line over the cap of {FIO.MAX_LINE_BYTES} bytes"
    assert _loader(data) == refused
    assert _service(pub, tmp_path, data) == [f"dataset: {refused}"]
    # 100,000 duplicate lines: refused at line 2, at once, without decoding an image.
    data = tmp_path / "dups"
    data.mkdir()
    (data / "a.png").write_bytes(_png((16, 16), "RGB"))
    (data / "metadata.jsonl").write_text((json.dumps(_row("a.png")) + "\n") * 100_000)
    refused = f"{data / 'metadata.jsonl'}:2: duplicate file_name 'a.png' (the same file as 'a.png' on line 1)"
    t = time.perf_counter()
    assert _loader(data) == refused
    assert time.perf_counter() - t < 1.0
    assert _service(pub, tmp_path, data) == [f"dataset: {refused}"]
    assert not decoded
    # 100,000 distinct names: refused at the policy's cap of 10,000 lines.
    (data / "metadata.jsonl").write_text("".join(json.dumps(_row(f"m{i}.png")) + "\n" for i in range(100_000)))
    refused = f"dataset: {data / 'metadata.jsonl'}: lists more than 10000 images (the cap)"
    assert _service(pub, tmp_path, data) == [refused]


def test_metadata_that_is_not_utf8_or_not_json(pub, tmp_path):
    data = _data(pub, tmp_path)
    meta = data / "metadata.jsonl"
    with open(meta, "ab") as f:
        f.write(b'{"file_name": "\xff\xfe.png", "text": "latin-1"}\n')
        f.write(b"[" * 20_000 + b"\n")  # nested past the recursion limit
        f.write(b'{"file_name": "a.png", "text": "x", "n": ' + b"1" * 5000 + b"}\n")  # past int digits
    ds = D.load_image_folder(data, 16, skip_bad=True)
    assert len(ds) == 8 and [line for _, line, _ in ds.skipped] == [9, 10, 11]
    got = [msg for _, _, msg in ds.skipped]
    assert got[0] == f"{meta}:9: not valid UTF-8"
    assert all(m.startswith(f"{meta}:{n}: not valid JSON (") for m, n in zip(got[1:], (10, 11)))
    assert _loader(data) == got[0] + " (and 2 more problem(s); skip_bad=True skips them)"
    assert _service(pub, tmp_path, data) == [f"dataset: {m}" for m in got]


def _outside_states(target):
    """Make ``target`` (outside the folder) a file, nothing, a directory, then a FIFO."""
    yield shutil.copy
    for make in (lambda p: None, os.mkdir, os.mkfifo):
        if target.is_dir():
            target.rmdir()
        else:
            target.unlink(missing_ok=True)
        yield lambda _, p, make=make: make(p)


def test_paths_outside_are_refused_identically_whether_they_exist_or_not(pub, tmp_path):
    out = tmp_path / "outside"
    out.mkdir()
    secret = out / "secret.png"
    data = _data(pub, tmp_path)
    src, meta = data / _names(data)[0], data / "metadata.jsonl"
    (data / "sub").mkdir()
    os.symlink(secret, data / "abs_link.png")
    os.symlink("../outside/secret.png", data / "rel_link.png")
    os.symlink("../outside", data / "linkdir")
    lines = meta.read_text()
    for i, fname in enumerate(["../outside/secret.png", str(secret), "abs_link.png", "rel_link.png",
                               "linkdir/secret.png", "sub/../../outside/secret.png",
                               f"linkdir/../data/{src.name}"]):  # POSIX: linkdir/.. is tmp_path, not data
        meta.write_text(lines + json.dumps(_row(fname)) + "\n")
        loader = f"{meta}:9: file_name {fname!r} is outside the dataset folder"
        service = f"dataset: file(s) outside the dataset folder: [{fname!r}]"
        for state, make in enumerate(_outside_states(secret)):
            make(src, secret)
            assert _loader(data) == loader, (fname, state)
            assert D.load_image_folder(data, 16, skip_bad=True).skipped == [(fname, 9, loader)]
            if state < 2 and i < 4:  # the service, as the file exists and as it does not
                assert _service(pub, tmp_path, data) == [service]
        secret.unlink()
    # A metadata.jsonl that is a symlink out is refused before it is read, whatever it points to.
    meta.unlink()
    os.symlink(out / "metadata.jsonl", meta)
    for state, make in enumerate(_outside_states(out / "metadata.jsonl")):
        make(pub.data / "metadata.jsonl", out / "metadata.jsonl")
        assert _loader(data) == f"{str(data)!r}: metadata.jsonl is outside the dataset folder", state
        if state < 2:
            assert _service(pub, tmp_path, data) == [f"dataset: {str(data)!r}: metadata.jsonl is outside the "
                                                     "dataset folder"]


def test_special_files_are_never_opened(pub, tmp_path):
    data = _data(pub, tmp_path, *(_row(n) for n in ("dir.png", "fifo.png", "alias.png")))
    meta = data / "metadata.jsonl"
    (data / "dir.png").mkdir()
    os.mkfifo(data / "fifo.png")
    os.symlink("fifo.png", data / "alias.png")
    expected = [f"{meta}:{9 + i}: image file {n!r} is not a regular file"
                for i, n in enumerate(("dir.png", "fifo.png", "alias.png"))]
    try:  # a device node (/dev/zero) inside the folder, where this may make one
        os.mknod(data / "zero.png", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except OSError:
        pass
    else:
        with open(meta, "a") as f:
            f.write(json.dumps(_row("zero.png")) + "\n")
        expected.append(f"{meta}:12: image file 'zero.png' is not a regular file")
    assert [m for _, _, m in D.load_image_folder(data, 16, skip_bad=True).skipped] == expected
    assert _service(pub, tmp_path, data) == [f"dataset: {m}" for m in expected]
    # The engine's own loader without confinement still never opens what is not a regular file.
    data = _data(pub, tmp_path, _row("devzero.png"), name="unconfined")
    os.symlink("/dev/zero", data / "devzero.png")
    refused = f"{data / 'metadata.jsonl'}:9: image file 'devzero.png' is not a regular file"
    assert _loader(data, confine=False) == refused
    # metadata.jsonl itself a FIFO or a directory
    for make in (os.mkfifo, os.mkdir):
        data = _data(pub, tmp_path, name=f"meta_{make.__name__}")
        (data / "metadata.jsonl").unlink()
        make(data / "metadata.jsonl")
        assert _loader(data) == f"{data / 'metadata.jsonl'}: not a regular file"
        assert _service(pub, tmp_path, data) == [f"dataset: {data / 'metadata.jsonl'}: not a regular file"]


def test_file_names_that_are_not_paths(pub, tmp_path):
    long, component = "x" * 5000 + ".png", "d/" + "y" * 300 + ".png"
    names = {"a\x00.png": "it contains a NUL byte", long: "it is over 1024 characters",
             component: "a component is over 255 bytes", "\ud800.png": "it cannot be encoded as a file name"}
    data = _data(pub, tmp_path, *(_row(n) for n in names))
    meta = data / "metadata.jsonl"

    def shown(n):
        return repr(n) if len(n) <= 120 else f"{n[:120]!r}... ({len(n)} characters)"

    expected = [f"{meta}:{9 + i}: file_name {shown(n)} is not a usable path ({why})"
                for i, (n, why) in enumerate(names.items())]
    assert [m for _, _, m in D.load_image_folder(data, 16, skip_bad=True).skipped] == expected
    assert _loader(data) == expected[0] + " (and 3 more problem(s); skip_bad=True skips them)"
    assert _service(pub, tmp_path, data) == [f"dataset: {m}" for m in expected]


def test_one_file_under_two_names_is_a_duplicate(pub, tmp_path):
    first = _names(pub.data)[0]
    for i, alias in enumerate([f"./{first}", f"sub/../{first}", f".//{first}", "alias.png", "hard.png"]):
        data = _data(pub, tmp_path, _row(alias), name=f"d{i}")
        (data / "sub").mkdir()
        os.symlink(first, data / "alias.png")
        os.link(data / first, data / "hard.png")
        refused = f"{data / 'metadata.jsonl'}:9: duplicate file_name {alias!r} (the same file as {first!r} on line 1)"
        assert _loader(data) == refused
        assert _loader(data, skip_bad=True) == refused  # never skipped: the whole dataset is refused
        if i in (0, 3):
            assert _service(pub, tmp_path, data) == [f"dataset: {refused}"]


_SQUARE = D._to_square


def _swap_at_first_decode(monkeypatch, swap):
    square, calls = _SQUARE, []

    def swapping(*a, **k):
        if not calls:
            swap()
        calls.append(1)
        return square(*a, **k)

    monkeypatch.setattr(D, "_to_square", swapping)


def test_hard_link_to_a_file_outside_is_refused_by_the_service(pub, tmp_path, monkeypatch):
    """A hard link is a second name of a file anywhere on the filesystem (the base weights, a key),
    with no symlink to resolve: the service refuses a file with st_nlink > 1, from the descriptor
    it reads; the engine's own loader still reads a folder of hard-linked copies."""
    names = _names(pub.data)
    out = tmp_path / "outside"
    out.mkdir()
    secret = out / "secret.png"
    secret.write_bytes(_png((16, 16), "RGB"))
    data = _data(pub, tmp_path, _row("hard.png"))
    os.link(secret, data / "hard.png")
    linked = (f"{data / 'metadata.jsonl'}:9: image file 'hard.png' has 2 hard links (another name may be "
              "outside the dataset folder; copy the file into the folder)")
    assert _service(pub, tmp_path, data) == [f"dataset: {linked}"]
    assert len(D.load_image_folder(data, 16)) == 9
    # metadata.jsonl itself, hard-linked from outside
    meta = tmp_path / "meta_data"
    shutil.copytree(pub.data, meta)
    os.replace(meta / "metadata.jsonl", out / "metadata.jsonl")
    os.link(out / "metadata.jsonl", meta / "metadata.jsonl")
    assert _service(pub, tmp_path, meta) == [
        f"dataset: {meta / 'metadata.jsonl'}: has 2 hard links (another name may be outside the dataset "
        "folder; copy the file into the folder)"]
    # A link made after the file was checked and before it is opened: the count is the open file's.
    data = _data(pub, tmp_path, name="late")
    _swap_at_first_decode(monkeypatch, lambda: os.link(data / names[2], out / "late.png"))
    assert _service(pub, tmp_path, data) == [
        f"dataset: {data / 'metadata.jsonl'}:3: image file {names[2]!r} has 2 hard links (another name may be "
        "outside the dataset folder; copy the file into the folder)"]


def test_file_swapped_while_being_read(pub, tmp_path, monkeypatch):
    names = _names(pub.data)
    other = _png((16, 16), "RGB")
    # Rewritten after it was decoded: the loader's hash is of the bytes decoded; the service refuses.
    for run in ("loader", "service"):
        data = _data(pub, tmp_path, name=f"rewrite_{run}")
        _swap_at_first_decode(monkeypatch, lambda: (data / names[0]).write_bytes(other))
        if run == "loader":
            ds = D.load_image_folder(data, 16)
            assert ds.files[names[0]] == hashlib.sha256((pub.data / names[0]).read_bytes()).hexdigest()
        else:
            assert _service(pub, tmp_path, data) == [f"dataset: file(s) changed while being read: {[names[0]]}"]
    # Swapped for a symlink out, or its folder swapped for one, after it was checked: not read.
    (tmp_path / "outside").mkdir()
    for case in ("file", "folder"):
        for run in ("loader", "service"):
            data = _data(pub, tmp_path, _row("sub/x.png"), name=f"{case}_{run}")
            (data / "sub").mkdir()
            shutil.copy(data / names[1], data / "sub" / "x.png")
            victim, target = (names[2], tmp_path / "outside" / f"{run}.png") if case == "file" else \
                ("sub/x.png", tmp_path / "outside" / f"sub_{run}")
            line = 3 if case == "file" else 9

            def swap(victim=victim, target=target, data=data):
                link = data / victim.split("/")[0]
                shutil.move(link, target)
                os.symlink(target, link)

            _swap_at_first_decode(monkeypatch, swap)
            refused = f"{data / 'metadata.jsonl'}:{line}: image file {victim!r} changed while being read"
            if run == "loader":
                assert _loader(data) == refused
            else:
                assert _service(pub, tmp_path, data) == [f"dataset: {refused}"]


def test_review_time_limit(pub, tmp_path, monkeypatch):
    data = _data(pub, tmp_path)
    meta = data / "metadata.jsonl"
    stopped = f"{data}: not read within the time limit (stopped at {meta}:1)"
    assert _loader(data, deadline=time.monotonic() - 1) == stopped
    # Each decode takes 100 s of a fake clock: a 250 s review stops before the 4th image.
    clock = [0.0]
    monkeypatch.setattr(FIO.time, "monotonic", lambda: clock[0])
    square = D._to_square

    def slow(*a, **k):
        clock[0] += 100
        return square(*a, **k)

    monkeypatch.setattr(D, "_to_square", slow)
    stopped = f"{data}: not read within the time limit (stopped at {meta}:4)"
    assert _loader(data, deadline=250.0) == stopped
    clock[0] = 0.0
    assert _service(pub, tmp_path, data, max_review_seconds=250) == [f"dataset: {stopped}"]
