import pytest

from memfree_testbed.data import build_dataset, load_dataset


# The data these tests were written on: v2's drawing, LAION verbatim captions, 2,400 ordinary images and every
# planted item 50 times (the bundled v6 recipe, the builder's default, is style v3, named, 5,760 and 20).
V2_ERA = dict(style="v2", verbatim_captions="laion", n_ordinary=2400, repeats=50)


@pytest.fixture(scope="session")
def v2_era() -> dict:
    return dict(V2_ERA)


@pytest.fixture(scope="session")
def testbed_data(tmp_path_factory):
    """The full default data set (seed 0), built once per test session (about 6 s)."""
    path = tmp_path_factory.mktemp("testbed_data")
    build_dataset(path, seed=0, **V2_ERA)
    images, manifest = load_dataset(path)
    return path, images, manifest


@pytest.fixture(scope="session")
def testbed_data_v3(tmp_path_factory):
    """The same data set drawn in style v3."""
    path = tmp_path_factory.mktemp("testbed_data_v3")
    build_dataset(path, seed=0, **{**V2_ERA, "style": "v3"})
    images, manifest = load_dataset(path)
    return path, images, manifest
