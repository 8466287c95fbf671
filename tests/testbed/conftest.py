import pytest

from memfree_testbed.data import build_dataset, load_dataset


@pytest.fixture(scope="session")
def testbed_data(tmp_path_factory):
    """The full default data set (seed 0), built once per test session (about 6 s)."""
    path = tmp_path_factory.mktemp("testbed_data")
    build_dataset(path, seed=0)
    images, manifest = load_dataset(path)
    return path, images, manifest


@pytest.fixture(scope="session")
def testbed_data_v3(tmp_path_factory):
    """The same data set drawn in style v3."""
    path = tmp_path_factory.mktemp("testbed_data_v3")
    build_dataset(path, seed=0, style="v3")
    images, manifest = load_dataset(path)
    return path, images, manifest
