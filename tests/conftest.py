"""Shared fixtures: small synthetic VOC and COCO trees, generated once per session.

Each returns the dict of paths ``trainers.data.synthetic.make_synthetic`` returns
(VOC: ``root``, ``train_sets``, ``test_sets``, ``class_names``, ``manifest``; COCO:
``train_ann``, ``train_images``, ``val_ann``, ``val_images``, ``class_names``,
``manifest``). Treat the trees as read-only; copy them to break them.
"""

import pytest
import torch

from trainers.data.synthetic import make_synthetic

# The tests train tiny models: one thread is the fastest on small convolutions and
# keeps the suite's time steady on a shared 2-core machine.
torch.set_num_threads(1)

SYNTHETIC_IMAGES = 64


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synthetic_voc"), format="voc",
                          images=SYNTHETIC_IMAGES, seed=0)


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synthetic_coco"), format="coco",
                          images=SYNTHETIC_IMAGES, seed=0)
