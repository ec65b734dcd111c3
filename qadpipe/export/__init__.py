"""Stage three: write the trained student for serving.

``fake`` bakes Q(W) into an ordinary BF16 HF checkpoint; ``compressed-tensors`` packs the
same codes and scales into the checkpoint layout vLLM loads.  :func:`run_export` is the
``qadpipe export`` command; :func:`export_model` exports an in-memory student.
"""

from qadpipe.export.runner import ExportResult, export_model, run_export

__all__ = ["ExportResult", "export_model", "run_export"]
