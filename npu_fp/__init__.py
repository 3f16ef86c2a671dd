"""npu_fp: was model X derived from model Y? Streaming, distributed lineage fingerprints.

Importing the package does nothing observable: devices are probed and logging is configured only
when a job runs.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
