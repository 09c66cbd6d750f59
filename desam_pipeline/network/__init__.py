"""The DeSAM network: PRIM on SAM's decoder and the PDMM mask module."""
from desam_pipeline.network.desam import DeSAM

__all__ = ["DeSAM"]
