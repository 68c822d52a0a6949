"""python -m cloc_jax.annotate --input=GLOB --output=DIR [--detector=cloc:EXPORT_DIR] [--masker=sam:MODEL_DIR]
[-- beam options]"""

from absl import app, flags

from cloc_jax.annotate.beam import run
from cloc_jax.annotate.label import LabelConfig
from cloc_jax.annotate.sam import MaskConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "glob of ArrayRecord shards in the record schema", required=True)
flags.DEFINE_string("output", None, "directory for the labelled shards", required=True)
flags.DEFINE_string("detector", None, "cloc:EXPORT_DIR (self-labelling) or owlv2:MODEL_DIR; unset: keep the boxes")
flags.DEFINE_string("masker", None, "sam:MODEL_DIR (transformers SamModel): one mask per box")
flags.DEFINE_float("mask_jitter", MaskConfig.mask_jitter, "box shift along its diagonal for mask stability")
flags.DEFINE_float("min_mask_stability", MaskConfig.min_mask_stability, "mean mask IoU under jitter to keep (0: off)")
flags.DEFINE_float("threshold", LabelConfig.threshold, "score threshold (owlv2: CLOC 0.1, UMG 0.3; cloc: cosine, 0.5)")
flags.DEFINE_float("nms_iou", LabelConfig.nms_iou, "IoU above which the less confident box is suppressed")
flags.DEFINE_float("min_stability", LabelConfig.min_stability, "mean IoU under box jitter to keep a box (0: off)")
flags.DEFINE_bool("referring", LabelConfig.referring, "also write 'the X left of the Y' referring expressions")
flags.DEFINE_integer("batch_size", 32, "images per detector call")


def main(argv):
    cfg = LabelConfig(
        threshold=FLAGS.threshold,
        nms_iou=FLAGS.nms_iou,
        min_stability=FLAGS.min_stability,
        referring=FLAGS.referring,
    )
    mask_cfg = MaskConfig(mask_jitter=FLAGS.mask_jitter, min_mask_stability=FLAGS.min_mask_stability)
    print(run(FLAGS.input, FLAGS.output, FLAGS.detector, cfg, FLAGS.batch_size, argv[1:], FLAGS.masker, mask_cfg))


if __name__ == "__main__":
    app.run(main)
