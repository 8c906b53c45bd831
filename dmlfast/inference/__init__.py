"""Using a trained model: load a training checkpoint and embed images (:mod:`.model`), export the
model for serving (:mod:`.export`), and search a gallery index (:mod:`.index`)::

    import dmlfast
    model = dmlfast.load("runs/train/best.pt", device="cpu")      # read without running code from the file
    vectors = model.embed("photos/")                              # float32 (N, D), unit rows
    from dmlfast.inference import GalleryIndex, gallery_from_folder
    index, _ = GalleryIndex.from_gallery(model, *gallery_from_folder("catalogue/"), kind="flat")
    index.query(model, ["query.jpg"], k=8)

The commands ``python -m dmlfast.embed``, ``export`` and ``index`` are thin layers over these.
"""
from dmlfast.training.gallery import gallery_from_folder, gallery_from_list  # a gallery's images, as retrieve lists them

from .export import EXPORT_FORMATS, export_model, exported_metadata
from .index import INDEX_KINDS, GalleryIndex
from .model import EvalTransform, TrainedModel, load

__all__ = ["EXPORT_FORMATS", "INDEX_KINDS", "EvalTransform", "GalleryIndex", "TrainedModel", "export_model", "exported_metadata",
           "gallery_from_folder", "gallery_from_list", "load"]
