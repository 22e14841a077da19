"""The batched path: decode once into the Hugging Face cache, then index tensors a batch at a time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_helpers import image_dataset

from learnloop.data import BatchedDataset, batched_loader, decode_images, load_local

SRC = str(Path(__file__).resolve().parents[2] / "src")


class TestDecodeImages:
    @pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
    def test_pixels(self, mode, channels):
        """Each image becomes a uint8 (C, H, W) array with PIL's pixel values."""
        ds = image_dataset(4, size=(6, 5), mode=mode)
        decoded = decode_images(ds)
        x = np.asarray(decoded.with_format("numpy")[:]["image"])
        assert x.shape == (4, channels, 5, 6)
        want = np.asarray(ds[3]["image"])
        assert np.array_equal(
            x[3], want[None] if mode == "L" else want.transpose(2, 0, 1)
        )

    def test_in_memory_has_no_cache_files(self):
        """A dataset built in memory is decoded in memory: no cache files appear."""
        assert decode_images(image_dataset(3)).cache_files == []

    def test_cached_across_processes(self, png_dir, tmp_path):
        """A second process loads the decoded images from the cache instead of decoding again."""
        cache = str(tmp_path / "hf-cache")
        first = decode_images(
            load_local(png_dir, cache_dir=cache)["train"]
        ).cache_files[0]["filename"]
        assert first.startswith(cache)
        mtime = os.stat(first).st_mtime_ns
        code = (
            "from learnloop.data import decode_images, load_local; import sys; "
            "print(decode_images(load_local(sys.argv[1], cache_dir=sys.argv[2])['train']).cache_files[0]['filename'])"
        )
        env = {**os.environ, "PYTHONPATH": SRC}
        out = subprocess.run(
            [sys.executable, "-c", code, str(png_dir), cache],
            check=False,
            capture_output=True,
            text=True,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == first and os.stat(first).st_mtime_ns == mtime

    def test_different_sizes(self):
        """Images of different sizes fail naming the image and both shapes."""
        with pytest.raises(
            ValueError,
            match=r"image 2 \(item 2 of its batch\) has shape \(1, 5, 7\).*image 0 has \(1, 5, 6\)",
        ):
            decode_images(image_dataset(4, size=(6, 5), odd=2))

    def test_no_images_unchanged(self, hf_dataset):
        """A dataset without Image columns is returned as it is."""
        assert decode_images(hf_dataset) is hf_dataset


class TestBatchedDataset:
    def test_from_hf_keeps_row_order(self, hf_dataset):
        """Columns follow the dataset's rows, including a selection's index mapping."""
        sub = hf_dataset.select([5, 2, 7])
        bds = BatchedDataset.from_hf(sub)
        x, y = bds[[0, 1, 2]]
        assert y.tolist() == sub["label"]
        assert torch.equal(
            x, torch.as_tensor(np.asarray(sub.with_format("numpy")["image"]))
        )
        assert x.dtype == torch.uint8 and len(bds) == 3

    def test_tfms_run_on_the_batch(self):
        """Transforms receive the batch dict and their result is returned as a tuple."""

        def double(b):
            b["x"] = b["x"] * 2
            return b

        bds = BatchedDataset(
            {"x": torch.arange(4.0), "y": torch.arange(4)}, tfms=double
        )
        assert bds[[1, 3]][0].tolist() == [2.0, 6.0]

    def test_tfm_returning_none(self):
        """A batch transform that returns None fails saying so and suggesting `return b` or @inplace."""

        def norm(b):
            b["x"] = b["x"] / 2

        with pytest.raises(
            TypeError,
            match=r"norm \(in batch_tfms\) returned None.*`return b`.*@inplace",
        ):
            BatchedDataset({"x": torch.arange(4.0)}, tfms=[norm])[[0]]

    def test_unequal_lengths(self):
        """Columns of different lengths are refused, naming the lengths."""
        with pytest.raises(ValueError, match="one length"):
            BatchedDataset({"x": torch.arange(4), "y": torch.arange(3)})

    def test_string_column(self, hf_dataset):
        """A text column cannot be batched into a tensor: the error names it and the fix."""
        ds = hf_dataset.add_column("name", [str(i) for i in range(len(hf_dataset))])
        with pytest.raises(
            ValueError, match=r"Column 'name'.*remove_columns\(\['name'\]\)"
        ):
            BatchedDataset.from_hf(ds)


class TestBatchedLoader:
    @pytest.mark.parametrize(
        ("shuffle", "drop_last", "n_batches"),
        [(False, False, 3), (True, False, 3), (True, True, 2)],
    )
    def test_epoch(self, shuffle, drop_last, n_batches):
        """One epoch visits every row once, in whole batches, shuffled if asked."""
        bds = BatchedDataset({"i": torch.arange(10)})
        dl = batched_loader(bds, 4, shuffle=shuffle, drop_last=drop_last)
        seen = torch.cat([b[0] for b in dl])
        assert len(dl) == n_batches and len(seen) == (8 if drop_last else 10)
        assert len(set(seen.tolist())) == len(seen)
        assert (seen.tolist() == list(range(10))) is not shuffle

    def test_workers(self):
        """Batches also come whole from worker processes."""
        bds = BatchedDataset({"i": torch.arange(10)})
        dl = batched_loader(bds, 5, num_workers=1)
        assert [b[0].tolist() for b in dl] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_with_transform_refused(hf_dataset):
    """A per-item transform is not silently dropped by the batched path: it is refused, pointing at batch_tfms."""
    with pytest.raises(ValueError, match="with_transform.*batch_tfms"):
        BatchedDataset.from_hf(hf_dataset.with_transform(lambda b: b))


def test_formatted_image_dataset():
    """An image dataset already in torch format decodes all the same."""
    x, _ = BatchedDataset.from_hf(image_dataset(3).with_format("torch"))[[0, 1, 2]]
    assert x.shape == (3, 1, 5, 6) and x.dtype == torch.uint8


def test_16_bit_images_refused(tmp_path):
    """16-bit images are refused rather than truncated to uint8, with the fix (a column mode)."""
    import datasets
    from PIL import Image

    Image.new("I;16", (4, 4)).save(tmp_path / "a.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")]}).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(ValueError, match=r"not 8-bit.*Image\(mode='L'\)"):
        decode_images(ds)
