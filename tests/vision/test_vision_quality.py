"""The judge, the Frechet distance, the data file and the PNG writer."""
import zlib

import numpy as np
import torch

from linattn.vision.data import TEST_SIZE, digits_from_sklearn, digits_split, load_arrays, split_indices, to_pixels
from linattn.vision.png import image_grid, write_png
from linattn.vision.quality import frechet_distance, sample_quality, train_judge


def test_frechet_distance_zero_for_a_set_with_itself_and_grows_with_a_shift():
    torch.manual_seed(0)
    a = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = torch.tensor([0.5, 0, 0, 0, 0, 0], dtype=torch.float64)
    assert abs(frechet_distance(a, a + shift) - 0.25) < 1e-8  # equal covariances: |shift|^2
    assert frechet_distance(a, a + 2 * shift) > frechet_distance(a, a + shift)
    assert frechet_distance(a, 2 * a) > 1  # a covariance change counts too


def test_judge_reads_real_digits_and_sample_quality_of_real_test_images():
    judge = train_judge(seed=0, steps=150)
    x, y = digits_split("test")
    q = sample_quality(judge, x, y, x)
    assert q["sample_accuracy"] > 0.85 and abs(q["fd"]) < 1e-6
    noise = torch.rand_like(x) * 2 - 1
    bad = sample_quality(judge, noise, y, x)
    assert bad["sample_accuracy"] < 0.5 and bad["fd"] > 10 * max(q["fd"], 1e-3)
    assert len(q["per_class_accuracy"]) == 10


def test_data_file_is_sklearn_digits_and_the_split_is_fixed():
    images, labels = load_arrays()
    ref_images, ref_labels = digits_from_sklearn()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)
    s = split_indices(1797)
    assert len(s["test"]) == TEST_SIZE and not set(s["test"]) & set(s["train"])
    assert np.array_equal(s["test"], split_indices(1797)["test"])
    x, y = digits_split("train")
    assert x.shape == (1797 - TEST_SIZE, 1, 8, 8) and x.min() == -1 and x.max() == 1
    assert torch.equal(to_pixels(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0, 128, 255], dtype=torch.uint8))


def test_png_grid_round_trip(tmp_path):
    pix = torch.arange(3 * 2 * 2, dtype=torch.uint8).view(3, 2, 2) * 10
    grid = image_grid(pix, columns=2, zoom=2, gap=1)
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1)
    assert int(grid[1, 1]) == 0 and int(grid[1, 3]) == 10 and int(grid[6, 6]) == 255  # empty slot white
    path = write_png(tmp_path / "g.png", grid)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    raw = zlib.decompress(data[idat + 4:idat + 4 + length])
    rows = [raw[r * 12 + 1:(r + 1) * 12] for r in range(11)]
    assert bytes(grid.flatten().tolist()) == b"".join(rows)
