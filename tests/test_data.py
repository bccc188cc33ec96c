"""Tests of the private data: digits, ImageFolder, the central split and the site partitions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from coautogen_fl.config import DataConfig
from coautogen_fl.data import (
    DataError,
    ImageSet,
    assign_roles,
    central_split,
    load_digits_dataset,
    load_image_folder,
    load_real_dataset,
    partition_indices,
    site_partition,
)

NUM_SITES = 10
KEY = bytes(range(32))  # a site's secret key (tests: fixed)


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_digits_dataset()


@pytest.fixture(scope="module")
def split(digits):
    return central_split(digits, DataConfig())


def all_partitions(labels: np.ndarray, cfg: DataConfig) -> list[np.ndarray]:
    return [partition_indices(labels, NUM_SITES, cfg, p) for p in range(NUM_SITES)]


@pytest.fixture(scope="module")
def iid_parts(split):
    pool, _ = split
    return all_partitions(pool.labels, DataConfig())


@pytest.fixture(scope="module")
def dirichlet_parts(split):
    pool, _ = split
    return all_partitions(pool.labels, DataConfig(partitioner="dirichlet", dirichlet_alpha=0.1))


# --- digits ---------------------------------------------------------------------------------


def test_digits_shape_range_and_classes(digits):
    assert len(digits) == 1797
    assert digits.images.shape == (1797, 28, 28)
    assert digits.images.dtype == np.float32
    assert digits.images.min() == 0.0
    assert digits.images.max() == 1.0
    assert digits.class_names == tuple(str(d) for d in range(10))
    assert set(np.unique(digits.labels)) == set(range(10))
    assert digits.labels.dtype == np.int64
    # ink is bright on a dark background: the mean is well below one half
    assert digits.images.mean() < 0.4


def test_digits_match_sklearn_scans_after_downsampling(digits):
    from sklearn.datasets import load_digits

    raw = load_digits().images / 16.0
    # image_size 8 is the scans themselves (up to uint8 quantisation)
    small = load_digits_dataset(image_size=8)
    np.testing.assert_allclose(small.images, raw, atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(small.labels, digits.labels)


def test_digits_three_channels():
    rgb = load_digits_dataset(image_size=16, channels=3)
    assert rgb.images.shape == (1797, 16, 16, 3)
    np.testing.assert_array_equal(rgb.images[..., 0], rgb.images[..., 2])


def test_load_real_dataset_dispatches_on_name(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load_real_dataset(DataConfig(name=str(tmp_path / "no_such_folder")))


# --- central split --------------------------------------------------------------------------


def test_central_split_is_the_reference_protocol(digits, split):
    from sklearn.model_selection import train_test_split

    pool, test = split
    assert len(test) == 540
    assert len(pool) == 1257
    ref_pool, ref_test = train_test_split(np.arange(1797), test_size=0.3, stratify=digits.labels, random_state=0)
    np.testing.assert_array_equal(test.labels, digits.labels[np.sort(ref_test)])
    np.testing.assert_array_equal(pool.images, digits.images[np.sort(ref_pool)])


def test_central_split_is_disjoint_and_stratified(digits, split):
    pool, test = split
    all_counts = np.bincount(digits.labels, minlength=10)
    test_counts = np.bincount(test.labels, minlength=10)
    pool_counts = np.bincount(pool.labels, minlength=10)
    np.testing.assert_array_equal(test_counts + pool_counts, all_counts)
    # stratified: each class holds ~30 % of its images in the test split (rounding only)
    assert np.all(np.abs(test_counts - 0.3 * all_counts) <= 1.0)
    # disjoint: no image appears in both (compare raw bytes of the images)
    pool_keys = {img.tobytes() + bytes([lbl]) for img, lbl in zip(pool.images, pool.labels)}
    test_keys = {img.tobytes() + bytes([lbl]) for img, lbl in zip(test.images, test.labels)}
    assert len({img.tobytes() for img in digits.images}) == 1797  # all images are distinct
    assert pool_keys.isdisjoint(test_keys)


def test_central_split_depends_on_seed(digits, split):
    other_pool, other_test = central_split(digits, DataConfig(seed=1))
    assert len(other_test) == 540
    assert not np.array_equal(other_test.images, split[1].images)


# --- partitions -----------------------------------------------------------------------------


def test_iid_partition_covers_the_pool_disjointly(split, iid_parts):
    pool, _ = split
    assert len(iid_parts) == NUM_SITES
    everything = np.concatenate(iid_parts)
    assert everything.size == len(pool)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(pool)))
    sizes = [p.size for p in iid_parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partition_is_not_sorted_by_label(split, iid_parts):
    pool, _ = split
    for part in iid_parts:
        counts = np.bincount(pool.labels[part], minlength=10)
        assert counts.min() >= 3  # every site sees every digit


def test_partition_is_deterministic(split, iid_parts):
    pool, _ = split
    again = all_partitions(pool.labels, DataConfig())
    for a, b in zip(iid_parts, again):
        np.testing.assert_array_equal(a, b)


def _label_skew(pool_labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label distribution and the pool's."""
    overall = np.bincount(pool_labels, minlength=10) / pool_labels.size
    distances = []
    for part in parts:
        if part.size == 0:
            continue
        site = np.bincount(pool_labels[part], minlength=10) / part.size
        distances.append(0.5 * np.abs(site - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_partition_is_label_skewed(split, iid_parts, dirichlet_parts):
    pool, _ = split
    everything = np.concatenate(dirichlet_parts)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(pool)))
    iid_skew = _label_skew(pool.labels, iid_parts)
    dirichlet_skew = _label_skew(pool.labels, dirichlet_parts)
    assert iid_skew < 0.15
    assert dirichlet_skew > 0.4
    # alpha 0.1: a typical site misses several digits entirely
    missing = [int((np.bincount(pool.labels[p], minlength=10) == 0).sum()) for p in dirichlet_parts]
    assert np.mean(missing) >= 2


def test_site_partition_train_and_test_are_disjoint(split, iid_parts):
    pool, _ = split
    cfg = DataConfig()
    site = site_partition(pool, 3, NUM_SITES, cfg, KEY)
    share = iid_parts[3]
    assert site.partition_id == 3
    assert len(site.train) + len(site.test) == share.size
    # each image is a test image with probability site_test_fraction, independently
    sd = np.sqrt(share.size * cfg.site_test_fraction * (1 - cfg.site_test_fraction))
    assert abs(len(site.test) - share.size * cfg.site_test_fraction) < 4 * sd
    # each image of the share lands in exactly one of train/test
    share_images = pool.images[share].reshape(share.size, -1)
    train_rows = {r.tobytes() for r in site.train.images.reshape(len(site.train), -1)}
    test_rows = {r.tobytes() for r in site.test.images.reshape(len(site.test), -1)}
    assert train_rows.isdisjoint(test_rows)
    assert train_rows | test_rows == {r.tobytes() for r in share_images}
    np.testing.assert_array_equal(
        np.bincount(site.train.labels, minlength=10) + np.bincount(site.test.labels, minlength=10),
        np.bincount(pool.labels[share], minlength=10),
    )


def test_site_partitions_of_different_sites_are_disjoint(split):
    pool, _ = split
    a = site_partition(pool, 0, NUM_SITES, DataConfig(), KEY)
    b = site_partition(pool, 1, NUM_SITES, DataConfig(), KEY)
    rows_a = {r.tobytes() for r in a.train.images.reshape(len(a.train), -1)}
    rows_b = {r.tobytes() for r in b.train.images.reshape(len(b.train), -1)}
    assert rows_a.isdisjoint(rows_b)  # the 1,797 digits are pairwise distinct images


def test_real_per_label_cap_is_respected(split):
    pool, _ = split
    uncapped = site_partition(pool, 2, NUM_SITES, DataConfig(), KEY)
    capped = site_partition(pool, 2, NUM_SITES, DataConfig(real_per_label=3), KEY)
    counts = np.bincount(capped.train.labels, minlength=10)
    assert counts.max() == 3
    np.testing.assert_array_equal(counts, np.minimum(np.bincount(uncapped.train.labels, minlength=10), 3))
    # the cap applies to the voting (train) split only
    np.testing.assert_array_equal(capped.test.labels, uncapped.test.labels)


def _roles(data: ImageSet, key: bytes, cap: int = 0) -> dict[bytes, str]:
    voters, test = assign_roles(data, key, 0.2, cap)
    rows = data.images.reshape(len(data), -1)
    roles = {rows[i].tobytes(): "test" for i in test}
    roles.update({rows[i].tobytes(): "vote" for i in voters})
    return roles  # images not listed are capped out


@pytest.mark.parametrize("cap", [0, 4])
def test_adding_one_image_moves_no_other_image_between_roles(digits, cap):
    """Finding 2 of issue 8: each image's role depends on that image alone (no cap), and with
    the -rvpl cap one added image pushes out at most one other voter."""
    base = digits.subset(np.arange(200))
    for extra in range(200, 230):
        plus = digits.subset(np.arange(extra + 1)[np.r_[0:200, extra]])
        before, after = _roles(base, KEY, cap), _roles(plus, KEY, cap)
        added = plus.images[-1].reshape(-1).tobytes()
        changed = [k for k in before if before[k] != after.get(k, "capped")]
        changed += [k for k in after if k != added and k not in before]
        if cap == 0:
            assert changed == [] and set(after) == set(before) | {added}
        else:
            assert len(changed) <= 1 and all(before[k] == "vote" for k in changed if k in before)


def test_roles_are_set_by_the_sites_key(digits):
    data = digits.subset(np.arange(300))
    assert _roles(data, KEY) == _roles(data, KEY)
    assert _roles(data, KEY) != _roles(data, bytes(32))  # another site's key: another split


def test_partition_id_out_of_range_is_refused(split):
    pool, _ = split
    with pytest.raises(DataError, match=r"partition-id 10 is outside \[0, 10\)"):
        site_partition(pool, 10, NUM_SITES, DataConfig(), KEY)


def test_site_with_fewer_than_two_images_is_refused(digits):
    pool = digits.subset(np.arange(15))  # 10 sites: five hold 2 images, five hold 1
    with pytest.raises(DataError) as info:
        site_partition(pool, 9, NUM_SITES, DataConfig(), KEY)
    assert "site 9 holds 1 private images" in str(info.value)
    assert "federation.num_hospitals" in str(info.value)


def test_more_sites_than_images_is_a_data_error(digits):
    # 5 images over 10 sites: some sites get nothing. This must be the same helpful DataError
    # (mentioning federation.num_hospitals), not an IndexError from the partitioner.
    pool = digits.subset(np.arange(5))
    with pytest.raises(DataError, match="federation.num_hospitals"):
        site_partition(pool, 0, NUM_SITES, DataConfig(), KEY)


# --- ImageFolder ----------------------------------------------------------------------------


def _write_folder(root, per_class: int = 3):
    rng = np.random.default_rng(0)
    for name, value in (("cat", 40), ("dog", 200)):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((12, 10), value, dtype=np.uint8)
            pixels[0, 0] = rng.integers(0, 255)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    (root / ".hidden").mkdir()


def test_image_folder_loads_classes_sorted_with_labels(tmp_path):
    _write_folder(tmp_path)
    data = load_image_folder(tmp_path, image_size=16)
    assert data.class_names == ("cat", "dog")
    assert data.images.shape == (6, 16, 16)
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])
    # resized uniform images keep their grey level, scaled to [0, 1]
    np.testing.assert_allclose(data.images[0, 8, 8], 40 / 255, atol=1e-6)
    np.testing.assert_allclose(data.images[3, 8, 8], 200 / 255, atol=1e-6)
    rgb = load_image_folder(tmp_path, image_size=8, channels=3)
    assert rgb.images.shape == (6, 8, 8, 3)


def test_image_folder_through_load_real_dataset_and_site_split(tmp_path):
    from coautogen_fl.data import load_site_from_folder

    _write_folder(tmp_path, per_class=5)
    cfg = DataConfig(name=str(tmp_path), image_size=8)
    assert len(load_real_dataset(cfg)) == 10
    site = load_site_from_folder(tmp_path, cfg, partition_id=4, key=KEY)
    assert site.partition_id == 4
    assert len(site.train) + len(site.test) == 10


def test_corrupt_image_raises_data_error_naming_the_file(tmp_path):
    _write_folder(tmp_path)
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path, on_bad_image="error")
    assert str(bad) in str(info.value)
    assert "cannot read 1 image file" in str(info.value) and "data.on_bad_image=skip" in str(info.value)


def test_truncated_image_raises_data_error_naming_the_file(tmp_path):
    _write_folder(tmp_path)
    good = tmp_path / "cat" / "0.png"
    big = tmp_path / "cat" / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)).save(big)
    big.write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
    assert good.is_file()
    with pytest.raises(DataError, match="big.png"):
        load_image_folder(tmp_path, on_bad_image="error")
    skipped = load_image_folder(tmp_path)  # the default skips it and says so in the report
    assert [path for path, _ in skipped.report.skipped] == [big] and len(skipped) == 6


def test_missing_folder_is_a_data_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_image_folder(missing)
    assert str(missing) in str(info.value)
    assert "data.name" in str(info.value)


def test_folder_with_one_class_is_refused(tmp_path):
    (tmp_path / "only").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(DataError, match="1 class folders and 1 images"):
        load_image_folder(tmp_path)


# --- ImageFolder checks (issue 9) -----------------------------------------------------------


def _png(path, value: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((12, 10), value, dtype=np.uint8)
    pixels[0, :4] = np.random.default_rng(seed).integers(0, 255, 4)
    Image.fromarray(pixels).save(path)


def test_unreadable_files_are_skipped_counted_and_all_listed(tmp_path):
    _write_folder(tmp_path, per_class=4)
    clean = load_image_folder(tmp_path)
    bad = [tmp_path / "dog" / "broken.png", tmp_path / "cat" / "empty.jpg", tmp_path / "cat" / "half.png"]
    bad[0].write_bytes(b"this is not a png")
    bad[1].write_bytes(b"")
    _png(bad[2], 90)
    bad[2].write_bytes(bad[2].read_bytes()[:40])  # truncated

    data = load_image_folder(tmp_path)  # the default: on_bad_image=skip
    assert data.report is not None
    assert sorted(path for path, _ in data.report.skipped) == sorted(bad)  # all of them, in one pass
    assert all(reason for _, reason in data.report.skipped)
    assert data.report.class_counts == {"cat": 4, "dog": 4}
    problems = data.report.problems()
    assert problems[0].startswith("3 unreadable image file(s) skipped") and all(
        any(str(p) in line for line in problems) for p in bad
    )
    # A skipped file is simply not an image of the folder: everything else is as without it.
    np.testing.assert_array_equal(data.images, clean.images)
    np.testing.assert_array_equal(data.labels, clean.labels)
    np.testing.assert_array_equal(assign_roles(data, KEY, 0.3)[0], assign_roles(clean, KEY, 0.3)[0])

    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path, on_bad_image="error")
    message = str(info.value)
    assert "cannot read 3 image file(s)" in message and all(str(p) in message for p in bad) and "\n" not in message


def test_a_folder_of_only_unreadable_files_is_a_data_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 2 image files"):
        load_image_folder(tmp_path)


def test_on_bad_image_is_validated():
    from coautogen_fl.config import ConfigError, load_config

    assert load_config().data.on_bad_image == "skip"
    assert load_config(overrides=["data.on_bad_image=error"]).data.on_bad_image == "error"
    with pytest.raises(ConfigError, match="data.on_bad_image"):
        load_config(overrides=["data.on_bad_image=ignore"])


def test_images_nested_below_class_folders_are_included_under_their_class(tmp_path):
    _png(tmp_path / "cat" / "0.png", 40)
    _png(tmp_path / "cat" / "scan1" / "1.png", 41)
    _png(tmp_path / "cat" / "scan1" / "deeper" / "2.png", 42)
    _png(tmp_path / "dog" / "0.png", 200)
    _png(tmp_path / "dog" / "2024" / "1.png", 201)
    _png(tmp_path / "dog" / ".ipynb_checkpoints" / "0-checkpoint.png", 200)  # hidden: not an image of the site
    (tmp_path / "dog" / "2024" / "scan.dcm").write_bytes(b"DICM")
    data = load_image_folder(tmp_path)
    assert data.class_names == ("cat", "dog")
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1])
    np.testing.assert_allclose(data.images[:, 8, 8] * 255, [40, 41, 42, 200, 201], atol=1e-3)
    assert data.report.nested == 3
    notes = data.report.notes()
    assert any("3 image(s) found in sub-folders" in line for line in notes)
    assert any(".dcm x1" in line for line in notes)  # files of other types are named, not dropped silently
    assert data.report.problems() == []


def test_a_symlink_loop_below_a_class_folder_is_walked_once(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "cat" / "loop").symlink_to(tmp_path / "cat", target_is_directory=True)
    data = load_image_folder(tmp_path)
    assert len(data) == 6


def test_empty_and_one_image_classes_are_reported_and_keep_their_labels(tmp_path):
    _png(tmp_path / "a" / "0.png", 10)
    _png(tmp_path / "a" / "1.png", 11)
    (tmp_path / "b").mkdir()  # empty class
    _png(tmp_path / "c" / "0.png", 30)  # one image
    _png(tmp_path / "d" / "0.png", 40)
    _png(tmp_path / "d" / "1.png", 41)
    (tmp_path / "d" / "broken.png").write_bytes(b"junk")  # two files, one readable: a small class too
    _png(tmp_path / "stray.png", 99)  # in no class folder
    data = load_image_folder(tmp_path)
    assert data.class_names == ("a", "b", "c", "d")
    np.testing.assert_array_equal(data.labels, [0, 0, 2, 3, 3])  # "b" keeps label 1 though it is empty
    assert data.report.class_counts == {"a": 2, "b": 0, "c": 1, "d": 2}
    assert data.report.small_classes == {"b": 0, "c": 1}
    problems = "\n".join(data.report.problems())
    assert "class 'b' holds no readable images" in problems and "class 'c' holds 1 readable image" in problems
    assert str(tmp_path / "stray.png") in problems and "broken.png" in problems


def test_a_folder_without_images_is_a_data_folder_error_naming_the_key(tmp_path):
    from coautogen_fl.data import DataFolderError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataFolderError, match="2 class folders and 0 images") as info:
        load_image_folder(tmp_path, key="node config data-path")
    assert "node config data-path" in str(info.value) and "data.name" not in str(info.value)
    with pytest.raises(DataFolderError, match="data folder not found") as info:
        load_image_folder(tmp_path / "nowhere", key="node config data-path")
    assert "node config data-path" in str(info.value) and "data.name" not in str(info.value)


def test_load_pool_keeps_the_folders_report(tmp_path):
    from coautogen_fl.data import load_pool_and_test

    _write_folder(tmp_path, per_class=6)
    (tmp_path / "dog" / "broken.png").write_bytes(b"junk")
    pool, test = load_pool_and_test(DataConfig(name=str(tmp_path), image_size=8, test_fraction=0.3))
    assert len(pool) + len(test) == 12
    assert [path.name for path, _ in pool.report.skipped] == ["broken.png"]
