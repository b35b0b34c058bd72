"""Detectors: torchvision's Faster R-CNN, Mask R-CNN and RetinaNet whose training
forward returns the raw (unweighted) loss of every head, so a loss-weighting method
can act on one head's (cls, reg) pair.

- ``build_detector(model)`` (a ``trainers.config.ModelConfig``) / ``DETECTORS``:
  trainers/detectors/build.py
- one file per family: two_stage.py (Faster/Mask R-CNN), retinanet.py, and the Table 3
  detectors built on Faster R-CNN: libra_rcnn.py, dynamic_rcnn.py, double_head_rcnn.py
  (docs/table3_detectors.md); backbones.py (tiny and ResNet-FPN backbones, anchors,
  cached ImageNet weights)

Train-mode output keys: two-stage ``rpn_cls``, ``rpn_reg``, ``roi_cls``, ``roi_reg``
(+ ``mask``); RetinaNet ``retina_cls``, ``retina_reg``. Every model has
``weighted_head`` ("rpn" / "retina"; may be set to "roi") and, after a train forward,
``kpis`` = {"cls_acc", "reg_iou"} (detached scalars) for that head.
"""

from trainers.detectors.build import DETECTORS, build_detector

__all__ = ["DETECTORS", "build_detector"]
