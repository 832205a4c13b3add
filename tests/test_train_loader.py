"""The training loader's fast paths against the libraries they stand in for.

- :class:`dcdb.train.transform.BatchTransform` (per-sample PIL crop in the workers, per-batch
  normalisation) against open_clip's own train ``preprocess`` on the same crops, and its crop
  sampler against torchvision's ``RandomResizedCrop.get_params``;
- :func:`dcdb.train.data.read_tar_samples` against webdataset's ``tarfile`` reader;
- the stream: seeded, full batches, the same images and captions as the per-sample path.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as `dcdb` does before it loads torch

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")


def _preprocess(model: str = "dcdb-tiny"):
    """open_clip's (train, eval) transforms for ``model``; for a built-in model, built from its config
    as ``create_model_and_transforms`` does, without creating the model."""
    from dcdb.train.models import quiet_random_init, register_models

    register_models()
    if model.startswith("dcdb-"):
        with quiet_random_init():
            _, train, val = open_clip.create_model_and_transforms(model)
        return train, val
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=True), open_clip.image_transform(size, is_train=False)


def _jpeg(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    shape = (height, width, 3) if mode == "RGB" else (height, width)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    """Encoded test images: the tiny model's size, larger, smaller, elongated, grayscale, PNG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = [_jpeg(rng, 64, 64), _jpeg(rng, 150, 97), _jpeg(rng, 40, 52), _jpeg(rng, 12, 230),
           _jpeg(rng, 80, 60, "L")]
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    return [*out, buf.getvalue()]


@pytest.mark.parametrize("model", ["dcdb-tiny", "ViT-B-32"])
def test_batch_transform_equals_open_clip_preprocess(model, images, monkeypatch):
    """Same crop → the same float tensor as open_clip's per-sample train preprocess, bit for bit."""
    from torchvision.transforms import RandomResizedCrop

    from dcdb.train.transform import BatchTransform, decode_rgb

    preprocess, _ = _preprocess(model)
    bt = BatchTransform.from_preprocess(preprocess)
    assert bt is not None and bt.size == (preprocess.transforms[0].size[0],) * 2
    rng = random.Random(3)
    crops, expected = [], []
    for data in images:
        for _ in range(3):
            pil = decode_rgb(data)
            params = bt.crop_params(pil.height, pil.width, rng)
            monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(lambda *a, p=params: p))
            expected.append(preprocess(pil))
            crops.append(bt.crop_image(pil, params))
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    got = bt.normalize(batch)
    want = torch.stack(expected)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want), float((got - want).abs().max())


def test_crop_sampler_follows_torchvision():
    """The crop sampler draws what ``RandomResizedCrop.get_params`` draws: same bounds and area and
    aspect ranges, the same centre-crop fallback, close mean crop size."""
    from torchvision.transforms import RandomResizedCrop

    from dcdb.train.transform import BatchTransform

    preprocess, _ = _preprocess()
    bt = BatchTransform.from_preprocess(preprocess)
    rng = random.Random(0)
    torch.manual_seed(0)
    for height, width in [(64, 64), (150, 97), (12, 230), (230, 12), (1, 1)]:
        ours = [bt.crop_params(height, width, rng) for _ in range(400)]
        theirs = [RandomResizedCrop.get_params(torch.empty(3, height, width), list(bt.scale), list(bt.ratio))
                  for _ in range(400)]
        for top, left, h, w in ours:
            assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        if height * width >= 64 and max(height, width) / min(height, width) < 2:
            for _, _, h, w in ours:
                assert bt.scale[0] * 0.9 <= h * w / (height * width) <= 1.0
            assert abs(np.mean([h * w for *_, h, w in ours]) - np.mean([h * w for *_, h, w in theirs])) \
                < 0.02 * height * width
        else:  # no random crop fits: both take the same centre crop
            assert set(ours) == set(theirs) and len(set(ours)) == 1


def test_other_transforms_fall_back_to_per_sample():
    from torchvision import transforms as T

    from dcdb.train.transform import BatchTransform

    train, val = _preprocess()
    assert BatchTransform.from_preprocess(val) is None  # resize + centre crop: not the train transform
    jitter = T.Compose([*train.transforms[:2], T.ColorJitter(0.4), *train.transforms[2:]])
    assert BatchTransform.from_preprocess(jitter) is None
    assert BatchTransform.from_preprocess(lambda img: img) is None


# ------------------------------------------------------------------------------ tar reading


def _write_tar(path, members, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5 if fmt == tarfile.PAX_FORMAT else 0  # a float mtime makes pax headers
            tar.addfile(info, io.BytesIO(data))


def test_fast_tokenizer_gives_open_clip_tokens():
    """The ftfy shortcut changes nothing: captions with entities, control characters, \\r, tabs,
    non-ASCII letters, curly quotes, ligatures, fullwidth forms and line separators."""
    from open_clip.tokenizer import _clean_lower

    from dcdb.train.data import _clean_lower as fast_clean
    from dcdb.train.data import fast_tokenizer
    from dcdb.train.models import register_models

    register_models()
    tok = open_clip.get_tokenizer("dcdb-tiny")
    rng = random.Random(0)
    pieces = ["a", "Dog", " ", "  ", "\t", "\n", "\r", "\r\n", "&amp;", "&lt;b&gt;", "&", "#", "'s", "IMG_2034.jpg",
              "\x00", "\x0b", "\x0c", "\x1b[31m", "\x7f", "\x85", "é", "\u201cq\u201d", "\ufb01", "\uff21",
              "\u2028", "Ã©", "\u00a0", "日本", "x" * 40]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(2000)]
    texts += ["a photo of a red circle", "  Click HERE\n\tnow  ", "Ein Foto", ""]
    assert [fast_clean(t) for t in texts] == [_clean_lower(t) for t in texts]
    fast = fast_tokenizer(tok)
    assert fast is not tok and torch.equal(fast(texts), tok(texts))
    assert fast_tokenizer(str.split) is str.split  # not open_clip's: used as it is


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_read_tar_samples_matches_webdataset(tmp_path, fmt):
    """Same samples, keys and bytes as webdataset's reader: image + caption only, the first image
    extension, upper-case extensions, long names, samples without caption or image skipped
    (webdataset splits the key at the first dot)."""
    from dcdb.train.data import (
        IMAGE_EXTS,
        has_image_and_text,
        image_and_text_only,
        read_tar_samples,
        tar_samples,
    )

    long = "d" * 60 + "/" + "x" * 90  # over 100 bytes: ustar prefix, GNU longname or pax path
    members = [("a.jpg", b"A"), ("a.txt", b"cap a"), ("a.json", b"{}"),
               ("b.PNG", b"B"), ("b.txt", b"cap b"),
               ("c.txt", b"no image"),
               ("e.jpg", b"E1"), ("e.webp", b"E2"), ("e.txt", b"cap e"),
               (f"{long}.jpeg", b"L"), (f"{long}.txt", b"cap long"),
               ("f.jpg", b"no caption"), ("g.seg.jpg", b"G"), ("g.seg.txt", b"cap g")]
    path = tmp_path / "s.tar"
    _write_tar(path, members, fmt)
    ours = list(read_tar_samples(str(path)))
    ref = [image_and_text_only(s) for s in tar_samples(lambda e: False)(iter([{"url": str(path)}]))
           if has_image_and_text(s)]
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in ref] == ["a", "b", "e", long]  # g.seg.*: extension "seg.jpg"
    for a, b in zip(ours, ref):
        assert {k: a[k] for k in (*IMAGE_EXTS, "txt") if k in a} == {k: b[k] for k in b if k != "__key__"}


def test_read_tar_samples_skips_damage_and_reads_compressed(tmp_path, caplog):
    import gzip

    from dcdb.train.data import read_tar_samples

    members = [(f"{k}.{e}", f"{k}{e}".encode()) for k in "abcd" for e in ("jpg", "txt")]
    path = tmp_path / "s.tar"
    _write_tar(path, members)
    raw = bytearray(path.read_bytes())
    raw[2 * 1024 + 148:2 * 1024 + 150] = b"99"  # break the checksum of b.jpg's header
    path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        keys = [s["__key__"] for s in read_tar_samples(str(path))]
    # b.jpg's header cannot be trusted, so neither can the sample before it (dcdb.shards.index rules)
    assert keys == ["c", "d"] and "damaged" in caplog.text
    gz = tmp_path / "z.tar"
    _write_tar(tmp_path / "plain.tar", members)
    gz.write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    assert [s["__key__"] for s in read_tar_samples(str(gz))] == list("abcd")


def test_count_samples_without_stats_reads_tars_as_tarfile_does(tmp_path):
    """No _stats.json: samples are counted from the tar headers (dcdb.tario) with tarfile's
    outcome: a damaged header ends the count, a file that is not a tar or a member cut short is a
    TrainError naming the shard."""
    import gzip

    from dcdb.errors import TrainError
    from dcdb.train.data import count_samples

    def tarfile_count(path):  # what count_samples did with tarfile
        keys: dict[str, set] = {}
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    keys.setdefault(key, set()).add(ext)
        return sum(1 for e in keys.values() if "txt" in e and e & {"jpg", "png"})

    members = [(f"{k}.{e}", f"{k}{e}".encode() * 300) for k in "abcdef" for e in ("jpg", "txt")]
    members += [("g.png", b"G"), ("g.txt", b"g"), ("h.jpg", b"no caption"), ("i.json", b"{}")]
    good = tmp_path / "good" / "s.tar"
    good.parent.mkdir()
    _write_tar(good, members)
    assert count_samples([good]) == tarfile_count(good) == 7
    raw = good.read_bytes()
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(raw[:8192] + b"\xff" * 512 + raw[8192 + 512:])  # c.jpg's header (2048 bytes a member)
    assert count_samples([damaged]) == tarfile_count(damaged) == 2
    bad = {"empty.tar": b"", "gz.tar": gzip.compress(raw), "cut.tar": raw[:5 * 1024 + 100]}
    for name, data in bad.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(tarfile.ReadError):
            tarfile_count(path)
        with pytest.raises(TrainError, match=f"cannot read shard .*{name}"):
            count_samples([path])


# ---------------------------------------------------------------------------------- stream


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from dcdb.train import find_shards
    from dcdb.demo.toy import write_toy_shards

    return find_shards(write_toy_shards(tmp_path_factory.mktemp("toy") / "data", 96, seed=0, shard_size=32))


def _stream(shards, preprocess, tokenizer, seed, workers=0, steps=3):
    from dcdb.train.data import stream_batches

    return [tuple(t.clone() for t in b) for b in stream_batches(
        shards, preprocess=preprocess, tokenizer=tokenizer, batch_size=16, steps=steps, seed=seed,
        workers=workers)]


def test_stream_is_seeded_and_matches_per_sample_path(shards):
    """Batches are reproducible from the seed, in workers or not, and hold what open_clip's
    per-sample path makes of the same samples (same captions; images equal up to the crop)."""
    from dcdb.train.data import BatchTransform

    preprocess, val = _preprocess()
    tokenizer = open_clip.get_tokenizer("dcdb-tiny")
    a = _stream(shards, preprocess, tokenizer, seed=5)
    b = _stream(shards, preprocess, tokenizer, seed=5)
    c = _stream(shards, preprocess, tokenizer, seed=6)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    for images, texts in a:
        assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
        assert texts.shape == (16, 32) and texts.dtype == torch.long
    w1 = _stream(shards, preprocess, tokenizer, seed=5, workers=1)
    w1b = _stream(shards, preprocess, tokenizer, seed=5, workers=1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(w1, w1b))
    # The per-sample path (any transform open_clip gives) sees the same samples in the same order.
    assert BatchTransform.from_preprocess(val) is None
    slow = _stream(shards, val, tokenizer, seed=5)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, slow))
    # Pixel statistics agree: a 0.9-1.0 crop of the same image vs its centre resize.
    fast_mean = torch.stack([x[0].mean((0, 2, 3)) for x in a])
    slow_mean = torch.stack([x[0].mean((0, 2, 3)) for x in slow])
    assert float((fast_mean - slow_mean).abs().max()) < 0.1


def test_toy_shards_json_untouched(shards):
    """The reader returns the image and caption only; the shards still hold their .json."""
    from dcdb.train.data import read_tar_samples

    sample = next(read_tar_samples(shards.shards[0]))
    assert set(sample) == {"__key__", "__url__", "jpg", "txt"}
    with tarfile.open(shards.shards[0]) as tar:
        names = tar.getnames()
    assert f"{sample['__key__']}.json" in names
    assert json.loads(tar_member(shards.shards[0], f"{sample['__key__']}.json"))["caption"] == sample["txt"].decode()


def tar_member(path, name):
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read()


# ------------------------------------------------------------------------------ CPU split


@pytest.mark.parametrize(("cores", "workers", "device", "threads", "expected"), [
    (2, None, "cpu", None, (1, None, 10)),  # 1 decoding worker at low priority; torch on every core
    (4, None, "cpu", None, (3, None, 10)),
    (4, 2, "cpu", None, (2, None, 10)),
    (1, None, "cpu", None, (1, None, 10)),
    (2, 0, "cpu", None, (0, None, 0)),  # no workers: nothing to share
    (8, None, "cpu", None, (4, None, 0)),  # a larger CPU: normal priority
    (2, None, "cuda", None, (1, None, 0)),
    (2, None, "cpu", 1, (1, 1, 10)),  # --threads wins
    (2, None, "cpu", 0, (1, None, 10)),  # --threads 0: torch's default
])
def test_loader_policy(monkeypatch, cores, workers, device, threads, expected):
    from dcdb.train import trainer

    monkeypatch.setattr(trainer, "cpu_cores", lambda: cores)
    p = trainer.loader_policy(workers, device, threads)
    assert (p.workers, p.threads, p.worker_nice) == expected


@pytest.mark.parametrize(("env", "code", "expected"), [
    ({}, "", "10000"),  # nothing set: a short spin
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "", None),  # the user's choice stays
    ({"GOMP_SPINCOUNT": "77"}, "", "77"),
    ({}, "import torch; ", None),  # too late once torch is loaded: leave it
])
def test_short_openmp_spin_only_before_torch_and_never_over_the_user(env, code, expected):
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    prog = (f"{code}import os; from dcdb.openmp import prefer_short_openmp_spin; prefer_short_openmp_spin(); "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", prog], env={**base, **env}, check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == str(expected)


def test_every_dcdb_command_shortens_the_spin_before_torch_loads():
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    prog = ("import os, sys; from dcdb.cli import main\ntry:\n    main(['filters'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules, file=sys.stderr)")
    err = subprocess.run([sys.executable, "-c", prog], env=base, check=True, capture_output=True,
                         text=True).stderr.strip().splitlines()[-1]
    assert err == "10000 False"


def test_worker_nice_lowers_priority():
    import subprocess
    import sys

    code = "import os; from dcdb.train.data import _Nice; a = os.nice(0); _Nice(3)(0); print(os.nice(0) - a)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "3"


@pytest.mark.slow  # two real trainings, each with a dataloader worker process
def test_train_applies_and_restores_the_cpu_split(shards, tmp_path, monkeypatch):
    from dcdb.train import train, trainer

    monkeypatch.setattr(trainer, "cpu_cores", lambda: 2)
    before = torch.get_num_threads()
    seen = []
    real_step = trainer.TrainSession.step

    def step(self, images, texts):
        seen.append(torch.get_num_threads())
        return real_step(self, images, texts)

    monkeypatch.setattr(trainer.TrainSession, "step", step)
    res = train(shards.root, tmp_path / "run", "tiny", seed=0, samples_seen=16 * 5, batch_size=16, workers=1,
                threads=1, progress=False)
    info = json.loads((res.output / "info.json").read_text())
    assert (info["workers"], info["worker_nice"], info["threads"]) == (1, 10, 1)
    assert seen == [1] * 5 and torch.get_num_threads() == before
    seen.clear()
    res = train(shards.root, tmp_path / "run2", "tiny", seed=0, samples_seen=16 * 5, batch_size=16, workers=1,
                progress=False)
    assert seen == [before] * 5
    assert json.loads((res.output / "info.json").read_text())["threads"] == before
